"""Batched multi-chain samplers over the metric contract."""
from .langevin import riemannian_langevin  # noqa: F401
