"""The seed claims of the SMoE papers smoe follows, each measured at >= 3 seeds with a paired 95% interval.

Each claim compares a router (or model option) with a baseline on the same budget and seeds, on the quantity the
paper says it improves; the difference is taken per seed (the runs of one seed share the initialisation seed, the
data order and the noise seed) and reported as mean +- the half-width of its 95% Student-t interval. The verdict
is mechanical: **holds** when the interval excludes 0 in the claimed direction, **does not hold** when it excludes
0 in the other direction, **inconclusive at this scale** otherwise.

=============  ==========================================================================================
claim          runs (every arm: ``--seeds`` seeds, the study's budget unless said otherwise)
=============  ==========================================================================================
lm             one ``smoe study`` (lm_study, 800 steps): token_choice, expert_choice, xmoe, similarity,
               attention_aware, ssr -- EC beats TC (loss); X-MoE reduces collapse (RC); similarity /
               attention-aware routing reduce fluctuation; SSR beats TC without an aux loss (loss)
s2moe          ``smoe study --routers s2moe --set moe.top_k=1``: S2MoE top-1 vs the lm study's TC top-2 (loss)
vision         ``smoe study --task vision`` (vit_small, 300 steps): token_choice, soft -- Soft MoE vs sparse
               at equal active parameters (accuracy)
momentum       ``smoe study --task vision --preset vit_small_momentum --routers token_choice``: heavy-ball
               MomentumSMoE vs the vision study's token choice (mean accuracy on Fashion-MNIST-C)
bpr            the vision study's token-choice runs evaluated at capacity factors 0.25-0.75: BPR vs vanilla
               (accuracy; V-MoE: BPR degrades gracefully below capacity 1)
vae            ``smoe train --preset vae_small``, unsupervised vs supervised routing (validation
               reconstruction loss; the SMoE-VAE paper: unsupervised reconstructs better)
vae_sweep      the same at 5%, 20% and 100% of the training images (``data.train_fraction``; the paper's
               data-fraction sweep)
=============  ==========================================================================================

    python experiments/claims.py --out runs/claims                  # everything (about 1 hour on 2 CPU cores)
    python experiments/claims.py --out runs/claims --only lm,s2moe   # some claims
    python experiments/claims.py --quick --out /tmp/claims          # debug presets, seconds: for CI

It writes ``claims.json`` and ``claims.md`` (the table of ``docs/claims.md``) to ``--out``; the studies' own reports
are under ``--out/<claim>/``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLAIMS = ("lm", "s2moe", "vision", "momentum", "bpr", "vae", "vae_sweep")


def _study(out: pathlib.Path, args: list[str], quick: bool, seeds: int, threads: int) -> pathlib.Path:
    """Run ``smoe study`` into ``out`` (kept when it already finished); returns the folder."""
    from smoe.cli.main import main  # noqa: PLC0415

    if (out / "results.json").is_file():
        return out
    argv = ["study", *args, "--seeds", str(seeds), "--out", str(out), "--no-progress", "--threads", str(threads)]
    if quick:
        argv += ["--quick", "--steps", "8", "--set", "train.eval_every=4", "--set", "train.eval_batches=1"]
        if "vision" in args:  # vit_debug is dropless; the V-MoE preset's capacity, for the BPR claim
            argv += ["--set", "moe.capacity_factor=1.05"]
    resume = ["--resume"] if (out / "study.json").is_file() else []
    code = main(argv + resume)
    if code not in (0, 1):
        raise SystemExit(f"smoe study {' '.join(args)} failed with exit status {code}")
    return out


def _finals(study: pathlib.Path) -> dict[tuple[str, int], dict]:
    results = json.loads((study / "results.json").read_text())
    return {(r["router"], r["seed"]): r["final"] for r in results["runs"] if r["error"] is None}


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """``a - b`` over the seeds both have: mean, 95% half-width, n."""
    from smoe.study.report import mean_ci  # noqa: PLC0415

    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    m, ci = mean_ci(diffs)
    return {
        "diff": m,
        "ci": ci,
        "n": len(diffs),
        "per_seed": diffs,
        "a": [a[s] for s in seeds],
        "b": [b[s] for s in seeds],
    }


def verdict(p: dict, better: str) -> str:
    """``holds`` / ``does not hold`` / ``inconclusive at this scale`` for a claimed improvement (``better`` =
    ``"higher"`` or ``"lower"`` for the claimed router)."""
    import math  # noqa: PLC0415

    if p["n"] < 2 or not math.isfinite(p["ci"]) or abs(p["diff"]) <= p["ci"]:
        return "inconclusive at this scale"
    right = p["diff"] > 0 if better == "higher" else p["diff"] < 0
    return "holds" if right else "does not hold"


def _row(claim, paper, key, router, baseline, p, verdict_, study) -> dict:
    """One row of the claims table."""
    return {"claim": claim, "paper": paper, "key": key, "router": router, "baseline": baseline, "paired": p,
            "verdict": verdict_, "study": str(study)}  # fmt: skip


def _by_seed(finals: dict, router: str, key: str) -> dict[int, float]:
    return {s: f[key] for (r, s), f in finals.items() if r == router and key in f}


def run_lm(out, quick, seeds, threads):
    routers = "token_choice,expert_choice,xmoe,similarity,attention_aware,ssr"
    t0 = time.time()
    study = _study(out / "lm", ["--routers", routers], quick, seeds, threads)
    f = _finals(study)
    tc = lambda key: _by_seed(f, "token_choice", key)  # noqa: E731
    rows = []
    for claim, router, key, better, paper in (
        ("Expert choice beats token choice (lower validation loss)", "expert_choice", "loss", "lower",
         "Zhou et al., NeurIPS 2022"),
        ("Hypersphere routing reduces representation collapse (higher RC)", "xmoe", "rc", "higher",
         "X-MoE, Chi et al. 2022"),
        ("Similarity-aware routing reduces routing fluctuation", "similarity", "fluct", "lower",
         "Nguyen et al., arXiv 2505.00792"),
        ("Attention-aware routing reduces routing fluctuation", "attention_aware", "fluct", "lower",
         "Nguyen et al., arXiv 2505.00792"),
        ("SSR beats token choice without an auxiliary loss (lower validation loss)", "ssr", "loss", "lower",
         "Nguyen et al., arXiv 2511.08972"),
    ):  # fmt: skip
        p = paired(_by_seed(f, router, key), tc(key))
        rows.append({"claim": claim, "paper": paper, "key": key, "router": router, "baseline": "token_choice",
                     "paired": p, "verdict": verdict(p, better), "study": str(study)})  # fmt: skip
    return rows, time.time() - t0, f"smoe study --routers {routers} --seeds {seeds}"


def run_s2moe(out, quick, seeds, threads):
    t0 = time.time()
    study = _study(out / "s2moe", ["--routers", "s2moe", "--set", "moe.top_k=1"], quick, seeds, threads)
    lm = _study(out / "lm", ["--routers", "token_choice,expert_choice,xmoe,similarity,attention_aware,ssr"], quick,
                seeds, threads)  # fmt: skip
    p = paired(_by_seed(_finals(study), "s2moe", "loss"), _by_seed(_finals(lm), "token_choice", "loss"))
    # "approximately equal": holds when the interval lies within +-0.02 nats/byte of zero (our tolerance)
    tol = 0.02
    if p["n"] >= 2 and abs(p["diff"]) + p["ci"] <= tol:
        v = "holds"
    elif p["n"] >= 2 and abs(p["diff"]) - p["ci"] > tol:
        v = "does not hold"
    else:
        v = "inconclusive at this scale"
    row = {"claim": f"S2MoE top-1 matches token choice top-2 (absolute loss difference <= {tol} nats/byte)",
           "paper": "Do et al., arXiv 2503.23007", "key": "loss", "router": "s2moe (top-1)",
           "baseline": "token_choice (top-2)", "paired": p, "verdict": v, "study": str(study)}  # fmt: skip
    return [row], time.time() - t0, f"smoe study --routers s2moe --set moe.top_k=1 --seeds {seeds}"


def run_vision(out, quick, seeds, threads):
    t0 = time.time()
    study = _study(out / "vision", ["--task", "vision", "--routers", "token_choice,soft"], quick, seeds, threads)
    f = _finals(study)
    p = paired(_by_seed(f, "soft", "accuracy"), _by_seed(f, "token_choice", "accuracy"))
    row = {"claim": "Soft MoE beats sparse token choice at equal active parameters (higher accuracy)",
           "paper": "Puigcerver et al., ICLR 2024", "key": "accuracy", "router": "soft", "baseline": "token_choice",
           "paired": p, "verdict": verdict(p, "higher"), "study": str(study)}  # fmt: skip
    return [row], time.time() - t0, f"smoe study --task vision --routers token_choice,soft --seeds {seeds}"


def run_momentum(out, quick, seeds, threads):
    t0 = time.time()
    preset = (["--preset", "vit_debug", "--set", "momentum.kind=heavy_ball", "--set", "momentum.mu=0.9"] if quick
              else ["--preset", "vit_small_momentum"])  # fmt: skip
    study = _study(out / "momentum", ["--task", "vision", *preset, "--routers", "token_choice"], quick, seeds,
                   threads)  # fmt: skip
    vision = _study(out / "vision", ["--task", "vision", "--routers", "token_choice,soft"], quick, seeds, threads)
    rows = []
    for key, name in (("robust", "mean accuracy on Fashion-MNIST-C"), ("accuracy", "clean accuracy")):
        p = paired(_by_seed(_finals(study), "token_choice", key), _by_seed(_finals(vision), "token_choice", key))
        rows.append({"claim": f"MomentumSMoE improves robustness ({name})" if key == "robust" else
                     f"MomentumSMoE keeps clean accuracy ({name}, for reference)",
                     "paper": "Teo & Nguyen, NeurIPS 2024", "key": key, "router": "token_choice + heavy-ball momentum",
                     "baseline": "token_choice", "paired": p, "verdict": verdict(p, "higher"),
                     "study": str(study)})  # fmt: skip
    return (
        rows,
        time.time() - t0,
        (f"smoe study --task vision --preset vit_small_momentum --routers token_choice --seeds {seeds}"),
    )


def run_bpr(out, quick, seeds, threads):
    import torch  # noqa: PLC0415

    from smoe.analysis.capacity_curve import capacity_curve  # noqa: PLC0415
    from smoe.study.analyze import _load, _test_set  # noqa: PLC0415

    t0 = time.time()
    torch.set_num_threads(threads)
    vision = _study(out / "vision", ["--task", "vision", "--routers", "token_choice,soft"], quick, seeds, threads)
    factors = (0.25, 0.5, 0.75)
    curves = {}
    for run in sorted((vision / "runs").glob("token_choice-seed*")):
        model, data, *_ = _load(run)
        images, labels = _test_set(data, 200 if quick else 2000)
        seed = int(run.name.rsplit("seed", 1)[1])
        curves[seed] = {
            "vanilla": capacity_curve(model, images, labels, factors, batch_priority=False),
            "bpr": capacity_curve(model, images, labels, factors, batch_priority=True),
        }
    rows = []
    for i, cf in enumerate(factors):
        bpr = {s: c["bpr"][i]["accuracy"] for s, c in curves.items()}
        van = {s: c["vanilla"][i]["accuracy"] for s, c in curves.items()}
        p = paired(bpr, van)
        processed = sum(c["bpr"][i]["processed"] for c in curves.values()) / max(len(curves), 1)
        rows.append({"claim": f"BPR degrades gracefully below capacity 1: capacity factor {cf} "
                     f"({100 * processed:.0f}% of assignments processed), BPR vs vanilla accuracy",
                     "paper": "Riquelme et al., NeurIPS 2021 (V-MoE)", "key": "accuracy", "router": "BPR",
                     "baseline": "vanilla dropping", "paired": p, "verdict": verdict(p, "higher"),
                     "study": str(vision)})  # fmt: skip
    (out / "bpr_curves.json").write_text(json.dumps(curves, indent=1))
    return rows, time.time() - t0, "python experiments/claims.py --only bpr (the vision study's token-choice runs)"


def run_vae(out, quick, seeds, threads):
    from smoe.study.analyze import AnalysisOptions, analyze_run  # noqa: PLC0415

    t0 = time.time()
    results = _vae_runs(out, quick, seeds, threads, 1.0)
    nmi: dict[str, dict[int, float]] = {"unsupervised": {}, "supervised": {}}
    for routing in nmi:
        for s in range(seeds):
            run = out / "vae" / f"{routing}-seed{s}"
            if not (run / "analysis" / "analysis.json").is_file():  # latents per expert: NMI and a t-SNE
                opts = AnalysisOptions(probe_examples=128 if quick else 2000, tsne_points=100 if quick else 2000,
                                       robust_examples=0, fluctuation=False)  # fmt: skip
                analyze_run(run, run / "analysis", opts, log=lambda m: None)
            analysis = json.loads((run / "analysis" / "analysis.json").read_text())
            nmi[routing][s] = analysis["layers"][0]["nmi"]
    paper = "Nikolic et al., arXiv 2509.10025 (SMoE-VAE)"
    p = paired(results["unsupervised"], results["supervised"])
    claim = (
        "Unsupervised routing reconstructs better than label-supervised routing (lower validation reconstruction loss)"
    )
    row = _row(claim, paper, "recon", "unsupervised", "supervised", p, verdict(p, "lower"), out / "vae")
    q = paired(nmi["supervised"], nmi["unsupervised"])
    claim = "(for reference) Supervised routing specialises the experts by sketch category more (higher NMI)"
    row_nmi = _row(claim, paper, "nmi", "supervised", "unsupervised", q, verdict(q, "higher"), out / "vae")
    return (
        [row, row_nmi],
        time.time() - t0,
        f"smoe train --preset vae_small --set routing=R --steps 600 --seed S (S < {seeds}), then smoe analyze",
    )


def _vae_runs(out, quick, seeds, threads, fraction: float) -> dict[str, dict[int, float]]:
    """Validation reconstruction loss of ``vae_small`` per routing and seed, trained on ``fraction`` of the data."""
    from smoe.cli.main import main  # noqa: PLC0415

    preset, steps = ("vae_debug", "8") if quick else ("vae_small", "600")
    folder = out / "vae" if fraction == 1.0 else out / "vae_sweep" / f"fraction{fraction}"
    results: dict[str, dict[int, float]] = {"unsupervised": {}, "supervised": {}}
    for routing in results:
        for s in range(seeds):
            run = folder / f"{routing}-seed{s}"
            if not (run / "final.json").is_file():
                argv = ["train", "--preset", preset, "--set", f"routing={routing}", "--set",
                        f"data.train_fraction={fraction}", "--steps", steps, "--seed", str(s), "--out", str(run),
                        "--no-progress", "--threads", str(threads)]  # fmt: skip
                if main(argv) != 0:
                    raise SystemExit(f"smoe train {' '.join(argv)} failed")
            results[routing][s] = json.loads((run / "final.json").read_text())["metric_recon"]
    return results


def run_vae_sweep(out, quick, seeds, threads):
    """The SMoE-VAE paper's data-fraction sweep (its Fig. 6 axis): unsupervised vs supervised at each fraction."""
    t0 = time.time()
    rows = []
    for fraction in (0.05, 0.2, 1.0):
        r = _vae_runs(out, quick, seeds, threads, fraction)
        p = paired(r["unsupervised"], r["supervised"])
        claim = f"Unsupervised routing reconstructs better at {100 * fraction:g}% of the training images"
        rows.append(_row(claim, "Nikolic et al., arXiv 2509.10025 (SMoE-VAE, Fig. 6 sweep)", "recon", "unsupervised",
                         "supervised", p, verdict(p, "lower"), out / "vae_sweep"))  # fmt: skip
    return (
        rows,
        time.time() - t0,
        (
            f"smoe train --preset vae_small --set routing=R --set data.train_fraction=F --steps 600 --seed S "
            f"(F in 0.05, 0.2, 1; S < {seeds})"
        ),
    )


