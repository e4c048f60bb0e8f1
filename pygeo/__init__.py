"""pygeo: fast, exact differential geometry for the latent spaces of generative models.

Public names (DESIGN.md, "Public names"); everything else lives in submodules.
"""
from . import ops
from ._backend import BackendUnavailableError, backends
from .metrics import FunctionMetric, Metric

__version__ = "0.1.0"

__all__ = ["ops", "backends", "BackendUnavailableError", "Metric", "FunctionMetric"]
from .metrics import ComplexGaussianFisherMetric, LSEKahlerMetric
__all__ += ["LSEKahlerMetric", "ComplexGaussianFisherMetric"]
