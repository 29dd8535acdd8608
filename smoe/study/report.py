"""The study's leaderboard, markdown report and matplotlib plots.

Columns: quality (validation loss and bits per byte for a language model; accuracy for vision), balance (load
coefficient of variation, max/mean load, dropped-assignment rate, dead experts), routing entropy, training
throughput (tokens routed per second), total and active parameters. Rows are ranked by quality: lowest validation
loss for a language model, highest accuracy for vision. Each number is the mean over seeds; with several seeds the
quality column also gives the standard deviation.
"""

from __future__ import annotations

import json
import math
import statistics
import time

import torch

from smoe.train.checkpoint import atomic_write_text

__all__ = ["leaderboard_rows", "format_leaderboard", "leaderboard_markdown", "write_report", "plot_all"]

_AVG_KEYS = (
    "loss",
    "ppl",
    "bpb",
    "accuracy",
    "load_cv",
    "max_load",
    "drop_rate",
    "dead_experts",
    "unrouted",
    "entropy",
    "tokens_per_s",
    "num_parameters",
    "num_active_parameters",
    "train_time",
    "rc",
    "nmi",
    "fluct",
    "robust",
)
#: columns that get no interval (deterministic, or machine-dependent)
_NO_CI = ("num_parameters", "num_active_parameters", "tokens_per_s", "train_time")
#: two-sided 95% Student-t quantiles t_{0.975, df}; a df between entries takes the next lower one (wider)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}  # fmt: skip


