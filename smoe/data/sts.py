"""The Lee et al. (2005) document-similarity set from gensim's test data, offline: 50 news documents and the mean
human similarity rating of each of their 1,225 pairs (``lee.cor`` + ``similarities0-1.txt``;
``shared/reference/data_sources.md`` §2.1). An embedding model is scored by the Spearman correlation between the
cosine similarities of its document embeddings and the human ratings (all-MiniLM-L6-v2: 0.508 there).
"""

from __future__ import annotations

import importlib.util
import pathlib
from dataclasses import dataclass

import numpy as np

from smoe.data.registry import DataUnavailableError

__all__ = ["LeeSTS", "load_lee_sts"]


@dataclass(frozen=True)
class LeeSTS:
    """Attributes: ``documents`` (50 texts); ``pairs`` ``(1225, 2)`` indices ``i < j``; ``ratings`` ``(1225,)``."""

    documents: list[str]
    pairs: np.ndarray
    ratings: np.ndarray


def load_lee_sts() -> LeeSTS:
    """The 50 Lee documents (latin-1: the file has a few pound signs) and the human ratings of their pairs (the
    upper triangle of the rating matrix)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError("the Lee similarity set comes with gensim's test data: pip install gensim")
    root = pathlib.Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"
    docs = [line.strip() for line in (root / "lee.cor").read_text(encoding="latin-1").splitlines() if line.strip()]
    ratings = np.loadtxt(root / "similarities0-1.txt")
    if ratings.shape != (len(docs), len(docs)):
        raise DataUnavailableError(f"{root}: {len(docs)} documents but a ratings matrix of shape {ratings.shape}")
    i, j = np.triu_indices(len(docs), k=1)
    return LeeSTS(documents=docs, pairs=np.stack([i, j], 1), ratings=ratings[i, j])
