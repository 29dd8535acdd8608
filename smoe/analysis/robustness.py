"""Robustness: accuracy on corrupted images with the corruption error of ImageNet-C, and a language model's loss on
contaminated text.

Vision (Hendrycks & Dietterich, ICLR 2019, §3): with ``E^f_{c,s}`` the top-1 error of model ``f`` on corruption
``c`` at severity ``s``,

    CE^f_c = sum_s E^f_{c,s} / sum_s E^base_{c,s},        mCE^f = mean_c CE^f_c

relative to a baseline model (AlexNet in ImageNet-C; here a baseline router, e.g. token choice), and the
unnormalised ``mean corrupted accuracy = 1 - mean_{c,s} E^f_{c,s}``. The corrupted images themselves come from
:func:`smoe.data.corruptions.corrupt_images` (Fashion-MNIST-C). MomentumSMoE (Teo & Nguyen 2024), SSR and the
graph-of-tokens routers claim gains on such benchmarks (reference §7).

Text: :func:`substitute_tokens` replaces each token with probability ``rate`` by a uniformly random one (a
byte-level analogue of MomentumSMoE's word-swap attack on WikiText-103; our choice of contamination, stated as
such); :func:`contaminated_loss` is the model's loss predicting the *clean* next tokens from the contaminated input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from smoe.analysis.evaluation import evaluating

__all__ = ["accuracy", "corruption_table", "mean_corruption_error", "substitute_tokens", "contaminated_loss"]


def accuracy(model: nn.Module, images_NCHW: Tensor, labels_N: Tensor, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier (``model(images).logits``) in eval mode, without gradients."""
    correct = 0
    with evaluating(model) as device:
        for i in range(0, labels_N.shape[0], batch_size):
            logits = model(images_NCHW[i : i + batch_size].to(device)).logits
            correct += int((logits.argmax(-1).cpu() == labels_N[i : i + batch_size]).sum())
    return correct / max(labels_N.shape[0], 1)


def corruption_table(
    model: nn.Module,
    labels_N: Tensor,
    corrupted: Mapping[tuple[str, int], Tensor],
    *,
    batch_size: int = 256,
) -> dict[str, dict[int, float]]:
    """``{corruption: {severity: top-1 error}}`` of ``model`` on each corrupted copy of the test images."""
    table: dict[str, dict[int, float]] = {}
    for (name, severity), images in corrupted.items():
        table.setdefault(name, {})[severity] = 1.0 - accuracy(model, images, labels_N, batch_size=batch_size)
    return table


def mean_corruption_error(
    errors: Mapping[str, Mapping[int, float]], baseline: Mapping[str, Mapping[int, float]] | None = None
) -> dict[str, float | dict[str, float]]:
    """ImageNet-C's ``CE_c`` per corruption and ``mCE`` (module docstring), or without a baseline the mean error.

    Returns:
        ``{"mean_error": ..., "mean_corrupted_accuracy": ...}`` plus, with a baseline, ``"mCE"`` and ``"CE"``
        (per corruption). A baseline with zero error on a corruption leaves that corruption's CE undefined:
        ``ValueError``.
    """
    cells = [e for sev in errors.values() for e in sev.values()]
    if not cells:
        raise ValueError("no corruption errors to average")
    out: dict[str, float | dict[str, float]] = {
        "mean_error": sum(cells) / len(cells),
        "mean_corrupted_accuracy": 1.0 - sum(cells) / len(cells),
    }
    if baseline is not None:
        ce = {}
        for name, sev in errors.items():
            if name not in baseline or set(baseline[name]) != set(sev):
                raise ValueError(f"the baseline has no errors for corruption {name!r} at severities {sorted(sev)}")
            base = sum(baseline[name].values())
            if base <= 0:
                raise ValueError(f"the baseline makes no error on {name!r}: its corruption error is undefined")
            ce[name] = sum(sev.values()) / base
        out["CE"] = ce
        out["mCE"] = sum(ce.values()) / len(ce)
    return out


def substitute_tokens(tokens: Tensor, rate: float, vocab_size: int, *, generator: torch.Generator | None = None):
    """``tokens`` with each entry replaced, with probability ``rate``, by a uniform random token of the vocabulary
    (possibly itself: the expected fraction changed is ``rate * (1 - 1 / vocab_size)``)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate!r}")
    mask = torch.rand(tokens.shape, generator=generator) < rate
    random = torch.randint(0, vocab_size, tokens.shape, generator=generator, dtype=tokens.dtype)
    return torch.where(mask, random, tokens)


def contaminated_loss(
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    rate: float,
    vocab_size: int,
    *,
    seed: int = 0,
    call: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
) -> float:
    """Mean loss on ``(inputs, targets)`` batches when the inputs are contaminated at ``rate`` (targets clean)."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with evaluating(model) as device:
        for x, y in batches:
            xc = substitute_tokens(x, rate, vocab_size, generator=g).to(device)
            y = y.to(device)
            loss = call(model, xc, y) if call is not None else model(xc, y).loss
            total += float(loss)
    return total / max(len(batches), 1)
