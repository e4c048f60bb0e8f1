"""The logarithm map: the initial velocity of the geodesic from z0 to z1, accurate to the ODE integrator of exp_map
(docs/MATH.md, "Log map, parallel transport, Frechet mean, tangent PCA")."""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from tqdm.auto import tqdm

from .. import _checks
from .curvature import uses_flat_coordinates
from .geodesic import _default_tol, _integrate, _minimise_energy, _straight_lines


@dataclass
class LogMapResult:
    """What log_map(..., return_result=True) returns (log_map(...) alone returns the tensor v).

    v [B, d]: initial velocities, exp_map(z0, v) = z1 to the tolerance where converged.
    converged [B] (bool): the shooting residual |exp_map(z0, v) - z1| met the tolerance.
    residual [B]: |exp_map(z0, v) - z1| (Euclidean, in coordinates); +inf where the path from v leaves the region
      where the metric is defined (such a pair is never converged).
    distance [B]: |v|_G(z0) = sqrt(v^T G(z0) v), the length of the geodesic (the geodesic distance when it minimises).
    points [B, n_points, d]: the geodesic sampled at t = 0, 1/(n_points - 1), ..., 1 by the integrator (the last
      point is exp_map(z0, v), within the residual of z1): a warm start (init=) for nearby pairs. Where that path
      leaves the metric's domain (residual inf), the minimum-energy curve from z0 to z1 of the first stage instead
      (the straight line when the first stage was skipped), so that the points are always finite.
    iterations [B]: Newton iterations each pair used.
    """

    v: torch.Tensor
    converged: torch.Tensor
    residual: torch.Tensor
    distance: torch.Tensor
    points: torch.Tensor
    iterations: torch.Tensor


def log_map(metric, z0: torch.Tensor, z1: torch.Tensor, *, n_points: int = 9, n_steps: int = 32,
            max_iter: int = 20, tol: Optional[float] = None, init: Optional[torch.Tensor] = None,
            energy_max_iter: int = 300, return_result: bool = False, progress: bool = False,
            backend: str = "auto") -> Union[torch.Tensor, LogMapResult]:
    """Riemannian logarithm: v [B, d] with exp_map(metric, z0, v, n_steps) = z1, for z0 [B, d] or [d] (one base point
    for all targets) and z1 [B, d] (both [d]: v [d]).

    Two stages, batched over the pairs:
      1. the minimum-energy curve from z0 to z1 on n_points points (metrics with flat coordinates: the batched
         Gauss-Newton solver of geodesic_distances; others: geodesic()'s L-BFGS), started from the straight line or
         from init [B, n_points, d] (curves from z0 to z1, e.g. the .points of an earlier result for nearby pairs);
         its velocity at t = 0 (one-sided fourth-order difference) is the first guess;
      2. a quasi-Newton method on the shooting residual r(v) = exp_map(z0, v) - z1 (RK4 with n_steps steps, the
         same integrator as exp_map): the first Jacobian dr/dv by forward differences with a quarter of the steps
         (the d probes in one batch), then Broyden's rank-one updates from the accepted steps; where a step fails to
         reduce |r|, the forward-difference Jacobian with n_steps steps, then backtracking on |r|. So v is accurate
         to the integrator, not to the curve's discretisation: a pair converges when
         |r| <= tol |z1 - z0| + 64 eps (|z0| + |z1|), tol defaulting to 1e-10 in float64 and 1e-5 in float32; a
         converged pair usually needs 1-2 iterations in float32 and 3-5 in float64, one integration each. Trial
         paths that leave the region where the metric is defined are rejected, not fatal. The returned curve
         (.points) is recorded by the final shot itself when n_steps is a multiple of n_points - 1.
    |v|_G(z0) is the length of the geodesic found: the geodesic distance when that geodesic is minimising (the
    energy stage starts Newton on the minimising branch unless the pair lies beyond a cut point).

    Returns v [B, d] (a plain tensor); pairs that did not converge within max_iter Newton iterations keep their best
    v and a RuntimeWarning says how many. return_result=True returns a LogMapResult instead (v, converged, residual,
    distance, points, iterations) and does not warn.
    Raises TypeError / ValueError naming the argument for non-tensors, non-float dtypes, NaN/Inf, mismatched shapes,
    and for points where the metric is not defined (non-finite or not positive definite G, or outside
    metric.in_domain(z) when the metric has that method).
    """
    z0, z1, single = _pair_points(metric, z0, z1)
    result = _solve(metric, z0, z1, n_points=n_points, n_steps=n_steps, max_iter=max_iter, tol=tol, init=init,
                    energy_max_iter=energy_max_iter, progress=progress, backend=backend)
    B = z1.shape[0]
    if single:
        result = LogMapResult(v=result.v[0], converged=result.converged[0], residual=result.residual[0],
                              distance=result.distance[0], points=result.points[0], iterations=result.iterations[0])
    if return_result:
        return result
    failed = int((~result.converged).sum())
    if failed:
        warnings.warn(f"log_map: {failed} of {B} pairs did not converge (their best v is returned; "
                      f"return_result=True gives .converged and .residual); raise max_iter, or the pairs lie beyond "
                      f"where the geodesic from z0 is unique", RuntimeWarning, stacklevel=2)
    return result.v


