"""Metrics of the contract `metric(z)`, `metric_and_derivative(z)`, `log_volume(z)`, `inner(z, u, v)` (see base.Metric)."""
from .base import Metric
from .ensemble import EnsembleMetric
from .function import FunctionMetric
from .kahler import ComplexGaussianFisherMetric, HermitianMetric, LSEKahlerMetric, RealFormMetric
from .latent import LatentMetric, RHVAEMetric
from .pullback import PullbackMetric

__all__ = ["Metric", "FunctionMetric", "PullbackMetric", "LatentMetric", "RHVAEMetric", "LSEKahlerMetric",
           "ComplexGaussianFisherMetric", "HermitianMetric", "RealFormMetric", "EnsembleMetric"]
