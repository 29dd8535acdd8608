"""2-D embeddings of token representations, coloured by expert and by label (as the SMoE-VAE paper's latent plots,
Nikolic et al. 2025, and X-MoE's UMAP of routed representations, Chi et al. 2022).

:func:`embed_2d` runs scikit-learn's t-SNE (van der Maaten & Hinton 2008) on a seeded subsample;
:func:`plot_embedding` draws the two scatter panels with matplotlib (Agg backend, no display needed).
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from torch import Tensor

__all__ = ["embed_2d", "plot_embedding", "subsample"]


def subsample(n: int, max_points: int, seed: int = 0) -> Tensor:
    """Sorted indices of at most ``max_points`` of ``n`` items, drawn without replacement with a fixed seed."""
    if n <= max_points:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_points].sort().values


def embed_2d(h_ND: Tensor, *, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """``(N, 2)`` t-SNE embedding of ``h_ND`` (PCA initialisation, scikit-learn defaults otherwise)."""
    from sklearn.manifold import TSNE  # noqa: PLC0415 - the data extra

    n = h_ND.shape[0]
    if n < 3:
        raise ValueError(f"a t-SNE embedding needs at least 3 points, got {n}")
    perplexity = min(perplexity, (n - 1) / 3)  # scikit-learn requires perplexity < n
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(h_ND.detach().double().cpu().numpy())


def plot_embedding(
    xy_N2: np.ndarray,
    expert_N: Tensor,
    label_N: Tensor | None,
    path: str | pathlib.Path,
    *,
    title: str = "",
    label_names: list[str] | tuple[str, ...] | None = None,
) -> pathlib.Path:
    """Save a figure with the embedding coloured by expert (left) and, when given, by label (right)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = [("expert", expert_N)] + ([("label", label_N)] if label_N is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5), squeeze=False)
    for ax, (what, values) in zip(axes[0], panels, strict=True):
        v = values.cpu().numpy()
        for c in np.unique(v):
            sel = v == c
            name = f"expert {c}" if what == "expert" else (label_names[c] if label_names else f"label {c}")
            ax.scatter(xy_N2[sel, 0], xy_N2[sel, 1], s=4, label=name if c >= 0 else "dropped")
        ax.set_title(f"{title} by {what}".strip())
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(markerscale=3, fontsize=7, loc="best")
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