def _solve(metric, z0: torch.Tensor, z1: torch.Tensor, *, n_points: int = 9, n_steps: int = 32, max_iter: int = 20,
           tol: Optional[float] = None, init: Optional[torch.Tensor] = None, energy_max_iter: int = 300,
           progress: bool = False, backend: str = "auto", velocity: Optional[torch.Tensor] = None,
           jacobian: Optional[torch.Tensor] = None) -> LogMapResult:
    """log_map's options checked and its solver run on z0, z1 [B, d] (validated points, z0 expanded), with the warm
    starts of _log_map (velocity [B, d], jacobian [B, d, d]) for callers that solve nearby problems again."""
    n_points = _integer("n_points", n_points, 3)
    n_steps = _integer("n_steps", n_steps, 1)
    max_iter = _integer("max_iter", max_iter, 0)
    energy_max_iter = _integer("energy_max_iter", energy_max_iter, 0)
    if tol is not None:
        tol = _checks.number("tol", tol)
        if not (tol > 0 and math.isfinite(tol)):
            raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    B, d = z1.shape
    if init is not None:
        _checks.real_tensor("init", init, min_dim=3)
        if tuple(init.shape) != (B, n_points, d):
            raise ValueError(f"init must have shape [B, n_points, d] = {(B, n_points, d)} (curves from z0 to z1), "
                             f"got {tuple(init.shape)}")
        _checks.same_dtype(z1=z1, init=init)
        _checks.same_device(z1=z1, init=init)
    with torch.no_grad():
        return _log_map(metric, z0, z1, n_points, n_steps, max_iter, tol, init, energy_max_iter, progress, backend,
                        velocity=velocity, jacobian=jacobian)


