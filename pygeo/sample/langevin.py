"""Riemannian Langevin dynamics / manifold MALA over the metric contract (MATH.md section 4)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from tqdm.auto import tqdm

from .. import _backend, _checks
from ..metrics.base import Metric, log_volume_and_grad, value_and_gradient, where_defined
from ..ops.langevin_step import langevin_step
from ._chains import ChainShard
from ._start import escape_radius, initial_states, on_real_coordinates, report_escapes, warn_if_improper


@dataclass
class LangevinResult:
    samples: torch.Tensor  # [n_samples, d] (fewer if interrupted)
    chains: torch.Tensor  # [n_kept, n_chains, d]: the kept states of every chain; samples is its first n_samples rows
    acceptance: torch.Tensor  # [n_chains] fraction of accepted proposals after warm-up
    step_size: float  # the step size used after warm-up
    n_failed: int  # proposals rejected because G was not positive definite (even with jitter) or log pi not finite
    interrupted: bool = False  # stopped by Ctrl-C: samples and chains hold the states kept by the completed steps
    escaped: Optional[torch.Tensor] = None  # [n_chains] bool, chains whose last state is farther than escape_radius
    # from the centre of the starting points and centroids (an improper target or a runaway step size)
    escape_radius: float = math.inf


class _Dual:
    """Dual averaging of log h toward a target acceptance (Hoffman and Gelman 2014, algorithm 5)."""

    def __init__(self, initial: float, target: float):
        self.mu, self.target = math.log(10 * initial), target
        self.average_error, self.log_h_bar, self.t = 0.0, 0.0, 0
        self.log_h = math.log(initial)

    def update(self, acceptance: float) -> None:
        self.t += 1
        weight = 1.0 / (self.t + 10.0)
        self.average_error = (1 - weight) * self.average_error + weight * (self.target - acceptance)
        self.log_h = self.mu - math.sqrt(self.t) / 0.05 * self.average_error
        eta = self.t ** -0.75
        self.log_h_bar = eta * self.log_h + (1 - eta) * self.log_h_bar


def riemannian_langevin(metric: Metric, n_samples: int, log_prob: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                        n_chains: int = 64, n_steps: Optional[int] = None, step_size: Union[str, float] = "auto",
                        mala: bool = True, full_drift: bool = True, init: Optional[torch.Tensor] = None,
                        seed: Optional[int] = None, warmup: int = 200, progress: bool = True, *,
                        dim: Optional[int] = None, target_acceptance: float = 0.57,
                        base_log_prob: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                        backend: str = "auto", distributed: bool = False) -> LangevinResult:
    """Sample pi(z) with Riemannian Langevin proposals N(mean(z), h G(z)^-1), made exact by a Metropolis test (MMALA).

    Each iteration runs one fused step (pygeo.ops.langevin_step) for all chains at z, evaluates the metric at the
    proposals z*, runs the step at z* for the reverse density q(z | z*), and accepts with
    log u < L(z*) - L(z) + log q(z | z*) - log q(z* | z).

    Args:
        metric: any metric of the contract (metric, metric_and_derivative, log_volume). A Hermitian metric on complex
            latents (LSEKahlerMetric, ComplexGaussianFisherMetric) is sampled through its real form on
            [Re z, Im z]: log_volume is then log det G (the Kahler volume), log_prob and base_log_prob take complex z,
            and samples come back complex [n_samples, n].
        n_samples: number of samples returned.
        log_prob: z [C, d] -> log pi(z) [C] (differentiable, up to a constant); None targets the Riemannian uniform
            distribution pi ~ sqrt(det G) (L = metric.log_volume).
        n_chains: chains run in parallel.
        n_steps: steps per chain after warm-up (default max(100, ceil(n_samples / n_chains))); every chain keeps
            ceil(n_samples / n_chains) states evenly spaced over them.
        step_size: h > 0, or "auto": adapted during warm-up by dual averaging toward `target_acceptance`, then fixed.
        mala: Metropolis correction (exact); False runs the unadjusted discretisation (biased by O(h)).
        full_drift: include the div(G^-1) drift term (needs metric_and_derivative); False is simplified MMALA, also
            exact with the Metropolis test, and cheaper.
        init: [m, d] starting points; chains start at m rows drawn at random (in order when m == n_chains).
            None: random centroids of a metric that has them (the latent metric), else N(0, I) draws.
            Without init, chains start at N(0, I) draws (d from `dim`).
        seed: seeds the noise, the Metropolis uniforms and the choice of starting rows. Chain c draws from the
            stream of its block of 64 chains, seeded from (seed, c // 64): its path depends only on the seed, its
            index and its start, never on n_chains nor on how chains are split between processes.
        warmup: steps before sampling (step-size adaptation when step_size="auto"); not kept. One step size is
            shared by all chains, driven by the mean acceptance probability over all n_chains chains, summed exactly
            (fixed point) and, when distributed, over every rank: it does not depend on the world size.
        progress: tqdm progress bar. Ctrl-C stops cleanly and returns what the completed steps kept
            (interrupted=True): chains [k, n_chains, d] holds the k states kept so far of every chain (k = 0 during
            warm-up) and samples its first min(n_samples, k * n_chains) rows; a step cut short is discarded. In a
            distributed run the interrupt is re-raised instead (the ranks cannot be joined safely mid-collective).
        dim: the latent dimension d when init is not given (default: metric.dim if the metric has it).
        target_acceptance: acceptance rate the warm-up adapts the step size toward.
        base_log_prob: with log_prob=None, a base log-density w (z [C, d] -> [C]) that multiplies the Riemannian
            uniform density: the target is w(z) sqrt(det G(z)) (w(z) det G(z) for a Hermitian metric).
        backend: backend of the fused step (see pygeo.backends()).
        distributed: shard the chains over the initialised default torch.distributed process group (launch with
            torchrun; gloo for CPU tensors, NCCL for CUDA tensors on each rank's local device). Each rank runs whole
            blocks of 64 chains and every rank returns the whole result, the same as one process with the same seed
            and n_chains (up to the batch-size invariance of the metric's own kernels); n_failed is the total over
            ranks. Every rank must pass the same arguments (init included). A rank left without a block (n_chains
            <= 64 * (world size - 1)) runs no chain and still returns the whole result. Without an initialised group:
            a RuntimeError.
    Returns:
        LangevinResult: samples [n_samples, d], chains [kept, n_chains, d], acceptance [n_chains], step_size,
        n_failed, interrupted, escaped [n_chains], escape_radius.
    Warnings: with log_prob = base_log_prob = None, a LatentMetric with tau = 0 is an improper target (a
    RuntimeWarning says so); chains ending farther than escape_radius (10 times the radius of the starting points
    and the metric's centroids around their mean, at least 10) from that mean are marked in `escaped` and counted in
    a RuntimeWarning.

    Caution (tails of the metric): where G -> 0, e.g. the tails of the latent metric with tau > 0, the proposal
    covariance h G^-1 explodes and the div(G^-1) drift points outward, so an exact MALA chain then almost never enters
    or leaves the tails (in a 1-D example it misses about 4% of the mass) while HMC with an identity mass matrix mixes
    fine. Prefer pygeo.sample.riemannian_uniform (HMC) for such targets, or start the chains from data (init=latents).
    """
    if not isinstance(metric, Metric) and not hasattr(metric, "metric"):
        raise TypeError(f"metric must follow the metric contract (pygeo.Metric), got {type(metric).__name__}")
    _backend.check_name(backend)
    if log_prob is not None and base_log_prob is not None:
        raise ValueError("base_log_prob multiplies the Riemannian uniform target (log_prob=None); with log_prob given, "
                         "include the base density in log_prob")
    metric, init, to_output, log_prob, base_log_prob = on_real_coordinates(metric, init, log_prob, base_log_prob)
    for name, value, low in (("n_samples", n_samples, 1), ("n_chains", n_chains, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    kept_per_chain = -(-n_samples // n_chains)
    if n_steps is None:
        n_steps = max(100, kept_per_chain)
    if not isinstance(n_steps, int) or n_steps < kept_per_chain:
        raise ValueError(f"n_steps must be an integer >= ceil(n_samples / n_chains) = {kept_per_chain}, got {n_steps!r}")
    adapt = isinstance(step_size, str)
    if adapt and step_size != "auto":
        raise ValueError(f"step_size must be 'auto' or a positive float, got {step_size!r}")
    if not adapt and not (float(step_size) > 0 and math.isfinite(float(step_size))):
        raise ValueError(f"step_size must be 'auto' or a positive float, got {step_size!r}")
    if not 0 < target_acceptance < 1:
        raise ValueError(f"target_acceptance must be in (0, 1), got {target_acceptance}")

    shard = ChainShard.create(n_chains, distributed, "riemannian_langevin")

    seed = shard.common_seed(seed)
    # Every rank draws the starting points of all chains (cheap) and keeps its own: the same starts at any world size.
    starts = initial_states(metric, init, dim, n_chains, torch.Generator().manual_seed(seed))
    centre, radius = escape_radius(starts, metric)
    z = starts[shard.start:shard.stop]
    streams = shard.streams(seed, z.device)
    warn_if_improper(metric, "riemannian_langevin", has_base_density=log_prob is not None or base_log_prob is not None)
    evaluate = _Evaluator(metric, log_prob, base_log_prob, full_drift)
    dual = _Dual(0.1 if adapt else float(step_size), target_acceptance)
    h = 0.1 if adapt else float(step_size)
    keep_at = {round((i + 1) * n_steps / kept_per_chain) - 1 for i in range(kept_per_chain)}
    kept, accepted, n_failed, interrupted = [], torch.zeros(shard.n_local, device=z.device), 0, False
    sampling_steps = 0

    current = evaluate(z)
    bar = tqdm(range(warmup + n_steps), desc="riemannian_langevin", disable=not (progress and shard.shows_progress))
    try:
        for iteration in bar:
            noise = streams.normal(z.shape[-1], z.dtype)
            # Drawn every step, used only with the Metropolis test: the streams stay aligned whatever `mala` is.
            uniform = streams.uniform(z.dtype)
            forward = langevin_step(z, current.G, current.grad, h, noise, dG=current.dG, backend=backend)
            finite = torch.isfinite(forward.proposal).all(-1)  # a huge drift can overflow: such a move is rejected
            proposal = torch.where(finite[:, None], forward.proposal, z)
            proposed = evaluate(proposal)
            reverse = langevin_step(proposal, proposed.G, proposed.grad, h, torch.zeros_like(z),
                                    dG=proposed.dG, target=z, backend=backend)
            log_ratio = proposed.log_prob - current.log_prob + reverse.log_q_target - forward.log_q_proposal
            valid = finite & forward.ok & reverse.ok & proposed.valid & torch.isfinite(log_ratio)
            log_ratio = torch.where(valid, log_ratio, torch.full_like(log_ratio, -math.inf))
            acceptance_probability = log_ratio.clamp(max=0).exp()
            if mala:
                accept = valid & (uniform.log() < log_ratio)
            else:
                accept = valid
            n_failed += int((~valid).sum())
            z = torch.where(accept[:, None], proposal, z)
            current = current.where(accept, proposed)
            if iteration < warmup:
                if adapt:
                    dual.update(shard.exact_mean(acceptance_probability))
                    h = math.exp(dual.log_h if iteration + 1 < warmup else dual.log_h_bar)
            else:
                accepted += accept.to(accepted.dtype)
                sampling_steps += 1
                if iteration - warmup in keep_at:
                    kept.append(z.clone())
                if not bar.disable:
                    bar.set_postfix(acceptance=f"{float(accepted.mean()) / sampling_steps:.2f}", h=f"{h:.3g}")
    except KeyboardInterrupt:
        if shard.distributed:
            raise
        interrupted = True
    finally:
        bar.close()
    local_chains = torch.stack(kept) if kept else z.new_empty((0, shard.n_local, z.shape[-1]))
    chains = shard.gather(local_chains, chain_dim=1)  # [k, n_chains, d]
    final = shard.gather(z)
    escaped = (final - centre).norm(dim=-1) > radius
    report_escapes("riemannian_langevin", escaped, final, radius)
    return LangevinResult(samples=to_output(chains.reshape(-1, z.shape[-1])[:n_samples]), chains=to_output(chains),
                          acceptance=shard.gather(accepted) / max(1, sampling_steps), step_size=h,
                          n_failed=shard.total(n_failed), interrupted=interrupted, escaped=escaped,
                          escape_radius=radius)


@dataclass
class _State:
    G: torch.Tensor  # [C, d, d]
    dG: Optional[torch.Tensor]  # [C, d, d, d]
    log_prob: torch.Tensor  # [C]
    grad: torch.Tensor  # [C, d]
    valid: torch.Tensor  # [C] bool: G factorised and log pi, its gradient finite

    def where(self, take: torch.Tensor, other: "_State") -> "_State":
        def pick(a, b):
            return None if a is None else torch.where(take.reshape(-1, *([1] * (a.dim() - 1))), b, a)
        return _State(*(pick(getattr(self, f), getattr(other, f)) for f in ("G", "dG", "log_prob", "grad", "valid")))


class _Evaluator:
    """Metric, log pi and its gradient at a batch of points (detached: the sampler does not differentiate)."""

    def __init__(self, metric, log_prob, base_log_prob, full_drift):
        self.metric, self.log_prob, self.base_log_prob, self.full_drift = metric, log_prob, base_log_prob, full_drift

    def __call__(self, z: torch.Tensor) -> _State:
        z = z.detach()
        d = z.shape[-1]
        # A point where the metric cannot be evaluated (it raises ValueError there) gets a NaN metric: invalid below.
        if self.full_drift:
            G, dG = where_defined(self.metric.metric_and_derivative, (z,),
                                  lambda n: (z.new_full((n, d, d), math.nan), z.new_full((n, d, d, d), math.nan)))
            G, dG = G.detach(), dG.detach()
        else:
            G = where_defined(self.metric.metric, (z,), lambda n: z.new_full((n, d, d), math.nan)).detach()
            dG = None
        if self.log_prob is None:
            # Riemannian uniform, L = 1/2 log det G: defined only where G itself (no jitter) is positive definite;
            # elsewhere the point is invalid (rejected), never an error that stops the run.
            C, info = torch.linalg.cholesky_ex(G)
            ok = (info == 0) & _checks.finite_rows(G)
            if dG is not None:
                # dL/dz_k = 1/2 tr(G^-1 dG[k]) from the G and dG at hand.
                C = torch.where(ok[:, None, None], C, torch.eye(G.shape[-1], dtype=G.dtype, device=G.device))
                log_prob = C.diagonal(dim1=-2, dim2=-1).log().sum(-1)
                grad = 0.5 * torch.einsum("ckij,cji->ck", dG, torch.cholesky_inverse(C))
            else:
                # where_defined: a trial point where the metric refuses (e.g. G so small that the gradient of its
                # log-volume overflows) is rejected, as HMC does, not fatal.
                def metric_value_and_grad(point):
                    return where_defined(lambda rows: log_volume_and_grad(self.metric, rows), (point,),
                                         lambda n: (point.new_full((n,), math.nan),
                                                    point.new_full((n, point.shape[-1]), math.nan)))

                log_prob, grad = _value_and_grad(self.metric.log_volume, z, ok, value_and_grad=metric_value_and_grad)
            if self.base_log_prob is not None:
                base, base_grad = _value_and_grad(self.base_log_prob, z, ok)
                log_prob, grad = log_prob + base, grad + base_grad
        else:
            ok = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
            log_prob, grad = _value_and_grad(self.log_prob, z, ok)
        valid = ok & torch.isfinite(log_prob) & _checks.finite_rows(grad)
        # Invalid points are never accepted; zero their non-finite inputs so the fused step never sees a NaN. The
        # scans are per-row min/max reductions and the rewrites happen only when needed: on dG [C, d, d, d] a
        # where over every chain would cost as much as the step itself.
        if not bool(valid.all()):
            grad = torch.where(valid[:, None], grad, torch.zeros_like(grad))
            log_prob = torch.where(valid, log_prob, torch.full_like(log_prob, -math.inf))
        G = _zero_non_finite_rows(G)
        dG = None if dG is None else _zero_non_finite_rows(dG)
        return _State(G, dG, log_prob, grad, valid)


def _zero_non_finite_rows(value: torch.Tensor) -> torch.Tensor:
    """value [C, ...] with every row that holds a NaN or Inf set to zero (the same tensor when there is none)."""
    finite = _checks.finite_rows(value)
    if bool(finite.all()):
        return value
    return torch.where(finite.reshape(-1, *([1] * (value.dim() - 1))), value, torch.zeros_like(value))


def _value_and_grad(target: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, rows: torch.Tensor,
                    value_and_grad: Optional[Callable] = None):
    """target(z) [C] and its gradient [C, d] at the rows where `rows` [C] is True (-inf and 0 elsewhere); a target
    that does not depend on z has gradient zero. value_and_grad: a faster way to both, when the target has one."""
    value = torch.full(z.shape[:-1], -math.inf, dtype=z.dtype, device=z.device)
    grad = torch.zeros_like(z)
    if bool(rows.any()):
        def checked(point):
            result = target(point)
            if result.shape != point.shape[:-1]:
                raise ValueError(f"log_prob(z) must return shape {tuple(point.shape[:-1])} for z {tuple(point.shape)}, "
                                 f"got {tuple(result.shape)}")
            return result

        value[rows], grad[rows] = (value_and_grad or (lambda point: value_and_gradient(checked, point)))(z[rows])
    return value, grad
