"""Geometry-aware regularisers for training (MATH.md section 5): penalise how much the volume element log det G varies
over the posterior. Both are differentiable with respect to the model parameters (the samples z usually come from the
encoder's reparameterisation, and the metric from the decoder), so they can be added to a loss.

`metric` is a HermitianMetric (complex z [..., n]; log det G = its log_volume) or a real pygeo Metric (real z [..., d];
log det G = 2 log_volume).
"""
from __future__ import annotations

import torch

from .metrics.base import Metric
from .metrics.kahler import HermitianMetric


def log_det_metric(metric, z: torch.Tensor) -> torch.Tensor:
    """log det G(z) [...] for a HermitianMetric (complex z) or a real Metric (real z)."""
    if isinstance(metric, HermitianMetric):
        return metric.log_volume(z)
    if isinstance(metric, Metric):
        return 2 * metric.log_volume(z)
    raise TypeError(f"metric must be a pygeo Metric or HermitianMetric, got {type(metric).__name__}")


def log_det_variance(metric, z_samples: torch.Tensor) -> torch.Tensor:
    """Var_q[log det G] as a scalar.

    Args:
        metric: HermitianMetric or Metric.
        z_samples: [S, ..., n] posterior samples, S >= 2 along the first axis (e.g. [S, batch, n]: S samples of each
            data point's posterior); the variance is taken over the first axis and averaged over the rest.
    """
    if z_samples.dim() < 2 or z_samples.shape[0] < 2:
        raise ValueError(f"z_samples must have shape [S, ..., n] with S >= 2 samples, got {tuple(z_samples.shape)}")
    log_det = log_det_metric(metric, z_samples)  # [S, ...]
    return log_det.var(dim=0).mean()


def log_det_gradient_penalty(metric, z_samples: torch.Tensor) -> torch.Tensor:
    """E_q |grad_z log det G(z)|^2 as a scalar, with the graph kept (create_graph) so it trains the model.

    For complex z the gradient is the real gradient on R^{2n}, dL/dx + i dL/dy (= PyTorch's .grad, 2 dL/dzbar), whose
    squared modulus summed over n is the squared Euclidean norm on R^{2n}.

    Args:
        metric: HermitianMetric or Metric.
        z_samples: [..., n] samples; they may carry a graph to encoder parameters (kept), or be plain tensors.
    """
    if z_samples.dim() < 1:
        raise ValueError(f"z_samples must have shape [..., n], got {tuple(z_samples.shape)}")
    with torch.enable_grad():
        z = z_samples if z_samples.requires_grad else z_samples.detach().requires_grad_(True)
        log_det = log_det_metric(metric, z)
        (grad,) = torch.autograd.grad(log_det.sum(), z, create_graph=True)
    squared = grad.abs() ** 2 if grad.is_complex() else grad ** 2
    return squared.sum(-1).mean()