# --------------------------------------------------------------------------------------------------- validation
def _integer(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_metric(metric) -> None:
    if not callable(getattr(metric, "metric", None)):
        raise TypeError(f"metric must follow the pygeo metric contract (metric(z)), got {type(metric).__name__}")


def check_defined(metric, name: str, z: torch.Tensor) -> torch.Tensor:
    """Refuse points z [N, d] where the metric is not defined: metric.in_domain(z) False (metrics that define it),
    G(z) not finite or not positive definite. Returns G(z) [N, d, d]. The error names the argument, how many of the
    points fail and the first one."""
    in_domain = getattr(metric, "in_domain", None)
    if callable(in_domain):
        inside = torch.as_tensor(in_domain(z)).reshape(-1)
        if not bool(inside.all()):
            first = int((~inside).nonzero()[0])
            raise ValueError(f"{name} is outside the metric's domain at {int((~inside).sum())} of {inside.numel()} "
                             f"points (first: index {first}, {z[first].tolist()})")
    try:
        G = metric.metric(z)
    except ValueError as error:
        raise ValueError(f"{name}: the metric is not defined at these points ({error})") from error
    _checks.finite_points(G.reshape(-1, z.shape[-1] ** 2), f"metric.metric({name})",
                          f"{name} lies outside where the metric is defined")
    _, info = torch.linalg.cholesky_ex(G)
    if bool((info > 0).any()):
        bad = (info > 0).nonzero().flatten()
        raise ValueError(f"metric.metric({name}) is not positive definite at {bad.numel()} of {info.numel()} points "
                         f"(first: index {int(bad[0])}): {name} lies outside where the metric is defined")
    return G


def _pair_points(metric, z0, z1) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """(z0 [B, d], z1 [B, d], single): z0 [d] is broadcast over z1's rows; single when both were [d]."""
    check_metric(metric)
    _checks.real_tensor("z0", z0, min_dim=1)
    _checks.real_tensor("z1", z1, min_dim=1)
    _checks.same_device(z0=z0, z1=z1)
    _checks.same_dtype(z0=z0, z1=z1)
    if z0.dim() > 2 or z1.dim() > 2:
        raise ValueError(f"z0 and z1 must have shape [B, d] or [d], got {tuple(z0.shape)} and {tuple(z1.shape)}")
    if z0.shape[-1] != z1.shape[-1] or z0.shape[-1] == 0:
        raise ValueError(f"z0 and z1 must have the same point dimension d >= 1, got {tuple(z0.shape)} and "
                         f"{tuple(z1.shape)}")
    single = z0.dim() == 1 and z1.dim() == 1
    z1 = z1.reshape(-1, z1.shape[-1])
    if z0.dim() == 2 and z0.shape[0] != z1.shape[0]:
        raise ValueError(f"z0 [B, d] and z1 [B, d] must have the same number of points B (or z0 one point [d]), got "
                         f"{tuple(z0.shape)} and {tuple(z1.shape)}")
    if z1.shape[0]:
        check_defined(metric, "z0", z0.reshape(-1, z0.shape[-1]))
        check_defined(metric, "z1", z1)
    z0 = z0.expand_as(z1).contiguous() if z0.dim() == 1 else z0
    return z0, z1, single


# ------------------------------------------------------------------------------------------------------ solver
def _log_map(metric, z0, z1, n_points, n_steps, max_iter, tol, init, energy_max_iter, progress, backend,
             velocity=None, jacobian=None):
    """The solver of log_map on validated z0, z1 [B, d]. velocity [B, d] (a first guess that replaces the energy
    stage) and jacobian [B, d, d] (a guess of d exp_z0(v) / dv that replaces the first finite-difference Jacobian) are
    warm starts for callers that solve nearby problems again (the Karcher flow); the result's .jacobian holds the last
    Jacobian estimate of each pair for the next such call, its .miss the residual vectors exp_map(z0, v) - z1."""
    B, d = z1.shape
    dtype, device = z1.dtype, z1.device
    if B == 0:
        empty = z1.new_zeros(0)
        return LogMapResult(v=z1.new_zeros(0, d), converged=torch.zeros(0, dtype=torch.bool, device=device),
                            residual=empty, distance=empty, points=z1.new_zeros(0, n_points, d),
                            iterations=torch.zeros(0, dtype=torch.long, device=device))
    if tol is None:
        tol = 1e-10 if dtype == torch.float64 else 1e-5
    curves = None
    if velocity is None:
        curves = _energy_curves(metric, z0, z1, n_points, init, energy_max_iter)
        velocity = _curve_velocity(curves)
    velocity = torch.where(torch.isfinite(velocity).all(-1, keepdim=True), velocity, z1 - z0).clone()
    floor = 64 * torch.finfo(dtype).eps * (z0.norm(dim=-1) + z1.norm(dim=-1))
    target = tol * (z1 - z0).norm(dim=-1) + floor  # [B]
    eye = torch.eye(d, dtype=dtype, device=device)
    fd_step = math.sqrt(torch.finfo(dtype).eps)
    substeps = max(1, math.ceil(n_steps / (n_points - 1)))
    record = substeps if substeps * (n_points - 1) == n_steps else None  # the curve comes with the shots
    coarse_steps = max(1, n_steps // 4)

    def shoot(start, v, steps=n_steps, record_every=None):
        """(end points [A, d], path or None): NaN where the path leaves the metric's domain."""
        return _integrate(metric, start, v, steps, record_every=record_every, nan_where_undefined=True,
                          backend=backend)

    def fd_jacobian(start, v, steps, base=None):
        """d exp_start(v) / dv [A, out, in] by forward differences with `steps` RK4 steps: v and its d probes
        v + h e_k in one batched integration (only the probes where base, the end at v with those steps, is
        known)."""
        A = v.shape[0]
        h = fd_step * (1 + v.norm(dim=-1))  # [A]
        probes = v[:, None, :] + h[:, None, None] * eye  # [A, d, d], probe k = v + h e_k
        if base is None:
            ends = shoot(start.repeat_interleave(d + 1, 0),
                         torch.cat([v[:, None, :], probes], 1).reshape(A * (d + 1), d), steps)[0].reshape(A, d + 1, d)
            base, ends = ends[:, 0], ends[:, 1:]
        else:
            ends = shoot(start.repeat_interleave(d, 0), probes.reshape(A * d, d), steps)[0].reshape(A, d, d)
        return ((ends - base[:, None, :]) / h[:, None, None]).transpose(-1, -2)

    def size(r):  # residual norms, +inf for a path that failed
        return torch.nan_to_num(r.norm(dim=-1), nan=math.inf)

    end, points = shoot(z0, velocity, record_every=record)
    residual = end - z1
    converged = size(residual) <= target
    iterations = torch.zeros(B, dtype=torch.long, device=device)
    # Jacobian estimates: a guess or a coarse finite-difference one (n_steps / 4 steps: a quarter of the work per
    # probe), then Broyden's rank-one updates from the accepted steps. A fine finite-difference Jacobian (`fresh`)
    # replaces them where a step fails, and backtracking is only done from a fresh one.
    J = eye.expand(B, d, d).clone() if jacobian is None else jacobian.clone()
    fresh = torch.zeros(B, dtype=torch.bool, device=device)
    bar = tqdm(total=B, desc="log maps (Newton)", disable=not progress, leave=False)
    bar.update(int(converged.sum()))
    try:
        active = (~converged).nonzero().squeeze(-1)
        if max_iter > 0 and active.numel() and jacobian is None:
            J[active] = fd_jacobian(z0[active], velocity[active], coarse_steps)
        for _ in range(max_iter):
            if active.numel() == 0:
                break
            iterations[active] += 1
            v, r, Ja, start, goal = velocity[active], residual[active], J[active], z0[active], z1[active]
            was_fresh = fresh[active]
            newton = _newton_step(Ja, r)
            trial_end, trial_path = shoot(start, v + newton, record_every=record)
            trial_r = trial_end - goal
            better = size(trial_r) < size(r)
            # Broyden: J <- J + (dr - J s) s^T / (s^T s) for the accepted steps s
            change = trial_r - r - (Ja @ newton.unsqueeze(-1)).squeeze(-1)
            update = change[:, :, None] * newton[:, None, :] / (newton * newton).sum(-1).clamp_min(
                torch.finfo(dtype).tiny)[:, None, None]
            broyden = better & torch.isfinite(update).flatten(1).all(-1)
            new_J = torch.where(broyden[:, None, None], Ja + update, Ja)
            new_fresh = was_fresh & ~broyden
            new_v = torch.where(better[:, None], v + newton, v)
            new_r = torch.where(better[:, None], trial_r, r)
            new_points = None
            if record is not None:
                new_points = torch.where(better[:, None, None], trial_path, points[active])
            stuck = torch.zeros_like(better)
            # A failed step from an estimated Jacobian: the fine finite-difference Jacobian at v, tried next time.
            refresh = (~better & ~was_fresh).nonzero().squeeze(-1)
            if refresh.numel():
                new_J[refresh] = fd_jacobian(start[refresh], v[refresh], n_steps, base=r[refresh] + goal[refresh])
                new_fresh[refresh] = True
            # A failed step from a fresh Jacobian: backtrack (plain trials).
            retry = (~better & was_fresh).nonzero().squeeze(-1)
            if retry.numel():
                step = torch.full((retry.numel(),), 0.5, dtype=dtype, device=device)
                found = torch.zeros(retry.numel(), dtype=torch.bool, device=device)
                for _ in range(10):
                    pending = (~found).nonzero().squeeze(-1)
                    if pending.numel() == 0:
                        break
                    rows = retry[pending]
                    candidate = v[rows] + step[pending, None] * newton[rows]
                    candidate_end, candidate_path = shoot(start[rows], candidate, record_every=record)
                    candidate_r = candidate_end - goal[rows]
                    ok = size(candidate_r) < size(r[rows])
                    new_v[rows[ok]], new_r[rows[ok]] = candidate[ok], candidate_r[ok]
                    if record is not None:
                        new_points[rows[ok]] = candidate_path[ok]
                    found[pending[ok]] = True
                    step[pending[~ok]] *= 0.25
                moved = retry[found]
                if moved.numel():
                    new_J[moved] = fd_jacobian(start[moved], new_v[moved], n_steps, base=new_r[moved] + goal[moved])
                    new_fresh[moved] = True
                stuck[retry[~found]] = True
            velocity[active], residual[active], J[active], fresh[active] = new_v, new_r, new_J, new_fresh
            if record is not None:
                points[active] = new_points
            done = size(new_r) <= target[active]
            converged[active] = done
            bar.update(int(done.sum()))
            # Pairs that can no longer reduce the residual (at the rounding floor, or a failed solve) leave the batch.
            active = active[~done & ~stuck]
    finally:  # Ctrl-C propagates (see geodesic._minimise_energy)
        bar.close()
    if record is None:  # the recorded curve needs its own step count; the residual stays the one of n_steps
        _, points = shoot(z0, velocity, substeps * (n_points - 1), record_every=substeps)
    failed = ~torch.isfinite(points).flatten(1).all(-1)
    if bool(failed.any()):  # paths that left the domain: the energy curve (or the straight line) instead
        fallback = _straight_lines(z0, z1, n_points)
        if curves is not None:
            fallback = torch.where(torch.isfinite(curves).flatten(1).all(-1)[:, None, None], curves, fallback)
        points = torch.where(failed[:, None, None], fallback, points)
    G0 = metric.metric(z0)
    distance = torch.einsum("bi,bij,bj->b", velocity, G0, velocity).clamp_min(0).sqrt()
    result = LogMapResult(v=velocity, converged=converged, residual=size(residual), distance=distance, points=points,
                          iterations=iterations)
    result.jacobian = J
    result.miss = residual  # exp_map(z0, v) - z1 [B, d]: with the triangle inequality, bounds |v|_G - d(z0, z1)
    return result


def _energy_curves(metric, z0, z1, n_points, init, max_iter, tol: Optional[float] = None) -> torch.Tensor:
    """Minimum-energy curves [B, n_points, d] from z0 to z1 (from init or the straight line), to the energy solvers'
    tolerance tol (default: geodesic()'s)."""
    if init is None:
        curves = _straight_lines(z0, z1, n_points)
    else:
        curves = torch.cat([z0[:, None], init[:, 1:-1].detach(), z1[:, None]], 1)
    if max_iter == 0:
        return curves
    tol = _default_tol(z0.dtype, "energy") if tol is None else tol
    if uses_flat_coordinates(metric):
        from .distances import _gauss_newton

        return _gauss_newton(metric, curves, max_iter, tol, return_points=True)[2]
    return _minimise_energy(metric, curves, max_iter, tol, progress=False).points


def _curve_velocity(curves: torch.Tensor) -> torch.Tensor:
    """c'(0) [B, d] of curves [B, T, d] sampled at t = k / (T - 1): the one-sided fourth-order difference
    (-25 c_0 + 48 c_1 - 36 c_2 + 16 c_3 - 3 c_4) / (12 h) (second order for T = 3, 4)."""
    T = curves.shape[1]
    h = 1.0 / (T - 1)
    if T >= 5:
        c = curves
        return (-25 * c[:, 0] + 48 * c[:, 1] - 36 * c[:, 2] + 16 * c[:, 3] - 3 * c[:, 4]) / (12 * h)
    return (-3 * curves[:, 0] + 4 * curves[:, 1] - curves[:, 2]) / (2 * h)


def _newton_step(J: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """-J^{-1} r [A, d] (least squares where J is singular; zero for rows whose J or r is not finite)."""
    usable = torch.isfinite(J).flatten(1).all(-1) & torch.isfinite(r).all(-1)
    eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)
    J = torch.where(usable[:, None, None], J, eye)
    rhs = -torch.where(usable[:, None], r, 0).unsqueeze(-1)
    solution, info = torch.linalg.solve_ex(J, rhs)
    step = solution.squeeze(-1)
    bad = (info != 0) | ~torch.isfinite(step).all(-1)
    if bool(bad.any()):
        step[bad] = torch.linalg.lstsq(J[bad], rhs[bad]).solution.squeeze(-1)
    return torch.where(usable[:, None], step, 0)
