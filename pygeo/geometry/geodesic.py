"""Geodesics: the boundary value problem (batched curve-energy minimisation or shooting) and the initial value problem
(exp_map by RK4 on c'' = -Gamma(c)[c', c']). MATH.md section 3."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from tqdm.auto import tqdm

from .. import _checks, _linalg
from ..metrics.base import where_defined
from .curvature import christoffel, uses_flat_coordinates


@dataclass
class GeodesicResult:
    """points [B, T, d] (T = n_points, from z0 to z1), length [B], energy [B], converged [B] (bool),
    iterations [B] (solver iterations each pair used)."""

    points: torch.Tensor
    length: torch.Tensor
    energy: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor


def curve_energy(metric, points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Discrete energy and length of curves points [B, T, d] (T - 1 segments) -> (energy [B], length [B]).

    E = (T-1) sum_t dc_t^T G(m_t) dc_t with m_t the segment midpoints; for metrics with flat coordinates phi the
    exact pullback form E = (T-1) sum_t |phi(c_{t+1}) - phi(c_t)|^2 (no metric evaluation at all).
    """
    segments = points.shape[-2] - 1
    if uses_flat_coordinates(metric):
        phi = metric.flat_coordinates(points)
        squared = (phi[..., 1:, :] - phi[..., :-1, :]).pow(2).sum(-1)
    else:
        steps = points[..., 1:, :] - points[..., :-1, :]
        G = metric.metric(0.5 * (points[..., 1:, :] + points[..., :-1, :]))
        squared = torch.einsum("...ti,...tij,...tj->...t", steps, G, steps).clamp_min(0)
    return segments * squared.sum(-1), squared.sqrt().sum(-1)


def _pair_inputs(metric, z0, z1):
    if not callable(getattr(metric, "metric", None)):
        raise TypeError(f"metric must follow the pygeo metric contract (metric(z)), got {type(metric).__name__}")
    _checks.real_tensor("z0", z0, min_dim=1)
    _checks.real_tensor("z1", z1, min_dim=1)
    _checks.same_device(z0=z0, z1=z1)
    _checks.same_dtype(z0=z0, z1=z1)
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape [B, d] (or [d]), got {tuple(z0.shape)} and {tuple(z1.shape)}")
    if z0.dim() > 2:
        raise ValueError(f"z0 and z1 must have shape [B, d] or [d], got {tuple(z0.shape)}")
    return z0.reshape(-1, z0.shape[-1]), z1.reshape(-1, z1.shape[-1])


