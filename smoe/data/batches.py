"""Deterministic, stateless batching: the training batch of step ``s`` is a pure function of ``(seed, s)``.

That is what makes resuming exact: the "data position" of a run is just its step count, stored in the checkpoint,
and a resumed run draws the very batches an uninterrupted run would have drawn. Evaluation batches are fixed
(evenly spaced windows of the split for text, the first images of the split for vision), so every evaluation of
every run sees the same data.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from smoe.data.images import ImageSplits
from smoe.data.text import TextSplits

__all__ = ["LMData", "ImageData", "step_generator"]

_SPLITS = ("train", "validation", "test")


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, step)`` alone (independent of any global RNG)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class LMData:
    """Token streams of a text corpus, served as ``(inputs (B, L), targets (B, L))`` int64 windows.

    Args:
        splits: the text of each split.
        tokenizer: a tokenizer from :mod:`smoe.data.tokenizer`.
        batch_size: ``B``.
        seq_len: ``L``.
        seed: data seed (the training windows of step ``s`` depend on ``(seed, s)`` only).
    """

    task = "lm"

    def __init__(self, splits: TextSplits, tokenizer, *, batch_size: int, seq_len: int, seed: int = 0) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        self.name, self.tokenizer = splits.name, tokenizer
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.tokens: dict[str, Tensor] = {}
        self.bytes_per_token: dict[str, float] = {}
        for split in _SPLITS:
            text = splits.split(split)
            ids = tokenizer.encode(text)
            if ids.numel() < seq_len + 2:
                raise ValueError(
                    f"the {split} split of {splits.name!r} has {ids.numel()} tokens; "
                    f"seq_len={seq_len} needs at least {seq_len + 2}"
                )
            self.tokens[split] = ids
            self.bytes_per_token[split] = len(text.encode("utf-8")) / ids.numel()
        self.documents = dict(splits.documents)
        self.source = splits.source

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def with_seed(self, seed: int) -> LMData:
        """The same token streams (shared, not copied) with another data seed."""
        new = copy.copy(self)
        new.seed = seed
        return new

    def _windows(self, split: str, start_B: Tensor) -> tuple[Tensor, Tensor]:
        chunk_BL1 = self.tokens[split][start_B.unsqueeze(1) + torch.arange(self.seq_len + 1)]
        return chunk_BL1[:, :-1].contiguous(), chunk_BL1[:, 1:].contiguous()

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The training batch of step ``step``: ``B`` windows at uniformly random offsets of the train split."""
        n = self.tokens["train"].numel() - self.seq_len - 1
        start_B = torch.randint(0, n + 1, (self.batch_size,), generator=step_generator(self.seed, step))
        return self._windows("train", start_B)

    def num_eval_windows(self, split: str) -> int:
        """How many disjoint ``L``-token windows the split holds."""
        return (self.tokens[split].numel() - 1) // self.seq_len

    def eval_batches(self, split: str, max_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Disjoint windows spread evenly over the whole split (all of them when ``max_batches`` is ``None``)."""
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {_SPLITS}")
        total = self.num_eval_windows(split)
        n = total if not max_batches else min(total, max_batches * self.batch_size)
        # window j of the chosen n starts at token L * round(j * (total - 1) / (n - 1)): first and last included
        pick = torch.linspace(0, total - 1, n).round().long() if n > 1 else torch.zeros(1, dtype=torch.long)
        starts = pick * self.seq_len
        for i in range(0, n, self.batch_size):
            yield self._windows(split, starts[i : i + self.batch_size])

    def describe(self) -> dict:
        """JSON-able summary for the run record."""
        return {
            "dataset": self.name,
            "source": self.source,
            "tokenizer": self.tokenizer.name,
            "vocab_size": self.vocab_size,
            "tokens": {k: int(v.numel()) for k, v in self.tokens.items()},
            "documents": self.documents,
            "bytes_per_token": {k: round(v, 6) for k, v in self.bytes_per_token.items()},
            "seq_len": self.seq_len,
        }


class ImageData:
    """Image splits served as ``(images (B, C, H, W) float32 in [0, 1], labels (B,) int64)``.

    Training batches walk through the train split in epochs, each epoch a fresh permutation seeded by
    ``(seed, epoch)``; batch ``s`` covers samples ``s*B .. s*B+B-1`` of that endless sequence.

    Args:
        splits: the dataset.
        task: ``"vision"`` (classification) or ``"vae"`` (generation; the labels are returned but unused).
        batch_size: ``B``.
        seed: data seed.
    """

    def __init__(self, splits: ImageSplits, *, task: str = "vision", batch_size: int, seed: int = 0) -> None:
        if task not in ("vision", "vae"):
            raise ValueError(f"ImageData task must be 'vision' or 'vae', got {task!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.task, self.splits, self.name = task, splits, splits.name
        self.batch_size, self.seed = batch_size, seed
        self._perm_cache: tuple[int, Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return self.splits.num_classes

    def with_seed(self, seed: int) -> ImageData:
        """The same images (shared, not copied) with another data seed."""
        new = copy.copy(self)
        new.seed, new._perm_cache = seed, None
        return new

    @property
    def image_size(self) -> int:
        return self.splits.image_size

    @property
    def channels(self) -> int:
        return self.splits.channels

    def _perm(self, epoch: int) -> Tensor:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            n = self.splits.size("train")
            self._perm_cache = (epoch, torch.randperm(n, generator=step_generator(self.seed, epoch)))
        return self._perm_cache[1]

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The training batch of step ``step``."""
        n = self.splits.size("train")
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs = pos // n
        index_B = torch.empty_like(pos)
        for e in torch.unique(epochs).tolist():
            m = epochs == e
            index_B[m] = self._perm(int(e))[pos[m] % n]
        return self.splits.batch("train", index_B)

    def eval_batches(self, split: str, max_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """The first ``max_batches * B`` images of the split in order (all when ``max_batches`` is ``None``)."""
        n = self.splits.size(split)
        if max_batches:
            n = min(n, max_batches * self.batch_size)
        for i in range(0, n, self.batch_size):
            yield self.splits.batch(split, torch.arange(i, min(i + self.batch_size, n)))

    def num_eval_batches(self, split: str, max_batches: int | None = None) -> int:
        n = self.splits.size(split)
        if max_batches:
            n = min(n, max_batches * self.batch_size)
        return math.ceil(n / self.batch_size)

    def describe(self) -> dict:
        """JSON-able summary for the run record."""
        return {
            "dataset": self.name,
            "source": self.splits.source,
            "images": {k: self.splits.size(k) for k in _SPLITS},
            "image_size": self.image_size,
            "channels": self.channels,
            "num_classes": self.num_classes,
        }
