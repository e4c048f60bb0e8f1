"""The latent metric of Chadebec and Allassonniere (MATH.md section 2) in plain PyTorch.

    G(z) = sum_i w_i(z) M_i + lam exp(-tau |z|^2) I,   w_i(z) = exp(-(z - c_i)^T M_i (z - c_i) / rho^2)

Three formulations:
  broadcast_metric   the paper's formula, broadcasting over centroids: O(B N d^2) memory; the float64 test oracle.
  gemm_metric        the fast plain-PyTorch way: quadratic forms from matrix products over z outer products, then one
                     matrix product for the weighted sum: O(B N + B d^2) memory; the benchmark baseline.
  metric_scaled / metric_vjp   what the "torch" backend of pygeo.ops.latent_metric runs: every quantity scaled by
                     exp(-s) with s = max(-tau |z|^2, max_i -q_i / rho^2), so nothing underflows to zero (MATH.md:
                     log-space weights, no det, no clamp). The compiled kernels compute exactly these outputs.

Precisions are diagonal [N, d] or full [N, d, d] (symmetric positive definite).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import symmetric_part


def full_precisions(precisions: torch.Tensor) -> torch.Tensor:
    """[N, d] (diagonal) or [N, d, d] -> [N, d, d]."""
    return torch.diag_embed(precisions) if precisions.dim() == 2 else precisions


def broadcast_metric(z: torch.Tensor, centroids: torch.Tensor, precisions: torch.Tensor, lam: float, tau: float,
                     rho: float) -> torch.Tensor:
    """The paper's formula. z [B, d], centroids [N, d], precisions [N, d] or [N, d, d] -> G [B, d, d]."""
    M = full_precisions(precisions)
    diff = z[:, None, :] - centroids[None]  # [B, N, d]
    q = torch.einsum("bni,nij,bnj->bn", diff, M, diff)
    w = torch.exp(-q / rho**2)
    eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    prior = lam * torch.exp(-tau * (z * z).sum(-1))
    return symmetric_part(torch.einsum("bn,nij->bij", w, M)) + prior[:, None, None] * eye


def gemm_metric(z: torch.Tensor, centroids: torch.Tensor, precisions: torch.Tensor, lam: float, tau: float,
                rho: float) -> torch.Tensor:
    """Same G [B, d, d] from two matrix products: q = [z z^T | z | 1] . [M | -2 M c | c^T M c], G = w @ M."""
    B, d = z.shape
    N = centroids.shape[0]
    if precisions.dim() == 2:
        q = (z * z) @ precisions.T - 2 * z @ (precisions * centroids).T + (precisions * centroids**2).sum(-1)
        diagonal = torch.exp(-q / rho**2) @ precisions
        G = torch.diag_embed(diagonal)
    else:
        M_flat = precisions.reshape(N, d * d)
        Mc = (precisions @ centroids.unsqueeze(-1)).squeeze(-1)  # [N, d]
        outer = (z[:, :, None] * z[:, None, :]).reshape(B, d * d)
        q = outer @ M_flat.T - 2 * z @ Mc.T + (centroids * Mc).sum(-1)
        G = symmetric_part((torch.exp(-q / rho**2) @ M_flat).reshape(B, d, d))
    prior = lam * torch.exp(-tau * (z * z).sum(-1))
    return G + prior[:, None, None] * torch.eye(d, dtype=z.dtype, device=z.device)


def _exponents(z, centroids, precisions, lam, tau, rho):
    """(e [B, N] = -q/rho^2, e0 [B] = -tau |z|^2 (or -inf when lam = 0), s [B], Y [B, N, d] = M_i (z - c_i))."""
    diff = z[:, None, :] - centroids[None]
    Y = diff * precisions[None] if precisions.dim() == 2 else torch.einsum("nij,bnj->bni", precisions, diff)
    e = -(diff * Y).sum(-1) / rho**2
    e0 = -tau * (z * z).sum(-1)
    if lam == 0:
        e0 = torch.full_like(e0, float("-inf"))
    scale = torch.maximum(e0, e.max(-1).values)
    return e, e0, scale, Y