def geodesic(metric, z0: torch.Tensor, z1: torch.Tensor, n_points: int = 16, method: str = "energy", *,
             init: Optional[torch.Tensor] = None, max_iter: int = 500, tol: Optional[float] = None,
             n_steps: int = 32, progress: bool = False) -> GeodesicResult:
    """Geodesics between z0 [B, d] and z1 [B, d] (or single points [d]), batched over pairs.

    method="energy": minimise the discrete curve energy (curve_energy) over the n_points - 2 interior points with a
      batched L-BFGS (per-pair histories and Armijo line searches); a pair stops being updated as soon as it converges,
      when its scaled gradient |grad E| |z1 - z0| / E falls below tol (default 1e-6 in float64, 1e-2 in float32).
      init [B, n_points, d] is an optional starting curve (default: the straight line, or for n_points > 17 the
      solution on a curve of (n_points - 1) // 4 + 1 points, resampled).
    method="shooting": Newton's method on the initial velocity v with exp_map(z0, v) = z1 (finite-difference
      Jacobians, backtracking on the residual), started from the velocity of a coarse minimum-energy curve;
      converged when |exp_map(z0, v) - z1| <= tol (|z1 - z0| + 1) (default tol 1e-6 in float64, 1e-4 in float32).
      n_steps RK4 steps per unit time. A trial path that leaves the region where the metric is positive definite is
      a failed trial, not an error.
    Pairs that do not converge within max_iter iterations come back with converged=False (and their best curve).
    """
    z0, z1 = _pair_inputs(metric, z0, z1)
    if method not in ("energy", "shooting"):
        raise ValueError(f"method must be 'energy' or 'shooting', got {method!r}")
    if not isinstance(n_points, numbers.Integral) or isinstance(n_points, bool) or n_points < 2:
        raise ValueError(f"n_points must be an integer >= 2, got {n_points!r}")
    n_points = int(n_points)
    if not isinstance(max_iter, numbers.Integral) or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if tol is None:
        tol = _default_tol(z0.dtype, method)
    if z0.shape[0] == 0:
        empty = z0.new_zeros(0)
        return GeodesicResult(points=z0.new_zeros(0, n_points, z0.shape[1]), length=empty, energy=empty,
                              converged=torch.zeros(0, dtype=torch.bool, device=z0.device),
                              iterations=torch.zeros(0, dtype=torch.long, device=z0.device))
    with torch.no_grad():
        if method == "energy":
            coarse_iterations = 0
            if init is None and n_points > _COARSE_FROM:
                # Long curves converge slowly from a straight line (the energy's Hessian is a discrete Laplacian with
                # condition ~ n_points^2): start from the solution on a coarser curve, resampled.
                coarse = geodesic(metric, z0, z1, n_points=(n_points - 1) // 4 + 1, max_iter=max_iter, tol=tol)
                init, coarse_iterations = _resample(coarse.points, n_points), coarse.iterations
            if init is None:
                init = _straight_lines(z0, z1, n_points)
            else:
                _checks.real_tensor("init", init, min_dim=3)
                if init.shape != (z0.shape[0], n_points, z0.shape[1]):
                    raise ValueError(f"init must have shape [B, n_points, d] = {(z0.shape[0], n_points, z0.shape[1])}, "
                                     f"got {tuple(init.shape)}")
                init = torch.cat([z0[:, None], init[:, 1:-1].to(z0), z1[:, None]], 1)
            result = _minimise_energy(metric, init, max_iter, tol, progress)
            result.iterations += coarse_iterations
            return result
        return _shoot(metric, z0, z1, n_points, max_iter, tol, n_steps, progress)


_COARSE_FROM = 17  # curves with more points than this start from a solved coarser curve
_SHOOTING_GUESS_POINTS = 9  # points of the energy solve that gives the shooting method its first velocity


def _straight_lines(z0: torch.Tensor, z1: torch.Tensor, n_points: int) -> torch.Tensor:
    """The straight lines [B, n_points, d] from z0 [B, d] to z1 [B, d], at t = k / (n_points - 1): the energy solvers'
    default start."""
    weights = torch.linspace(0, 1, n_points, dtype=z0.dtype, device=z0.device)[:, None]
    return z0[:, None, :] * (1 - weights) + z1[:, None, :] * weights


def _initial_velocity(metric, z0: torch.Tensor, z1: torch.Tensor, max_iter: int) -> torch.Tensor:
    """c'(0) [B, d] of the minimum-energy curve on a coarse grid (t = 0, h, 2h, ...), by the second-order one-sided
    difference (-3 c_0 + 4 c_1 - c_2) / (2h). The straight-line velocity z1 - z0 can overshoot wildly where the metric
    varies (hyperbolic space) and Newton never recovers; this guess is close enough for Newton to converge."""
    T = _SHOOTING_GUESS_POINTS
    curve = _minimise_energy(metric, _straight_lines(z0, z1, T), max_iter, _default_tol(z0.dtype, "energy"),
                             progress=False).points
    velocity = (-3 * curve[:, 0] + 4 * curve[:, 1] - curve[:, 2]) * ((T - 1) / 2)
    return torch.where(torch.isfinite(velocity).all(-1, keepdim=True), velocity, z1 - z0)


def _default_tol(dtype: torch.dtype, method: str) -> float:
    """energy: on the scaled gradient, whose float32 rounding floor is near 1e-3; shooting: on the end point's miss,
    relative to |z1 - z0| + 1 (RK4 in float32 is good to about 1e-6)."""
    if dtype == torch.float64:
        return 1e-6
    return 1e-2 if method == "energy" else 1e-4


def _resample(points: torch.Tensor, n_points: int) -> torch.Tensor:
    """Piecewise-linear resampling of curves points [B, T, d] (uniform in the parameter) to [B, n_points, d]."""
    T = points.shape[1]
    position = torch.linspace(0, T - 1, n_points, dtype=points.dtype, device=points.device)
    left = position.floor().long().clamp(max=T - 2)
    fraction = (position - left.to(points.dtype))[:, None]
    return points[:, left] * (1 - fraction) + points[:, left + 1] * fraction


def _energy_and_gradient(metric, points: torch.Tensor):
    with torch.enable_grad():
        interior = points[:, 1:-1].detach().requires_grad_(True)
        curve = torch.cat([points[:, :1], interior, points[:, -1:]], 1)
        energy, _ = curve_energy(metric, curve)
        (gradient,) = torch.autograd.grad(energy.sum(), interior)
    return energy.detach(), gradient.reshape(points.shape[0], -1)


def _minimise_energy(metric, points: torch.Tensor, max_iter: int, tol: float, progress: bool,
                     history: int = 10) -> GeodesicResult:
    B, T, d = points.shape
    points = points.clone()
    converged = torch.zeros(B, dtype=torch.bool, device=points.device)
    iterations = torch.zeros(B, dtype=torch.long, device=points.device)
    span = (points[:, -1] - points[:, 0]).norm(dim=-1)
    if T > 2:
        n = (T - 2) * d
        S = points.new_zeros(B, history, n)  # L-BFGS memory, newest last; zero rows are inert in the two-loop recursion
        Y = points.new_zeros(B, history, n)
        energy, gradient = _energy_and_gradient(metric, points)
        active = torch.arange(B, device=points.device)
        bar = tqdm(total=B, desc="geodesics (energy)", disable=not progress, leave=False)
        try:
            for _ in range(max_iter):
                done = _energy_converged(gradient[active], energy[active], span[active], tol)
                converged[active[done]] = True
                bar.update(int(done.sum()))
                active = active[~done]
                if active.numel() == 0:
                    break
                iterations[active] += 1
                x, g, E = points[active, 1:-1].reshape(-1, n), gradient[active], energy[active]
                direction = -_two_loop(g, S[active], Y[active], span[active] ** 2 / (4 * (T - 1) * E.clamp_min(1e-300)))
                slope = (direction * g).sum(-1)
                new_x, new_E, moved = _armijo(metric, points[active], x, E, direction, slope)
                stalled = ~moved
                new_points = points[active].clone()
                new_points[:, 1:-1] = new_x.reshape(-1, T - 2, d)
                _, new_g = _energy_and_gradient(metric, new_points)
                s, y = new_x - x, new_g - g
                curvature_ok = (s * y).sum(-1) > 1e-10 * s.norm(dim=-1) * y.norm(dim=-1)
                S_act, Y_act = S[active], Y[active]
                S[active] = torch.where(curvature_ok[:, None, None], torch.cat([S_act[:, 1:], s[:, None]], 1), S_act)
                Y[active] = torch.where(curvature_ok[:, None, None], torch.cat([Y_act[:, 1:], y[:, None]], 1), Y_act)
                points[active] = new_points
                energy[active], gradient[active] = new_E, new_g
                # A pair whose line search can no longer decrease the energy is finished: converged only if its
                # gradient criterion holds, otherwise reported as not converged.
                if bool(stalled.any()):
                    finished = active[stalled]
                    converged[finished] = _energy_converged(gradient[finished], energy[finished], span[finished], tol)
                    bar.update(int(stalled.sum()))
                    active = active[~stalled]
                    if active.numel() == 0:
                        break
            else:
                done = _energy_converged(gradient[active], energy[active], span[active], tol)
                converged[active[done]] = True
        finally:  # Ctrl-C propagates: a caller looping over batches must stop, not start the next one
            bar.close()
    else:
        converged[:] = True
    energy, length = curve_energy(metric, points)
    return GeodesicResult(points=points, length=length, energy=energy, converged=converged, iterations=iterations)


def _energy_converged(gradient, energy, span, tol):
    tiny = torch.finfo(energy.dtype).tiny
    return (gradient.norm(dim=-1) * span <= tol * energy) | (energy <= tiny) | (span <= tiny)


def _two_loop(g, S, Y, initial_scale):
    """Batched L-BFGS two-loop recursion: approximately H^{-1} g for each row."""
    ys = (S * Y).sum(-1)  # [A, m]
    rho = torch.where(ys > 0, 1 / ys.clamp_min(1e-300), torch.zeros_like(ys))
    q = g.clone()
    alphas = []
    for k in range(S.shape[1] - 1, -1, -1):
        alpha = rho[:, k] * (S[:, k] * q).sum(-1)
        q = q - alpha[:, None] * Y[:, k]
        alphas.append(alpha)
    newest_yy = (Y[:, -1] * Y[:, -1]).sum(-1)
    has_memory = ys[:, -1] > 0
    scale = torch.where(has_memory, ys[:, -1] / newest_yy.clamp_min(1e-300), initial_scale)
    r = q * scale[:, None]
    for k, alpha in zip(range(S.shape[1]), reversed(alphas)):
        beta = rho[:, k] * (Y[:, k] * r).sum(-1)
        r = r + S[:, k] * (alpha - beta)[:, None]
    # Not a descent direction (should not happen with positive curvature pairs): fall back to scaled steepest descent.
    descent = (r * g).sum(-1) > 0
    return torch.where(descent[:, None], r, g * initial_scale[:, None])


def _armijo(metric, points, x, energy, direction, slope, max_halvings: int = 30):
    """Batched backtracking line search from step 1; returns (x, energy, moved [A])."""
    A, T, d = points.shape
    step = torch.ones_like(energy)
    accepted = torch.zeros(A, dtype=torch.bool, device=x.device)
    new_x, new_E = x.clone(), energy.clone()
    trial_points = points.clone()
    for _ in range(max_halvings):
        pending = ~accepted
        if not bool(pending.any()):
            break
        idx = pending.nonzero().squeeze(-1)
        candidate = x[idx] + step[idx, None] * direction[idx]
        trial_points[idx, 1:-1] = candidate.reshape(-1, T - 2, d)
        trial_E, _ = curve_energy(metric, trial_points[idx])
        ok = torch.isfinite(trial_E) & (trial_E <= energy[idx] + 1e-4 * step[idx] * slope[idx]) & (trial_E < energy[idx])
        good = idx[ok]
        new_x[good], new_E[good], accepted[good] = candidate[ok], trial_E[ok], True
        step[idx[~ok]] *= 0.5
    return new_x, new_E, accepted


def exp_map(metric, z: torch.Tensor, v: torch.Tensor, n_steps: int = 32, *, backend: str = "auto") -> torch.Tensor:
    """Exponential map: the end point c(1) [..., d] of the geodesic with c(0) = z [..., d], c'(0) = v [..., d], by
    n_steps classical RK4 steps of c'' = -Gamma(c)[c', c']."""
    _checks.real_tensor("z", z, min_dim=1)
    _checks.real_tensor("v", v, min_dim=1)
    _checks.same_device(z=z, v=v)
    _checks.same_dtype(z=z, v=v)
    if z.shape != v.shape:
        raise ValueError(f"v must have the shape of z {tuple(z.shape)}, got {tuple(v.shape)}")
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    # expanded or strided views (z0.expand(B, d)) are copied: forward-mode AD refuses to write into aliased memory
    end, _ = _integrate(metric, z.contiguous(), v.contiguous(), n_steps, record_every=None, backend=backend)
    return end


def _integrate(metric, z, v, n_steps, record_every=None, backend="auto", nan_where_undefined=False):
    """RK4 of (c, w)' = (w, -Gamma(c)[w, w]) over t in [0, 1]; optionally records c every `record_every` steps.
    nan_where_undefined (z, v [B, d]): a path that leaves the region where the metric is positive definite (or finite)
    turns into NaN instead of raising for the whole batch (the shooting solver's trial velocities may do that)."""
    def exact_acceleration(c, w):
        if uses_flat_coordinates(metric):
            return _flat_acceleration(metric, c, w)
        return -torch.einsum("...kij,...i,...j->...k", christoffel(metric, c, backend=backend), w, w)

    def acceleration(c, w):
        if not nan_where_undefined:
            return exact_acceleration(c, w)
        return where_defined(exact_acceleration, (c, w), lambda n: c.new_full((n, c.shape[-1]), math.nan))

    return rk4_geodesic(acceleration, z, v, n_steps, record_every)


def rk4_geodesic(acceleration, z: torch.Tensor, v: torch.Tensor, n_steps: int, record_every=None):
    """Classical RK4 on c'' = acceleration(c, c') over t in [0, 1] with n_steps steps from c(0) = z, c'(0) = v [..., d]:
    (c(1) [..., d], the points every record_every steps [..., K + 1, d] or None). The one integrator of exp_map,
    shooting geodesics and the log map's fused rates."""
    h = 1.0 / n_steps
    c, w = z, v
    path = [c] if record_every else None
    for step in range(n_steps):
        a1 = acceleration(c, w)
        c2, w2 = c + 0.5 * h * w, w + 0.5 * h * a1
        a2 = acceleration(c2, w2)
        c3, w3 = c + 0.5 * h * w2, w + 0.5 * h * a2
        a3 = acceleration(c3, w3)
        c4, w4 = c + h * w3, w + h * a3
        a4 = acceleration(c4, w4)
        c = c + h / 6 * (w + 2 * w2 + 2 * w3 + w4)
        w = w + h / 6 * (a1 + 2 * a2 + 2 * a3 + a4)
        if record_every and (step + 1) % record_every == 0:
            path.append(c)
    return c, (torch.stack(path, -2) if record_every else None)


def _flat_acceleration(metric, c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """c'' = -G^{-1} J^T phi''[w, w] for G = J^T J (MATH.md section 3): d jvps for J and one jvp of a jvp, instead of
    the d(d+1)/2 second derivatives that the full Christoffel symbols need."""
    flat_c, flat_w = c.reshape(-1, c.shape[-1]), w.reshape(-1, w.shape[-1])
    fused = getattr(metric, "_fused_geodesic_acceleration", None)  # PullbackMetric of an MLP: tangents as GEMMs
    acceleration = fused(flat_c, flat_w) if fused is not None else None
    if acceleration is None:  # the MLP rates cover the likelihoods with a point-dependent weight (Bernoulli) too
        from ._rates import mlp_rates  # (a module that imports this one)

        rates = mlp_rates(metric, flat_c, flat_w)
        acceleration = None if rates is None else rates[0]
    if acceleration is not None:
        return acceleration.reshape(c.shape)
    phi = metric.flat_coordinates
    eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
    J = torch.func.vmap(lambda u: torch.func.jvp(phi, (flat_c,), (u.expand_as(flat_c),))[1], out_dims=-1)(eye)
    along = lambda x: torch.func.jvp(phi, (x,), (flat_w,))[1]  # noqa: E731
    _, second = torch.func.jvp(along, (flat_c,), (flat_w,))  # phi''[w, w], [B, D]
    G = J.transpose(-1, -2) @ J
    rhs = (J.transpose(-1, -2) @ second.unsqueeze(-1))
    return -torch.cholesky_solve(rhs, _linalg.cholesky(G, "metric(z)")).reshape(c.shape)


def _shoot(metric, z0, z1, n_points, max_iter, tol, n_steps, progress) -> GeodesicResult:
    B, d = z0.shape
    velocity = _initial_velocity(metric, z0, z1, max_iter)
    scale = (z1 - z0).norm(dim=-1) + 1
    fd_step = math.sqrt(torch.finfo(z0.dtype).eps)

    def shoot(start, v):  # end points [A, d], NaN where the path leaves the metric's domain
        return _integrate(metric, start, v, n_steps, nan_where_undefined=True)[0]

    def size(r):  # residual norms, +inf for a path that failed
        return torch.nan_to_num(r.norm(dim=-1), nan=math.inf)

    residual = shoot(z0, velocity) - z1
    converged = size(residual) <= tol * scale
    iterations = torch.zeros(B, dtype=torch.long, device=z0.device)
    eye = torch.eye(d, dtype=z0.dtype, device=z0.device)
    bar = tqdm(total=B, desc="geodesics (shooting)", disable=not progress, leave=False)
    bar.update(int(converged.sum()))
    try:
        for _ in range(max_iter):
            active = (~converged).nonzero().squeeze(-1)
            if active.numel() == 0:
                break
            iterations[active] += 1
            A = active.numel()
            v, r, start = velocity[active], residual[active], z0[active]
            h = fd_step * (1 + v.norm(dim=-1))  # [A]
            probes = (v[:, None, :] + h[:, None, None] * eye).reshape(A * d, d)
            ends = shoot(start.repeat_interleave(d, 0), probes).reshape(A, d, d)
            jacobian = ((ends - (r + z1[active])[:, None, :]) / h[:, None, None]).transpose(-1, -2)  # [A, out, in]
            usable = torch.isfinite(jacobian).flatten(1).all(-1) & torch.isfinite(r).all(-1)
            jacobian = torch.where(usable[:, None, None], jacobian, eye)
            newton = torch.linalg.lstsq(jacobian, -torch.where(usable[:, None], r, 0).unsqueeze(-1)).solution.squeeze(-1)
            # Backtrack on the residual norm, all pairs at once.
            step = torch.ones(A, dtype=z0.dtype, device=z0.device)
            best_v, best_r = v.clone(), r.clone()
            improved = torch.zeros(A, dtype=torch.bool, device=z0.device)
            for _ in range(8):
                trial_v = v + step[:, None] * newton
                trial_r = shoot(start, trial_v) - z1[active]
                better = (~improved) & (size(trial_r) < size(r))
                best_v[better], best_r[better], improved = trial_v[better], trial_r[better], improved | better
                if bool(improved.all()):
                    break
                step = torch.where(improved, step, 0.5 * step)
            velocity[active], residual[active] = best_v, best_r
            newly = size(best_r) <= tol * scale[active]
            bar.update(int(newly.sum()))
            converged[active] = newly
            if not bool(improved.any()):  # no pair can make progress any more
                break
    finally:  # Ctrl-C propagates (see _minimise_energy)
        bar.close()
    substeps = max(1, math.ceil(n_steps / (n_points - 1)))
    _, points = _integrate(metric, z0, velocity, substeps * (n_points - 1), record_every=substeps,
                           nan_where_undefined=True)
    points[converged, -1] = z1[converged]  # within tol of the integrated end; the curve ends exactly at z1
    G0 = metric.metric(z0)
    energy = torch.einsum("bi,bij,bj->b", velocity, G0, velocity)
    return GeodesicResult(points=points, length=energy.clamp_min(0).sqrt(), energy=energy, converged=converged,
                          iterations=iterations)
