"""Where the chains of every sampler start."""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from .. import _checks
from ..metrics.kahler import HermitianMetric, to_complex, to_real
from ..metrics.latent import LatentMetric

ESCAPE_FACTOR = 10.0  # a chain "escaped" when it ends this many times the radius of the starts (and centroids) away


def initial_states(metric, init: Optional[torch.Tensor], dim: Optional[int], n_chains: int,
                   generator: torch.Generator) -> torch.Tensor:
    """[n_chains, d] starting points.

    init: [n_chains, d] (used as is), [d], or a pool [m, d] whose rows are drawn at random. Without init: random
    centroids of a metric that has them (the latent metric: chains start in the data, not in its flat tails), else
    N(0, I) draws in dimension `dim` (or the metric's `.dim`).
    """
    if init is None:
        init = getattr(metric, "centroids", None)
    if init is None:
        dim = dim if dim is not None else getattr(metric, "dim", None)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError("the sampler needs starting points: pass init [n_chains, d] or a pool [m, d] (e.g. encoder "
                             "means), or dim=d to start from N(0, I)")
        return torch.randn(n_chains, dim, generator=generator, dtype=torch.get_default_dtype())
    _checks.real_tensor("init", init, min_dim=1)
    if init.dim() == 1:
        init = init.unsqueeze(0)
    if init.dim() != 2:
        raise ValueError(f"init must have shape [d], [n_chains, d] or [m, d] (a pool to start from), got {tuple(init.shape)}")
    dim = dim if dim is not None else getattr(metric, "dim", None)
    if isinstance(dim, int) and init.shape[-1] != dim:
        raise ValueError(f"init must have last dimension {dim} (the latent dimension), got shape {tuple(init.shape)}")
    if init.shape[0] == n_chains:
        return init.detach().clone()
    rows = torch.randint(init.shape[0], (n_chains,), generator=generator)
    return init.detach()[rows.to(init.device)].clone()


def on_real_coordinates(metric, init: Optional[torch.Tensor], *log_probs: Optional[Callable]):
    """Samplers run on R^d. A Hermitian metric on C^n (complex latents) is sampled through its real form on
    x = [Re z, Im z] in R^{2n}, whose log_volume is log det G + const: the Kahler volume form. A complex init is mapped
    to x and each log-density of complex z is composed with x -> z.

    Returns (metric, init, to_output, *log_probs): to_output maps states [..., 2n] back to z [..., n] (the identity
    for a real metric)."""
    if not isinstance(metric, HermitianMetric):
        return (metric, init, lambda x: x, *log_probs)
    if isinstance(init, torch.Tensor) and init.is_complex():
        init = to_real(init)

    def on_x(log_prob):
        return None if log_prob is None else (lambda x: log_prob(to_complex(x)))

    return (metric.as_real(), init, to_complex, *(on_x(log_prob) for log_prob in log_probs))


def warn_if_improper(metric, caller: str, has_base_density: bool) -> None:
    """One warning when the target is known to be improper: the Riemannian uniform law of a LatentMetric with tau = 0
    and lam > 0 has sqrt(det G) -> lam^(d/2) > 0 far from the data, so it does not integrate and chains are free to
    drift away (a step size adapted there can grow without bound). A base density (base_log_prob) may make it proper:
    then nothing is said."""
    if has_base_density or not isinstance(metric, LatentMetric) or metric.tau != 0 or metric.lam <= 0:
        return
    warnings.warn(
        f"{caller}: the target is improper: with tau = 0 the Riemannian-uniform density sqrt(det G) of this "
        f"LatentMetric tends to lam^(d/2) = {metric.lam ** (metric.dim / 2):.3g} > 0 far from the data and does not "
        f"integrate, so chains can drift arbitrarily far (see the result's escaped count). Use tau > 0 (e.g. "
        f"LatentMetric(..., tau=0.05)) or a base_log_prob such as the N(0, I) prior.", RuntimeWarning, stacklevel=3)


def escape_radius(starts: torch.Tensor, metric) -> tuple:
    """(centre [d], radius): chains ending farther than `radius` from `centre` count as escaped. The reference points
    are the starting points of all chains (so the same on every rank) and the metric's centroids when it has them
    (the data: chains started far away may rightly travel there); the radius is ESCAPE_FACTOR times the largest
    distance of a reference point from their mean, and at least ESCAPE_FACTOR (a unit scale for chains started at
    one point). starts: [n_chains, d]."""
    reference = starts
    centroids = getattr(metric, "centroids", None)
    if isinstance(centroids, torch.Tensor) and centroids.dim() == 2 and centroids.shape[-1] == starts.shape[-1]:
        reference = torch.cat([starts, centroids.to(starts)])
    centre = reference.mean(0)
    spread = float((reference - centre).norm(dim=-1).max())
    return centre, ESCAPE_FACTOR * max(1.0, spread)


def report_escapes(caller: str, escaped: torch.Tensor, final: torch.Tensor, radius: float) -> None:
    """One warning when chains escaped: escaped [n_chains] bool, final [n_chains, d] their last states."""
    n_escaped = int(escaped.sum())
    if n_escaped == 0:
        return
    largest = float(final.norm(dim=-1).max())
    warnings.warn(
        f"{caller}: {n_escaped} of {escaped.numel()} chains ended more than {radius:.3g} from the centre of their "
        f"starting points and the metric's centroids (largest |z| = {largest:.3g}): the target is probably improper "
        f"(e.g. a LatentMetric with tau = 0) or the step size too large; those samples do not represent a proper "
        f"distribution (result.escaped marks the chains)", RuntimeWarning, stacklevel=3)
