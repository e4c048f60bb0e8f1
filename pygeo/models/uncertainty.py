"""A Gaussian decoder whose standard deviation grows away from the data: the RBF precision network of Arvanitidis,
Hansen & Hauberg ("Latent space oddity", ICLR 2018), fitted after the mean decoder with the mean frozen.

The precision of each output is beta(z) = W^T v(z) + zeta [D], with RBF features v_k(z) = exp(-lambda_k |z - c_k|^2)
around k-means centres c_k of the encoded training data, positive weights W [K, D] and a floor zeta > 0; the std is
sigma(z) = beta(z)^(-1/2). Near the data the fitted weights make sigma as small as the reconstruction error; far from
every centre v(z) -> 0 and sigma -> zeta^(-1/2), so the expected metric J_mu^T J_mu + J_sigma^T J_sigma
(pygeo.PullbackMetric(decoder, likelihood="gaussian", form="expected")) is large where sigma rises, at the edges of
the data and across the gaps between clusters: geodesics then follow the data (docs/MATH.md section 1).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import _checks
from ..cluster import _EuclideanDistances, _init_plus_plus


class RBFVariance(nn.Module):
    """z [B, d] -> std [B, D] with precision beta(z) = W^T v(z) + zeta, v_k(z) = exp(-lambda_k |z - c_k|^2).

    Args:
        centers: c [K, d], the RBF centres (k-means centres of the encoded training data; see `from_latents`).
        bandwidths: lambda [K] > 0.
        out_features: D, the number of outputs (pixels).
        zeta: the precision floor > 0: far from every centre sigma -> zeta^(-1/2).
    The weights W = exp(log_weight) [K, D] are positive, so beta >= zeta > 0 everywhere (the log parameterisation lets
    a gradient method move them by orders of magnitude); they start at 1 and are fitted by `fit_uncertainty_decoder`.
    Centres and bandwidths are buffers (fixed).
    """

    def __init__(self, centers: torch.Tensor, bandwidths: torch.Tensor, out_features: int, zeta: float = 1e-2):
        super().__init__()
        _checks.real_tensor("centers", centers, min_dim=2)
        if centers.dim() != 2 or centers.shape[0] == 0:
            raise ValueError(f"centers must have shape [K, d] with K >= 1, got {tuple(centers.shape)}")
        _checks.real_tensor("bandwidths", bandwidths, min_dim=1)
        if bandwidths.shape != centers.shape[:1]:
            raise ValueError(f"bandwidths must have shape [K] = [{centers.shape[0]}] like centers, "
                             f"got {tuple(bandwidths.shape)}")
        if not bool((bandwidths > 0).all()):
            raise ValueError("bandwidths must be positive")
        if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1:
            raise ValueError(f"out_features must be a positive int, got {out_features!r}")
        zeta = _checks.number("zeta", zeta)
        if not 0 < zeta < math.inf:
            raise ValueError(f"zeta must be a finite number > 0, got {zeta!r}")
        self.register_buffer("centers", centers.detach().clone())
        self.register_buffer("bandwidths", bandwidths.detach().clone().to(centers.dtype))
        self.log_weight = nn.Parameter(torch.zeros(centers.shape[0], out_features, dtype=centers.dtype,
                                                   device=centers.device))
        self.zeta = zeta
        self.out_features = out_features

    @classmethod
    def from_latents(cls, latents: torch.Tensor, n_centers: int, out_features: int, zeta: float = 1e-2,
                     bandwidth_scale: float = 1.0, seed: int = 0, max_iter: int = 100) -> "RBFVariance":
        """Centres by k-means (k-means++ seeding, Lloyd iterations) of latents [N, d]; bandwidths from each cluster's
        spread as in the paper: lambda_k = 1/2 (a * mean_{z in cluster k} |z - c_k|)^-2, a = bandwidth_scale (larger a:
        wider kernels, a smoother sigma). A cluster of one point takes the median spread of the others."""
        _checks.real_tensor("latents", latents, min_dim=2)
        if latents.dim() != 2:
            raise ValueError(f"latents must have shape [N, d], got {tuple(latents.shape)}")
        if isinstance(n_centers, bool) or not isinstance(n_centers, int) or not 1 <= n_centers <= latents.shape[0]:
            raise ValueError(f"n_centers must be an int in [1, N={latents.shape[0]}], got {n_centers!r}")
        bandwidth_scale = _checks.number("bandwidth_scale", bandwidth_scale)
        if not 0 < bandwidth_scale < math.inf:
            raise ValueError(f"bandwidth_scale must be a finite number > 0, got {bandwidth_scale!r}")
        centers, assignment = kmeans(latents.detach(), n_centers, seed=seed, max_iter=max_iter)
        spread = torch.zeros(n_centers, dtype=latents.dtype, device=latents.device)
        counts = torch.bincount(assignment, minlength=n_centers).to(latents.dtype)
        spread.index_add_(0, assignment, (latents.detach() - centers[assignment]).norm(dim=-1))
        spread = spread / counts.clamp_min(1)
        degenerate = spread <= 0
        if bool(degenerate.all()):
            raise ValueError("latents: every k-means cluster has zero spread (all points identical?)")
        spread[degenerate] = spread[~degenerate].median()
        bandwidths = 0.5 / (bandwidth_scale * spread) ** 2
        return cls(centers, bandwidths, out_features, zeta)

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """v(z) [B, K]. Squared distances by broadcasting, not torch.cdist, which has no forward-mode derivative (the
        generic metric paths differentiate the decoder by jvp)."""
        return torch.exp(-self.bandwidths * (z.unsqueeze(-2) - self.centers).pow(2).sum(-1))

    @property
    def weight(self) -> torch.Tensor:
        """W [K, D] > 0."""
        return self.log_weight.exp()

    def precision(self, z: torch.Tensor) -> torch.Tensor:
        """beta(z) = W^T v(z) + zeta [B, D]."""
        return self.features(z) @ self.weight + self.zeta

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """sigma(z) = beta(z)^(-1/2) [B, D]."""
        return self.precision(z).rsqrt()

    def std_and_jacobian(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(sigma [B, D], d sigma / dz [B, D, d]) in closed form: dv_k/dz = -2 lambda_k (z - c_k) v_k, and
        d sigma / dz = -1/2 beta^(-3/2) W^T dv/dz. Differentiable (autograd) in z and the weights."""
        offsets = z.unsqueeze(-2) - self.centers  # [B, K, d]
        v = torch.exp(-self.bandwidths * offsets.pow(2).sum(-1))  # [B, K]
        weight = self.weight  # [K, D]
        beta = v @ weight + self.zeta
        std = beta.rsqrt()
        dv = -2 * (self.bandwidths * v).unsqueeze(-1) * offsets  # [B, K, d]
        dbeta = torch.einsum("bkd,kD->bDd", dv, weight)
        return std, (-0.5 * std.pow(3)).unsqueeze(-1) * dbeta


