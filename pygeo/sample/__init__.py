"""Batched multi-chain samplers over the metric contract: Riemannian-uniform HMC and Riemannian Langevin (MALA)."""
from .hmc import HMCResult, riemannian_uniform
from .langevin import LangevinResult, riemannian_langevin

__all__ = ["HMCResult", "riemannian_uniform", "LangevinResult", "riemannian_langevin"]
