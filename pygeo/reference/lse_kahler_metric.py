"""Log-sum-exp Kahler metric, closed form in plain PyTorch (MATH.md section 5): the fallback, the oracle, the baseline.

Psi(z) = T log sum_i pi_i exp(u_i / T), u_i = (z - c_i)^H P_i (z - c_i), p = softmax(log pi + u / T), y_i = P_i (z - c_i).
The metric, as the matrix G of the Hermitian form h(u, u) = u^H G u (for (z - c)^H P (z - c) this G is P):
    G = sum_i p_i P_i + (1/T) (sum_i p_i y_i y_i^H - ybar ybar^H),   ybar = sum_i p_i y_i.
Memory O(B K n): the [B, K, n] tensor y is materialised (the fused kernels never write it).
"""
from __future__ import annotations

import torch


def lse_kahler_metric(z: torch.Tensor, centers: torch.Tensor, precisions: torch.Tensor, log_weights: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """z [B, n] complex, centers [K, n] complex, precisions [K, n, n] complex Hermitian PD or [K, n] real positive
    (diagonal), log_weights [K] real -> G [B, n, n] complex Hermitian."""
    diagonal = not precisions.is_complex() and precisions.dim() == 2
    diff = z.unsqueeze(1) - centers.unsqueeze(0)  # [B, K, n]
    if diagonal:
        y = precisions.unsqueeze(0) * diff  # [B, K, n]
    else:
        y = torch.einsum("kij,bkj->bki", precisions, diff)
    u = (diff.conj_physical() * y).real.sum(-1)  # [B, K]
    p = torch.softmax(log_weights + u / temperature, dim=-1)  # [B, K]
    B, K, n = diff.shape
    if diagonal:
        mean_precision = torch.diag_embed(p @ precisions).to(z.dtype)  # [B, n, n]
    else:
        mean_precision = (p.to(z.dtype) @ precisions.reshape(K, n * n)).reshape(B, n, n)
    weighted_y = p.unsqueeze(-1) * y  # [B, K, n]
    second_moment = weighted_y.transpose(-1, -2) @ y.conj_physical()  # [B, n, n]: sum_i p_i y_i y_i^H
    y_mean = weighted_y.sum(1)  # [B, n]
    G = mean_precision + (second_moment - y_mean.unsqueeze(-1) * y_mean.conj_physical().unsqueeze(-2)) / temperature
    return 0.5 * (G + G.transpose(-1, -2).conj_physical())


def lse_kahler_metric_real(z: torch.Tensor, centers: torch.Tensor, precisions: torch.Tensor, log_weights: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """The same on real views (the layout of the custom op): z [B, n, 2], centers [K, n, 2], precisions [K, n, n, 2]
    or [K, n], log_weights [K] -> G [B, n, n, 2] (torch.view_as_real of the complex G)."""
    # torch.complex / torch.stack rather than view_as_complex / view_as_real: no views of the op's inputs or outputs,
    # which AOTAutograd's functionalisation (torch.compile) does not handle for complex views.
    def as_complex(pairs):
        return torch.complex(pairs[..., 0], pairs[..., 1])

    full = precisions.dim() == 4
    G = lse_kahler_metric(as_complex(z), as_complex(centers), as_complex(precisions) if full else precisions, log_weights,
                          temperature)
    return torch.stack([G.real, G.imag], dim=-1)
