"""String registry of datasets: ``register_dataset`` / ``get_dataset`` / ``list_datasets`` / ``load_dataset``.

Every dataset is real and loads offline from an installed package (pip, apt-get or npm) or from the Python
standard library; none downloads anything. A dataset that is not installed is still listed (``smoe ls datasets``
shows it as unavailable, with the command that installs it), and loading it raises :class:`DataUnavailableError`
naming that command.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TASKS",
    "DatasetSpec",
    "DataUnavailableError",
    "register_dataset",
    "get_dataset",
    "list_datasets",
    "load_dataset",
    "default_dataset",
]

#: the tasks a dataset can serve: language modelling, image classification, image generation (SMoE-VAE)
TASKS = ("lm", "vision", "vae")


class DataUnavailableError(ValueError):
    """A known dataset whose files are not installed on this machine (the message says how to install them)."""


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """A registered dataset.

    Attributes:
        name: registry name (``smoe train --dataset NAME``).
        tasks: the tasks it serves, a subset of :data:`TASKS`.
        description: one line: what it is, its size, its licence.
        install: the command that makes it available.
        is_available: returns whether the files are present (cheap: never parses the data).
        loader: builds the dataset's splits (:class:`~smoe.data.text.TextSplits` or
            :class:`~smoe.data.images.ImageSplits`); takes keyword options of its own.
        priority: order of preference among the available datasets of a task when none is named (lower first); an
            int for every task, or a ``{task: int}`` dict (tasks not in it rank last).
    """

    name: str
    tasks: tuple[str, ...]
    description: str
    install: str
    is_available: Callable[[], bool]
    loader: Callable[..., Any]
    priority: int | dict[str, int] = 100

    def rank(self, task: str) -> int:
        """Preference rank of this dataset for ``task`` (lower is preferred)."""
        return self.priority if isinstance(self.priority, int) else self.priority.get(task, 1000)

    def available(self) -> bool:
        """Whether the dataset's files are present; never raises."""
        try:
            return bool(self.is_available())
        except Exception:  # a broken optional install counts as absent
            return False


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(
    name: str,
    *,
    tasks: tuple[str, ...],
    description: str,
    install: str,
    is_available: Callable[[], bool],
    priority: int | dict[str, int] = 100,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a loader function under ``name``."""
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"dataset {name!r}: unknown task(s) {bad}; expected a subset of {TASKS}")

    def deco(loader: Callable[..., Any]) -> Callable[..., Any]:
        if name in _DATASETS and _DATASETS[name].loader is not loader:
            raise ValueError(f"dataset name {name!r} is already registered")
        _DATASETS[name] = DatasetSpec(
            name=name,
            tasks=tuple(tasks),
            description=description,
            install=install,
            is_available=is_available,
            loader=loader,
            priority=priority,
        )
        return loader

    return deco


def list_datasets(task: str | None = None) -> list[str]:
    """Names of the registered datasets (serving ``task`` if given), sorted."""
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return sorted(n for n, s in _DATASETS.items() if task is None or task in s.tasks)


def get_dataset(name: str) -> DatasetSpec:
    """The dataset registered under ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return _DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list_datasets()}") from None


def load_dataset(name: str, **options: Any) -> Any:
    """Load the dataset ``name``; :class:`DataUnavailableError` (a ``ValueError``) if it is not installed."""
    spec = get_dataset(name)
    if not spec.available():
        raise DataUnavailableError(
            f"dataset {name!r} is not installed on this machine; install it with: {spec.install}"
        )
    return spec.loader(**options)


def default_dataset(task: str) -> str:
    """The preferred available dataset of ``task`` (e.g. Shakespeare for ``"lm"``, Fashion-MNIST for ``"vision"``).

    Raises:
        DataUnavailableError: when no dataset of the task is installed (the message lists the install commands).
    """
    names = sorted(list_datasets(task), key=lambda n: (_DATASETS[n].rank(task), n))
    for n in names:
        if _DATASETS[n].available():
            return n
    hints = "; ".join(f"{n}: {_DATASETS[n].install}" for n in names)
    raise DataUnavailableError(f"no dataset for task {task!r} is installed; install one of them ({hints})")
