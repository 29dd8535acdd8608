"""Representation collapse of routed token representations (X-MoE, Chi et al., NeurIPS 2022, §3.2 and Fig. 2c).

X-MoE measures how far the representations a router sees have collapsed onto a few directions with the neural
collapse metric of Zhu et al. (NeurIPS 2021, "A Geometric Analysis of Neural Collapse with Unconstrained
Features"), taking a token's *class* to be the expert it is routed to::

    RC = Tr(Sigma_W Sigma_B^+)

    Sigma_W = 1/N  sum_c sum_{i in c} (h_i - mu_c)(h_i - mu_c)^T       within-class covariance
    Sigma_B = 1/C  sum_c (mu_c - mu)(mu_c - mu)^T                      between-class covariance

with ``mu_c`` the mean of class ``c``, ``mu`` the mean of the class means, ``C`` the number of non-empty classes
and ``^+`` the Moore-Penrose pseudo-inverse. A *smaller* RC means more collapse in X-MoE's reading (tokens of one
expert cluster tightly around class means that span few directions); it is the ratio of within- to between-class
spread. RC is invariant to rotations, reflections and isotropic scaling of the representations (a test checks it).

What is confirmed: the formula ``Tr(Sigma_W Sigma_B^+)`` and "class = assigned expert" (reference §3.2.2). Our
choices (standard in the neural-collapse literature, not stated by X-MoE): ``Sigma_W`` averaged over the ``N``
tokens, ``Sigma_B`` over the classes, ``mu`` the mean of the class means, and the pseudo-inverse's cut-off
(eigenvalues below ``rtol`` times the largest are treated as zero).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["representation_collapse", "class_covariances"]


def class_covariances(h_ND: Tensor, labels_N: Tensor) -> tuple[Tensor, Tensor]:
    """``(Sigma_W, Sigma_B)``, each ``(D, D)`` float64, of ``h_ND`` grouped by ``labels_N`` (module docstring).

    Tokens with a negative label (e.g. routed to no expert) are left out.
    """
    if h_ND.dim() != 2 or labels_N.shape != h_ND.shape[:1]:
        raise ValueError(f"expected h (N, D) and labels (N,), got {tuple(h_ND.shape)} and {tuple(labels_N.shape)}")
    keep = labels_N >= 0
    h = h_ND[keep].detach().double()
    labels = labels_N[keep].long()
    classes, inverse = torch.unique(labels, return_inverse=True)
    C, N = classes.numel(), h.shape[0]
    if C < 2:
        raise ValueError(f"representation collapse needs tokens of at least 2 classes, got {C}")
    counts = torch.bincount(inverse, minlength=C).double()
    mu_CD = torch.zeros(C, h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, inverse, h) / counts[:, None]
    centred = h - mu_CD[inverse]
    sigma_w = centred.T @ centred / N
    between = mu_CD - mu_CD.mean(dim=0)
    sigma_b = between.T @ between / C
    return sigma_w, sigma_b


def representation_collapse(h_ND: Tensor, labels_N: Tensor, *, rtol: float = 1e-8) -> float:
    """``RC = Tr(Sigma_W Sigma_B^+)`` of representations ``h_ND`` with classes ``labels_N`` (module docstring).

    Args:
        h_ND: ``(N, D)`` routed representations (the MoE layer's input).
        labels_N: ``(N,)`` class of each token: its top-1 expert (X-MoE), or a data label; ``< 0`` is ignored.
        rtol: relative eigenvalue cut-off of the pseudo-inverse.

    Returns:
        RC (>= 0).
    """
    sigma_w, sigma_b = class_covariances(h_ND, labels_N)
    return float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, rtol=rtol, hermitian=True)))