class UncertaintyDecoder(nn.Module):
    """z [B, d] -> (mean [B, D], std [B, D]): a mean decoder and an RBFVariance, for
    pygeo.PullbackMetric(decoder, likelihood="gaussian", form="expected" | "fisher").

    When `mean` is an nn.Sequential of nn.Linear and elementwise activations, the expected metric takes the fused path:
    J_mu^T J_mu by pygeo.ops.mlp_metric (J_mu never materialised) plus J_sigma^T J_sigma from `std_and_jacobian`.
    """

    def __init__(self, mean: nn.Module, variance: RBFVariance):
        super().__init__()
        if not isinstance(mean, nn.Module):
            raise TypeError(f"mean must be an nn.Module z -> mean [B, D], got {type(mean).__name__}")
        if not isinstance(variance, RBFVariance):
            raise TypeError(f"variance must be a pygeo.models.RBFVariance, got {type(variance).__name__}")
        self.mean = mean
        self.variance = variance

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.mean(z), self.variance(z)

    def std_and_jacobian(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(std [B, D], d std / dz [B, D, d]) in closed form (RBFVariance.std_and_jacobian)."""
        return self.variance.std_and_jacobian(z)


def fit_uncertainty_decoder(mean: nn.Module, latents: torch.Tensor, data: torch.Tensor, n_centers: int = 64,
                            zeta: float = 1e-2, bandwidth_scale: float = 1.0, steps: int = 200, lr: float = 0.05,
                            seed: int = 0, progress: bool = True) -> Tuple[UncertaintyDecoder, List[float]]:
    """Wrap a trained mean decoder into a (mean, std) decoder and fit its RBF precision with the mean frozen.

    Args:
        mean: the trained mean decoder z [N, d] -> [N, D] (left unchanged; its parameters get no gradient).
        latents: [N, d] latent codes of the training data (e.g. the encoder means).
        data: [N, D] the training data they encode (flattened like the decoder's output).
        n_centers: K, k-means centres of the latents.
        zeta: precision floor (sigma far from the data -> zeta^(-1/2)).
        bandwidth_scale: a in lambda_k = 1/2 (a * cluster spread)^-2.
        steps: full-batch Adam steps on the Gaussian negative log-likelihood (a fixed number: no time cap). The RBF
            features of the latents are fixed, so every step is one [N, K] x [K, D] product.
        lr: Adam learning rate of the log-weights.
    The weights start where beta(z) is, at the data, about the inverse of each output's mean squared residual (floored
    at 1e-4, a std of 0.01, so that outputs the mean reproduces exactly do not start at an infinite precision).
    Returns:
        (UncertaintyDecoder, the negative log-likelihood per data point after each step, nats).
    Ctrl-C stops the fit and keeps the weights so far.
    """
    if not isinstance(mean, nn.Module):
        raise TypeError(f"mean must be an nn.Module z -> mean [N, D], got {type(mean).__name__}")
    _checks.real_tensor("latents", latents, min_dim=2)
    _checks.real_tensor("data", data, min_dim=2)
    if latents.dim() != 2:
        raise ValueError(f"latents must have shape [N, d], got {tuple(latents.shape)}")
    data = data.reshape(data.shape[0], -1)
    if data.shape[0] != latents.shape[0]:
        raise ValueError(f"data must have one row per latent: latents has {latents.shape[0]} rows, data "
                         f"{data.shape[0]}")
    _checks.same_device(latents=latents, data=data)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    latents = latents.detach()
    with torch.no_grad():
        residual2 = (data.to(latents.dtype) - mean(latents)).pow(2)  # [N, D], fixed: the mean is frozen
    if residual2.shape[1:] != data.shape[1:]:
        raise ValueError(f"mean(latents) must have shape [N, D] = {tuple(data.shape)}, got {tuple(residual2.shape)}")
    variance = RBFVariance.from_latents(latents, n_centers, data.shape[1], zeta=zeta, bandwidth_scale=bandwidth_scale,
                                        seed=seed)
    features = variance.features(latents)  # [N, K]
    with torch.no_grad():
        start = 1.0 / residual2.mean(0).clamp_min(1e-4)  # [D]
        variance.log_weight.copy_((start / features.sum(-1).mean()).log().expand_as(variance.log_weight))
    optimizer = torch.optim.Adam([variance.log_weight], lr=lr)
    losses: List[float] = []
    bar = tqdm(range(steps), desc="fitting RBF variance", unit="step", disable=not progress, leave=False)
    try:
        for _ in bar:
            beta = features @ variance.weight + variance.zeta
            # Gaussian negative log-likelihood per data point: sum over outputs of 1/2 (log 2 pi - log beta + beta r^2).
            loss = 0.5 * (math.log(2 * math.pi) - beta.log() + beta * residual2).sum(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(nll=f"{losses[-1]:.1f}")
    except KeyboardInterrupt:
        tqdm.write(f"fitting RBF variance interrupted after {len(losses)} step(s); keeping the weights so far")
    finally:
        bar.close()
    return UncertaintyDecoder(mean, variance), losses


def kmeans(points: torch.Tensor, k: int, seed: int = 0, max_iter: int = 100) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding (pygeo.cluster's): points [N, d] -> (centres [k, d], assignment [N]).
    An emptied cluster keeps its previous centre."""
    generator = torch.Generator().manual_seed(seed)
    centers = points[_init_plus_plus(_EuclideanDistances(points), k, generator)].clone()
    assignment: Optional[torch.Tensor] = None
    for _ in range(max_iter):
        new_assignment = torch.cdist(points, centers).argmin(-1)
        if assignment is not None and bool((new_assignment == assignment).all()):
            break
        assignment = new_assignment
        sums = torch.zeros_like(centers).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled].unsqueeze(-1).to(points.dtype)
    return centers, torch.cdist(points, centers).argmin(-1)
