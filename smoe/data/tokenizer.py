"""Tokenizers: UTF-8 bytes (the default, vocabulary 256) or byte-level BPE trained offline on the train split.

A tokenizer serialises to a JSON-able dict (:meth:`to_dict`) that is saved next to every run, so that ``smoe eval``
rebuilds exactly the tokenizer the model was trained with (:func:`tokenizer_from_dict`).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
from torch import Tensor

__all__ = ["ByteTokenizer", "BPETokenizer", "build_tokenizer", "tokenizer_from_dict", "TOKENIZERS"]

TOKENIZERS = ("byte", "bpe")


class ByteTokenizer:
    """UTF-8 bytes as tokens (enwik8-style byte-level modelling): ``vocab_size = 256``, lossless on any text."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> Tensor:
        """``(N,)`` int64 token ids of ``text``'s UTF-8 bytes."""
        return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))

    def decode(self, ids: Tensor | list[int]) -> str:
        """Text of ``ids`` (invalid UTF-8 sequences become U+FFFD)."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return bytes(int(i) for i in values).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        """JSON-able description (see :func:`tokenizer_from_dict`)."""
        return {"kind": "byte"}


class BPETokenizer:
    """Byte-level BPE from the ``tokenizers`` package, trained offline on the training text.

    Args:
        vocab_size: target vocabulary size (at least 257: the 256 byte symbols plus merges).
    """

    name = "bpe"

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.vocab_size = int(tokenizer.get_vocab_size())

    @classmethod
    def train(cls, text: str, vocab_size: int = 1024) -> BPETokenizer:
        """Train a byte-level BPE on ``text`` (deterministic for a given text and size)."""
        if importlib.util.find_spec("tokenizers") is None:
            raise ValueError("tokenizer 'bpe' needs the 'tokenizers' package: pip install tokenizers")
        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(f"bpe vocab_size must be an integer >= 257, got {vocab_size!r}")
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        chunk = 1 << 16
        tok.train_from_iterator((text[i : i + chunk] for i in range(0, len(text), chunk)), trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> Tensor:
        """``(N,)`` int64 token ids."""
        chunk = 1 << 20  # encode in pieces cut at line breaks to bound memory
        ids: list[int] = []
        start = 0
        while start < len(text):
            end = len(text) if start + chunk >= len(text) else text.rfind("\n", start, start + chunk) + 1
            if end <= start:
                end = min(len(text), start + chunk)
            ids.extend(self._tok.encode(text[start:end]).ids)
            start = end
        return torch.tensor(ids, dtype=torch.int64)

    def decode(self, ids: Tensor | list[int]) -> str:
        """Text of ``ids``."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self._tok.decode([int(i) for i in values])

    def to_dict(self) -> dict:
        """JSON-able description including the trained vocabulary and merges."""
        return {"kind": "bpe", "tokenizer_json": self._tok.to_str()}


def build_tokenizer(kind: str, train_text: str, *, vocab_size: int = 1024) -> ByteTokenizer | BPETokenizer:
    """A tokenizer of ``kind`` (``"byte"`` or ``"bpe"``); BPE is trained on ``train_text``."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(train_text, vocab_size)
    raise ValueError(f"unknown tokenizer {kind!r}; expected one of {TOKENIZERS}")


def tokenizer_from_dict(d: dict) -> ByteTokenizer | BPETokenizer:
    """Rebuild a tokenizer saved by ``to_dict``."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer  # noqa: PLC0415

        return BPETokenizer(Tokenizer.from_str(d["tokenizer_json"]))
    raise ValueError(f"unknown saved tokenizer kind {kind!r}; expected one of {TOKENIZERS}")