def metric_scaled(z: torch.Tensor, centroids: torch.Tensor, precisions: torch.Tensor, lam: float, tau: float,
                  rho: float, with_derivative: bool) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Scaled metric, log scale and scaled derivative: G = exp(s) G_s, dG = exp(s) dG_s.

    z [B, d], centroids [N, d], precisions [N, d] or [N, d, d] ->
      G_s [B, d] (diagonal precisions: the diagonal of G) or [B, d, d],
      s [B],
      dG_s None or [B, d, d] (diagonal: dG_s[b, k, j] = d G_jj / d z_k) or [B, d, d, d] (dG_s[b, k, i, j] = d G_ij / d z_k).
    """
    e, e0, s, Y = _exponents(z, centroids, precisions, lam, tau, rho)
    W = torch.exp(e - s[:, None])  # [B, N], the largest weight of each point is 1
    prior = lam * torch.exp(e0 - s)  # [B]
    B, d = z.shape
    diagonal = precisions.dim() == 2
    M_flat = precisions if diagonal else precisions.reshape(-1, d * d)
    G_s = W @ M_flat
    if diagonal:
        G_s = G_s + prior[:, None]
    else:  # each (i, j) and (j, i) is its own dot product over N: mirror them exactly
        G_s = symmetric_part(G_s.reshape(B, d, d)) + prior[:, None, None] * torch.eye(d, dtype=z.dtype, device=z.device)
    if not with_derivative:
        return G_s, s, None
    # dw_i/dz = -(2/rho^2) w_i M_i (z - c_i);  d(lam e^{-tau|z|^2})/dz = -2 tau z lam e^{-tau|z|^2}
    dG_s = (-(2 / rho**2)) * ((W[:, :, None] * Y).transpose(1, 2) @ M_flat)  # [B, d, d] or [B, d, d*d]
    prior_grad = (-2 * tau) * z * prior[:, None]  # [B, d]
    if diagonal:
        dG_s = dG_s + prior_grad[:, :, None]
    else:
        eye = torch.eye(d, dtype=z.dtype, device=z.device)
        dG_s = symmetric_part(dG_s.reshape(B, d, d, d)) + prior_grad[:, :, None, None] * eye
    return G_s, s, dG_s


def metric_vjp(z: torch.Tensor, centroids: torch.Tensor, precisions: torch.Tensor, lam: float, tau: float, rho: float,
               A: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """v [B, d] with v_k = sum_ij A_ij dG_s[k, i, j], the weights scaled by exp(-scale).

    A [B, d] (diagonal precisions: only A's diagonal matters) or [B, d, d]; scale [B]. With scale = 0 and A = dL/dG this
    is dL/dz; with A = G_s^{-1} / 2 and the metric's own scale it is the gradient of 1/2 log det G.
    """
    e, e0, _, Y = _exponents(z, centroids, precisions, lam, tau, rho)
    W = torch.exp(e - scale[:, None])
    prior = lam * torch.exp(e0 - scale)
    diagonal = precisions.dim() == 2
    B, d = z.shape
    inner = A @ precisions.T if diagonal else A.reshape(B, d * d) @ precisions.reshape(-1, d * d).T  # <A, M_i> [B, N]
    trace = A.sum(-1) if diagonal else A.diagonal(dim1=-2, dim2=-1).sum(-1)
    v = (-(2 / rho**2)) * ((W * inner)[:, :, None] * Y).sum(1)
    return v + ((-2 * tau) * prior * trace)[:, None] * z


def log_volume(z: torch.Tensor, centroids: torch.Tensor, precisions: torch.Tensor, lam: float, tau: float,
               rho: float) -> torch.Tensor:
    """1/2 log det G [B] in log space (differentiable plain torch; the slow path of double backward)."""
    G_s, s, _ = metric_scaled(z, centroids, precisions, lam, tau, rho, False)
    d = z.shape[-1]
    if precisions.dim() == 2:
        return 0.5 * (d * s + G_s.log().sum(-1))
    return 0.5 * d * s + torch.linalg.cholesky(G_s).diagonal(dim1=-2, dim2=-1).log().sum(-1)
