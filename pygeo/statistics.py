"""Statistics on a Riemannian manifold given by a metric of the contract: the Frechet (Karcher) mean, tangent PCA and
wrapped normal samples, over pygeo.log_map and pygeo.exp_map (docs/MATH.md, "Log map, parallel transport, Frechet
mean, tangent PCA")."""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import _checks, _linalg
from .geometry.geodesic import exp_map
from .geometry.logmap import _curve_velocity, _energy_curves, _integer, _solve, check_defined, check_metric, log_map

__all__ = ["FrechetMeanResult", "TangentPCAResult", "frechet_mean", "tangent_pca", "wrapped_normal"]


@dataclass
class FrechetMeanResult:
    """mean [d]: the weighted Frechet mean found; variance (0-d): sum_i w_i d(mean, x_i)^2 / sum_i w_i (the squared
    distances are |log_mean(x_i)|^2_G); converged (bool): the gradient criterion was met; n_iter (int): Karcher
    iterations done; gradient_norm (0-d): |sum_i w_i log_mean(x_i) / sum_i w_i|_G(mean), the Riemannian gradient norm
    of variance / 2 at the mean; log_maps [N, d]: log_mean(x_i); log_maps_converged [N] (bool): which of those log
    maps met their tolerance (log_map's default on the shooting residual, or frechet_mean's tol / 10 where tighter)."""

    mean: torch.Tensor
    variance: torch.Tensor
    converged: bool
    n_iter: int
    gradient_norm: torch.Tensor
    log_maps: torch.Tensor
    log_maps_converged: torch.Tensor


@dataclass
class TangentPCAResult:
    """mean [d]: the base point; components [k, d]: principal directions, orthonormal in G(mean)
    (components G components^T = I_k), by decreasing variance; explained_variance [k]: the variance of the scores
    along each; explained_variance_ratio [k]: its share of total_variance (0-d, the mean squared distance to the
    mean); scores [N, k]: <log_mean(x_i), component_j>_G(mean); log_maps [N, d]."""

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance: torch.Tensor
    explained_variance_ratio: torch.Tensor
    total_variance: torch.Tensor
    scores: torch.Tensor
    log_maps: torch.Tensor


def _points(name: str, x) -> torch.Tensor:
    _checks.real_tensor(name, x, min_dim=2)
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have shape [N, d] with N >= 1 and d >= 1, got {tuple(x.shape)}")
    return x


def _weights(weights, x: torch.Tensor) -> torch.Tensor:
    """Normalised weights [N] (sum 1), validated: shape [N], finite, non-negative, not all zero."""
    N = x.shape[0]
    if weights is None:
        return x.new_full((N,), 1.0 / N)
    _checks.real_tensor("weights", weights, min_dim=1)
    if tuple(weights.shape) != (N,):
        raise ValueError(f"weights must have shape [N] = [{N}] (one per point of x), got {tuple(weights.shape)}")
    _checks.same_device(x=x, weights=weights)
    weights = weights.to(x.dtype)
    if bool((weights < 0).any()):
        raise ValueError(f"weights must be non-negative, got a minimum of {float(weights.min()):.3g}")
    total = weights.sum()
    if not total > 0:
        raise ValueError("weights must not all be zero")
    return weights / total


