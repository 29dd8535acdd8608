"""Corrupted test images, ImageNet-C style (Hendrycks & Dietterich, ICLR 2019), for robustness evaluation.

``corrupt_images(images, "gaussian_noise", severity=3)`` applies one of the 19 ImageNet-C corruptions at severity
1-5 with the ``corrupt-tta`` package (0.1.7; its code is the ImageNet-C reference code ported to numpy 2, with the
real frost photos; ``../shared/reference/data_sources.md`` §2.8), which works on 28x28 images: applied to the
Fashion-MNIST test set it gives a "Fashion-MNIST-C". Grayscale images are stacked to 3 channels for the
corruption and averaged back. ``IMAGENET_C_CORRUPTIONS`` are the 15 corruptions of the ImageNet-C benchmark (the
other four, speckle noise, gaussian blur, spatter and saturate, are its held-out set).

The corruptions draw from numpy's global random state (the package's API); :func:`corrupt_images` seeds it per call
and restores it afterwards, so a result depends only on ``seed``. ``impulse_noise`` is the exception: the package
calls scikit-image's ``random_noise``, which draws from fresh OS entropy, so here it is computed with the same
formula (salt-and-pepper noise of amount ``(.03, .06, .09, .17, .27)[severity - 1]``) and a seeded generator.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
from torch import Tensor

__all__ = ["IMAGENET_C_CORRUPTIONS", "corrupt_images", "corruption_names", "corruptions_available"]

IMAGENET_C_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip

_INSTALL = "pip install opencv-python-headless scikit-image && pip install --no-deps corrupt-tta==0.1.7"


def corruptions_available() -> bool:
    """Whether ``corrupt-tta`` (and its OpenCV / scikit-image dependencies) can be imported."""
    return all(importlib.util.find_spec(m) is not None for m in ("corrupt_tta", "cv2", "skimage"))


def _corrupt_tta():
    if not corruptions_available():
        raise ValueError(f"image corruptions need the corrupt-tta package; install it with: {_INSTALL}")
    import corrupt_tta  # noqa: PLC0415

    return corrupt_tta


def corruption_names() -> list[str]:
    """All 19 corruption names of ``corrupt-tta``."""
    return [f.__name__ for f in _corrupt_tta().corruption_tuple]


def corrupt_images(images_NCHW: Tensor, corruption: str, severity: int, *, seed: int = 0) -> Tensor:
    """``images_NCHW`` (float in ``[0, 1]``, 1 or 3 channels) with ``corruption`` at ``severity`` (1-5).

    Returns:
        ``(N, C, H, W)`` float32 in ``[0, 1]``.
    """
    tta = _corrupt_tta()
    names = corruption_names()
    if corruption not in names:
        raise ValueError(f"unknown corruption {corruption!r}; expected one of {names}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer in [1, 5], got {severity!r}")
    if images_NCHW.dim() != 4 or images_NCHW.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, 1 or 3, H, W) images, got shape {tuple(images_NCHW.shape)}")
    x = (images_NCHW.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    gray = x.shape[-1] == 1
    state = np.random.get_state()
    np.random.seed(seed * 1_000_003 + severity * 101 + names.index(corruption))
    try:
        out = np.empty(x.shape[:3] + (3,), dtype=np.float32)
        for i, img in enumerate(x):
            rgb = np.repeat(img, 3, axis=-1) if gray else img
            if corruption == "impulse_noise":  # corrupt-tta's formula, with a seeded generator (module docstring)
                from skimage.util import random_noise  # noqa: PLC0415

                amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
                noisy = random_noise(rgb / 255.0, mode="s&p", amount=amount, rng=np.random.randint(2**31))
                out[i] = np.clip(noisy, 0, 1) * 255
            else:
                out[i] = np.asarray(tta.corrupt(rgb, severity=severity, corruption_name=corruption), dtype=np.float32)
    finally:
        np.random.set_state(state)
    out = np.clip(out, 0, 255) / 255.0
    if gray:
        out = out.mean(axis=-1, keepdims=True)
    return torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).contiguous()