def t975(df: int) -> float:
    """The two-sided 95% Student-t quantile for ``df >= 1`` degrees of freedom (1.96 beyond 60)."""
    if df < 1:
        raise ValueError(f"a t interval needs df >= 1, got {df}")
    if df > 60:
        return 1.96
    return _T975[max(k for k in _T975 if k <= df)]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """``(mean, half-width of the 95% t interval)``; the half-width is ``nan`` for fewer than 2 finite values."""
    v = [x for x in values if isinstance(x, int | float) and math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    m = statistics.fmean(v)
    if len(v) < 2:
        return m, math.nan
    return m, t975(len(v) - 1) * statistics.stdev(v) / math.sqrt(len(v))


#: (key, better): the quality and measurement columns compared with the baseline router, paired by seed
def _compared(task: str) -> list[tuple[str, str]]:
    quality = ("accuracy", "higher") if task == "vision" else ("loss", "lower")
    robust = ("robust", "higher") if task == "vision" else ("robust", "lower")
    return [quality, ("rc", "higher"), ("nmi", "higher"), ("fluct", "lower"), robust]


def paired_differences(runs, task: str, baseline: str) -> dict[str, dict[str, dict]]:
    """``{router: {key: {"diff", "ci", "n", "beyond"}}}``: router minus ``baseline`` per seed, mean and 95% t
    interval over the seeds both ran; ``beyond`` when the interval excludes 0 (a difference beyond seed noise)."""
    by: dict[tuple[str, int], dict] = {(r.variant.name, r.seed): r.final for r in runs if r.error is None}
    names = list(dict.fromkeys(r.variant.name for r in runs))
    out: dict[str, dict[str, dict]] = {}
    for name in names:
        if name == baseline:
            continue
        cmp: dict[str, dict] = {}
        for key, _ in _compared(task):
            diffs = []
            for (router, seed), final in by.items():
                base = by.get((baseline, seed))
                if router == name and base is not None and key in final and key in base:
                    d = final[key] - base[key]
                    if math.isfinite(d):
                        diffs.append(d)
            if diffs:
                m, ci = mean_ci(diffs)
                cmp[key] = {"diff": m, "ci": ci, "n": len(diffs), "beyond": bool(len(diffs) > 1 and abs(m) > ci)}
        out[name] = cmp
    return out


def _consistency(runs) -> float:
    """Inter-run consistency (X-MoE's IC, :func:`smoe.analysis.specialisation.inter_run_consistency`) of the
    per-layer expert loads at the final evaluation over ``runs`` (the seeds of one router), averaged over the
    layers; loads sorted by size, since the experts of runs trained from different seeds do not correspond. ``nan``
    with fewer than 2 runs or a layer of equal loads (fixed balanced routing)."""
    from smoe.analysis.specialisation import inter_run_consistency  # noqa: PLC0415

    layers = [r.final.get("layers", []) for r in runs]
    if len(layers) < 2 or not all(layers) or len({len(x) for x in layers}) != 1:
        return math.nan
    values = []
    for i in range(len(layers[0])):
        loads = [run_layers[i].get("load") for run_layers in layers]
        if any(not load for load in loads):
            return math.nan
        try:
            values.append(inter_run_consistency(torch.tensor(loads, dtype=torch.float64), sort=True))
        except ValueError:
            return math.nan
    return statistics.fmean(values) if values else math.nan


def baseline_router(names: list[str]) -> str:
    """The router the others are compared with: ``token_choice`` when it ran, else the first."""
    return "token_choice" if "token_choice" in names else names[0]


def leaderboard_rows(runs, task: str) -> list[dict]:
    """One row per router (means over its successful seeds), ranked by quality; failed routers last."""
    by_name: dict[str, list] = {}
    for r in runs:
        by_name.setdefault(r.variant.name, []).append(r)
    rows = []
    for name, group in by_name.items():
        ok = [r for r in group if r.error is None]
        row: dict = {"router": name, "seeds": len(ok), "group_mode": group[0].group_mode}
        if not ok:
            row["error"] = group[0].error
            rows.append(row)
            continue
        for key in _AVG_KEYS:
            values = [r.final[key] for r in ok if key in r.final]
            if values:
                row[key], ci = mean_ci(values)
                if math.isnan(row[key]):
                    row[key] = sum(values) / len(values)  # nan where undefined
                if len(ok) > 1 and key not in _NO_CI:
                    row[f"{key}_ci"] = ci
        quality = "accuracy" if task == "vision" else "loss"
        values = [r.final[quality] for r in ok]
        row[f"{quality}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    good = [r for r in rows if "error" not in r]
    for r in good:  # X-MoE's inter-run consistency of the expert loads over the seeds (sorted: see below)
        r["ic"] = _consistency([run for run in by_name[r["router"]] if run.error is None])
    if good and max(r["seeds"] for r in good) > 1:
        base = baseline_router([r["router"] for r in good])
        paired = paired_differences(runs, task, base)
        quality = "accuracy" if task == "vision" else "loss"
        for r in good:
            if r["router"] == base:
                r["vs_baseline"] = "baseline"
                continue
            r["paired"] = paired.get(r["router"], {})
            q = r["paired"].get(quality)
            if q is not None and math.isfinite(q["ci"]):
                scale = 100 if task == "vision" else 1
                unit = "%.1f" if task == "vision" else "%.4f"
                r["vs_baseline"] = (f"{unit % (scale * q['diff'])} ± {unit % (scale * q['ci'])}"
                                    + (" *" if q["beyond"] else ""))  # fmt: skip
    # ties (equal accuracy, or equal loss) are broken by validation loss, then by name
    good.sort(key=lambda r: ((-r["accuracy"], r["loss"]) if task == "vision" else (r["loss"],)) + (r["router"],))
    for i, r in enumerate(good, 1):
        r["rank"] = i
    return good + [r for r in rows if "error" in r]


def _columns(task: str, seeds: int) -> list[tuple[str, str, str]]:
    """(header, key, format) of the leaderboard columns."""
    pm = seeds > 1
    if task == "vision":
        quality = [("accuracy", "accuracy", "pct_std" if pm else "pct"), ("val loss", "loss", ".4f")]
    else:
        quality = [("val loss", "loss", ".4f_std" if pm else ".4f"), ("ppl", "ppl", ".2f"), ("bits/byte", "bpb", ".4f")]
    robust = ("corrupted acc", "robust", "pct") if task == "vision" else ("loss @10% noise", "robust", ".4f")
    return [
        ("#", "rank", "d"),
        ("router", "router", "s"),
        *quality,
        *([("vs baseline", "vs_baseline", "s")] if pm else []),
        robust,
        ("RC", "rc", ".2f"),
        ("NMI", "nmi", ".3f"),
        ("fluct", "fluct", ".3f"),
        ("load CV", "load_cv", ".3f"),
        ("max/mean", "max_load", ".2f"),
        ("dropped", "drop_rate", "pct"),
        ("dead", "dead_experts", ".0f"),
        ("entropy", "entropy", ".3f"),
        ("tokens/s", "tokens_per_s", ",.0f"),
        ("params", "num_parameters", "M"),
        ("active", "num_active_parameters", "M"),
    ]


def _fmt(row: dict, key: str, fmt: str, task: str) -> str:
    if key not in row:
        if key == "loss" or (key == "accuracy" and task == "vision"):
            error = row.get("error") or ""
            return error if error.startswith("diverged at step") else "FAILED"
        return "n/a"
    v = row[key]
    if fmt == "s":
        return str(v)
    if fmt == "d":
        return str(int(v))
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    ci = row.get(f"{key}_ci")
    pm = ci is not None and isinstance(ci, float) and math.isfinite(ci)
    if fmt in ("pct", "pct_std"):
        return f"{100 * v:.1f}%" + (f" ± {100 * ci:.1f}" if pm else "")
    if fmt == ".4f_std":
        fmt = ".4f"
    if fmt == "M":
        return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}K"
    return format(v, fmt) + (f" ± {format(ci, fmt)}" if pm else "")


def _table(rows: list[dict], task: str) -> tuple[list[str], list[list[str]]]:
    seeds = max((r.get("seeds", 1) for r in rows), default=1)
    cols = _columns(task, seeds)
    body = [
        [_fmt(r, key, fmt, task) if not (key == "rank" and "rank" not in r) else "-" for _, key, fmt in cols]
        for r in rows
    ]
    return [h for h, _, _ in cols], body


def format_leaderboard(rows: list[dict], task: str) -> str:
    """Fixed-width text table for the terminal."""
    head, body = _table(rows, task)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])


