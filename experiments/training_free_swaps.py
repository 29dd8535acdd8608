"""Training-free router swaps (USMoE's "without training" setting, reference §4.2.3), measured.

The gate weights and experts of a model stay as they are; only the selection rule changes
(:func:`smoe.swap_router`); the model is evaluated as is. Three kinds of model:

1. trained smoe MoE LMs: the upcycled and from-scratch runs of ``experiments/upcycling.py`` (one per seed),
   validation loss (nats per byte) on their own split;
2. SmolLM2-135M upcycled (every other FFN -> 8 copies, top-2 token choice), just upcycled and after a short
   continued pre-training on Shakespeare: validation loss (nats per token) on Shakespeare's validation split;
3. all-MiniLM-L6-v2 upcycled (every FFN -> 8 copies): the Lee STS Spearman correlation (0.508 for plain MiniLM).

Coupling routers (expert choice, USMoE) are evaluated causal-safe in the decoders: routing groups are the tokens at
one position across the batch (``group_mode="position"``), so no token sees a later one; the encoder routes per
sequence. Each swap keeps the layer's ``top_k`` (expert choice: its capacity factor).

    python experiments/training_free_swaps.py --runs runs/exp-upcycling --out runs/exp-swaps
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys
import time

import torch

SWAPS = [("token_choice", {}), ("usmoe", {}), ("expert_choice", {}), ("sinkhorn", {}), ("ssr", {})]


def _swap(model, name: str, kwargs: dict, group_mode: str | None):
    from smoe import MoE, swap_router  # noqa: PLC0415

    model = copy.deepcopy(model)
    if name == "token_choice":
        return model
    for m in model.modules():
        if isinstance(m, MoE) and group_mode is not None:
            m.group_mode = group_mode
    swap_router(model, name, **kwargs)
    return model


def smoe_runs(root: pathlib.Path) -> dict:
    import smoe  # noqa: PLC0415
    from smoe.train import run as run_mod  # noqa: PLC0415

    out = {}
    for kind in ("upcycled", "scratch"):
        runs = sorted(root.glob(f"{kind}-s*"))
        for name, kwargs in SWAPS:
            values = []
            for run in runs:
                model = _swap(smoe.load_run(run).model, name, kwargs, None if name == "token_choice" else "position")
                values.append(_eval_smoe(run_mod, run, model))
            out[f"{kind}/{name}"] = values
            print(kind, name, values, file=sys.stderr, flush=True)
    return out


def _eval_smoe(run_mod, run_dir, model) -> float:
    from smoe.train.trainer import Trainer  # noqa: PLC0415

    cfg, tok = run_mod.load_run_config(run_dir)
    _, data, cfg, _ = run_mod.prepare_run(cfg, tokenizer_state=tok)
    trainer = Trainer(model, data, cfg.train, run_dir=None, progress=False)
    return float(trainer.evaluate("validation")["loss"])


def smollm2(out_root: pathlib.Path, steps: int, eval_batches: int) -> dict:
    from smoe.data import DataConfig  # noqa: PLC0415
    from smoe.interop import load_pretrained, upcycle  # noqa: PLC0415
    from smoe.train.config import TrainConfig  # noqa: PLC0415
    from smoe.train.hf_lm import (  # noqa: PLC0415
        EVAL_BATCH_SIZE,
        _save_folder,  # noqa: PLC0415
        evaluate_hf_lm,
        hf_lm_data,
        train_hf_lm,
    )

    t0 = time.perf_counter()
    model, tok = load_pretrained("smollm2")
    data = hf_lm_data(tok, DataConfig(dataset="shakespeare"), batch_size=EVAL_BATCH_SIZE, seq_len=128)
    res = {"load_s": time.perf_counter() - t0}

    def ev(m):
        return evaluate_hf_lm(m, data, max_batches=eval_batches)["loss"]

    res["dense"] = ev(model)
    drop = copy.deepcopy(model)  # V-MoE's softmax then top-k, not renormalised: the paper's initial drop
    upcycle(drop, num_experts=8, top_k=2, layers="every_other")
    res["upcycled_softmax_topk/token_choice"] = ev(drop)
    del drop
    upcycle(model, num_experts=8, top_k=2, layers="every_other", router_kwargs={"order": "topk_softmax"})
    res["upcycled/token_choice"] = ev(model)
    for name, kwargs in SWAPS[1:3]:
        res[f"upcycled/{name}"] = ev(_swap(model, name, kwargs, "position"))
    print("smollm2 just upcycled", res, file=sys.stderr, flush=True)
    if steps:
        folder = out_root / "smollm2-moe"
        _save_folder(model, tok, folder)
        del model
        t1 = time.perf_counter()
        cfg = TrainConfig(steps=steps, batch_size=4, lr=3e-4, warmup_steps=5, min_lr_ratio=0.1, eval_every=0)
        r = train_hf_lm(folder, None, cfg, DataConfig(dataset="shakespeare"), eval_batches=eval_batches, progress=False)
        res["train_s"] = time.perf_counter() - t1
        res["trained_steps"] = steps
        trained, _ = load_pretrained(str(folder))
        res["trained/token_choice"] = ev(trained)
        res["trained/train_record_loss"] = r["loss"]
        for name, kwargs in SWAPS[1:3]:
            res[f"trained/{name}"] = ev(_swap(trained, name, kwargs, "position"))
        dense_folder = out_root / "smollm2-dense"
        dense, tok2 = load_pretrained("smollm2")
        _save_folder(dense, tok2, dense_folder)
        del dense
        t2 = time.perf_counter()
        rd = train_hf_lm(
            dense_folder, None, cfg, DataConfig(dataset="shakespeare"), eval_batches=eval_batches, progress=False
        )
        res["dense_train_s"] = time.perf_counter() - t2
        res["dense_trained"] = rd["loss"]
    print("smollm2", res, file=sys.stderr, flush=True)
    return res


def minilm() -> dict:
    from smoe.interop import load_pretrained, upcycle  # noqa: PLC0415
    from smoe.train.hf_lm import sts_spearman  # noqa: PLC0415

    model, tok = load_pretrained("minilm")
    res = {"dense": sts_spearman(model, tok)}
    up = copy.deepcopy(model)
    upcycle(up, num_experts=8, top_k=2, layers="all", group_mode="sequence")
    res["upcycled/token_choice"] = sts_spearman(up, tok)
    # control: with identical experts a router only rescales each token's FFN output by its weight sum; the dense
    # model with every FFN output scaled by that mean sum separates the rescaling from the routing
    from smoe import MoE  # noqa: PLC0415

    sums = []

    def record(module, args, out):
        sums.append(float(out[1].plan.weight_N.sum() / out[1].plan.num_tokens))

    hooks = [m.register_forward_hook(record) for m in up.modules() if isinstance(m, MoE)]
    sts_spearman(up, tok)
    for h in hooks:
        h.remove()
    scale = sum(sums) / len(sums)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for layer in scaled.encoder.layer:
            layer.output.dense.weight.mul_(scale)
            layer.output.dense.bias.mul_(scale)
    res["control_dense_ffn_scaled"] = {"scale": scale, "spearman": sts_spearman(scaled, tok)}
    for name, kwargs in SWAPS[1:]:
        try:
            res[f"upcycled/{name}"] = sts_spearman(_swap(up, name, kwargs, None), tok)
        except ValueError as e:
            res[f"upcycled/{name}"] = f"refused: {e}"
    print("minilm", res, file=sys.stderr, flush=True)
    return res


def smoe_report(res: dict) -> str:
    """A markdown table: each swap's validation loss and its paired difference from the trained router (token
    choice), per seed, mean +- 95% t-interval."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from upcycling import mean_ci  # noqa: PLC0415

    lines = [
        "| model | router at evaluation | validation loss | swap - token choice, paired | per seed |",
        "|---|---|---:|---:|---|",
    ]
    for key, values in res.items():
        kind, name = key.split("/")
        base = res[f"{kind}/token_choice"]
        m, ci = mean_ci(values)
        if name == "token_choice":
            diff = "(trained router)"
        else:
            diffs = [v - b for v, b in zip(values, base)]
            dm, dci = mean_ci(diffs)
            if all(d == 0 for d in diffs):
                sign = "identical on every seed"
            else:
                sign = "beyond seed noise" if abs(dm) > dci else "within seed noise"
            diff = f"{dm:+.4f} +- {dci:.4f} ({sign})"
        seeds = ", ".join(f"{v:.4f}" for v in values)
        lines.append(f"| {kind} | {name} | {m:.4f} +- {ci:.4f} | {diff} | {seeds} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", help="the output folder of experiments/upcycling.py (trained smoe MoE LMs)")
    p.add_argument("--out", required=True)
    p.add_argument("--smollm2-steps", type=int, default=20, help="continued pre-training steps (0: swaps only)")
    p.add_argument("--eval-batches", type=int, default=4, help="SmolLM2: batches of 8 windows of 128 tokens")
    p.add_argument("--skip", nargs="*", default=[], choices=("smoe", "smollm2", "minilm"))
    args = p.parse_args(argv)
    root = pathlib.Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.runs and "smoe" not in args.skip:
        results["smoe"] = smoe_runs(pathlib.Path(args.runs))
    if "minilm" not in args.skip:
        results["minilm"] = minilm()
    if "smollm2" not in args.skip:
        results["smollm2"] = smollm2(root, args.smollm2_steps, args.eval_batches)
    (root / "results.json").write_text(json.dumps(results, indent=1))
    if "smoe" in results:
        report = smoe_report(results["smoe"])
        (root / "report.md").write_text(report + "\n", encoding="utf-8")
        print(report)
    print(json.dumps({k: v for k, v in results.items() if k != "smoe"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
