"""Image grids of a trained SMoE-VAE (Nikolic et al. 2025): reconstructions, and samples from every decoder expert.

* ``reconstructions.png``: the first images of a split (top row) and their reconstructions by the model in
  ``eval()`` mode (encoder mean, the gate's top-``K`` decoders);
* ``samples.png``: the same latents ``z ~ N(0, I)`` decoded by each expert alone, one row per expert: what each
  decoder has specialised in.
"""

from __future__ import annotations

import pathlib

import torch
from torch import Tensor

__all__ = ["write_vae_images"]


def _grid(rows: list[Tensor], path: pathlib.Path, labels: list[str]) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n, 1.25 * len(rows)), squeeze=False)
    for r, (images, label) in enumerate(zip(rows, labels)):
        for c in range(n):
            ax = axes[r][c]
            img = images[c].detach().float().clamp(0, 1).cpu()
            ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def write_vae_images(model, data, out_dir, *, split: str = "validation", n: int = 8, seed: int = 0) -> dict:
    """Write the two grids (module docstring) into ``out_dir``; returns ``{"reconstructions": path, "samples": path}``.

    ``model`` is an :class:`~smoe.models.vae.SMoEVAE`, ``data`` its :class:`~smoe.data.ImageData`.
    """
    out_dir = pathlib.Path(out_dir)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    images = next(iter(data.eval_batches(split, 1)))[0][:n].to(device)
    mu, _ = model.encoder(images)
    recon = model.decode(mu)
    files = {"reconstructions": out_dir / "reconstructions.png", "samples": out_dir / "samples.png"}
    _grid([images, recon], files["reconstructions"], [split, "reconstruction"])
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(n, mu.shape[1], generator=g).to(device=device, dtype=mu.dtype)
    experts = [model.decoders[e](z) for e in range(model.num_experts)]
    _grid(experts, files["samples"], [f"expert {e}" for e in range(model.num_experts)])
    model.train(was_training)
    return files
