"""Deep CCA objective: canonical correlation of two views as the trace norm, over three views.

``corr(H1, H2) = || Σ11^-1/2 Σ12 Σ22^-1/2 ||_*`` (the sum of singular values, i.e. the sum of
all canonical correlations; Andrew et al. 2013, eq. 10). Computed in float64 with ridged
covariances and eigenvalues clamped before the inverse square root. Popular public DeepCCA
code takes the Frobenius norm (``sqrt(trace(TᵀT))``) instead, which is not the correlation.
"""
from __future__ import annotations

from typing import Sequence

import torch


class _InvSqrtPSD(torch.autograd.Function):
    """``S^-1/2`` of a symmetric PSD matrix through ``eigh``, eigenvalues clamped at ``eps``.

    The backward is the Daleckii–Krein formula, ``V (F ∘ sym(Vᵀ G V)) Vᵀ`` with the divided
    differences ``F_ij = (f(λi) - f(λj)) / (λi - λj)`` (``f'(λi)`` where they coincide). Autograd
    through ``eigh`` instead forms ``1/(λi - λj)`` for the eigenvectors, which is infinite when
    eigenvalues repeat (dead units give several equal to the ridge) and turns the weights NaN.
    """

    @staticmethod
    def forward(ctx, S: torch.Tensor, eps: float) -> torch.Tensor:
        vals, vecs = torch.linalg.eigh(S)
        lam = vals.clamp_min(eps)
        ctx.save_for_backward(vals, vecs)
        ctx.eps = eps
        return vecs @ torch.diag_embed(lam.rsqrt()) @ vecs.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        vals, vecs = ctx.saved_tensors
        lam = vals.clamp_min(ctx.eps)
        f = lam.rsqrt()
        fprime = torch.where(vals > ctx.eps, -0.5 * lam.pow(-1.5), torch.zeros_like(lam))
        dl = lam[:, None] - lam[None, :]
        close = dl.abs() <= 1e-12 * lam.abs().max().clamp_min(1.0)
        F = torch.where(close, 0.5 * (fprime[:, None] + fprime[None, :]),
                        (f[:, None] - f[None, :]) / torch.where(close, torch.ones_like(dl), dl))
        g = vecs.transpose(-1, -2) @ grad @ vecs
        g = 0.5 * (g + g.transpose(-1, -2))
        return vecs @ (F * g) @ vecs.transpose(-1, -2), None


def _inv_sqrt(S: torch.Tensor, eps: float) -> torch.Tensor:
    return _InvSqrtPSD.apply(S, eps)


def cca_correlation(H1: torch.Tensor, H2: torch.Tensor, ridge: float = 1e-3,
                    eps: float = 1e-9) -> torch.Tensor:
    """Sum of the canonical correlations of the paired samples ``H1 [N,d1]``, ``H2 [N,d2]``."""
    if H1.dim() != 2 or H2.dim() != 2 or H1.shape[0] != H2.shape[0]:
        raise ValueError(f"H1, H2 must be [N,d1], [N,d2] with the same N, got {tuple(H1.shape)}, "
                         f"{tuple(H2.shape)}")
    n = H1.shape[0]
    if n < 2:
        raise ValueError(f"CCA needs at least 2 paired samples, got N={n}")
    out_dtype = H1.dtype
    H1, H2 = H1.double(), H2.double()
    H1 = H1 - H1.mean(0, keepdim=True)
    H2 = H2 - H2.mean(0, keepdim=True)
    S11 = H1.T @ H1 / (n - 1) + ridge * torch.eye(H1.shape[1], dtype=H1.dtype, device=H1.device)
    S22 = H2.T @ H2 / (n - 1) + ridge * torch.eye(H2.shape[1], dtype=H2.dtype, device=H2.device)
    S12 = H1.T @ H2 / (n - 1)
    T = _inv_sqrt(S11, eps) @ S12 @ _inv_sqrt(S22, eps)
    return torch.linalg.svdvals(T).sum().to(out_dtype)


def multiview_cca_loss(views: Sequence[torch.Tensor], ridge: float = 1e-3) -> torch.Tensor:
    """Negative sum of pairwise CCA correlations over the views (each ``[N,d]``, paired by row)."""
    total = 0.0
    for a in range(len(views)):
        for b in range(a + 1, len(views)):
            total = total + cca_correlation(views[a], views[b], ridge=ridge)
    return -total
