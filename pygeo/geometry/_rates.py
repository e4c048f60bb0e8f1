"""The right-hand sides of the geodesic and parallel-transport equations, c'' = -Gamma(c)[c', c'] and
V' = -Gamma(c)[c', V], computed together (docs/MATH.md section 9), and an RK4 geodesic integrator over them."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import _linalg
from ..metrics.base import where_defined
from ..metrics.pullback import _elementwise_jet
from .curvature import christoffel, uses_flat_coordinates
from .geodesic import _integrate, rk4_geodesic


def rates(metric, c: torch.Tensor, w: torch.Tensor, V: Optional[torch.Tensor] = None, backend: str = "auto"
          ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(-Gamma(c)[w, w] [B, d], -Gamma(c)[w, V] [B, d] or None without V) for c, w, V [B, d]: the fused MLP pass
    where it applies, else through flat coordinates (-G^{-1} J^T phi''[., .]), else Christoffel symbols."""
    if uses_flat_coordinates(metric):
        fused = mlp_rates(metric, c, w, V)
        if fused is not None:
            return fused
        return flat_rates(metric, c, w, V)
    gamma = christoffel(metric, c, backend=backend)
    return (-torch.einsum("bkij,bi,bj->bk", gamma, w, w),
            None if V is None else -torch.einsum("bkij,bi,bj->bk", gamma, w, V))


def flat_rates(metric, c, w, V=None):
    """G = J^T J with J = d phi / dz: -Gamma[a, b] = -G^{-1} J^T phi''[a, b], with phi''[w, w] (and phi''[w, V]) as
    jvps of a jvp and the d columns of J by vmapped jvps; one Cholesky factor for both."""
    phi = metric.flat_coordinates
    d = c.shape[-1]
    eye = torch.eye(d, dtype=c.dtype, device=c.device)
    J = torch.func.vmap(lambda u: torch.func.jvp(phi, (c,), (u.expand_as(c),))[1], out_dims=-1)(eye)  # [B, D, d]

    def second(a, b):  # phi''[a, b] [B, D]
        return torch.func.jvp(lambda x: torch.func.jvp(phi, (x,), (b,))[1], (c,), (a,))[1]

    seconds = [second(w, w)] + ([] if V is None else [second(w, V)])
    rhs = J.transpose(-1, -2) @ torch.stack(seconds, -1)  # [B, d, 1 or 2]
    G = J.transpose(-1, -2) @ J
    solved = -torch.cholesky_solve(rhs, _linalg.cholesky(G, "metric(z)"))
    return solved[..., 0], (None if V is None else solved[..., 1])