def leaderboard_markdown(rows: list[dict], task: str) -> str:
    """GitHub markdown table."""
    head, body = _table(rows, task)
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 1 else "---:" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(b) + " |" for b in body]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------- plots


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, m = [], None
    for v in values:
        m = v if m is None else (1 - alpha) * m + alpha * v
        out.append(m)
    return out


def plot_all(result, out_dir) -> dict:
    """Write ``curves.png``, ``expert_load.png`` and ``tradeoff.png``; returns their paths by name."""
    import matplotlib  # noqa: PLC0415 - optional dependency, imported only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    files = {}
    ok = [r for r in result.runs if r.error is None]
    names = list(dict.fromkeys(r.variant.name for r in ok))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}

    # 1. validation curves and smoothed training loss
    fig, (ax_val, ax_tr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in ok:
        label = r.variant.name if r.seed == ok[0].seed or result.config.seeds == 1 else None
        if r.curve:
            ax_val.plot(*zip(*r.curve), marker="o", ms=3, color=colors[r.variant.name], label=label)
        if r.train_curve:
            steps, losses = zip(*r.train_curve)
            ax_tr.plot(steps, _ema(list(losses)), color=colors[r.variant.name], label=label, lw=1.2)
    ax_val.set(title="validation loss", xlabel="step", ylabel="loss (nats/token)" if result.task == "lm" else "loss")
    ax_tr.set(title="training loss (EMA 0.1)", xlabel="step")
    for ax in (ax_val, ax_tr):
        ax.grid(alpha=0.3)
        if ok:  # (no curve at all when every run failed or diverged)
            ax.legend(fontsize=8)
    fig.tight_layout()
    files["curves"] = out_dir / "curves.png"
    fig.savefig(files["curves"], dpi=110)
    plt.close(fig)

    # 2. expert-load heatmaps: rows = MoE layers, columns = experts, colour = share of tokens x E (1 = fair share)
    first = {}
    for r in ok:
        first.setdefault(r.variant.name, r)
    n = max(1, len(first))
    cols = min(3, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows_n, cols, figsize=(4.2 * cols, 2.4 * rows_n + 0.8), squeeze=False, layout="constrained"
    )
    vmax = 1.0
    loads = {}
    for name, r in first.items():
        layers = r.final.get("layers", [])
        grid = [[share * len(layer["load"]) for share in layer["load"]] for layer in layers]
        loads[name] = grid
        vmax = max([vmax] + [max(row) for row in grid if row])
    image = None
    for ax, (name, grid) in zip(axes.flat, loads.items()):
        if grid:
            image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
            ax.set_yticks(range(len(grid)))
            ax.set_xticks(range(len(grid[0])))
        ax.set(title=name, xlabel="expert", ylabel="MoE layer")
    for ax in list(axes.flat)[len(loads) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), label="tokens / fair share")
    fig.suptitle(f"expert load at the final evaluation (seed {ok[0].seed if ok else 0})")
    files["expert_load"] = out_dir / "expert_load.png"
    fig.savefig(files["expert_load"], dpi=110)
    plt.close(fig)

    # 3. quality vs balance
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    key = "accuracy" if result.task == "vision" else "loss"
    for row in result.leaderboard:
        if "error" in row:
            continue
        ax.scatter(row["load_cv"], row[key], color=colors.get(row["router"]), s=40)
        ax.annotate(row["router"], (row["load_cv"], row[key]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set(
        xlabel="load coefficient of variation (lower = more balanced)",
        ylabel="validation accuracy" if key == "accuracy" else "validation loss",
        title="quality vs. balance",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files["tradeoff"] = out_dir / "tradeoff.png"
    fig.savefig(files["tradeoff"], dpi=110)
    plt.close(fig)

    # 4. the papers' measurements per router, mean and 95% interval over seeds
    rows = [r for r in result.leaderboard if "error" not in r]
    measures = [k for k in ("robust", "rc", "nmi", "fluct") if any(_finite(r.get(k)) for r in rows)]
    if measures:
        titles = {"robust": "corrupted accuracy" if result.task == "vision" else "loss @10% input noise",
                  "rc": "representation collapse RC (higher = less)", "nmi": "expert/label NMI",
                  "fluct": "routing fluctuation"}  # fmt: skip
        fig, axes = plt.subplots(1, len(measures), figsize=(3.6 * len(measures), 3.8), squeeze=False)
        for ax, key in zip(axes[0], measures, strict=True):
            names_k = [r["router"] for r in rows if _finite(r.get(key))]
            values = [r[key] for r in rows if _finite(r.get(key))]
            errs = [r.get(f"{key}_ci") if _finite(r.get(f"{key}_ci")) else 0.0 for r in rows if _finite(r.get(key))]
            ax.bar(range(len(values)), values, yerr=errs, capsize=3, color=[colors.get(n) for n in names_k])
            ax.set_xticks(range(len(values)), names_k, rotation=60, ha="right", fontsize=8)
            ax.set_title(titles[key], fontsize=9)
            ax.grid(alpha=0.3, axis="y")
        fig.suptitle("measurements (bars: mean over seeds; whiskers: 95% t interval)", fontsize=10)
        fig.tight_layout()
        files["measures"] = out_dir / "measures.png"
        fig.savefig(files["measures"], dpi=110)
        plt.close(fig)
    return files


def _finite(v) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


# --------------------------------------------------------------------------------------------------- report


def _layer_table(result) -> list[str]:
    lines = [
        "| router | layer | load CV | max/mean | dropped | dead | entropy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    seen = set()
    for r in result.runs:
        if r.error is not None or r.variant.name in seen:
            continue
        seen.add(r.variant.name)
        for i, layer in enumerate(r.final.get("layers", [])):
            lines.append(
                f"| {r.variant.name} | {i} | {layer['load_cv']:.3f} | {layer['max_load']:.2f} | "
                f"{100 * layer['drop_rate']:.1f}% | {int(layer['dead_experts'])} | {layer['entropy']:.3f} |"
            )
    return lines


def write_report(result) -> dict:
    """Write ``report.md``, ``leaderboard.json``, ``results.json`` and the plots; returns the paths by name."""
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    files: dict = {}
    plot_note = ""
    try:
        files.update(plot_all(result, out))
    except ImportError:
        plot_note = "\n_Plots skipped: matplotlib is not installed (`pip install matplotlib`)._\n"
    b, task = result.base, result.task
    quality = "validation accuracy (higher is better)" if task == "vision" else "validation loss (lower is better)"
    lm_line = f", sequence length {result.data_info.get('seq_len')}" if task == "lm" else ""
    moe = b.model.moe
    lines = [
        "# smoe router study",
        "",
        *verdict_lines(result),
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')} · task `{task}` · preset `{result.preset}` · "
        f"data `{result.data_info['dataset']}`"
        f" · {len(result.leaderboard)} routers × {result.config.seeds} seed(s) · wall time {result.wall_time:.0f} s",
        "",
        f"Same budget for every router: {b.train.steps} steps of {b.train.batch_size} "
        f"{'sequences' if task == 'lm' else 'images'}{lm_line}; {moe.num_experts} experts, top-{moe.top_k}, "
        f"AdamW lr {b.train.lr:g} (warm-up {b.train.warmup_steps}, cosine to {b.train.min_lr_ratio:g}×). "
        f"Ranked by {quality}; metrics from the final evaluation on the validation split "
        f"({b.train.eval_batches or 'all'} batches).",
        "",
        "## Leaderboard",
        "",
        leaderboard_markdown(result.leaderboard, task),
        "",
        "Balance columns: load CV = std/mean of tokens per expert (0 = perfectly balanced); max/mean = busiest expert "
        "over a fair share; dropped = assignments dropped by capacity; dead = experts that got no token (summed over "
        "layers); entropy = mean per-token router entropy in nats (ln E = uniform). tokens/s = median per-step rate "
        "of tokens routed per second of training on this machine (noisy on a shared machine: compare it within one "
        "study only). Active parameters count the experts one token uses (top-k of E). The papers' measurements "
        "(`smoe.study.measures`): RC = representation collapse Tr(Σ_W Σ_B⁺) of the routed representations with "
        "class = top-1 expert (X-MoE; smaller = more collapsed), NMI = normalised mutual information of top-1 "
        "expert and label (image class, or byte class for text), fluct = fraction of a fixed probe set whose top-k "
        "experts changed between consecutive evaluations, "
        + (
            "corrupted acc = mean accuracy on 5 Fashion-MNIST-C corruptions × severities 1, 3, 5"
            if task == "vision"
            else "loss @10% noise = validation loss with 10% of the input bytes replaced at random"
        )
        + ". With several seeds every number is the mean ± the half-width of its 95% t interval, and `vs baseline` "
        "is the paired difference in quality from the baseline router (* = beyond seed noise).",
        "",
        "## Routers",
        "",
    ]
    for row in result.leaderboard:
        run = next(r for r in result.runs if r.variant.name == row["router"])
        extra = f" (routing groups: `{run.group_mode}`)" if run.group_mode != "batch" else ""
        lines.append(f"- `{row['router']}`: {run.variant.description}{extra}.")
        if "error" in row:
            lines.append(f"  - **failed**: `{row['error']}`")
    lines += ["", "## Plots", plot_note]
    for name, title in (
        ("curves", "Learning curves"),
        ("expert_load", "Expert load per layer"),
        ("tradeoff", "Quality vs. balance"),
        ("measures", "The papers' measurements"),
    ):
        if name in files:
            lines += [f"### {title}", "", f"![{title}]({files[name].name})", ""]
    tsne = [(row["router"], out / f"tsne_{row['router']}.png") for row in result.leaderboard]
    tsne = [(name, f) for name, f in tsne if f.is_file()]
    if tsne:
        lines += [
            "### Routed representations (t-SNE, first seed)",
            "",
            "The last MoE layer's input on the probe set, coloured by top-1 expert (left) and by label (right).",
            "",
        ]
        lines += [f"![{name}]({f.name})" for name, f in tsne] + [""]
    ic = [(r["router"], r["ic"]) for r in result.leaderboard if _finite(r.get("ic"))]
    if ic:
        lines += [
            "### Inter-run consistency of the expert loads",
            "",
            "X-MoE's IC = mean Pearson correlation of the per-expert loads of every pair of seeds (1 = the same load "
            "profile), on loads sorted by size since experts of different seeds do not correspond; mean over layers:",
            "",
            ", ".join(f"`{name}` {value:.3f}" for name, value in ic),
            "",
        ]
    lines += [
        "## Per-layer routing diagnostics (first seed)",
        "",
        *_layer_table(result),
        "",
        "## Reproduce",
        "",
        "```",
        _command(result),
        "```",
        "",
        *_what_ran(result),
        "Every run folder under `runs/` holds its resolved `config.json`, `metrics.jsonl` and a checkpoint "
        "(`smoe eval <run folder>`).",
        "",
    ]
    files["report"] = out / "report.md"
    atomic_write_text(files["report"], "\n".join(lines))
    files["leaderboard"] = out / "leaderboard.json"
    atomic_write_text(files["leaderboard"], json.dumps(result.leaderboard, indent=1))
    files["results"] = out / "results.json"
    atomic_write_text(files["results"], json.dumps(_results_json(result), indent=1))
    return files


_MEASURE_NAMES = {
    "loss": "validation loss",
    "accuracy": "validation accuracy",
    "rc": "representation collapse RC",
    "nmi": "expert/label NMI",
    "fluct": "routing fluctuation",
    "robust": "robustness",
}


def verdict_lines(result) -> list[str]:
    """The report's first lines: which routers differ from the baseline beyond seed noise, or that none does."""
    rows = [r for r in result.leaderboard if "error" not in r]
    seeds = max((r.get("seeds", 1) for r in rows), default=1)
    if not rows:
        return ["**Every run failed: nothing to compare.**"]
    if seeds < 2:
        return [
            "**One seed per router: no confidence intervals, so no difference below can be told from seed noise "
            "(run with `--seeds 2` or more).**"
        ]
    base = baseline_router([r["router"] for r in rows])
    names = dict(_MEASURE_NAMES)
    names["robust"] = "corrupted accuracy" if result.task == "vision" else "loss under 10% input noise"
    quality = "accuracy" if result.task == "vision" else "loss"
    found, q_found = [], []
    for r in rows:
        for key, c in r.get("paired", {}).items():
            if c["beyond"]:
                sign = "higher" if c["diff"] > 0 else "lower"
                text = f"`{r['router']}` {sign} {names[key]} ({c['diff']:+.3g} ± {c['ci']:.2g})"
                (q_found if key == quality else found).append(text)
    head = (
        f"**{seeds} seeds per router; differences from `{base}` are paired by seed with 95% t intervals (marked * in "
        "the table when the interval excludes 0).** "
    )
    if not q_found:
        head += f"**No router's {names[quality]} differs from `{base}` beyond seed noise.**"
    else:
        head += "Beyond seed noise on quality: " + "; ".join(q_found) + "."
    tail = ("Beyond seed noise on the measurements: " + "; ".join(found) + ".") if found else (
        "No measurement (RC, NMI, fluctuation, robustness) differs from the baseline beyond seed noise.")  # fmt: skip
    return [head, "", tail]


def _what_ran(result) -> list[str]:
    """What actually ran per router: the MoE settings the study set on top of the base config and ``--set``."""
    if not result.settings:
        return []
    lines = ["What ran, per router (MoE settings the study changed from the base configuration):", ""]
    for name, changed in result.settings.items():
        shown = {k: v for k, v in changed.items() if k != "moe.router"}
        text = ", ".join(f"`{k}={v!r}`" for k, v in shown.items()) or "the base configuration"
        lines.append(f"- **{name}**: {text}")
    lines.append("")
    return lines


def _command(result) -> str:
    c = result.config
    parts = ["smoe study", f"--task {c.task}"]
    if c.quick:
        parts.append("--quick")
    parts.append(f"--preset {result.preset}")
    parts.append("--routers " + ",".join(dict.fromkeys(r.variant.name for r in result.runs)))
    if c.seeds != 1:
        parts.append(f"--seeds {c.seeds}")
    parts += [f"--set {k}={v}" for k, v in c.overrides.items()]
    return " ".join(parts)


def _results_json(result) -> dict:
    return {
        "task": result.task,
        "preset": result.preset,
        "data": result.data_info,
        "wall_time": result.wall_time,
        "command": _command(result),
        "runs": [
            {
                "router": r.variant.name,
                "seed": r.seed,
                "run_dir": str(r.run_dir),
                "group_mode": r.group_mode,
                "error": r.error,
                "final": r.final,
                "validation_curve": r.curve,
            }
            for r in result.runs
        ],
    }