def _tolerance(name: str, value) -> Optional[float]:
    if value is None:
        return None
    value = _checks.number(name, value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _start(metric, x: torch.Tensor, weights: torch.Tensor, init) -> torch.Tensor:
    """init [d] (validated), or the weighted Euclidean mean of x, or where the metric is not defined there the
    point of x nearest to it."""
    d = x.shape[1]
    if init is not None:
        _checks.real_tensor("init", init, min_dim=1)
        if tuple(init.shape) != (d,):
            raise ValueError(f"init must have shape [d] = [{d}], got {tuple(init.shape)}")
        _checks.same_dtype(x=x, init=init)
        _checks.same_device(x=x, init=init)
        check_defined(metric, "init", init[None])
        return init.clone()
    euclidean = weights @ x
    try:
        check_defined(metric, "the Euclidean mean", euclidean[None])
        return euclidean
    except ValueError:
        return x[((x - euclidean) ** 2).sum(-1).argmin()].clone()


def frechet_mean(metric, x: torch.Tensor, weights: Optional[torch.Tensor] = None, init: Optional[torch.Tensor] = None,
                 *, step: float = 1.0, max_iter: int = 100, tol: Optional[float] = None, n_points: int = 9,
                 n_steps: int = 32, progress: bool = False, **log_map_options) -> FrechetMeanResult:
    """Weighted Frechet (Karcher) mean of the points x [N, d]: the minimiser m of
    F(m) = sum_i w_i d(m, x_i)^2 / (2 sum_i w_i), by the Karcher flow m <- exp_m(K g), g = sum_i w_i log_m(x_i) / sum w
    (minus the Riemannian gradient of F).

    weights [N] (default uniform): non-negative, not all zero. init [d]: the starting point (default: the weighted
    Euclidean mean, or the nearest point of x where the metric is not defined there). K is step * I on the first
    iteration (the plain Karcher step) and then a secant (Broyden) estimate of F's inverse Hessian in coordinates,
    learnt from the gradients of successive iterates, so the flow converges superlinearly instead of by a fixed
    factor per step; a quasi-Newton step that fails is retried as the plain one. The N log maps of an iteration are
    one batch, in two stages: first inexact log maps, the initial velocities of the minimum-energy curves from m to
    x_i on 2 (n_points - 1) + 1 points (no shooting; each started from the previous iteration's curve with its
    start moved to the new m), until that gradient is below tol or the curves' discretisation error, or a step fails
    to lower that variance; then accurate log maps (pygeo.log_map's shooting with n_points, n_steps and
    log_map_options, to log_map's residual tolerance, or tol / 10 where tighter), each started from the energy
    velocity at the new m plus the last accurate-minus-energy difference, and from its last Jacobian estimate. An
    iteration on accurate log maps is accepted when it lowers F, or, close to the mean where the change in F is
    below what the log maps resolve (bounded by how far their geodesics miss the x_i), when it keeps F within that
    bound and lowers the gradient norm; otherwise it is undone and retried with half the step. Converges (quickly
    where the points lie within a region of moderate curvature, where F is convex) when the gradient norm
    |grad F|_G(m) <= tol * sqrt(2 F(m)) with accurate log maps (the reported gradient_norm, variance and log_maps
    are always those), tol defaulting to 1e-8 in float64 and 2e-3 in float32 (where the variance's rounding hides
    smaller steps); it may not converge when the points spread beyond where geodesics from m are unique (then
    converged is False and a RuntimeWarning says so). max_iter bounds the iterations.
    Ctrl-C during the iterations returns the last accepted mean (converged False) with a warning (during the
    inexact stage with its inexact log maps, log_maps_converged all False).

    Returns a FrechetMeanResult (.mean [d], .variance, .converged, .n_iter, .gradient_norm, .log_maps [N, d]).
    Raises TypeError / ValueError naming the argument for bad shapes or dtypes, NaN/Inf, negative or all-zero
    weights, and points where the metric is not defined.
    """
    check_metric(metric)
    x = _points("x", x)
    w = _weights(weights, x)
    step = _checks.number("step", step)
    if not (0 < step <= 2):
        raise ValueError(f"step must be in (0, 2], got {step!r}")
    max_iter = _integer("max_iter", max_iter, 0)
    tol = _tolerance("tol", tol)
    if tol is None:
        tol = 1e-8 if x.dtype == torch.float64 else 2e-3
    G_x = check_defined(metric, "x", x).detach()  # [N, d, d]: measures how far the accurate log maps miss each x_i
    m = _start(metric, x, w, init)
    with torch.no_grad():
        return _karcher_flow(metric, x, G_x, w, m, step, max_iter, tol, n_points, n_steps, progress, log_map_options)


def _karcher_flow(metric, x, G_x, w, m, step, max_iter, tol, n_points, n_steps, progress, log_map_options):
    """Two stages (docs/MATH.md section 9). Inexact: each log_m(x_i) is the initial velocity of the minimum-energy
    curve on 2 (n_points - 1) + 1 points (no shooting), until that gradient meets the criterion or a step fails to
    lower that variance. Accurate: pygeo.log_map's Newton solution (to its tolerance) at the same m, and from then
    on at every trial point, started from the energy curve's velocity there plus the difference between the
    accurate and the energy velocities at the last accepted point, and from that point's Jacobian estimates. The
    criterion is only met on accurate log maps. The step is K g (g the mean log map), K a secant (Broyden) estimate
    of the inverse Hessian of F in coordinates, started at step * I and learnt from successive gradients of the same
    stage; a failed quasi-Newton step is retried as the plain step * g, a failed plain step halves step."""
    N, d = x.shape
    fine_points = 2 * (n_points - 1) + 1
    energy_max_iter = log_map_options.get("energy_max_iter", 300)
    energy_tol = _ENERGY_TOL.get(x.dtype)
    # The accurate log maps' residual tolerance: log_map's default, or a tenth of the criterion's (relative) tolerance
    # where that is tighter, so that their errors stay well below the gradient norm the criterion asks for (a looser
    # one, tol / 10 = 2e-4 in float32, saved 15 % on 2,000 demo codes but left the reported variance off by ~2e-4
    # relative: more than the Frechet mean's own gain over the Euclidean mean on a small class)
    log_tol = min(tol / 10, 1e-10 if x.dtype == torch.float64 else 1e-5)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)

    def moved(curves, shift):  # the curves to x_i with their start moved by shift, linearly fading to x_i
        fade = torch.linspace(1, 0, curves.shape[1], dtype=x.dtype, device=x.device)[None, :, None]
        return curves + fade * shift

    def summary(point, logs, miss=None):
        """(variance, gradient [d], gradient norm, G(point), the variance's uncertainty) of the log maps logs [N, d]
        at point, whose geodesics end at x + miss (miss [N, d]; None: inexact log maps, no bound)."""
        G = metric.metric(point[None])[0]
        squared = torch.einsum("ni,ij,nj->n", logs, G, logs).clamp_min(0)
        gradient = w @ logs
        uncertainty = 0
        if miss is not None:
            # |u_i|_G is the length of a geodesic from point to x_i + miss_i, so by the triangle inequality
            # |d(point, x_i) - |u_i|_G| <= |miss_i|_G(x_i) (to first order), and d^2 is off by at most 2 d gap + gap^2
            gap = torch.nan_to_num(torch.einsum("ni,nij,nj->n", miss, G_x, miss).clamp_min(0).sqrt(), nan=0.0,
                                   posinf=0.0)
            uncertainty = w @ (2 * squared.sqrt() * gap + gap * gap)
        gradient_norm = (gradient @ G @ gradient).clamp_min(0).sqrt()
        return dict(variance=w @ squared, gradient=gradient, gradient_norm=gradient_norm, G=G, uncertainty=uncertainty)

    def energy_velocities(point, curves):
        """(velocities [N, d], curves [N, fine_points, d]): the minimum-energy curves from point to x_i (from curves
        or straight lines) and their initial velocities."""
        start = point.expand(N, d).contiguous()
        curves = _energy_curves(metric, start, x, fine_points, curves, energy_max_iter, energy_tol)
        velocity = _curve_velocity(curves)
        return torch.where(torch.isfinite(velocity).all(-1, keepdim=True), velocity, x - point), curves

    def inexact(point, curves):
        velocity, curves = energy_velocities(point, curves)
        return dict(logs=velocity, ok=torch.zeros(N, dtype=torch.bool, device=x.device), curves=curves,
                    energy=velocity, jacobian=None, exact=False) | summary(point, velocity)

    def accurate(point, state, curves=None):
        """The accurate log maps at point: from state's energy velocities there (curves None), or from the energy
        velocities at point (curves: warm starts) shifted by state's accurate - energy difference."""
        if curves is None:
            energy, guess, jacobian = state["energy"], state["energy"], None
        else:
            energy, curves = energy_velocities(point, curves)
            guess, jacobian = energy + (state["logs"] - state["energy"]), state["jacobian"]
        start = point.expand(N, d).contiguous()
        result = _solve(metric, start, x, n_points=n_points, n_steps=n_steps, tol=log_tol, velocity=guess,
                        jacobian=jacobian, **log_map_options)
        return dict(logs=result.v, ok=result.converged, curves=state["curves"] if curves is None else curves,
                    energy=energy, jacobian=result.jacobian, exact=True) | summary(point, result.v, result.miss)

    # The inexact stage stops where its own gradient is below the energy curves' discretisation error (about h^2
    # relative, h = 1 / (fine_points - 1); a fraction of it in practice) rather than go on to tol.
    inexact_tol = max(tol, 0.01 / (fine_points - 1) ** 2)

    def met(state):
        level = tol if state["exact"] else inexact_tol
        # variance = 2 F: the documented criterion |grad F|_G <= tol sqrt(2 F)
        return bool(state["gradient_norm"] <= level * state["variance"].sqrt()) or bool(state["variance"] == 0)

    def acceptable(state, trial_state):
        """A trial that lowers the variance, or (near the mean, where the change in F is below what the log maps
        resolve) that keeps it within both variances' uncertainty and lowers the gradient norm."""
        old = state["variance"] * (1 + 1e3 * torch.finfo(x.dtype).eps)  # within rounding counts as no increase
        if bool(trial_state["variance"] <= old):
            return True
        within = trial_state["variance"] <= old + state["uncertainty"] + trial_state["uncertainty"]
        return bool(within) and bool(trial_state["gradient_norm"] < state["gradient_norm"])

    state = inexact(m, None) if max_iter > 0 else accurate(m, inexact(m, None))
    K, plain = step * eye, True  # the step is K @ gradient; K = step * I is the plain Karcher step
    n_iter, converged, interrupted = 0, False, False
    bar = tqdm(total=max_iter, desc="Frechet mean (Karcher flow)", disable=not progress, leave=False)
    try:
        while True:
            converged = met(state)
            if converged and not state["exact"]:  # confirm with accurate log maps at the same point
                state = accurate(m, state)
                continue
            if converged or n_iter >= max_iter:
                break
            n_iter += 1
            bar.update(1)
            gradient, G = state["gradient"], state["G"]
            direction = K @ gradient
            if not plain:  # a secant estimate far from the plain step is not trusted beyond 4x its length
                length, limit = (direction @ G @ direction).clamp_min(0).sqrt(), 4 * step * state["gradient_norm"]
                if bool(length > limit):
                    direction = direction * (limit / length)
            trial = exp_map(metric, m[None], direction[None], n_steps=n_steps)[0]
            try:
                check_defined(metric, "the Karcher step", trial[None])
                shifted = moved(state["curves"], trial - m)
                trial_state = accurate(trial, state, shifted) if state["exact"] else inexact(trial, shifted)
                accepted = acceptable(state, trial_state)
            except ValueError:  # the step left where the metric is defined
                accepted = False
            if accepted:
                # Broyden's update of K ~ -(d gradient / dm)^{-1} from s = trial - m, y = change of the gradient
                # (in coordinates; both gradients from the same stage): K y = -s afterwards
                s, y = trial - m, trial_state["gradient"] - gradient
                Ky = K @ y
                denominator = s @ Ky
                update = torch.outer(s + Ky, s @ K) / denominator
                if bool(denominator.abs() > 1e-8 * s.norm() * Ky.norm()) and bool(torch.isfinite(update).all()):
                    K, plain = K - update, False
                m, state = trial, trial_state
                bar.set_postfix(gradient=f"{float(state['gradient_norm']):.2e}",
                                variance=f"{float(state['variance']):.4g}")
            elif not state["exact"]:  # an inexact variance does not decide step sizes: accurate log maps from here
                state = accurate(m, state)
            elif not plain:  # the secant estimate failed: the plain step
                K, plain = step * eye, True
            else:
                step *= 0.5
                K = step * eye
                if step < 1e-6:
                    break
    except KeyboardInterrupt:
        interrupted = True
        converged = False
    finally:
        bar.close()
    if not interrupted and not state["exact"]:  # max_iter reached in the inexact stage: report accurate log maps
        state = accurate(m, state)
        converged = met(state)
    if interrupted:
        warnings.warn(f"frechet_mean interrupted after {n_iter} iterations: the last accepted mean is returned "
                      f"(converged=False)", RuntimeWarning, stacklevel=3)
    elif not converged:
        warnings.warn(f"frechet_mean did not converge in {n_iter} iterations (gradient norm "
                      f"{float(state['gradient_norm']):.3g}, variance {float(state['variance']):.4g}); raise max_iter, "
                      f"or the points spread beyond where the mean is unique", RuntimeWarning, stacklevel=3)
    return FrechetMeanResult(mean=m, variance=state["variance"], converged=converged, n_iter=n_iter,
                             gradient_norm=state["gradient_norm"], log_maps=state["logs"],
                             log_maps_converged=state["ok"])


