"""Riemannian Brownian motion in local coordinates, batched over paths (docs/MATH.md section 8).

The diffusion whose generator is 1/2 the Laplace-Beltrami operator of G:
    dz^k = b^k(z) dt + (C^-T dW)^k,   G = C C^T (Cholesky), so C^-T C^-1 = G^-1,
    b^k = 1/2 Delta_g z^k = -1/2 G^ij Gamma^k_ij = 1/2 [div(G^-1)_k + (G^-1 grad log sqrt(det G))_k],
the last form computed from G and dG alone in O(d^3) per point (no Christoffel tensor). It is the Riemannian Langevin
drift of the target sqrt(det G) (the Riemannian volume, the invariant measure of Brownian motion), so one
Euler-Maruyama step is exactly the proposal of the fused step pygeo.ops.langevin_step with h = dt and
grad_log_prob = grad(1/2 log det G), without a Metropolis test.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from tqdm.auto import tqdm

from .. import _backend, _checks
from ..metrics.base import Metric, where_defined
from ..ops.langevin_step import langevin_step
from ._chains import ChainShard
from ._start import on_real_coordinates


@dataclass
class BrownianResult:
    """What brownian_motion returns (complex [.., n] states for a Hermitian metric, else real [.., d])."""

    endpoints: torch.Tensor  # [n_paths, d], every path's state at final_time (escaped paths: their last valid state)
    paths: torch.Tensor  # [n_paths, n_kept, d], the states at `times` (every keep_every-th step, the start included)
    times: torch.Tensor  # [n_kept], the times of the kept states: 0, keep_every * dt, ...
    escaped: torch.Tensor  # [n_paths] bool, paths stopped because G or its derivative became non-finite or not SPD
    escape_step: torch.Tensor  # [n_paths] int64, the step whose move was refused (the path stays at the state of
    # the step before, escape_step - 1), -1 for paths that did not escape
    step_size: float  # dt = t / n_steps
    n_steps_done: int  # steps completed (n_steps unless interrupted)
    final_time: float  # n_steps_done * dt, the time of `endpoints`
    interrupted: bool = False  # stopped by Ctrl-C: everything above holds the completed steps


def laplace_beltrami_drift(metric: Metric, z: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """b(z) = 1/2 Delta_g z = -1/2 G^ij(z) Gamma^k_ij(z) [B, d] at z [B, d]: the drift of Brownian motion in
    coordinates, from metric.metric_and_derivative through the fused Langevin step (zero noise, so the step's mean
    is z + dt b). ValueError where G is not finite and symmetric positive definite (no jitter)."""
    _checks.real_tensor("z", z, min_dim=2)
    if z.dim() != 2:
        raise ValueError(f"z must have shape [B, d], got {tuple(z.shape)}")
    state = _evaluate(metric, z)
    if not bool(state.valid.all()):
        bad = int((~state.valid).sum())
        raise ValueError(f"the metric is not finite and positive definite at {bad} of {z.shape[0]} points of z")
    step = langevin_step(z, state.G, state.grad, 1.0, torch.zeros_like(z), dG=state.dG, backend=backend)
    return step.mean - z


def brownian_motion(metric: Metric, z0: torch.Tensor, t: float, n_steps: int, n_paths: Optional[int] = None,
                    seed: Optional[int] = None, progress: bool = True, *, keep_every: int = 1,
                    backend: str = "auto") -> BrownianResult:
    """Riemannian Brownian motion (generator 1/2 Laplace-Beltrami of the metric) from z0 for time t, n_paths at once.

    Euler-Maruyama in the metric's coordinates with dt = t / n_steps (docs/MATH.md section 8):
        z_{n+1} = z_n + dt b(z_n) + sqrt(dt) C(z_n)^-T xi_n,   xi_n ~ N(0, I),   G = C C^T,
        b = -1/2 G^ij Gamma^k_ij = 1/2 [div(G^-1) + G^-1 grad log sqrt(det G)],
    one fused pygeo.ops.langevin_step per step for all live paths, with G and dG from metric.metric_and_derivative.
    Weak order 1: expectations of smooth functions of the endpoints are off by O(dt) (strong order 1/2), with a
    constant that grows where the metric varies fast on the scale of a step, sqrt(dt |G^-1|); for a constant metric
    the endpoints are exactly N(z0, t G^-1).

    Args:
        metric: any metric of the contract (metric_and_derivative is used). A Hermitian metric on complex latents runs
            on its real form [Re z, Im z] and the states come back complex.
        z0: [d] (every path starts there) or [n_paths, d] (one start per path; [1, d] is broadcast), float32 or
            float64; the metric must be finite and positive definite there.
        t: total time, > 0.
        n_steps: Euler-Maruyama steps, >= 1.
        n_paths: number of paths (default: z0.shape[0] for z0 [m, d], 1 for z0 [d]).
        seed: seeds the noise. Path p draws from the generator of its block of 64 paths, seeded from (seed, p // 64):
            the same seed gives bitwise identical paths, and path p does not depend on n_paths (up to the
            batch-size invariance of the metric's own kernels). None: a seed drawn from torch's global generator.
        progress: tqdm progress bar.
        keep_every: keep the state of every keep_every-th step in `paths` (memory n_paths * (n_steps / keep_every + 1)
            * d); n_steps must be a multiple of it. keep_every = n_steps keeps only the start and the end.
        backend: backend of the fused step (see pygeo.backends()).
    Returns:
        BrownianResult: endpoints [n_paths, d], paths [n_paths, n_kept, d], times [n_kept], escaped [n_paths],
        escape_step [n_paths], step_size, n_steps_done, final_time, interrupted.
    Escapes: a move to a point where the metric raises ValueError, G or dG is not finite, G is not positive definite
    (tested without jitter) or the step overflows is refused and that path stops for good at its last valid state
    (escaped = True; its later kept states repeat that state); the others go on. No warning is raised: check
    result.escaped. Typical cause: a chart that misses a point of the manifold (the stereographic chart of the sphere
    misses a pole, sent to infinity, where G -> 0 and G^-1 grows without bound), near which an Euler step overshoots
    to huge |z| until G^-1 overflows; a path that gets there is flagged. Smaller steps make it rarer.
    Ctrl-C stops cleanly and returns the completed steps (interrupted=True; a step cut short is discarded).
    Raises:
        TypeError / ValueError for bad arguments (naming them); ValueError when the metric is not finite and positive
        definite at a start.
    """
    if not isinstance(metric, Metric) and not hasattr(metric, "metric_and_derivative"):
        raise TypeError(f"metric must follow the metric contract (pygeo.Metric), got {type(metric).__name__}")
    _backend.check_name(backend)
    if isinstance(z0, torch.Tensor) and z0.is_complex():
        _checks.complex_tensor("z0", z0, min_dim=1)
    metric, z0, to_output = on_real_coordinates(metric, z0)
    _checks.real_tensor("z0", z0, min_dim=1)
    if z0.dim() > 2 or z0.shape[-1] == 0:
        raise ValueError(f"z0 must have shape [d] or [n_paths, d] with d >= 1, got {tuple(z0.shape)}")
    t = _checks.number("t", t)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"t must be a positive finite time, got {t}")
    n_steps = _positive_int("n_steps", n_steps)
    keep_every = _positive_int("keep_every", keep_every)
    if n_steps % keep_every:
        raise ValueError(f"n_steps ({n_steps}) must be a multiple of keep_every ({keep_every})")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    starts = _starts(z0, None if n_paths is None else _positive_int("n_paths", n_paths))
    n_paths, d = starts.shape

    shard = ChainShard(n_paths, 0, n_paths, False)
    streams = shard.streams(shard.common_seed(seed), starts.device)
    dt = t / n_steps

    state = _evaluate(metric, starts)
    if not bool(state.valid.all()):
        bad = (~state.valid).nonzero().flatten()
        raise ValueError(f"z0: the metric is not finite and positive definite at {bad.numel()} of {n_paths} starting "
                         f"points (first: path {int(bad[0])}); start where the metric is defined")
    z = starts  # [n_paths, d], never written in place: each step makes a new tensor (escaped paths keep their state)
    live = torch.arange(n_paths, device=z.device)  # indices of the paths still running; state holds their rows
    escaped = torch.zeros(n_paths, dtype=torch.bool, device=z.device)
    escape_step = torch.full((n_paths,), -1, dtype=torch.long, device=z.device)
    kept, n_done, interrupted = [starts], 0, False
    bar = tqdm(range(n_steps), desc="brownian_motion", disable=not progress)
    try:
        for step in bar:
            # Drawn for every path, live or not: path p's noise depends only on (seed, p) and the step.
            noise = streams.normal(d, z.dtype)
            new_z, new_live, new_state = z, live, state
            new_escaped, new_escape_step = escaped, escape_step
            if live.numel():
                move = langevin_step(z[live], state.G, state.grad, dt, noise[live], dG=state.dG, backend=backend)
                proposed = _evaluate(metric, move.proposal)
                moved = move.ok & _checks.finite_rows(move.proposal) & proposed.valid
                new_state, proposal = proposed, move.proposal
                if not bool(moved.all()):
                    stopped = live[~moved]
                    new_escaped, new_escape_step = escaped.clone(), escape_step.clone()
                    new_escaped[stopped] = True
                    new_escape_step[stopped] = step + 1
                    new_live, new_state, proposal = live[moved], proposed.rows(moved), proposal[moved]
                new_z = z.index_copy(0, new_live, proposal)
            # The step is committed in one assignment (no call inside, so Ctrl-C cannot fall in the middle of it):
            # an interrupt leaves every variable at the last completed step.
            z, live, state, escaped, escape_step, n_done = (new_z, new_live, new_state, new_escaped, new_escape_step,
                                                            step + 1)
            if n_done % keep_every == 0:
                kept.append(z)
            if not bar.disable:
                bar.set_postfix(escaped=int(escaped.sum()))
    except KeyboardInterrupt:
        interrupted = True
        if n_done % keep_every == 0 and len(kept) == n_done // keep_every:  # cut between the commit and the append
            kept.append(z)
    finally:
        bar.close()
    paths = torch.stack(kept, 1)  # [n_paths, n_kept, d]
    times = torch.arange(paths.shape[1], dtype=z.dtype, device=z.device) * (keep_every * dt)
    return BrownianResult(endpoints=to_output(z), paths=to_output(paths), times=times, escaped=escaped,
                          escape_step=escape_step, step_size=dt, n_steps_done=n_done, final_time=n_done * dt,
                          interrupted=interrupted)


@dataclass
class _State:
    """Metric quantities at a batch of points [C, ...], detached."""

    G: torch.Tensor  # [C, d, d]
    dG: torch.Tensor  # [C, d, d, d]
    grad: torch.Tensor  # [C, d], grad(1/2 log det G) = 1/2 tr(G^-1 dG[k])
    valid: torch.Tensor  # [C] bool: G and dG finite, G positive definite without jitter

    def rows(self, take: torch.Tensor) -> "_State":
        return _State(self.G[take], self.dG[take], self.grad[take], self.valid[take])


def _evaluate(metric, z: torch.Tensor) -> _State:
    """G, dG and grad log sqrt(det G) at z [C, d]; rows where the metric raises ValueError, or G, dG are not finite,
    or G is not positive definite, are invalid (never an error for the whole batch)."""
    z = z.detach()
    n, d = z.shape
    G, dG = where_defined(metric.metric_and_derivative, (z,),
                          lambda rows: (z.new_full((rows, d, d), math.nan), z.new_full((rows, d, d, d), math.nan)))
    G, dG = G.detach(), dG.detach()
    if G.shape != (n, d, d) or dG.shape != (n, d, d, d):
        raise ValueError(f"metric.metric_and_derivative(z) must return G [{n}, {d}, {d}] and dG [{n}, {d}, {d}, {d}] "
                         f"for z [{n}, {d}], got {tuple(G.shape)} and {tuple(dG.shape)}")
    if G.dtype != z.dtype or dG.dtype != z.dtype:
        raise TypeError(f"the metric must return G and dG in z's dtype {z.dtype}, got {G.dtype} and {dG.dtype}")
    factor, info = torch.linalg.cholesky_ex(G)
    valid = (info == 0) & _checks.finite_rows(G) & _checks.finite_rows(dG)
    eye = torch.eye(d, dtype=G.dtype, device=G.device)
    if not bool(valid.all()):
        factor = torch.where(valid[:, None, None], factor, eye)
    grad = 0.5 * torch.einsum("ckij,cji->ck", dG, torch.cholesky_inverse(factor))
    # A G so small that G^-1 overflows (far out in a chart, e.g. near the point a stereographic chart misses) has a
    # finite G and dG but no finite drift: invalid too.
    valid = valid & _checks.finite_rows(grad)
    if not bool(valid.all()):
        # Invalid rows never step; give them harmless values so that nothing downstream sees a NaN.
        G = torch.where(valid[:, None, None], G, eye)
        dG = torch.where(valid[:, None, None, None], dG, torch.zeros_like(dG))
        grad = torch.where(valid[:, None], grad, torch.zeros_like(grad))
    return _State(G, dG, grad, valid)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _starts(z0: torch.Tensor, n_paths: Optional[int]) -> torch.Tensor:
    """[n_paths, d] starting points from z0 [d] or [m, d]."""
    if z0.dim() == 1:
        return z0.detach().expand(n_paths or 1, -1).clone()
    m = z0.shape[0]
    if n_paths is None or n_paths == m:
        if m == 0:
            raise ValueError("z0 [n_paths, d] must have at least one row, got shape (0, d)")
        return z0.detach().clone()
    if m == 1:
        return z0.detach().expand(n_paths, -1).clone()
    raise ValueError(f"z0 has {m} rows but n_paths={n_paths}: give z0 [d], [1, d] or [n_paths, d]")
