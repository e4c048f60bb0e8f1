"""Batched multi-chain samplers over the metric contract."""
from .hmc import HMCResult, riemannian_uniform

__all__ = ["HMCResult", "riemannian_uniform"]
