"""pygeo: fast, exact differential geometry for the latent spaces of generative models.

Public names (DESIGN.md, "Public names"); everything else lives in submodules.
"""
import warnings as _warnings

from . import _backend, diagnostics, evaluate, ops, optim, sample
from ._backend import BackendUnavailableError, backends
from .geometry import christoffel, curvature, exp_map, geodesic, geodesic_distances, sectional_curvature
from .geometry import log_map, parallel_transport
from .metrics import ComplexGaussianFisherMetric, FunctionMetric, LatentMetric, LSEKahlerMetric, Metric, PullbackMetric

__version__ = "0.1.0"

# `pip install .` then `python -m pygeo` from the clone's root imports this source folder, not the build: say so.
if _backend.shadowing_warning():
    _warnings.warn(_backend.shadowing_warning(), RuntimeWarning, stacklevel=2)

__all__ = [
    "ops", "sample", "optim", "diagnostics", "evaluate", "backends", "BackendUnavailableError",
    "Metric", "FunctionMetric", "PullbackMetric", "LatentMetric", "LSEKahlerMetric", "ComplexGaussianFisherMetric",
    "christoffel", "curvature", "sectional_curvature", "geodesic", "exp_map", "geodesic_distances",
    "log_map", "parallel_transport",
]
