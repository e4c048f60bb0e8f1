"""FunctionMetric: any user function z -> G as a metric of the contract (derivatives by autograd)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import _checks
from ..reference import symmetric_part
from .base import Metric


class FunctionMetric(Metric):
    """Wraps fn: z [..., d] -> G [..., d, d] (symmetric positive definite). Derivatives come from autograd, so fn must
    be written in differentiable torch operations; forward mode (torch.func) is used when fn supports it.

    G is returned as (fn(z) + fn(z)^T) / 2, so it is symmetric to the bit whatever rounding fn's products make (and so
    are its derivatives)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], dim: Optional[int] = None):
        """dim: the latent dimension d, optional (samplers use it to start chains when no init is given)."""
        if not callable(fn):
            raise TypeError(f"fn must be callable z -> G, got {type(fn).__name__}")
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise ValueError(f"dim must be a positive integer or None, got {dim!r}")
        self.fn = fn
        self.dim = dim

    def metric(self, z: torch.Tensor) -> torch.Tensor:
        _checks.real_tensor("z", z, min_dim=1)
        G = self.fn(z)
        d = z.shape[-1]
        if not isinstance(G, torch.Tensor) or tuple(G.shape) != tuple(z.shape[:-1]) + (d, d):
            shape = tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__
            raise ValueError(f"FunctionMetric: fn(z) must return G of shape {tuple(z.shape[:-1]) + (d, d)} for z of shape "
                             f"{tuple(z.shape)}, got {shape}")
        if G.dtype != z.dtype:  # else derivatives and solvers downstream mix precisions (or fail deep inside)
            raise TypeError(f"FunctionMetric: fn(z) must return G in z's dtype {z.dtype}, got {G.dtype}")
        # z was checked finite, so a NaN/Inf here is fn's own (a point outside its domain, an overflow): say so rather
        # than pass it on into Cholesky factors, geodesic energies and samplers.
        _checks.finite_points(G.reshape(-1, d, d), "FunctionMetric: fn(z)",
                              "fn returned NaN or Inf for finite z (a point outside the metric's domain, or an "
                              "overflow)")
        return symmetric_part(G)
