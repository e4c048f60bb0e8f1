"""The interpolation of Chadebec and Allassonniere: curves minimising the length of the conformal metric V(z)^2 I,
V = det(G)^(-1/2) = exp(-log_volume) (MATH.md section 2), batched over pairs of end points.

The curve is discretised in T points; its energy E = (T - 1) sum_t |c_{t+1} - c_t|^2 V(m_t)^2 (m_t the midpoints) is
minimised over the interior points with Adam. Energy minimisers are constant-speed length minimisers. V^2 spans many
orders of magnitude across a latent space, so the objective is log E, a log-sum-exp over segments: scale-free and
never overflowing.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import _checks


@dataclass
class ConformalInterpolation:
    points: torch.Tensor  # [B, T, d], end points included
    length: torch.Tensor  # [B], conformal length sum_t |c_{t+1} - c_t| V(m_t) of the optimised curve
    straight_length: torch.Tensor  # [B], conformal length of the straight line between the same end points


def _log_segment_terms(metric, points: torch.Tensor) -> torch.Tensor:
    """log(|c_{t+1} - c_t| V(m_t)) [B, T - 1] for curves points [B, T, d]."""
    steps = points[:, 1:] - points[:, :-1]
    midpoints = 0.5 * (points[:, 1:] + points[:, :-1])
    tiny = torch.finfo(points.dtype).tiny
    return 0.5 * torch.log((steps * steps).sum(-1) + tiny) - metric.log_volume(midpoints)


def conformal_length(metric, points: torch.Tensor) -> torch.Tensor:
    """Length of discretised curves points [B, T, d] in the conformal metric exp(-2 log_volume) I -> [B]."""
    return torch.logsumexp(_log_segment_terms(metric, points), -1).exp()


def conformal_interpolation(metric, z0: torch.Tensor, z1: torch.Tensor, n_points: int = 24, n_iter: int = 200,
                            lr: float = 0.02, progress: bool = True) -> ConformalInterpolation:
    """Curves from z0 to z1 minimising the length of the conformal metric det(G)^-1 I (the paper's interpolation).

    Args:
        metric: any metric of the contract (log_volume differentiable in z).
        z0, z1: [B, d] or [d] end points.
        n_points: T, points on each curve, end points included (>= 3).
        n_iter: Adam steps on the interior points, started from the straight line.
        lr: Adam step, in units of each pair's end-point distance.
        progress: show a tqdm bar.
    Returns:
        ConformalInterpolation(points [B, T, d], length [B], straight_length [B]).
    On KeyboardInterrupt the bar is closed and the interrupt re-raised.
    """
    _checks.real_tensor("z0", z0, min_dim=1)
    _checks.real_tensor("z1", z1, min_dim=1)
    _checks.same_device(z0=z0, z1=z1)
    _checks.same_dtype(z0=z0, z1=z1)
    squeeze = z0.dim() == 1 and z1.dim() == 1
    z0, z1 = (z0.unsqueeze(0) if z0.dim() == 1 else z0), (z1.unsqueeze(0) if z1.dim() == 1 else z1)
    if z0.dim() != 2 or z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must both have shape [B, d] or [d], got {tuple(z0.shape)} and {tuple(z1.shape)}")
    if not isinstance(n_points, int) or n_points < 3:
        raise ValueError(f"n_points must be an int >= 3 (end points included), got {n_points!r}")
    if n_iter < 0 or not lr > 0:
        raise ValueError(f"n_iter must be >= 0 and lr > 0, got {n_iter} and {lr}")
    z0, z1 = z0.detach(), z1.detach()
    t = torch.linspace(0, 1, n_points, dtype=z0.dtype, device=z0.device)[None, :, None]
    straight = z0[:, None] + t * (z1 - z0)[:, None]  # [B, T, d]
    unit = (z1 - z0).norm(dim=-1).clamp_min(1e-6)[:, None, None]  # offsets are optimised in units of the distance
    offset = torch.zeros_like(straight[:, 1:-1]).requires_grad_(True)
    optimizer = torch.optim.Adam([offset], lr=lr)

    def curve(interior_offset):
        return torch.cat([z0[:, None], straight[:, 1:-1] + unit * interior_offset, z1[:, None]], 1)

    def log_energy(interior_offset):  # [B]: log E per pair minus log(T - 1), a constant that does not matter
        return torch.logsumexp(2 * _log_segment_terms(metric, curve(interior_offset)), -1)

    # Adam does not descend monotonically: keep each pair's best curve so far (the straight line first).
    best_offset = offset.detach().clone()
    best_value = torch.full((z0.shape[0],), math.inf, dtype=z0.dtype, device=z0.device)

    def remember(value):
        nonlocal best_value
        better = value < best_value
        best_value = torch.where(better, value, best_value)
        best_offset[better] = offset.detach()[better]

    bar = tqdm(range(n_iter), desc="conformal interpolation", disable=not progress)
    try:
        for _ in bar:
            optimizer.zero_grad()
            value = log_energy(offset)
            remember(value.detach())
            value.sum().backward()
            optimizer.step()
    finally:
        bar.close()
    with torch.no_grad():
        remember(log_energy(offset))
        points = curve(best_offset)
        length = conformal_length(metric, points)
        straight_length = conformal_length(metric, straight)
    if squeeze:
        points, length, straight_length = points[0], length[0], straight_length[0]
    return ConformalInterpolation(points=points, length=length, straight_length=straight_length)
