"""``analyze_run``: the SMoE papers' measurements of one trained run, as plots, JSON and a markdown section.

For a run folder (its newest checkpoint) or one checkpoint folder, on the run's own data:

* **routing of a probe set** (test images, or validation text windows) in every MoE layer
  (:mod:`smoe.analysis.probe`): representation collapse ``RC`` with class = top-1 expert (X-MoE), the mutual
  information / purity of expert vs label (image class; for text the byte class of the token: letter, digit,
  space, punctuation, other), the expert loads, and a t-SNE of the routed representations coloured by expert and
  by label (SMoE-VAE, X-MoE);
* **routing fluctuation** (StableMoE, graph of tokens) over the run's checkpoints: the probe set is routed by every
  saved checkpoint, consecutive and to-final fractions of changed top-k sets (needs >= 2 checkpoints:
  ``train.ckpt_every``);
* **robustness**: vision -- accuracy on Fashion-MNIST-C (:mod:`smoe.data.corruptions`) per corruption and
  severity, the mean corrupted accuracy and, with a baseline run, mCE; language -- loss with the input tokens
  randomly substituted at fixed rates (:mod:`smoe.analysis.robustness`);
* **adaptive compute** (V-MoE), vision with a capacity-limited router: accuracy and processed fraction vs the
  evaluation capacity factor, vanilla vs Batch Prioritized Routing (:mod:`smoe.analysis.capacity_curve`).

For an SMoE-VAE run the routed representations are the latents ``z`` and the labels the sketch categories: RC,
expert/category specialisation and the t-SNE of the latents per expert (the paper's Fig. 3-style plot); the
robustness and capacity measurements do not apply.

Everything is written to ``out`` (default ``RUN/analysis``): ``analysis.json``, ``analysis.md`` and the plots.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from dataclasses import dataclass

import torch

from smoe.analysis.capacity_curve import capacity_curve, capacity_layers
from smoe.analysis.collapse import representation_collapse
from smoe.analysis.embedding import embed_2d, plot_embedding, subsample
from smoe.analysis.fluctuation import fluctuation_series
from smoe.analysis.probe import probe_routing
from smoe.analysis.robustness import contaminated_loss, corruption_table, mean_corruption_error
from smoe.analysis.specialisation import mutual_information, normalized_mutual_information, purity
from smoe.train.checkpoint import atomic_write_text

__all__ = ["AnalysisOptions", "analyze_run", "byte_classes", "BYTE_CLASS_NAMES"]

BYTE_CLASS_NAMES = ("letter", "digit", "space", "punctuation", "other")


def byte_classes(tokens: torch.Tensor) -> torch.Tensor:
    """The byte class of each byte token: 0 letter, 1 digit, 2 whitespace, 3 ASCII punctuation, 4 other."""
    t = tokens.long()
    out = torch.full_like(t, 4)
    letter = ((t >= 65) & (t <= 90)) | ((t >= 97) & (t <= 122))
    digit = (t >= 48) & (t <= 57)
    space = (t == 32) | (t == 9) | (t == 10) | (t == 13)
    punct = ((t >= 33) & (t <= 47)) | ((t >= 58) & (t <= 64)) | ((t >= 91) & (t <= 96)) | ((t >= 123) & (t <= 126))
    for cls, mask in ((3, punct), (2, space), (1, digit), (0, letter)):
        out = torch.where(mask, torch.full_like(t, cls), out)
    return out


@dataclass(kw_only=True)
class AnalysisOptions:
    """Budgets of :func:`analyze_run`.

    Attributes:
        probe_examples: test images (vision) or validation windows (LM) routed for the probe measurements.
        tsne_points: at most this many tokens in each t-SNE (0: no embedding).
        robust_examples: test images evaluated under each corruption (0: no robustness).
        corruptions: corruption names (:data:`smoe.data.corruptions.IMAGENET_C_CORRUPTIONS` by default).
        severities: severities 1-5.
        capacities: evaluation capacity factors of the adaptive-compute curve (empty: none).
        contamination_rates: token substitution rates of the LM robustness evaluation.
        baseline: another run (or checkpoint) of the same task: the mCE baseline.
        fluctuation: route the probe set with every saved checkpoint.
        seed: seed of the corruptions, contamination and subsamples.
    """

    probe_examples: int = 256
    tsne_points: int = 1500
    robust_examples: int = 500
    corruptions: tuple[str, ...] | None = None
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    capacities: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    contamination_rates: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)
    baseline: str | None = None
    fluctuation: bool = True
    seed: int = 0


def _load(path, device=None):
    """``(model in eval mode on device, data, run config, checkpoint, run folder, step)`` of a trained run."""
    from smoe.train.run import load_trained  # noqa: PLC0415

    model, data, run, ckpt, run_dir, state = load_trained(path)
    if device is not None:
        model.to(device)
    return model.eval(), data, run, ckpt, run_dir, int(state.get("step", 0))


def _probe_batches(task: str, data, n: int, batch_size: int = 64):
    """``[(inputs, labels)]`` of the first ``n`` test images, or of ``n`` validation windows with byte classes."""
    if task == "lm":
        out, seen = [], 0
        for x, _ in data.eval_batches("validation"):
            x = x[: n - seen]
            out.append((x, byte_classes(x) if data.vocab_size == 256 else None))
            seen += x.shape[0]
            if seen >= n:
                break
        return out
    m = min(n, data.splits.size("test"))
    if m >= batch_size:
        m -= m % batch_size  # whole batches (V-MoE image groups divide them)
    return [data.splits.batch("test", torch.arange(i, min(i + batch_size, m))) for i in range(0, m, batch_size)]


def _call(task: str):
    return lambda model, x: model(x)


def _test_set(data, n: int):
    """The first ``n`` test images, rounded down to a multiple of 64 (V-MoE routes in groups of whole images, so a
    group size must divide every batch) unless the split is smaller."""
    m = min(n, data.splits.size("test"))
    if m >= 64:
        m -= m % 64
    return data.splits.batch("test", torch.arange(m))


def analyze_run(path, out=None, options: AnalysisOptions | None = None, *, device=None, log=print) -> dict:
    """Measure a trained run (module docstring); returns the results written to ``out/analysis.json``."""
    opts = options or AnalysisOptions()
    t0 = time.time()
    model, data, run, ckpt, run_dir, step = _load(path, device)
    task = run.task
    if task not in ("lm", "vision", "vae"):
        raise ValueError(f"smoe analyze measures language, vision and SMoE-VAE runs; this run's task is {task!r}")
    out = pathlib.Path(out) if out is not None else run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"run": str(run_dir), "checkpoint": str(ckpt), "step": step, "task": task, "plots": {}}
    label_names = list(BYTE_CLASS_NAMES) if task == "lm" else list(data.splits.class_names)

    # 1. probe-set routing: collapse, specialisation, loads, t-SNE
    batches = _probe_batches(task, data, opts.probe_examples)
    probes = probe_routing(model, batches, call=_call(task))
    layers = []
    for i, p in enumerate(probes):
        row: dict = {"layer": p.name, "tokens": int(p.h_ND.shape[0])}
        top1 = p.top1_N
        routed = int((top1 >= 0).sum())
        row["experts_used"] = int((p.load_E > 0).sum())
        row["load"] = (p.load_E / max(routed, 1)).tolist()
        try:
            row["rc"] = representation_collapse(p.h_ND, top1)
        except ValueError:
            row["rc"] = math.nan  # fewer than two experts used: no between-class spread
        if p.labels_N is not None:
            row["mi"] = mutual_information(top1, p.labels_N)
            row["nmi"] = normalized_mutual_information(top1, p.labels_N)
            row["purity"] = purity(top1, p.labels_N)
        if opts.tsne_points > 0:
            idx = subsample(p.h_ND.shape[0], opts.tsne_points, opts.seed)
            xy = embed_2d(p.h_ND[idx], seed=opts.seed)
            file = out / f"tsne_layer{i}.png"
            plot_embedding(
                xy, top1[idx], None if p.labels_N is None else p.labels_N[idx], file,
                title=f"{p.name} (step {step})", label_names=label_names,
            )  # fmt: skip
            result["plots"][f"tsne_layer{i}"] = file.name
        layers.append(row)
    result["layers"] = layers
    log(f"analyze: probe routing of {len(probes)} MoE layers done ({time.time() - t0:.0f} s)")

    # 2. fluctuation over the saved checkpoints
    if opts.fluctuation:
        result["fluctuation"] = _fluctuation(model, run_dir, batches, task, probes)

    # 3. robustness
    if task == "vision" and opts.robust_examples > 0:
        result["robustness"] = _robustness(model, data, opts, device, log)
    if task == "lm" and opts.contamination_rates:
        eval_batches = list(data.eval_batches("validation", max(1, run.train.eval_batches)))
        result["contamination"] = {
            str(rate): contaminated_loss(model, eval_batches, rate, data.vocab_size, seed=opts.seed)
            for rate in opts.contamination_rates
        }

    # 4. adaptive compute
    if task == "vision" and opts.capacities and capacity_layers(model):
        images, labels = _test_set(data, opts.robust_examples or opts.probe_examples)
        curves = {
            name: capacity_curve(model, images, labels, opts.capacities, batch_priority=bpr)
            for name, bpr in (("vanilla", False), ("bpr", True))
        }
        result["capacity_curve"] = curves
        result["plots"]["capacity_curve"] = _plot_capacity(curves, out / "capacity_curve.png").name
    result["seconds"] = time.time() - t0
    atomic_write_text(out / "analysis.json", json.dumps(result, indent=1))
    atomic_write_text(out / "analysis.md", analysis_markdown(result))
    log(f"analyze: wrote {out / 'analysis.md'} ({result['seconds']:.0f} s)")
    return result


def _fluctuation(model, run_dir, batches, task, final_probes) -> dict:
    from smoe.train.checkpoint import list_checkpoints, load_checkpoint  # noqa: PLC0415

    ckpts = list_checkpoints(run_dir)
    if len(ckpts) < 2:
        return {"checkpoints": len(ckpts), "note": "needs at least 2 saved checkpoints (train.ckpt_every)"}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    steps, per_layer = [], [[] for _ in final_probes]
    try:
        for ckpt in ckpts:
            st = load_checkpoint(ckpt, model=model, restore_rng=False)
            steps.append(int(st.get("step", 0)))
            for i, p in enumerate(probe_routing(model, batches, call=_call(task))):
                per_layer[i].append(p.choices_NK)
    finally:
        model.load_state_dict(state)
    return {
        "steps": steps,
        "layers": {p.name: fluctuation_series(choices) for p, choices in zip(final_probes, per_layer, strict=True)},
    }


def _robustness(model, data, opts: AnalysisOptions, device, log) -> dict:
    from smoe.analysis.robustness import accuracy  # noqa: PLC0415
    from smoe.data.corruptions import IMAGENET_C_CORRUPTIONS, corrupt_images, corruptions_available  # noqa: PLC0415

    images, labels = _test_set(data, opts.robust_examples)
    out: dict = {"images": int(labels.shape[0]), "clean_accuracy": accuracy(model, images, labels)}
    if not corruptions_available():
        out["note"] = "corrupt-tta is not installed (scripts/setup.sh installs it): no corrupted images"
        return out
    names = opts.corruptions or IMAGENET_C_CORRUPTIONS
    corrupted = {
        (c, s): corrupt_images(images, c, s, seed=opts.seed) for c in names for s in opts.severities
    }  # fmt: skip
    errors = corruption_table(model, labels, corrupted)
    out["errors"] = errors
    out.update(mean_corruption_error(errors))
    if opts.baseline:
        base_model, *_ = _load(opts.baseline, device)
        base_errors = corruption_table(base_model, labels, corrupted)
        out["baseline"] = opts.baseline
        out["baseline_errors"] = base_errors
        rel = mean_corruption_error(errors, base_errors)
        out["mCE"], out["CE"] = rel["mCE"], rel["CE"]
    log(f"analyze: robustness on {len(corrupted)} corrupted copies of {labels.shape[0]} images done")
    return out


def _plot_capacity(curves: dict, path: pathlib.Path) -> pathlib.Path:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in curves.items():
        cf = [p["capacity_factor"] for p in points]
        axes[0].plot(cf, [p["accuracy"] for p in points], marker="o", label=name)
        axes[1].plot([p["processed"] for p in points], [p["accuracy"] for p in points], marker="o", label=name)
    axes[0].set_xlabel("evaluation capacity factor")
    axes[1].set_xlabel("fraction of assignments processed (expert FLOPs)")
    for ax in axes:
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _f(x, fmt=".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def analysis_markdown(result: dict) -> str:
    """The markdown section of an analysis (what ``analysis.md`` holds)."""
    lines = [f"## Analysis of `{result['run']}` at step {result['step']} ({result['task']})", ""]
    lines += ["| layer | tokens | experts used | RC | MI (nats) | NMI | purity |"]
    lines += ["|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["layers"]:
        lines.append(
            f"| {r['layer']} | {r['tokens']} | {r['experts_used']} | {_f(r['rc'])} | {_f(r.get('mi'))} | "
            f"{_f(r.get('nmi'))} | {_f(r.get('purity'))} |"
        )
    lines += ["", "RC = Tr(Sigma_W Sigma_B^+) with class = top-1 expert (X-MoE; smaller = more collapsed). MI / NMI / "
              "purity: top-1 expert vs the label (image class, or byte class for text).", ""]  # fmt: skip
    fl = result.get("fluctuation")
    if fl:
        if "layers" in fl:
            lines += [f"Routing fluctuation over checkpoints at steps {fl['steps']} (fraction of probe tokens whose "
                      "top-k set changed):", "", "| layer | consecutive | to final |", "|---|---|---|"]  # fmt: skip
            for name, s in fl["layers"].items():
                cons = ", ".join(f"{v:.3f}" for v in s["consecutive"])
                fin = ", ".join(f"{v:.3f}" for v in s["to_final"])
                lines.append(f"| {name} | {cons} | {fin} |")
            lines.append("")
        else:
            lines += [f"Routing fluctuation: {fl['note']}.", ""]
    rb = result.get("robustness")
    if rb:
        lines += [f"Robustness on {rb['images']} test images: clean accuracy {rb['clean_accuracy']:.4f}."]
        if "errors" in rb:
            lines[-1] += (
                f" Mean corrupted accuracy {rb['mean_corrupted_accuracy']:.4f}"
                + (f", mCE {rb['mCE']:.3f} relative to `{rb['baseline']}`" if "mCE" in rb else "")
                + "."
            )
            sevs = sorted({s for v in rb["errors"].values() for s in v})
            lines += ["", "| corruption | " + " | ".join(f"acc s{s}" for s in sevs) + " |",
                      "|---|" + "---:|" * len(sevs)]  # fmt: skip
            for name, sev in rb["errors"].items():
                lines.append(f"| {name} | " + " | ".join(f"{1 - sev[s]:.3f}" for s in sevs) + " |")
        else:
            lines[-1] += f" {rb.get('note', '')}"
        lines.append("")
    ct = result.get("contamination")
    if ct:
        lines += ["Loss with the input tokens randomly substituted (targets clean):", "",
                  "| substitution rate | loss |", "|---:|---:|"]  # fmt: skip
        lines += [f"| {rate} | {loss:.4f} |" for rate, loss in ct.items()] + [""]
    cc = result.get("capacity_curve")
    if cc:
        lines += ["Adaptive compute (V-MoE): test accuracy at evaluation capacity factors, vanilla vs BPR:", "",
                  "| capacity factor | processed | vanilla acc | BPR acc |", "|---:|---:|---:|---:|"]  # fmt: skip
        for v, b in zip(cc["vanilla"], cc["bpr"], strict=True):
            cells = (v["capacity_factor"], f"{v['processed']:.3f}", f"{v['accuracy']:.4f}", f"{b['accuracy']:.4f}")
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines.append("")
    if result["plots"]:
        lines += ["Plots: " + ", ".join(f"`{f}`" for f in result["plots"].values()), ""]
    return "\n".join(lines)
