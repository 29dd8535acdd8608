"""``DataConfig`` and :func:`build_data`: from a task and a few options to ready batches.

``dataset`` names a registered dataset (``smoe ls datasets``); ``path`` instead points at a local UTF-8 text file,
or at a Hugging Face dataset as ``hf:NAME[:CONFIG]`` (optional, needs the ``datasets`` package and a network or a
warm cache). With neither, the preferred installed dataset of the task is used: Shakespeare for ``lm`` (then the
enwiki excerpt, then the always-present pydoc topics), Fashion-MNIST for ``vision`` (then scikit-learn digits),
QuickDraw for ``vae`` (then Fashion-MNIST, then digits).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from smoe.data.batches import ImageData, LMData
from smoe.data.images import ImageSplits
from smoe.data.registry import TASKS, default_dataset, get_dataset, load_dataset
from smoe.data.text import TextSplits, load_hf_text, load_text_file
from smoe.data.tokenizer import TOKENIZERS, build_tokenizer, tokenizer_from_dict

__all__ = ["DataConfig", "build_data"]


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """What data a run trains on.

    Attributes:
        dataset: a registered dataset name, or ``None`` for the task's default.
        path: a local text file or ``hf:NAME[:CONFIG]`` (language modelling only); overrides ``dataset``.
        tokenizer: ``"byte"`` (default, vocabulary 256) or ``"bpe"`` (byte-level BPE trained on the train split).
        bpe_vocab_size: BPE vocabulary size.
        seq_len: training/evaluation window ``L`` of a language model; ``None`` takes the model's context length.
        quickdraw_categories: how many QuickDraw categories (``0``: the default ten).
        train_fraction: train on this fraction of the training images, a fixed seeded subset (the same for every
            run and seed), in ``(0, 1]``; the SMoE-VAE paper's data-fraction sweep. Images only.
    """

    dataset: str | None = None
    path: str | None = None
    tokenizer: str = "byte"
    bpe_vocab_size: int = 1024
    seq_len: int | None = None
    quickdraw_categories: int = 0
    train_fraction: float = 1.0


def _load_splits(task: str, cfg: DataConfig) -> TextSplits | ImageSplits:
    if cfg.path:
        if task != "lm":
            raise ValueError(f"data path {cfg.path!r} is only supported for task 'lm' (got task {task!r})")
        return load_hf_text(cfg.path[3:]) if cfg.path.startswith("hf:") else load_text_file(cfg.path)
    name = cfg.dataset or default_dataset(task)
    spec = get_dataset(name)
    if task not in spec.tasks:
        raise ValueError(f"dataset {name!r} serves tasks {spec.tasks}, not {task!r}")
    options = {}
    if name == "quickdraw" and cfg.quickdraw_categories:
        options["categories"] = cfg.quickdraw_categories
    return load_dataset(name, **options)


def build_data(
    task: str,
    cfg: DataConfig,
    *,
    batch_size: int,
    seq_len: int | None = None,
    seed: int = 0,
    tokenizer_state: dict | None = None,
) -> LMData | ImageData:
    """Load the data of ``task`` described by ``cfg``.

    Args:
        task: ``"lm"``, ``"vision"`` or ``"vae"``.
        cfg: the data options.
        batch_size: ``B``.
        seq_len: window length for a language model when ``cfg.seq_len`` is ``None`` (the model's context).
        seed: data seed.
        tokenizer_state: a saved tokenizer (``to_dict()``) to reuse instead of building one (eval / resume).

    Returns:
        :class:`~smoe.data.batches.LMData` or :class:`~smoe.data.batches.ImageData`.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if cfg.tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {cfg.tokenizer!r}; expected one of {TOKENIZERS}")
    splits = _load_splits(task, cfg)
    if task == "lm":
        if cfg.train_fraction != 1:
            raise ValueError(f"data.train_fraction={cfg.train_fraction} applies to image datasets only")
        if not isinstance(splits, TextSplits):
            raise ValueError(f"dataset {splits.name!r} is not a text corpus")
        L = cfg.seq_len or seq_len
        if not L:
            raise ValueError("language modelling needs a seq_len (data.seq_len or the model's context length)")
        if tokenizer_state is not None:
            tok = tokenizer_from_dict(tokenizer_state)
        else:
            tok = build_tokenizer(cfg.tokenizer, splits.train, vocab_size=cfg.bpe_vocab_size)
        return LMData(splits, tok, batch_size=batch_size, seq_len=L, seed=seed)
    if not isinstance(splits, ImageSplits):
        raise ValueError(f"dataset {splits.name!r} is not an image dataset")
    return ImageData(train_subset(splits, cfg.train_fraction), task=task, batch_size=batch_size, seed=seed)


def train_subset(splits: ImageSplits, fraction: float) -> ImageSplits:
    """``splits`` with its training images cut to a fixed seeded ``fraction`` (at least one image)."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise ValueError(f"data.train_fraction must be a number in (0, 1], got {fraction!r}")
    if fraction == 1:
        return splits
    n = splits.size("train")
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: max(1, round(fraction * n))].sort().values
    images = {**splits.images, "train": splits.images["train"][keep]}
    labels = {**splits.labels, "train": splits.labels["train"][keep]}
    return dataclasses.replace(splits, images=images, labels=labels)