RUNNERS = {"lm": run_lm, "s2moe": run_s2moe, "vision": run_vision, "momentum": run_momentum, "bpr": run_bpr,
           "vae": run_vae, "vae_sweep": run_vae_sweep}  # fmt: skip


def claims_markdown(record: dict) -> str:
    lines = [
        "| claim | paper | arms | measured (mean ± 95% half-width, per-seed difference) | verdict | command | cost |",
        "|---|---|---|---|---|---|---|",
    ]
    for part in record["claims"].values():
        for r in part["rows"]:
            p = r["paired"]
            per = ", ".join(f"{d:+.4f}" for d in p["per_seed"])
            a = sum(p["a"]) / max(len(p["a"]), 1)
            b = sum(p["b"]) / max(len(p["b"]), 1)
            lines.append(
                f"| {r['claim']} | {r['paper']} | `{r['router']}` {a:.4f} vs `{r['baseline']}` {b:.4f} "
                f"({r['key']}, n={p['n']}) | {p['diff']:+.4f} ± {p['ci']:.4f} ({per}) | **{r['verdict']}** | "
                f"`{part['command']}` | {part['seconds'] / 60:.0f} min |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True)
    p.add_argument("--only", help=f"comma-separated claims out of {','.join(CLAIMS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="debug presets and a few steps (CI)")
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    which = [c.strip() for c in args.only.split(",")] if args.only else list(CLAIMS)
    unknown = sorted(set(which) - set(CLAIMS))
    if unknown:
        p.error(f"unknown claims {unknown}; expected some of {CLAIMS}")
    path = out / "claims.json"
    record = json.loads(path.read_text()) if path.is_file() else {"claims": {}}
    for name in which:
        rows, seconds, command = RUNNERS[name](out, args.quick, args.seeds, args.threads)
        record["claims"][name] = {"rows": rows, "seconds": seconds, "command": command}
        path.write_text(json.dumps(record, indent=1))
        print(f"claims: {name} done in {seconds / 60:.1f} min", flush=True)
    record["date"] = time.strftime("%Y-%m-%d")
    path.write_text(json.dumps(record, indent=1))
    (out / "claims.md").write_text(claims_markdown(record))
    print(claims_markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
