"""Metrics of the contract `metric(z)`, `metric_and_derivative(z)`, `log_volume(z)`, `inner(z, u, v)` (see base.Metric)."""
from .base import Metric
from .function import FunctionMetric

__all__ = ["Metric", "FunctionMetric"]
from .kahler import ComplexGaussianFisherMetric, HermitianMetric, LSEKahlerMetric, RealFormMetric
__all__ += ["LSEKahlerMetric", "ComplexGaussianFisherMetric", "HermitianMetric", "RealFormMetric"]