_ENERGY_TOL = {torch.float32: 1e-3}


def tangent_pca(metric, x: torch.Tensor, n_components: Optional[int] = None, mean: Optional[torch.Tensor] = None, *,
                weights: Optional[torch.Tensor] = None, n_points: int = 9, n_steps: int = 32,
                **frechet_options) -> TangentPCAResult:
    """Principal component analysis of x [N, d] in the tangent space at the mean, in the metric's inner product.

    mean [d] (default: frechet_mean(metric, x, weights, **frechet_options).mean); the log maps u_i = log_mean(x_i)
    [N, d] and their weighted second moment C = sum_i w_i u_i u_i^T / sum w (about the mean itself: at the Frechet
    mean sum_i w_i u_i = 0, so this is the covariance); the components are the G-orthonormal eigenvectors of C G
    (maximise a^T G C G a subject to a^T G a = 1: with G = L L^T, the eigenvectors y of L^T C L give a = L^{-T} y),
    explained_variance their eigenvalues (the variance of the scores <u_i, a_j>_G), by decreasing size.
    n_components (default d) must be an integer in [1, d].

    Returns a TangentPCAResult (.mean, .components [k, d], .explained_variance [k], .explained_variance_ratio [k],
    .total_variance, .scores [N, k], .log_maps [N, d]). Raises ValueError naming the argument for bad shapes,
    n_components outside [1, d], bad weights, and points where the metric is not defined.
    """
    check_metric(metric)
    x = _points("x", x)
    d = x.shape[1]
    k = d if n_components is None else n_components
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= d:
        raise ValueError(f"n_components must be an integer in [1, d] = [1, {d}], got {n_components!r}")
    k = int(k)
    w = _weights(weights, x)
    if mean is None:
        result = frechet_mean(metric, x, weights=w, n_points=n_points, n_steps=n_steps, **frechet_options)
        mean, logs = result.mean, result.log_maps
    else:
        if frechet_options:
            raise ValueError(f"{sorted(frechet_options)}: Frechet mean options given with an explicit mean")
        _checks.real_tensor("mean", mean, min_dim=1)
        if tuple(mean.shape) != (d,):
            raise ValueError(f"mean must have shape [d] = [{d}], got {tuple(mean.shape)}")
        _checks.same_dtype(x=x, mean=mean)
        _checks.same_device(x=x, mean=mean)
        logs = log_map(metric, mean, x, n_points=n_points, n_steps=n_steps)
    with torch.no_grad():
        G = metric.metric(mean[None])[0]
        L = _linalg.cholesky(G, "metric(mean)")
        second_moment = torch.einsum("n,ni,nj->ij", w, logs, logs)
        whitened = L.T @ second_moment @ L
        eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (whitened + whitened.T))
        order = eigenvalues.flip(0)[:k].clamp_min(0)
        directions = torch.linalg.solve_triangular(L.T, eigenvectors.flip(1)[:, :k], upper=True)  # [d, k]
        # A sign convention, so that the result does not depend on the eigensolver: the largest entry is positive.
        largest = directions.abs().argmax(0)
        signs = torch.sign(directions[largest, torch.arange(k)])
        directions = directions * torch.where(signs == 0, 1, signs)
        scores = logs @ G @ directions
        total = torch.einsum("ni,ij,nj->n", logs, G, logs).clamp_min(0) @ w
    ratio = order / total.clamp_min(torch.finfo(x.dtype).tiny)
    return TangentPCAResult(mean=mean, components=directions.T.contiguous(), explained_variance=order,
                            explained_variance_ratio=ratio, total_variance=total, scores=scores, log_maps=logs)