def mlp_rates(metric, c, w, V=None):
    """flat_rates for a PullbackMetric of an MLP decoder with a linear output layer (euclidean, gaussian with a fixed
    sigma, bernoulli), else None. The d basis tangents, w (and V) go through the hidden layers as rows of the same
    GEMMs as the points, with the second tangents along (w, w) (and (w, V)): for a = s(h),
    a''[x, y] = s''(h) h'[x] h'[y] + s'(h) h''[x, y]. At the output l the flat coordinates are phi = psi(l)
    elementwise (psi(l) = l / sigma, or 2 atan(exp(l / 2)) for Bernoulli logits, continued linearly where p is
    clamped), so J_phi = psi'(l) J_l and phi''[x, y] = psi'(l) l''[x, y] + psi''(l) l'[x] l'[y], with psi' = sqrt(w)
    (the Fisher weight) and psi'' = (1 - 2 p) psi' / 2 for Bernoulli inside the clamp (0 outside and otherwise)."""
    from ..metrics.pullback import PullbackMetric

    if not isinstance(metric, PullbackMetric) or metric.learned_std:
        return None
    mlp = metric._fused_mlp(c)
    if mlp is None or mlp.activation_modules[-1] is not None:
        return None
    B, d = c.shape
    tangents = [w] + ([] if V is None else [V])
    n = len(tangents)
    a = c
    basis = torch.eye(d, dtype=c.dtype, device=c.device).expand(B, d, d)
    rows = torch.cat([basis] + [t.unsqueeze(1) for t in tangents], 1)  # [B, d + n, width]: e_1 .. e_d, w, V
    second = c.new_zeros(B, n, d)  # a'' along (w, w) and (w, V); zero entering the first layer
    for linear, activation in zip(mlp.linears[:-1], mlp.activation_modules[:-1]):
        h = linear(a)
        rows = (rows.reshape(-1, rows.shape[-1]) @ linear.weight.t()).reshape(B, d + n, linear.out_features)
        second = (second.reshape(-1, second.shape[-1]) @ linear.weight.t()).reshape(B, n, linear.out_features)
        if activation is None:
            a = h
            continue
        a, slope, curvature = _elementwise_jet(activation, h)
        mixed = rows[:, d:d + 1] * rows[:, d:]  # h'[w] h'[w], h'[w] h'[V]
        second = curvature.unsqueeze(1) * mixed + slope.unsqueeze(1) * second
        rows = slope.unsqueeze(1) * rows
    last = mlp.linears[-1]
    output = last(a)
    metric._check_rows(output)
    D = last.out_features
    out_rows = (rows.reshape(-1, rows.shape[-1]) @ last.weight.t()).reshape(B, d + n, D)
    J_rows, along = out_rows[:, :d], out_rows[:, d:]  # l' along e_i [B, d, D]; along w (and V) [B, n, D]
    l_second = (second.reshape(-1, second.shape[-1]) @ last.weight.t()).reshape(B, n, D)
    weight = metric._weight(output)
    slope_out = None if weight is None else weight.sqrt()  # psi'(l): [D] or [B, D]
    phi_second = l_second if slope_out is None else slope_out.unsqueeze(-2) * l_second
    if metric.likelihood == "bernoulli":
        inside = ((output > math.log(metric.eps) - math.log1p(-metric.eps))
                  & (output < math.log1p(-metric.eps) - math.log(metric.eps)))
        p = torch.sigmoid(output)
        psi_second = torch.where(inside, 0.5 * (1 - 2 * p) * slope_out, 0)  # [B, D]
        phi_second = phi_second + psi_second.unsqueeze(1) * along[:, :1] * along
    # J_phi^T x = J_l^T (psi' x); G = J_l^T diag(psi'^2) J_l
    weighted = J_rows if weight is None else J_rows * weight.unsqueeze(-2)
    G = weighted @ J_rows.transpose(1, 2)
    scaled = J_rows if slope_out is None else J_rows * slope_out.unsqueeze(-2)
    rhs = scaled @ phi_second.transpose(1, 2)  # [B, d, n]
    solved = -torch.cholesky_solve(rhs, _linalg.cholesky(G, "metric(z)"))
    return solved[..., 0], (None if V is None else solved[..., 1])


def integrate(metric, z: torch.Tensor, v: torch.Tensor, n_steps: int, record_every: Optional[int] = None,
              backend: str = "auto", nan_where_undefined: bool = False):
    """geodesic._integrate (RK4 of (c, w)' = (w, -Gamma(c)[w, w])), with the fused MLP rates where they apply and
    exp_map has no fused path of its own (Bernoulli decoders): the same scheme and steps, so the same end point up to
    rounding. Returns (end [B, d], recorded path [B, n_steps / record_every + 1, d] or None)."""
    if getattr(metric, "_fused_geodesic_acceleration", None) is not None and \
            metric._fused_geodesic_acceleration(z[:1], v[:1]) is not None:
        return _integrate(metric, z, v, n_steps, record_every, backend, nan_where_undefined)
    if mlp_rates(metric, z[:1], v[:1]) is None:
        return _integrate(metric, z, v, n_steps, record_every, backend, nan_where_undefined)

    def acceleration(c, w):
        if not nan_where_undefined:
            return mlp_rates(metric, c, w)[0]
        return where_defined(lambda a, b: mlp_rates(metric, a, b)[0], (c, w),
                             lambda count: c.new_full((count, c.shape[-1]), math.nan))

    return rk4_geodesic(acceleration, z, v, n_steps, record_every)
