"""Expert specialisation: how much the expert choice says about the data's labels, and how consistent expert loads
are across runs (X-MoE, Chi et al. 2022, §3.2.2; the SMoE-VAE's expert/class analysis, Nikolic et al. 2025).

For tokens with expert ``x`` (top-1) and label ``y`` (image class, sketch category, byte class), with the joint
frequencies ``p(x, y)``:

* ``mutual_information = sum_{x,y} p(x,y) log(p(x,y) / (p(x) p(y)))`` in nats: 0 when the expert says nothing
  about the label, ``H(Y)`` when it determines it;
* ``normalized_mi = I(X;Y) / H(Y)`` in ``[0, 1]``, the share of the label's entropy the expert choice explains
  (our normalisation: by ``H(Y)``, so that more experts than labels cannot exceed 1);
* ``purity = sum_x max_y n(x, y) / N``: the accuracy of predicting each token's label by its expert's majority
  label (clustering purity, Manning et al. 2008, §16.3);
* ``inter_run_consistency = sum_{i,j} rho(l_i, l_j) / m^2``: the mean Pearson correlation of the per-expert load
  vectors of ``m`` runs, diagonal included (X-MoE's IC). Experts are comparable across runs only when the runs
  share their initial experts (X-MoE fine-tunes one pretrained model); for runs trained from scratch pass
  ``sort=True``, which correlates the loads sorted by size (the shape of the load distribution, our choice).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["contingency", "mutual_information", "normalized_mutual_information", "purity", "inter_run_consistency"]


def contingency(expert_N: Tensor, label_N: Tensor) -> Tensor:
    """``(X, Y)`` float64 counts of (expert, label) pairs over the tokens with ``expert >= 0`` and ``label >= 0``."""
    if expert_N.shape != label_N.shape or expert_N.dim() != 1:
        raise ValueError(f"expected expert and label ids of one shape (N,), got {tuple(expert_N.shape)}, "
                         f"{tuple(label_N.shape)}")  # fmt: skip
    keep = (expert_N >= 0) & (label_N >= 0)
    x, y = expert_N[keep].long().cpu(), label_N[keep].long().cpu()
    if x.numel() == 0:
        raise ValueError("no token has both an expert and a label")
    X, Y = int(x.max()) + 1, int(y.max()) + 1
    return torch.bincount(x * Y + y, minlength=X * Y).view(X, Y).double()


def mutual_information(expert_N: Tensor, label_N: Tensor) -> float:
    """``I(expert; label)`` in nats (module docstring)."""
    p = contingency(expert_N, label_N)
    p = p / p.sum()
    px, py = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    return float((p[nz] * (p[nz] / (px @ py)[nz]).log()).sum())


def normalized_mutual_information(expert_N: Tensor, label_N: Tensor) -> float:
    """``I(expert; label) / H(label)`` in ``[0, 1]`` (0 when the label is constant)."""
    p = contingency(expert_N, label_N)
    py = p.sum(0) / p.sum()
    py = py[py > 0]
    h = float(-(py * py.log()).sum())
    return 0.0 if h == 0 else mutual_information(expert_N, label_N) / h


def purity(expert_N: Tensor, label_N: Tensor) -> float:
    """``sum_x max_y n(x, y) / N``: each expert predicts its majority label (module docstring)."""
    n = contingency(expert_N, label_N)
    return float(n.max(dim=1).values.sum() / n.sum())


def inter_run_consistency(loads_mE: Tensor, *, sort: bool = False) -> float:
    """X-MoE's ``IC = sum_{i,j} rho(l_i, l_j) / m^2`` over ``m`` runs' per-expert loads ``loads_mE`` ``(m, E)``.

    ``sort=True`` correlates the loads sorted in decreasing order (runs whose experts do not correspond).
    A run with constant loads (zero variance) has no defined correlation: ``ValueError``.
    """
    if loads_mE.dim() != 2 or loads_mE.shape[0] < 2 or loads_mE.shape[1] < 2:
        raise ValueError(f"expected loads of m >= 2 runs over E >= 2 experts, got shape {tuple(loads_mE.shape)}")
    l = loads_mE.detach().double()
    if sort:
        l = l.sort(dim=1, descending=True).values
    centred = l - l.mean(dim=1, keepdim=True)
    norm = centred.norm(dim=1)
    if bool((norm == 0).any()):
        raise ValueError("a run with equal loads on every expert has no load correlation")
    z = centred / norm[:, None]
    return float((z @ z.T).mean())