def wrapped_normal(metric, mean: torch.Tensor, covariance: torch.Tensor, n: int, *, seed: Optional[int] = None,
                   generator: Optional[torch.Generator] = None, n_steps: int = 32) -> torch.Tensor:
    """n samples [n, d] of the wrapped normal at mean [d]: exp_mean(v) with tangent vectors v ~ N(0, covariance).

    covariance [d, d] (symmetric positive semi-definite) is that of the tangent vectors' coordinates; for noise that
    is isotropic in the metric pass s^2 G(mean)^{-1} (then |v|_G^2 / s^2 is chi-square with d degrees of freedom).
    seed (an int) or generator (a torch.Generator on mean's device) makes the draws reproducible; not both.
    Raises ValueError naming the argument for bad shapes, a covariance that is not symmetric positive semi-definite,
    n < 0, and a mean where the metric is not defined.
    """
    check_metric(metric)
    _checks.real_tensor("mean", mean, min_dim=1)
    if mean.dim() != 1 or mean.shape[0] == 0:
        raise ValueError(f"mean must have shape [d], got {tuple(mean.shape)}")
    d = mean.shape[0]
    _checks.real_tensor("covariance", covariance, min_dim=2)
    if tuple(covariance.shape) != (d, d):
        raise ValueError(f"covariance must have shape [d, d] = [{d}, {d}], got {tuple(covariance.shape)}")
    _checks.same_dtype(mean=mean, covariance=covariance)
    _checks.same_device(mean=mean, covariance=covariance)
    n = _integer("n", n, 0)
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        generator = torch.Generator(device=mean.device).manual_seed(int(seed))
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    scale = covariance.abs().max().clamp_min(torch.finfo(mean.dtype).tiny)
    if not bool(((covariance - covariance.T).abs() <= 1e-6 * scale).all()):
        raise ValueError("covariance must be symmetric")
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (covariance + covariance.T))
    if bool((eigenvalues < -1e-6 * scale).any()):
        raise ValueError(f"covariance must be positive semi-definite, got an eigenvalue of {float(eigenvalues.min()):.3g}")
    check_defined(metric, "mean", mean[None])
    factor = eigenvectors * eigenvalues.clamp_min(0).sqrt()  # covariance = factor factor^T, also when singular
    noise = torch.randn(n, d, dtype=mean.dtype, device=mean.device, generator=generator)
    tangents = noise @ factor.T
    with torch.no_grad():
        return exp_map(metric, mean.expand(n, d).contiguous(), tangents, n_steps=n_steps)
