"""``run_study``: train one model with each routing method under the same budget, then rank them.

Same budget means: the same base preset (same experts, ``top_k`` and hence the same active parameters), the same
optimizer steps, batch size and sequence length (the same tokens), the same data order for a given seed, and the
same learning-rate schedule. Only the routing changes (:mod:`smoe.study.variants`). With ``seeds > 1`` every router
runs once per seed and the leaderboard reports means (and the spread of the quality metric).

Output folder (``runs/study-<timestamp>/`` by default)::

    study.json           what the study compares (task, preset, routers, seeds, overrides): what --resume reads
    report.md            leaderboard, setup, per-layer diagnostics, plots
    leaderboard.json     the rows of the leaderboard
    results.json         every run's final metrics and curves
    curves.png           validation loss (and smoothed training loss) per router
    expert_load.png      per-layer expert-load heatmaps per router
    tradeoff.png         quality vs. load balance
    runs/<router>-seed<s>/   a complete run folder each (config.json, metrics.jsonl, checkpoint): `smoe eval` works

A killed study continues with ``resume=True`` (``smoe study --resume --out DIR``): finished runs (``final.json``)
are kept, the interrupted one resumes exactly from its newest checkpoint (runs checkpoint at every evaluation, the
newest kept), and runs that had not started start. Re-running into a folder that holds an interrupted study without
``--resume`` is refused, so no run is restarted into an old log.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from smoe.data import build_data
from smoe.study.measures import ProbeRecorder, StudyProbe, measure_run, plot_routed
from smoe.study.variants import StudyVariant, resolve_variants, variant_overrides
from smoe.train.checkpoint import atomic_write_text, latest_checkpoint, read_json
from smoe.train.config import TrainConfig
from smoe.train.device import resolve_device
from smoe.train.run import RunConfig, fit_model_to_data, resolve_run_config, write_run_config
from smoe.train.trainer import Trainer, TrainingDiverged

__all__ = ["StudyConfig", "StudyRun", "StudyResult", "run_study", "study_budget", "STUDY_TASKS"]

STUDY_TASKS = ("lm", "vision")

#: default presets: (task, quick) -> preset
DEFAULT_PRESETS = {
    ("lm", False): "lm_study",
    ("lm", True): "lm_debug",
    ("vision", False): "vit_small",
    ("vision", True): "vit_debug",
}


def study_budget(task: str, quick: bool) -> TrainConfig:
    """The default training budget of a study (the default LM study, 5 routers x 2 seeds on ``lm_study``, takes
    about 15 minutes on 2 CPU cores, ``--quick`` well under 2 minutes; every field can be changed with
    ``--set train.FIELD=VALUE``). The LM budget of 800 steps is past the byte-level plateau (near 2.5 nats) that
    the earlier 300-step budget stopped on, where every learned router was within seed noise."""
    if task == "lm":
        if quick:
            return TrainConfig(
                steps=60, batch_size=8, lr=3e-3, warmup_steps=6, eval_every=20, eval_batches=4, **ckpt(20)
            )
        return TrainConfig(
            steps=800, batch_size=16, lr=3e-3, warmup_steps=30, eval_every=100, eval_batches=16, **ckpt(100)
        )
    if quick:
        return TrainConfig(steps=60, batch_size=16, lr=3e-3, warmup_steps=6, eval_every=20, eval_batches=4, **ckpt(20))
    return TrainConfig(steps=300, batch_size=64, lr=2e-3, warmup_steps=30, eval_every=50, eval_batches=16, **ckpt(50))


def ckpt(every: int) -> dict:
    """A checkpoint at every evaluation, only the newest kept: what a killed study resumes from."""
    return {"ckpt_every": every, "keep_checkpoints": 1}


@dataclass(kw_only=True)
class StudyConfig:
    """What a study compares and on what.

    Attributes:
        task: ``"lm"`` (default; Shakespeare, byte-level) or ``"vision"`` (Fashion-MNIST).
        preset: base model preset; ``None`` picks ``lm_small``/``vit_small`` (``lm_debug``/``vit_debug`` when quick).
        routers: router or variant names; ``None`` for the default set (:data:`~smoe.study.variants.DEFAULT_ROUTERS`).
        seeds: runs per router (seeds ``train.seed, train.seed + 1, ...``); 2 by default, so that every number
            has a confidence interval.
        quick: the small smoke-test budget and debug preset.
        overrides: dotted overrides (``moe.num_experts``, ``train.steps``, ``data.dataset``, ...).
        out_dir: output folder (``None``: ``runs/study-<timestamp>``).
        progress: progress bars.
        resume: continue the interrupted study in ``out_dir`` (its ``study.json`` decides what it compares).
        device: where every run trains (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``).
        measure: add the papers' measurements to every run (:mod:`smoe.study.measures`: collapse,
            specialisation, fluctuation, robustness).
    """

    task: str = "lm"
    preset: str | None = None
    routers: list[str] | None = None
    seeds: int = 2
    quick: bool = False
    overrides: dict[str, str] = field(default_factory=dict)
    out_dir: str | None = None
    progress: bool = True
    resume: bool = False
    device: str = "cpu"
    measure: bool = True

    def __post_init__(self) -> None:
        if self.task not in STUDY_TASKS:
            raise ValueError(f"study task must be one of {STUDY_TASKS}, got {self.task!r}")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be a positive integer, got {self.seeds!r}")


@dataclass(kw_only=True)
class StudyRun:
    """One trained (router, seed) pair."""

    variant: StudyVariant
    seed: int
    run_dir: pathlib.Path
    final: dict = field(default_factory=dict)  # final validation metrics + throughput + parameter counts
    curve: list[tuple[int, float]] = field(default_factory=list)  # validation (step, loss)
    train_curve: list[tuple[int, float]] = field(default_factory=list)  # training (step, loss)
    group_mode: str = "batch"
    error: str | None = None


@dataclass(kw_only=True)
class StudyResult:
    """Everything a study produced."""

    config: StudyConfig
    preset: str
    task: str
    base: RunConfig
    data_info: dict
    runs: list[StudyRun]
    leaderboard: list[dict]
    out_dir: pathlib.Path
    wall_time: float = 0.0
    files: dict[str, pathlib.Path] = field(default_factory=dict)
    settings: dict[str, dict] = field(default_factory=dict)  # per router: MoE settings changed from the base


def _default_out() -> pathlib.Path:
    return pathlib.Path("runs") / f"study-{time.strftime('%Y%m%d-%H%M%S')}"


def run_study(cfg: StudyConfig, *, log: Callable[[str], None] = print) -> StudyResult:
    """Train every router of ``cfg`` on the same budget, write the report, return the results.

    Raises:
        ValueError: unknown preset, router, override key or dataset, or a preset of another task.
    """
    from smoe.models.presets import apply_overrides, model_class  # noqa: PLC0415
    from smoe.study.report import leaderboard_rows, write_report  # noqa: PLC0415

    t_start = time.perf_counter()
    cfg = _resolve_resume(cfg, log)
    device = resolve_device(cfg.device)
    preset = cfg.preset or DEFAULT_PRESETS[(cfg.task, cfg.quick)]
    base = resolve_run_config(preset, cfg.overrides, train=study_budget(cfg.task, cfg.quick))
    if base.task != cfg.task:
        raise ValueError(f"preset {preset!r} is a {base.task!r} model; the study task is {cfg.task!r}")
    variants = resolve_variants(cfg.routers, cfg.task)
    out = pathlib.Path(cfg.out_dir) if cfg.out_dir else _default_out()
    if not cfg.resume:
        if (out / "report.md").exists():
            raise ValueError(f"{str(out)!r} already holds a study report; choose another --out")
        if (out / "runs").is_dir() and any((out / "runs").iterdir()):
            raise ValueError(
                f"{str(out)!r} holds an interrupted study; pass --resume to continue it, or choose another --out"
            )
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "study.json", json.dumps(_study_record(cfg), indent=1))

    # the data is loaded once and shared by every run (each seed gets its own data order)
    data = build_data(
        cfg.task,
        base.data,
        batch_size=base.train.batch_size,
        seq_len=getattr(base.model, "seq_len", None),
        seed=base.train.seed,
    )
    probe = StudyProbe(cfg.task, data) if cfg.measure else None  # the measurements' fixed probe data
    model_cfg, changes = fit_model_to_data(base.model, data)
    data_cfg = base.data if base.data.dataset or base.data.path else dataclasses.replace(base.data, dataset=data.name)
    base = dataclasses.replace(base, model=model_cfg, data=data_cfg)
    log(
        f"smoe study: task={cfg.task} preset={preset} data={data.name} routers={[v.name for v in variants]} "
        f"seeds={cfg.seeds} steps={base.train.steps} batch={base.train.batch_size}"
        + (f" seq_len={data.seq_len}" if cfg.task == "lm" else "")
        + f" -> {out}"
    )

    runs: list[StudyRun] = []
    settings: dict[str, dict] = {}  # per router: the MoE settings the study changed from the base config
    for variant in variants:
        over = variant_overrides(variant, model_cfg)
        v_cfg = apply_overrides(model_cfg, over)
        changed = _changed_settings(model_cfg, v_cfg)
        for key, (_was, now) in changed.items():
            if key in cfg.overrides and str(now) != str(cfg.overrides[key]):
                log(
                    f"smoe study: {variant.name}: {key}={now!r}, not your --set {key}={cfg.overrides[key]} "
                    f"({_why(key)})"
                )
        settings[variant.name] = {k: now for k, (was, now) in changed.items()}
        for s in range(cfg.seeds):
            seed = base.train.seed + s
            train_cfg = dataclasses.replace(base.train, seed=seed)
            run_dir = out / "runs" / f"{variant.name}-seed{seed}"
            run = StudyRun(variant=variant, seed=seed, run_dir=run_dir, group_mode=v_cfg.moe.group_mode)
            if cfg.resume and (run_dir / "final.json").is_file():  # finished before the interruption: kept
                run.final = read_json(run_dir / "final.json", "run result")
                if (run_dir / "measures.json").is_file():
                    run.final.update(read_json(run_dir / "measures.json", "run measurements"))
                history = _read_history(run_dir)
                run.curve = [(r["step"], r["loss"]) for r in history if r["split"] == "validation"]
                run.train_curve = [(r["step"], r["loss"]) for r in history if r["split"] == "train"]
                log(_one_line(variant.name, seed, run.final, cfg.task) + " (kept)")
                runs.append(run)
                continue
            try:
                torch.manual_seed(seed)
                model = model_class(v_cfg.task)(v_cfg)
                run_data = data.with_seed(seed)
                resuming = cfg.resume and latest_checkpoint(run_dir) is not None
                if not resuming:  # a fresh start: nothing of an earlier attempt is kept or appended to
                    for stale in ("metrics.jsonl", "error.txt"):
                        (run_dir / stale).unlink(missing_ok=True)
                    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
                    write_run_config(
                        run_dir,
                        RunConfig(preset=preset, model=v_cfg, train=train_cfg, data=data_cfg),
                        run_data,
                        changes,
                    )
                if not resuming:
                    (run_dir / "probe_routing.pt").unlink(missing_ok=True)
                recorder = None
                if probe is not None:  # the probe set's routing at every evaluation (fluctuation)
                    recorder = ProbeRecorder(probe, train_cfg.eval_every, train_cfg.steps, run_dir)
                trainer = Trainer(
                    model,
                    run_data,
                    train_cfg,
                    run_dir=run_dir,
                    progress=cfg.progress,
                    desc=f"{variant.name} s{seed}",
                    device=device,
                    on_step=recorder,
                )
                if resuming:
                    trainer.resume()
                run.final = trainer.fit()
                if probe is not None:
                    measured = measure_run(trainer.model, probe, recorder)
                    atomic_write_text(run_dir / "measures.json", json.dumps(measured, indent=1))
                    run.final.update(measured)
                    if s == 0:  # the first seed's routed representations, for the report
                        plot_routed(trainer.model, probe, out / f"tsne_{variant.name}.png", title=variant.name)
                history = _read_history(run_dir)  # the whole run, also the part before a resume
                run.curve = [(r["step"], r["loss"]) for r in history if r["split"] == "validation"]
                run.train_curve = [(r["step"], r["loss"]) for r in history if r["split"] == "train"]
                log(_one_line(variant.name, seed, run.final, cfg.task) + (" (resumed)" if resuming else ""))
            except TrainingDiverged as e:  # a visible state of its own, listed last
                run.error = f"diverged at step {e.step}"
                log(f"  {variant.name} seed {seed}: {run.error}")
                (run_dir / "error.txt").parent.mkdir(parents=True, exist_ok=True)
                (run_dir / "error.txt").write_text(str(e), encoding="utf-8")
            except (RuntimeError, ValueError, ArithmeticError) as e:  # one failing router must not sink the study
                run.error = f"{type(e).__name__}: {e}"
                log(f"  {variant.name} seed {seed}: FAILED: {run.error}")
                (run_dir / "error.txt").parent.mkdir(parents=True, exist_ok=True)
                (run_dir / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
            runs.append(run)

    result = StudyResult(
        config=cfg,
        preset=preset,
        task=cfg.task,
        base=base,
        data_info=data.describe(),
        runs=runs,
        leaderboard=leaderboard_rows(runs, cfg.task),
        out_dir=out,
        settings=settings,
    )
    result.wall_time = time.perf_counter() - t_start
    result.files = write_report(result)
    result.wall_time = time.perf_counter() - t_start
    return result


_WHY = {
    "moe.group_mode": "a router whose tokens compete routes per position in a causal LM, so no token sees its "
    "sequence's future; Soft MoE routes per image",
    "moe.capacity_factor": "a router other than the preset's runs dropless",
    "moe.eval_capacity_factor": "a router other than the preset's runs dropless",
    "moe.eval_batch_priority": "a router other than the preset's runs dropless",
    "moe.router_kwargs": "each router runs with its own options",
    "moe.images_per_group": "Soft MoE routes per image",
    "moe.router": "the router under study",
}


def _why(key: str) -> str:
    return _WHY.get(key, "the study's setting for this router")


def _changed_settings(base, variant) -> dict[str, tuple]:
    """``{"moe.<field>": (base value, variant value)}`` for every MoE field the variant changes."""
    out = {}
    for f in dataclasses.fields(base.moe):
        was, now = getattr(base.moe, f.name), getattr(variant.moe, f.name)
        if was != now:
            out[f"moe.{f.name}"] = (was, now)
    return out


def _study_record(cfg: StudyConfig) -> dict:
    return {
        "task": cfg.task,
        "preset": cfg.preset,
        "routers": cfg.routers,
        "seeds": cfg.seeds,
        "quick": cfg.quick,
        "overrides": cfg.overrides,
    }


def _resolve_resume(cfg: StudyConfig, log) -> StudyConfig:
    """For ``resume``: the study as ``study.json`` of its folder records it (its flags win over the caller's)."""
    if not cfg.resume:
        return cfg
    if not cfg.out_dir:
        raise ValueError("--resume needs --out DIR, the folder of the study to continue")
    path = pathlib.Path(cfg.out_dir) / "study.json"
    if not path.is_file():
        raise ValueError(f"cannot resume: {str(cfg.out_dir)!r} holds no study.json of an earlier study")
    record = read_json(path, "study record")
    saved = dataclasses.replace(cfg, **record)
    if _study_record(cfg) != record and (cfg.routers or cfg.overrides or cfg.preset):
        log("smoe study: --resume continues the saved study; its study.json wins over other flags")
    return saved


def _read_history(run_dir: pathlib.Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _one_line(name: str, seed: int, final: dict, task: str) -> str:
    quality = f"acc={final['accuracy']:.4f}" if task == "vision" else f"bpb={final['bpb']:.4f}"
    return (
        f"  {name:<16} seed {seed}: val_loss={final['loss']:.4f} {quality} load_cv={final['load_cv']:.3f} "
        f"drop={final['drop_rate']:.3f} dead={int(final['dead_experts'])} {final['tokens_per_s']:.0f} tok/s"
    )
