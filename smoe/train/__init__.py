"""Training: config, optimizer and schedule, the trainer loop, atomic checkpoints with exact resume, runs."""

from smoe.train.checkpoint import latest_checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from smoe.train.config import TrainConfig, apply_dataclass_overrides
from smoe.train.optim import WarmupCosine, build_optimizer, build_scheduler
from smoe.train.run import RunConfig, evaluate_run, load_run_config, prepare_run, resolve_run_config, train_run
from smoe.train.trainer import Trainer, TrainingDiverged, count_parameters, has_expert_bias

__all__ = [
    "TrainConfig",
    "apply_dataclass_overrides",
    "WarmupCosine",
    "build_optimizer",
    "build_scheduler",
    "Trainer",
    "TrainingDiverged",
    "count_parameters",
    "has_expert_bias",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "resolve_checkpoint",
    "RunConfig",
    "resolve_run_config",
    "prepare_run",
    "train_run",
    "load_run_config",
    "evaluate_run",
]
