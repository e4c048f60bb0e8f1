"""Batched multi-chain samplers over the metric contract: Riemannian-uniform HMC, Riemannian Langevin (MALA), and
Riemannian Brownian motion."""
from .brownian import BrownianResult, brownian_motion
from .hmc import HMCResult, riemannian_uniform
from .langevin import LangevinResult, riemannian_langevin

__all__ = ["HMCResult", "riemannian_uniform", "LangevinResult", "riemannian_langevin", "BrownianResult",
           "brownian_motion"]
