"""Log-sum-exp Kahler metric, closed form in plain PyTorch (MATH.md section 5): the fallback, the oracle, the baseline.

Psi(z) = T log sum_i pi_i exp(u_i / T), u_i = (z - c_i)^H P_i (z - c_i), p = softmax(log pi + u / T), y_i = P_i (z - c_i).
The metric, as the matrix G of the Hermitian form h(u, u) = u^H G u (for (z - c)^H P (z - c) this G is P):
    G = sum_i p_i P_i + (1/T) (sum_i p_i y_i y_i^H - ybar ybar^H),   ybar = sum_i p_i y_i.
Memory O(B K n): the [B, K, n] tensor y is materialised (the fused kernels never write it).

The moments are taken of y_i - y_r, r the component of largest weight at each point (as the C++ kernel does): the
covariance does not depend on the shift, but the plain second moment minus the squared mean cancels catastrophically
when one weight is ~1 and |y| is large (far from the centres it returned negative diagonals).
"""
from __future__ import annotations

import torch

from . import hermitian_part


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
    y = _shifted_to_dominant(y, p)
    weighted_y = p.unsqueeze(-1) * y  # [B, K, n]
    second_moment = weighted_y.transpose(-1, -2) @ y.conj_physical()  # [B, n, n]: sum_i p_i y_i y_i^H
    y_mean = weighted_y.sum(1)  # [B, n]
    G = mean_precision + (second_moment - y_mean.unsqueeze(-1) * y_mean.conj_physical().unsqueeze(-2)) / temperature
    return hermitian_part(G)


def _shifted_to_dominant(y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """y [B, K, n] minus, at each point, the y of its component of largest weight p [B, K]."""
    dominant = p.argmax(-1)  # [B]
    return y - y[torch.arange(y.shape[0], device=y.device), dominant].unsqueeze(1)


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


def lse_kahler_metric_vjp_z(z: torch.Tensor, centers: torch.Tensor, precisions: torch.Tensor, log_weights: torch.Tensor,
                            temperature: float, grad_G: torch.Tensor) -> torch.Tensor:
    """The gradient with respect to z of the real loss whose gradient with respect to G is grad_G, in closed form
    (O(B K n^2) work and O(B K n) memory, batched products only; the autograd graph of the forward is several times
    slower). z [B, n], centers [K, n], precisions as lse_kahler_metric, grad_G [B, n, n] complex
    (d loss / d Re G + i d loss / d Im G) -> [B, n] complex (d loss / d Re z + i d loss / d Im z).

    With H = (grad_G + grad_G^H) / 2 (G is symmetrised), dloss = Re(v^H dz) for
        v = (2/T) sum_i p_i [ (e_i - ebar) y_i + P_i H (y_i - ybar) ],
        e_i = Re tr(H P_i) + (y_i^H H y_i - 2 Re (H ybar)^H y_i) / T,   ebar = sum_i p_i e_i,
    from dp_i = p_i (du_i - sum_j p_j du_j) / T, du_i = 2 Re y_i^H dz and dy_i = P_i dz.
    """
    diagonal = not precisions.is_complex() and precisions.dim() == 2
    H = hermitian_part(grad_G)  # [B, n, n]
    diff = z.unsqueeze(1) - centers.unsqueeze(0)  # [B, K, n]
    y = precisions.unsqueeze(0) * diff if diagonal else torch.einsum("kij,bkj->bki", precisions, diff)
    u = (diff.conj_physical() * y).real.sum(-1)  # [B, K]
    p = torch.softmax(log_weights + u / temperature, dim=-1)  # [B, K]
    B, K, n = diff.shape
    # The formula below holds for y shifted by any r (e_i moves by a constant, which centred_e removes, and
    # sum_i p_i (e_i - ebar) r = 0): shifting to the dominant component's y avoids cancellation, as in the forward.
    y = _shifted_to_dominant(y, p)
    y_mean = (p.unsqueeze(-1) * y).sum(1)  # [B, n]
    Hy = y @ H.transpose(-1, -2)  # [B, K, n]: H y_i
    H_y_mean = (H @ y_mean.unsqueeze(-1)).squeeze(-1)  # [B, n]
    if diagonal:
        trace_HP = H.diagonal(dim1=-2, dim2=-1).real @ precisions.transpose(0, 1)  # [B, K]
    else:  # tr(H P) = sum_ab H_ab conj(P_ab) for Hermitian P
        trace_HP = (H.reshape(B, n * n) @ precisions.reshape(K, n * n).conj_physical().transpose(0, 1)).real
    quadratic = (y.conj_physical() * Hy).real.sum(-1)  # [B, K]: y_i^H H y_i
    cross = (H_y_mean.conj_physical().unsqueeze(1) * y).real.sum(-1)  # [B, K]: Re (H ybar)^H y_i
    e = trace_HP + (quadratic - 2 * cross) / temperature
    # A component of weight 0 contributes nothing, but far from the centres its e (~ |y_i - y_dominant|^2) can
    # overflow, and 0 * inf would turn the whole gradient into NaN (complex64 at |z| ~ 1e19, found by the fuzz).
    e = torch.where(p > 0, e, torch.zeros_like(e))
    centred_e = e - (p * e).sum(-1, keepdim=True)
    H_centred = Hy - H_y_mean.unsqueeze(1)  # [B, K, n]: H (y_i - ybar)
    P_H_centred = (precisions.unsqueeze(0) * H_centred if diagonal
                   else torch.einsum("kij,bkj->bki", precisions, H_centred))
    weights = p.to(z.dtype).unsqueeze(-1)
    return (2 / temperature) * (weights * (centred_e.to(z.dtype).unsqueeze(-1) * y + P_H_centred)).sum(1)
