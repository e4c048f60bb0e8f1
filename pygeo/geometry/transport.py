"""Parallel transport of tangent vectors along geodesics or given curves: V' = -Gamma(c)[c', V] by RK4, fused with the
geodesic for metrics with flat coordinates (no Christoffel tensor; docs/MATH.md, "Parallel transport")."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from .. import _checks
from ._rates import rates
from .logmap import _integer, _pair_points, check_defined, check_metric, log_map


def parallel_transport(metric, z0: Optional[torch.Tensor] = None, z1: Optional[torch.Tensor] = None,
                       v: Optional[torch.Tensor] = None, *, along: Optional[torch.Tensor] = None,
                       velocity: Optional[torch.Tensor] = None, n_steps: int = 32, backend: str = "auto",
                       **log_map_options) -> torch.Tensor:
    """Parallel transport of v [B, d] (tangent vectors at z0) to z1, along the geodesic z0 -> z1 or along a curve.

    Along the geodesic (along=None): z0 [B, d] or [d], z1 [B, d], v [B, d] (or [d], one vector at one z0; all
      three [d]: the result is [d]). The geodesic's initial velocity is log_map(metric, z0, z1, n_steps=n_steps,
      **log_map_options) unless given as velocity= [B, d] (then z1 only fixes the batch); the system
      (c, c', V)' = (c', -Gamma(c)[c', c'], -Gamma(c)[c', V]) is integrated by n_steps RK4 steps over t in [0, 1]:
      the end point is exp_map(z0, velocity), within the log map's tolerance of z1.
    Along a curve (along=curve [B, T, d], T >= 2, from z0 = curve[:, 0] to z1 = curve[:, -1]; z0 and z1 may be
      omitted, and must match the curve's ends if given): the curve is the piecewise cubic Hermite interpolant of its
      points (node tangents by second-order differences) and V' = -Gamma(c)[c', V] is integrated along it by RK4,
      about n_steps steps in all (at least one per segment). The transport is exact for that interpolant up to RK4's
      error; how close the interpolant is to the intended curve is O(1 / T^2).
    Metrics with flat coordinates phi (G = J^T J) never form Christoffel symbols: V' = -G^{-1} J^T phi''[c', V]
    (the tangential part of d/dt (J V) vanishes), with phi''[c', c'] for the geodesic in the same forward-mode pass
    (for an MLP decoder the tangents ride through the layers as extra GEMM rows). Other metrics use christoffel().
    Transport preserves inner products: <P u, P w>_G(z1) = <u, w>_G(z0) up to the integrator's error (O(n_steps^-4)).

    Returns the transported vectors [B, d] at the end of the path. Raises TypeError / ValueError naming the argument
    for bad shapes, dtypes, NaN/Inf, and points where the metric is not defined.
    """
    check_metric(metric)
    n_steps = _integer("n_steps", n_steps, 1)
    if along is not None:
        if velocity is not None or log_map_options:
            raise ValueError("velocity= and log map options apply to transport along the geodesic, not along=curve")
        return _transport_along_curve(metric, z0, z1, v, along, n_steps, backend)
    if z0 is None or z1 is None or v is None:
        raise ValueError("parallel_transport needs z0, z1 and v (or v and along=curve)")
    _checks.real_tensor("v", v, min_dim=1)
    single = z0.dim() == 1 and z1.dim() == 1 and v.dim() == 1
    start, end, _ = _pair_points(metric, z0, z1)
    B, d = end.shape
    if v.dim() > 2 or v.shape[-1] != d or (v.dim() == 2 and v.shape[0] != B) or (v.dim() == 1 and z0.dim() == 2):
        raise ValueError(f"v must have shape [B, d] = {(B, d)} like the pairs (or [d] with one z0 [d]), got "
                         f"{tuple(v.shape)}")
    _checks.same_dtype(z0=start, v=v)
    _checks.same_device(z0=start, v=v)
    vectors = v.expand(B, d) if v.dim() == 1 else v
    if velocity is None:
        result = log_map(metric, start, end, n_steps=n_steps, return_result=True, backend=backend, **log_map_options)
        velocity = result.v
        failed = int((~result.converged).sum())
        if failed:
            warnings.warn(f"parallel_transport: the log map of {failed} of {B} pairs did not converge; their vectors "
                          f"are transported along the best geodesic found", RuntimeWarning, stacklevel=2)
    else:
        _checks.real_tensor("velocity", velocity, min_dim=2)
        if tuple(velocity.shape) != (B, d):
            raise ValueError(f"velocity must have shape [B, d] = {(B, d)}, got {tuple(velocity.shape)}")
        _checks.same_dtype(z0=start, velocity=velocity)
    if B == 0:
        return vectors.clone()
    with torch.no_grad():
        transported = _transport_along_geodesic(metric, start, velocity, vectors, n_steps, backend)
    return transported[0] if single else transported


def _transport_along_geodesic(metric, z0, velocity, vectors, n_steps, backend):
    h = 1.0 / n_steps
    c, w, V = z0, velocity, vectors
    for _ in range(n_steps):
        a1, b1 = _rates(metric, c, w, V, backend)
        c2, w2, V2 = c + 0.5 * h * w, w + 0.5 * h * a1, V + 0.5 * h * b1
        a2, b2 = _rates(metric, c2, w2, V2, backend)
        c3, w3, V3 = c + 0.5 * h * w2, w + 0.5 * h * a2, V + 0.5 * h * b2
        a3, b3 = _rates(metric, c3, w3, V3, backend)
        c4, w4, V4 = c + h * w3, w + h * a3, V + h * b3
        a4, b4 = _rates(metric, c4, w4, V4, backend)
        c = c + h / 6 * (w + 2 * w2 + 2 * w3 + w4)
        w = w + h / 6 * (a1 + 2 * a2 + 2 * a3 + a4)
        V = V + h / 6 * (b1 + 2 * b2 + 2 * b3 + b4)
    return V


def _transport_along_curve(metric, z0, z1, v, curve, n_steps, backend):
    _checks.real_tensor("along", curve, min_dim=2)
    single = curve.dim() == 2
    curve = curve.unsqueeze(0) if single else curve
    if curve.dim() != 3 or curve.shape[1] < 2 or curve.shape[2] < 1:
        raise ValueError(f"along must be curves [B, T, d] with T >= 2 points, got {tuple(curve.shape)}")
    B, T, d = curve.shape
    _checks.real_tensor("v", v, min_dim=1)
    _checks.same_dtype(along=curve, v=v)
    _checks.same_device(along=curve, v=v)
    vectors = v.reshape(-1, v.shape[-1]) if v.dim() == 1 else v
    if vectors.dim() != 2 or tuple(vectors.shape) != (B, d):
        raise ValueError(f"v must have shape [B, d] = {(B, d)} (vectors at the curves' first points), got "
                         f"{tuple(v.shape)}")
    for name, given, end in (("z0", z0, curve[:, 0]), ("z1", z1, curve[:, -1])):
        if given is None:
            continue
        _checks.real_tensor(name, given, min_dim=1)
        rows = given.reshape(-1, given.shape[-1])
        if given.dim() > 2 or rows.shape[-1] != d or rows.shape[0] not in (1, B):
            raise ValueError(f"{name} must have shape [B, d] = {(B, d)} like the curve's ends, got {tuple(given.shape)}")
        scale = end.abs().max().clamp_min(1)
        if not bool(((rows.to(end) - end).abs() <= 1e-5 * scale).all()):
            raise ValueError(f"{name} must be the {'first' if name == 'z0' else 'last'} point of the curves in along "
                             f"(or omitted)")
    check_defined(metric, "along", curve.reshape(-1, d))
    if B == 0:
        return vectors.clone()
    segments = T - 1
    substeps = max(1, math.ceil(n_steps / segments))
    h = 1.0 / segments  # parameter step of a segment, t in [0, 1]
    tangents = _node_tangents(curve, h)  # [B, T, d]
    V = vectors.clone()
    with torch.no_grad():
        for k in range(segments):
            p0, p1, m0, m1 = curve[:, k], curve[:, k + 1], tangents[:, k], tangents[:, k + 1]

            def point(s):  # Hermite cubic on the segment: (c, dc/dt) at local parameter s in [0, 1]
                c = (2 * s ** 3 - 3 * s ** 2 + 1) * p0 + (s ** 3 - 2 * s ** 2 + s) * h * m0 \
                    + (-2 * s ** 3 + 3 * s ** 2) * p1 + (s ** 3 - s ** 2) * h * m1
                dc = ((6 * s ** 2 - 6 * s) * p0 + (3 * s ** 2 - 4 * s + 1) * h * m0
                      + (-6 * s ** 2 + 6 * s) * p1 + (3 * s ** 2 - 2 * s) * h * m1) / h
                return c, dc

            delta = 1.0 / substeps
            for j in range(substeps):
                s = j * delta
                dt = delta * h
                (ca, wa), (cb, wb), (cc, wc) = point(s), point(s + 0.5 * delta), point(s + delta)
                b1 = _transport_rate(metric, ca, wa, V, backend)
                b2 = _transport_rate(metric, cb, wb, V + 0.5 * dt * b1, backend)
                b3 = _transport_rate(metric, cb, wb, V + 0.5 * dt * b2, backend)
                b4 = _transport_rate(metric, cc, wc, V + dt * b3, backend)
                V = V + dt / 6 * (b1 + 2 * b2 + 2 * b3 + b4)
    return V[0] if single else V


def _node_tangents(curve: torch.Tensor, h: float) -> torch.Tensor:
    """dc/dt at the nodes of curves [B, T, d] (t = k h): central differences inside, second-order one-sided at the
    ends (first order for T = 2)."""
    T = curve.shape[1]
    if T == 2:
        slope = (curve[:, 1] - curve[:, 0]) / h
        return torch.stack([slope, slope], 1)
    inside = (curve[:, 2:] - curve[:, :-2]) / (2 * h)
    first = (-3 * curve[:, 0] + 4 * curve[:, 1] - curve[:, 2]) / (2 * h)
    last = (3 * curve[:, -1] - 4 * curve[:, -2] + curve[:, -3]) / (2 * h)
    return torch.cat([first[:, None], inside, last[:, None]], 1)


# ------------------------------------------------------------------------------------------------ the rates
def _rates(metric, c, w, V, backend):
    """(-Gamma(c)[w, w], -Gamma(c)[w, V]) [B, d] each."""
    return rates(metric, c, w, V, backend)


def _transport_rate(metric, c, w, V, backend):
    """-Gamma(c)[w, V] [B, d] (w = c' of a given curve)."""
    return rates(metric, c, w, V, backend)[1]
