"""The right-hand sides of the geodesic and parallel-transport equations, c'' = -Gamma(c)[c', c'] and
V' = -Gamma(c)[c', V], computed together (docs/MATH.md section 9); geodesic._integrate uses mlp_rates for the MLP
decoders that have no fused acceleration of their own (Bernoulli)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import _linalg
from ..metrics.pullback import _elementwise_jet
from .curvature import christoffel, uses_flat_coordinates


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
    sigma, bernoulli), else None. The d basis tangents go through the hidden layers as rows of the same GEMMs as the
    points, with the second tangents along (w, w) (and (w, V)); the first tangents along w (and V) are combinations of
    the basis rows (h'[w] = sum_i w_i h'[e_i]: the activations scale every row alike), not rows of their own: for
    a = s(h), a''[x, y] = s''(h) h'[x] h'[y] + s'(h) h''[x, y]. At the output l the flat coordinates are phi = psi(l)
    elementwise (psi(l) = l / sigma, or 2 atan(exp(l / 2)) for Bernoulli logits, continued linearly where p is
    clamped), so J_phi = psi'(l) J_l and phi''[x, y] = psi'(l) l''[x, y] + psi''(l) l'[x] l'[y], with psi' = sqrt(w)
    (the Fisher weight) and psi'' = (1 - 2 p) psi' / 2 for Bernoulli inside the clamp (0 outside and otherwise).
    So G = J_l^T diag(w) J_l and J_phi^T phi''[x, y] = J_l^T diag(w) (l''[x, y] + q l'[x] l'[y]) with
    q = psi'' / psi' = (1 - 2 p) / 2 (Bernoulli inside the clamp, else 0)."""
    from ..metrics.pullback import PullbackMetric

    if not isinstance(metric, PullbackMetric) or metric.learned_std:
        return None
    mlp = metric._fused_mlp(c)
    if mlp is None or mlp.activation_modules[-1] is not None:
        return None
    B, d = c.shape
    tangents = torch.stack([w] + ([] if V is None else [V]), 1)  # [B, n, d]
    n = tangents.shape[1]
    a = c
    rows = None  # h'[e_1] .. h'[e_d] [B, d, width]; the first layer's are its weight's columns
    second = None  # a'' along (w, w) (and (w, V)) [B, n, width]; zero entering the first layer
    for linear, activation in zip(mlp.linears[:-1], mlp.activation_modules[:-1]):
        h = linear(a)
        width = linear.out_features
        if rows is None:
            rows = linear.weight.t().unsqueeze(0).expand(B, d, width)
        else:
            rows = (rows.reshape(-1, rows.shape[-1]) @ linear.weight.t()).reshape(B, d, width)
        if second is not None:
            second = (second.reshape(-1, second.shape[-1]) @ linear.weight.t()).reshape(B, n, width)
        if activation is None:
            a = h
            continue
        a, slope, curvature = _activation_jet(activation, h)
        along = _combine(tangents, rows)  # h'[w] (and h'[V]) [B, n, width]
        mixed = (curvature.unsqueeze(1) * along[:, :1]) * along  # s'' h'[w] h'[w] (and s'' h'[w] h'[V])
        second = mixed if second is None else torch.addcmul(mixed, slope.unsqueeze(1), second)
        rows = slope.unsqueeze(1) * rows
    last = mlp.linears[-1]
    output = last(a)
    metric._check_rows(output)
    D = last.out_features
    if rows is None:  # a single linear layer
        J_rows = last.weight.t().unsqueeze(0).expand(B, d, D)
    else:
        J_rows = (rows.reshape(-1, rows.shape[-1]) @ last.weight.t()).reshape(B, d, D)  # l' along e_i [B, d, D]
    # l'' along (w, w) (and (w, V)) [B, n, D]; zero through linear layers alone
    u = None if second is None else (second.reshape(-1, second.shape[-1]) @ last.weight.t()).reshape(B, n, D)
    weight = metric._weight(output)  # None, [D] or [B, D]
    weighted = J_rows if weight is None else J_rows * weight.unsqueeze(-2)  # J_l^T diag(w), as rows
    if metric.likelihood == "bernoulli":
        inside = ((output > math.log(metric.eps) - math.log1p(-metric.eps))
                  & (output < math.log1p(-metric.eps) - math.log(metric.eps)))
        q = torch.where(inside, 0.5 - torch.sigmoid(output), 0)  # psi'' / psi' [B, D]
        along = _combine(tangents, J_rows)  # l'[w] (and l'[V]) [B, n, D]
        bent = (q.unsqueeze(1) * along[:, :1]) * along
        u = bent if u is None else u + bent
    G = torch.bmm(weighted, J_rows.transpose(1, 2))
    rhs = G.new_zeros(B, d, n) if u is None else torch.bmm(weighted, u.transpose(1, 2))  # [B, d, n]
    solved = -torch.cholesky_solve(rhs, _linalg.cholesky(G, "metric(z)"))
    return solved[..., 0], (None if V is None else solved[..., 1])


def _combine(tangents: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """sum_i t_i rows_i [B, n, width] for tangents t [B, n, d] and rows [B, d, width] (d small: axpys, not a bmm of
    1 x d by d x width matrices)."""
    out = tangents[:, :, :1] * rows[:, None, 0]
    for i in range(1, rows.shape[1]):
        out = torch.addcmul(out, tangents[:, :, i:i + 1], rows[:, None, i])
    return out


def _activation_jet(activation, h: torch.Tensor):
    """(s(h), s'(h), s''(h)): closed forms for Softplus (the demo decoders' activation: s' = sigmoid(beta h),
    s'' = beta s' (1 - s'), and the module's linear branch s = h, s' = 1, s'' = 0 above its threshold), else
    pullback._elementwise_jet (forward mode over forward mode, exact for any elementwise module)."""
    if type(activation) is torch.nn.Softplus:
        beta, threshold = float(activation.beta), float(activation.threshold)
        value = torch.nn.functional.softplus(h, beta, threshold)
        scaled = h * beta if beta != 1 else h
        slope = torch.sigmoid(scaled)
        curvature = slope * (1 - slope)
        if beta != 1:
            curvature = curvature * beta
        linear = scaled > threshold
        return value, torch.where(linear, 1, slope), torch.where(linear, 0, curvature)
    return _elementwise_jet(activation, h)
