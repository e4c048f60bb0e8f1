"""pygeo: fast, exact differential geometry for the latent spaces of generative models.

Public names (DESIGN.md, "Public names"); everything else lives in submodules.
"""
from . import evaluate, ops, sample
from ._backend import BackendUnavailableError, backends
from .geometry import christoffel, curvature, exp_map, geodesic, geodesic_distances, sectional_curvature
from .metrics import ComplexGaussianFisherMetric, FunctionMetric, LatentMetric, LSEKahlerMetric, Metric, PullbackMetric

__version__ = "0.1.0"

__all__ = [
    "ops", "sample", "evaluate", "backends", "BackendUnavailableError",
    "Metric", "FunctionMetric", "PullbackMetric", "LatentMetric", "LSEKahlerMetric", "ComplexGaussianFisherMetric",
    "christoffel", "curvature", "sectional_curvature", "geodesic", "exp_map", "geodesic_distances",
]
