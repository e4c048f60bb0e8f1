"""Metrics of the contract `metric(z)`, `metric_and_derivative(z)`, `log_volume(z)`, `inner(z, u, v)` (see base.Metric)."""
from .base import Metric
from .function import FunctionMetric

__all__ = ["Metric", "FunctionMetric"]
from .latent import LatentMetric  # noqa: E402

__all__ += ["LatentMetric"]
