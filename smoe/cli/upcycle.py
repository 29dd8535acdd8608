"""``smoe upcycle``: sparse upcycling of a dense model (Komatsuzaki et al. 2023) into an MoE that training continues."""

from __future__ import annotations

import argparse
import json

from smoe.cli.common import non_negative_int, parse_sets, positive_float, positive_int

EPILOG = """examples:
  smoe train --preset lm_small_dense --out runs/dense                  # a dense run to start from
  smoe upcycle --from runs/dense --experts 8 --top-k 2 --out runs/moe  # every other FFN -> 8 copies, fresh router
  smoe train --resume-from runs/moe --steps 1200                       # continue it (schedule and data continue)
  smoe eval runs/moe
  smoe upcycle --from runs/vit --router expert_choice --top-k 2 --capacity-factor 2 --normalize-weights --out runs/v
  smoe upcycle --from smollm2 --experts 8 --top-k 2 --out runs/smol-moe      # SmolLM2-135M, offline package
  smoe upcycle --from minilm --experts 4 --layers all --out runs/minilm-moe  # all-MiniLM-L6-v2 (BERT)

--from takes an smoe run folder, one of its checkpoints, a local Hugging Face model folder, or an offline model
name (smollm2, minilm). An smoe source gives a run folder whose checkpoint sits at the dense checkpoint's step; a
Hugging Face source gives a save_pretrained folder (config.json records the upcycling; smoe.interop.load_upcycled
reads it back), which `smoe train --resume-from` and `smoe eval` take too.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "upcycle",
        help="turn a dense model's FFNs into MoE layers of copies (sparse upcycling)",
        description="Sparse upcycling: each chosen dense FFN becomes an MoE layer whose experts all start as copies "
        "of it, behind a fresh router; everything else is kept.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--from", dest="source", required=True, metavar="RUN_OR_PATH", help="the dense model")
    p.add_argument("--out", required=True, help="the folder to write (must not hold a run)")
    p.add_argument("--experts", type=positive_int, default=8, help="experts per upcycled layer (default 8)")
    p.add_argument("--top-k", type=positive_int, default=2, help="experts per token (expert choice: capacity)")
    p.add_argument("--router", default="token_choice", help="a registered router (smoe ls routers)")
    p.add_argument(
        "--router-option",
        action="append",
        metavar="KEY=VALUE",
        help="a router option, repeatable (e.g. order=topk_softmax); values are read as JSON, else as text",
    )
    p.add_argument(
        "--layers",
        default="every_other",
        help="every_other (FFNs 1, 3, 5, ...: the paper's half), all, or comma-separated FFN indices (0,2,4)",
    )
    p.add_argument("--noise", type=float, default=0.0, help="relative std of a perturbation of each copy (0)")
    p.add_argument("--capacity-factor", type=positive_float, help="capacity factor (default: dropless)")
    p.add_argument(
        "--normalize-weights",
        action="store_true",
        help="renormalise each token's combine weights after routing (the paper's vision recipe)",
    )
    p.add_argument("--group-mode", choices=("batch", "sequence", "position"), help="routing groups")
    p.add_argument(
        "--allow-token-coupling", action="store_true", help="accept a router that leaks future tokens in a decoder"
    )
    p.add_argument(
        "--optimizer",
        choices=("fresh", "tile"),
        help="smoe runs: drop the dense Adam moments (fresh; default for LMs) or tile them into the experts "
        "(tile; default for vision), as the paper",
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the router init and the noise")
    p.add_argument("--use-intact", action="store_true", help="take the newest intact checkpoint if it is damaged")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)
    return p


def _layers(text: str):
    if text in ("every_other", "all"):
        return text
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--layers must be every_other, all or comma-separated integers, got {text!r}") from None


def _router_options(items: list[str] | None) -> dict:
    out = {}
    for key, text in parse_sets(items).items():
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def run(args: argparse.Namespace) -> int:
    import pathlib  # noqa: PLC0415

    from smoe.interop.hf_upcycle import OFFLINE_MODELS, is_hf_model_dir  # noqa: PLC0415

    options = dict(
        num_experts=args.experts,
        top_k=args.top_k,
        router=args.router,
        layers=_layers(args.layers),
        noise=args.noise,
        capacity_factor=args.capacity_factor,
        router_kwargs=_router_options(args.router_option),
        normalize_weights=args.normalize_weights,
        group_mode=args.group_mode,
        allow_token_coupling=args.allow_token_coupling,
        seed=args.seed,
    )
    if args.source in OFFLINE_MODELS or is_hf_model_dir(args.source):
        if args.optimizer is not None:
            raise ValueError("--optimizer applies to smoe runs; a Hugging Face model on disk has no optimizer state")
        from smoe.train.hf_lm import upcycle_pretrained  # noqa: PLC0415

        summary = upcycle_pretrained(args.source, args.out, **options)
    else:
        if not pathlib.Path(args.source).exists():
            raise ValueError(
                f"--from {args.source!r} is neither a path nor an offline model name ({sorted(OFFLINE_MODELS)})"
            )
        from smoe.train.upcycle import upcycle_run  # noqa: PLC0415

        summary = upcycle_run(args.source, args.out, optimizer=args.optimizer, use_intact=args.use_intact, **options)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(
            f"upcycled {summary['from']} (step {summary.get('step', 0)}): {len(summary['layers'])} MoE layers of "
            f"{args.experts} experts, top-{args.top_k} {args.router}; parameters {summary['dense_parameters']:,} -> "
            f"{summary['parameters']:,}\nwritten: {summary['out']}"
        )
    return 0
