"""Where the chains of every sampler start."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import _checks
from ..metrics.kahler import HermitianMetric, to_complex, to_real


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
