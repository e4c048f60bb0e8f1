"""Riemannian-uniform sampling with batched multi-chain Hamiltonian Monte Carlo (MATH.md section 2).

Target density pi(z) proportional to sqrt(det G(z)) (times exp(log_prob(z)) when a base log-density is given), i.e.
potential U(z) = -log_volume(z) - log_prob(z). Momentum p ~ N(0, I) with kinetic energy |p|^2 / 2 (the same identity
mass in both places), leapfrog integration, and the Metropolis test log u < H0 - H1 in log space. A non-finite energy
(a diverging trajectory) is a rejection, never a NaN that spreads to the chain.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from tqdm.auto import tqdm

from ..metrics.base import log_volume_and_grad, value_and_gradient, where_defined
from ._chains import ChainShard
from ._start import escape_radius, initial_states, on_real_coordinates, report_escapes, warn_if_improper


@dataclass
class HMCResult:
    """What riemannian_uniform returns."""

    samples: torch.Tensor  # [n_samples, d]
    acceptance: torch.Tensor  # [n_chains], fraction of accepted proposals after warm-up
    step_size: float  # the step size used after warm-up (adapted or given)
    chains: torch.Tensor  # [n_kept, n_chains, d], the kept states of every chain (samples are drawn from these)
    n_divergent: torch.Tensor  # [n_chains], proposals rejected for a non-finite energy (after warm-up)
    log_volume: torch.Tensor  # [n_samples], log_volume at the samples (for diagnostics: the target's log-density)
    interrupted: bool = False  # stopped by Ctrl-C: samples and chains hold the states kept by the completed steps
    escaped: Optional[torch.Tensor] = None  # [n_chains] bool, chains whose last state is farther than escape_radius
    # from the centre of the starting points and centroids (an improper target or a runaway step size)
    escape_radius: float = math.inf


def potential_and_grad(metric, log_prob: Optional[Callable[[torch.Tensor], torch.Tensor]]):
    """U(z) = -(log_volume(z) + log_prob(z)) and its gradient, as a function z [n, d] -> (U [n], dU/dz [n, d]).

    The log-volume part comes from the metric's `log_volume_and_grad` (fused kernels for LatentMetric, the decoder's
    parameters left alone for PullbackMetric), or autograd through `log_volume` (any metric of the contract)."""
    def fn(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # A trajectory that blew up to Inf/NaN gets U = +inf (so it is rejected), evaluated nowhere near the metric.
        bad = ~torch.isfinite(z).all(-1)
        if bool(bad.any()):
            potential, grad = fn(torch.where(bad[:, None], torch.zeros_like(z), z))
            return potential.masked_fill(bad, math.inf), grad.masked_fill(bad[:, None], 0.0)
        # A point where the metric is not positive definite gets a NaN energy: its trajectory is rejected.
        value, grad = where_defined(target_and_grad, (z,),
                                    lambda n: (z.new_full((n,), math.nan), z.new_full((n, z.shape[-1]), math.nan)))
        return -value, -grad

    def target_and_grad(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        value, grad = log_volume_and_grad(metric, z)
        if log_prob is not None:
            base, base_grad = value_and_gradient(log_prob, z)
            value, grad = value + base, grad + base_grad
        return value, grad

    return fn


def leapfrog(potential_grad: Callable, z: torch.Tensor, p: torch.Tensor, grad: torch.Tensor, step_size, n_steps: int):
    """n_steps leapfrog steps of H(z, p) = U(z) + |p|^2 / 2, batched over chains.

    z, p, grad (= dU/dz at z): [n, d]; step_size: float or [n, 1]. Returns (z, p, U, grad) at the end. Exactly
    reversible up to rounding: running it again from (z, -p) returns to the start with momentum -p.
    """
    p = p - 0.5 * step_size * grad
    potential = None
    for step in range(n_steps):
        z = z + step_size * p
        potential, grad = potential_grad(z)
        p = p - (step_size if step < n_steps - 1 else 0.5 * step_size) * grad
    return z, p, potential, grad


class _DualAveraging:
    """Step-size adaptation of Hoffman and Gelman (NUTS, 2014, section 3.2) towards a target acceptance rate,
    driven by the mean acceptance probability over chains."""

    def __init__(self, step_size: float, target: float):
        self.mu = math.log(10 * step_size)
        self.target = target
        self.h_bar = 0.0
        self.log_step = math.log(step_size)
        self.log_step_bar = 0.0
        self.t = 0

    def update(self, accept_prob: float) -> float:
        self.t += 1
        t0, gamma, kappa = 10.0, 0.05, 0.75
        eta = 1.0 / (self.t + t0)
        self.h_bar = (1 - eta) * self.h_bar + eta * (self.target - accept_prob)
        self.log_step = self.mu - math.sqrt(self.t) / gamma * self.h_bar
        weight = self.t ** (-kappa)
        self.log_step_bar = weight * self.log_step + (1 - weight) * self.log_step_bar
        return math.exp(self.log_step)

    def final(self) -> float:
        return math.exp(self.log_step_bar)


def riemannian_uniform(metric, n_samples: int, n_chains: Optional[int] = None, n_steps: int = 100, n_leapfrog: int = 10,
                       step_size: float = 0.01, init: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                       base_log_prob: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                       warmup: Optional[int] = None, adapt_step_size: bool = True, target_acceptance: float = 0.65,
                       progress: bool = True, dim: Optional[int] = None,
                       log_prob: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, *,
                       distributed: bool = False) -> HMCResult:
    """Samples from the Riemannian uniform distribution, density proportional to sqrt(det G(z)), by HMC.

    Args:
        metric: any metric of the contract (log_volume(z) differentiable); LatentMetric uses its fused gradient.
            A Hermitian metric on complex latents (LSEKahlerMetric, ComplexGaussianFisherMetric) is sampled through
            its real form: the target is the Kahler volume det G, and samples come back complex [n_samples, n].
        n_samples: number of samples returned.
        n_chains: chains run in parallel (default: n_samples, one sample per chain as in the paper: 500 chains).
        n_steps: HMC steps per chain after warm-up; each chain contributes ceil(n_samples / n_chains) states, evenly
            spaced over these steps and ending at the last one.
        n_leapfrog: leapfrog steps per proposal.
        step_size: the leapfrog step (the initial one when adapting).
        init: starting points: [n_chains, d], [d], or a pool [m, d] from which chains start at random rows;
            None = random centroids of the metric (the paper starts chains at training means), or N(0, I) draws in
            dimension `dim` (default metric.dim) for a metric without centroids.
        seed: seed of the momenta, the Metropolis draws and the starting rows (deterministic given the seed). Chain c
            draws from the stream of its block of 64 chains, seeded from (seed, c // 64): its path depends only on the
            seed, its index and its start, never on n_chains nor on how chains are split between processes.
        base_log_prob: optional base log-density w, z [n, d] -> [n], added to log_volume: the target is
            w(z) sqrt(det G(z)) (det G for a Hermitian metric). None: the Riemannian uniform distribution.
        warmup: steps before sampling (default n_steps // 2 when adapting, else 0); the step size is adapted there
            by dual averaging to `target_acceptance`, then frozen. One step size is shared by all chains: it is
            driven by the mean acceptance probability over all n_chains chains, summed exactly (fixed point) and,
            when distributed, over every rank, so it does not depend on the world size.
        progress: show a tqdm bar.
        dim: the latent dimension, when neither init nor the metric's centroids give the starting points.
        log_prob: the same as base_log_prob (its earlier name).
        distributed: shard the chains over the initialised default torch.distributed process group (launch with
            torchrun; gloo for CPU tensors, NCCL for CUDA tensors on each rank's local device). Each rank runs whole
            blocks of 64 chains and every rank returns the whole result, the same as one process with the same seed
            and n_chains (up to the batch-size invariance of the metric's own kernels). Every rank must pass the same
            arguments (init included). A rank left without a block (n_chains <= 64 * (world size - 1)) runs no chain
            and still returns the whole result. Without an initialised group: a RuntimeError.
    Returns:
        HMCResult(samples [n_samples, d], acceptance [n_chains], step_size, chains, n_divergent, log_volume,
        interrupted, escaped [n_chains], escape_radius).
    Ctrl-C (KeyboardInterrupt) stops the run and returns what the completed HMC steps kept (interrupted=True): chains
    [k, n_chains, d] holds the k states kept so far of every chain (k = 0 during warm-up), samples its first
    min(n_samples, k * n_chains) rows; a step cut short is discarded. In a distributed run the interrupt is re-raised
    instead (the ranks cannot be joined safely in the middle of a collective).
    Warnings: a LatentMetric with tau = 0 and no base_log_prob is an improper target (sqrt(det G) -> lam^(d/2) far
    away): a RuntimeWarning says so. A chain whose last state lies farther than escape_radius (10 times the radius
    of the ball around the mean of the starting points and the metric's centroids that holds them all, at least 10)
    from that mean is marked in `escaped`, and a RuntimeWarning says how many: the sign of an improper target or of
    a step size that grew without bound (adaptation on the tau = 0 target sends chains to |z| ~ 1e12 and beyond).
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if log_prob is not None and base_log_prob is not None:
        raise ValueError("give base_log_prob or log_prob (its earlier name), not both")
    metric, init, to_output, log_prob = on_real_coordinates(metric, init, base_log_prob or log_prob)
    n_chains = n_samples if n_chains is None else n_chains
    if not isinstance(n_chains, int) or n_chains < 1:
        raise ValueError(f"n_chains must be a positive int, got {n_chains!r}")
    if n_steps < 1 or n_leapfrog < 1:
        raise ValueError(f"n_steps and n_leapfrog must be >= 1, got {n_steps} and {n_leapfrog}")
    if isinstance(step_size, str):
        raise ValueError(f"step_size must be a finite positive number, got {step_size!r} (riemannian_uniform has no "
                         "'auto': it adapts the given step during warm-up when adapt_step_size=True)")
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a finite positive number, got {step_size!r}")
    if not 0 < target_acceptance < 1:
        raise ValueError(f"target_acceptance must be in (0, 1), got {target_acceptance}")
    warmup = (n_steps // 2 if adapt_step_size else 0) if warmup is None else warmup
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    per_chain = -(-n_samples // n_chains)
    if per_chain > n_steps:
        raise ValueError(f"n_samples={n_samples} needs {per_chain} states per chain but n_steps={n_steps}: raise n_steps "
                         f"or n_chains")
    shard = ChainShard.create(n_chains, distributed, "riemannian_uniform")

    seed = shard.common_seed(seed)
    # Every rank draws the starting points of all chains (cheap) and keeps its own: the same starts at any world size.
    starts = initial_states(metric, init, dim, n_chains, torch.Generator().manual_seed(seed))
    centre, radius = escape_radius(starts, metric)
    z = starts[shard.start:shard.stop]
    device, dtype = z.device, z.dtype
    streams = shard.streams(seed, device)
    warn_if_improper(metric, "riemannian_uniform", has_base_density=log_prob is not None)
    potential_grad = potential_and_grad(metric, log_prob)
    potential, grad = potential_grad(z)
    if not (torch.isfinite(potential).all() and torch.isfinite(grad).all()):
        raise ValueError("the target's log-density or its gradient is not finite at some starting points (init): the "
                         "metric must be positive definite and log_prob finite there")

    keep_every = n_steps // per_chain
    kept_at = {n_steps - 1 - i * keep_every for i in range(per_chain)}
    kept = []
    accepted = torch.zeros(shard.n_local, dtype=dtype, device=device)
    divergent = torch.zeros(shard.n_local, dtype=torch.long, device=device)
    adaptation = _DualAveraging(step_size, target_acceptance) if adapt_step_size and warmup > 0 else None
    current_step = step_size
    sampling_steps, interrupted = 0, False
    bar = tqdm(total=warmup + n_steps, desc="HMC", disable=not (progress and shard.shows_progress))
    try:
        for iteration in range(warmup + n_steps):
            sampling = iteration >= warmup
            if sampling and iteration == warmup and adaptation is not None:
                current_step = adaptation.final()
            momentum = streams.normal(z.shape[-1], dtype)
            log_u = torch.log(streams.uniform(dtype))
            energy0 = potential + 0.5 * (momentum * momentum).sum(-1)
            z_new, p_new, potential_new, grad_new = leapfrog(potential_grad, z, momentum, grad, current_step, n_leapfrog)
            energy1 = potential_new + 0.5 * (p_new * p_new).sum(-1)
            finite = torch.isfinite(energy1) & torch.isfinite(z_new).all(-1) & torch.isfinite(grad_new).all(-1)
            log_ratio = torch.where(finite, energy0 - energy1, torch.full_like(energy0, -math.inf))
            accept = log_u < log_ratio
            # The state changes only here, after a whole step: an interrupt leaves the last completed step's state.
            z = torch.where(accept[:, None], z_new, z)
            potential = torch.where(accept, potential_new, potential)
            grad = torch.where(accept[:, None], grad_new, grad)
            if sampling:
                accepted += accept.to(dtype)
                divergent += (~finite).long()
                sampling_steps += 1
                if iteration - warmup in kept_at:
                    kept.append(z.clone())
            elif adaptation is not None:
                current_step = adaptation.update(shard.exact_mean(log_ratio.clamp_max(0).exp()))
            bar.update(1)
            if not bar.disable:
                bar.set_postfix(step=f"{current_step:.3g}", accept=f"{float(accept.to(dtype).mean()):.2f}")
    except KeyboardInterrupt:
        if shard.distributed:
            raise
        interrupted = True
    finally:
        bar.close()
    local_chains = torch.stack(kept) if kept else z.new_empty((0, shard.n_local, z.shape[-1]))  # [k, n_local, d]
    local_log_volume = _log_volume_at(metric, log_prob, potential_grad, local_chains)  # [k, n_local]
    chains = shard.gather(local_chains, chain_dim=1)  # [k, n_chains, d]
    samples = chains.reshape(-1, z.shape[-1])[:n_samples]
    log_volume = shard.gather(local_log_volume, chain_dim=1).reshape(-1)[:n_samples]
    final = shard.gather(z)
    escaped = (final - centre).norm(dim=-1) > radius
    report_escapes("riemannian_uniform", escaped, final, radius)
    return HMCResult(samples=to_output(samples), acceptance=shard.gather(accepted) / max(1, sampling_steps),
                     step_size=float(current_step), chains=to_output(chains), n_divergent=shard.gather(divergent),
                     log_volume=log_volume, interrupted=interrupted, escaped=escaped, escape_radius=radius)


def _log_volume_at(metric, log_prob, potential_grad, states: torch.Tensor) -> torch.Tensor:
    """log_volume [k, n] at states [k, n, d] (the fused path when the potential is -log_volume)."""
    if states.numel() == 0:
        return states.new_empty(states.shape[:2])
    flat = states.reshape(-1, states.shape[-1])
    values = -potential_grad(flat)[0] if log_prob is None else metric.log_volume(flat).detach()
    return values.reshape(states.shape[:2])
