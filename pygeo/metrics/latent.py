"""LatentMetric: the latent metric of Chadebec and Allassonniere (NeurIPS 2022), MATH.md section 2.

    G(z) = sum_i M_i exp(-(z - c_i)^T M_i (z - c_i) / rho^2) + lam exp(-tau |z|^2) I

built from an encoder's posteriors N(c_i, M_i^-1) at N centroids. Every method runs the fused op
pygeo.ops.latent_metric (one pass over the centroids, log-space weights), never a det.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .. import _backend, _checks, _linalg
from ..ops.latent_metric import check_inputs, default_rho, latent_metric
from ..reference import symmetric_part
from .base import Metric


class LatentMetric(Metric):
    """The Chadebec-Allassonniere metric.

    Args:
        centroids: [N, d] centroids c_i (N >= 1).
        precisions: [N, d] diagonal precisions (1 / posterior variances) or [N, d, d] symmetric positive definite.
        lam: weight of the regulariser lam exp(-tau |z|^2) I (lam >= 0; the paper uses 0.01 on MNIST).
        tau: decay of the regulariser (tau >= 0). With tau = 0 the Riemannian-uniform density sqrt(det G) is improper
            (it tends to lam^(d/2) at infinity): sample it with tau > 0, or with chains started at the data.
        rho: bandwidth > 0. None: the paper's rule, max_i min_{j != i} |c_i - c_j|; with a single centroid there is
            no neighbour, so N = 1 needs an explicit rho.
        backend: backend of the fused op ("auto", "torch", "cpp", "cuda", "triton").
    The metric is differentiable in z (first derivatives through the fused kernels; second derivatives through a
    plain-PyTorch slow path); centroids and precisions are constants.
    """

    def __init__(self, centroids: torch.Tensor, precisions: torch.Tensor, lam: float = 0.01, tau: float = 0.0,
                 rho: Optional[float] = None, backend: str = "auto"):
        lam, tau, rho = check_inputs(centroids, precisions, lam, tau, rho)
        _backend.check_name(backend)
        self.centroids = centroids.detach()
        self.precisions = precisions.detach()
        self.lam, self.tau = lam, tau
        self.rho = rho if rho is not None else default_rho(self.centroids)
        self.backend = backend

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    @property
    def n_centroids(self) -> int:
        return self.centroids.shape[0]

    def __repr__(self) -> str:
        kind = "diagonal" if self.precisions.dim() == 2 else "full"
        return (f"LatentMetric(N={self.n_centroids}, d={self.dim}, {kind} precisions, lam={self.lam}, tau={self.tau}, "
                f"rho={self.rho:.4g})")

    def to(self, device=None, dtype=None) -> "LatentMetric":
        """A copy with centroids and precisions on another device / dtype."""
        return LatentMetric(self.centroids.to(device=device, dtype=dtype), self.precisions.to(device=device, dtype=dtype),
                            self.lam, self.tau, self.rho, self.backend)

    def _call(self, z: torch.Tensor, derivative: bool = False, log_volume: bool = False):
        _checks.real_tensor("z", z, min_dim=1, check_finite=False)  # the op scans z for NaN / Inf
        if z.shape[-1] != self.dim:
            raise ValueError(f"z must have shape [..., {self.dim}] (the metric's latent dimension), got {tuple(z.shape)}")
        centroids, precisions = self.centroids, self.precisions
        if centroids.device != z.device or centroids.dtype != z.dtype:  # follow z, as a module's buffers would
            centroids, precisions = centroids.to(z.device, z.dtype), precisions.to(z.device, z.dtype)
        return latent_metric(z, centroids, precisions, self.lam, self.tau, self.rho,
                                              derivative=derivative, log_volume=log_volume, backend=self.backend)

    def metric(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., d] -> G [..., d, d]."""
        return self._call(z).metric

    def metric_and_derivative(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """z [..., d] -> (G [..., d, d], dG [..., d, d, d]) with dG[..., k, i, j] = d G_ij / d z_k."""
        out = self._call(z, derivative=True)
        return out.metric, out.derivative

    def log_volume(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., d] -> 1/2 log det G [...], computed in log space (finite even where G underflows);
        differentiable, with the exact gradient 1/2 tr(G^-1 dG[k]) from the fused kernels."""
        return self._call(z, log_volume=True).log_volume

    def log_volume_and_grad(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """z [..., d] -> (1/2 log det G [...], its gradient [..., d]) in one fused call, without autograd (samplers)."""
        out = self._call(z.detach(), log_volume=True)
        return out.log_volume, out.log_volume_grad

    @classmethod
    def from_encoder(cls, encoder: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]], data: torch.Tensor,
                     n_centroids: int = 100, lam: float = 0.01, tau: float = 0.0, rho: Optional[float] = None,
                     batch_size: int = 1024, seed: Optional[int] = 0, max_iter: int = 100, progress: bool = True,
                     backend: str = "auto") -> "LatentMetric":
        """Build the metric from a trained encoder, as in the paper.

        Encodes `data` [n, ...] in batches with encoder(x) -> (mu [b, d], logvar [b, d]) (no gradients), picks
        n_centroids centroids among the means with k-medoids (pygeo.cluster.kmedoids, seeded) and gives each centroid
        its own posterior precision diag(exp(-logvar)).
        """
        from tqdm.auto import tqdm

        from ..cluster import kmedoids

        if not isinstance(data, torch.Tensor) or data.dim() < 1 or data.shape[0] == 0:
            raise ValueError(f"data must be a non-empty tensor [n, ...], got {getattr(data, 'shape', type(data).__name__)}")
        if not (isinstance(n_centroids, int) and 1 <= n_centroids <= data.shape[0]):
            raise ValueError(f"n_centroids must be an int in [1, n={data.shape[0]}], got {n_centroids!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        means, logvars = [], []
        with torch.no_grad():
            for start in tqdm(range(0, data.shape[0], batch_size), desc="encoding", disable=not progress):
                out = encoder(data[start:start + batch_size])
                if not (isinstance(out, (tuple, list)) and len(out) == 2):
                    raise TypeError("encoder(x) must return (mu, logvar)")
                means.append(out[0].detach())
                logvars.append(out[1].detach())
        mu, logvar = torch.cat(means), torch.cat(logvars)
        if mu.dim() != 2 or logvar.shape != mu.shape:
            raise ValueError(f"encoder must return mu and logvar of shape [b, d], got {tuple(mu.shape)} and "
                             f"{tuple(logvar.shape)}")
        medoids = kmedoids(mu, n_centroids, seed=seed, max_iter=max_iter).indices
        return cls(mu[medoids], torch.exp(-logvar[medoids]), lam=lam, tau=tau, rho=rho, backend=backend)


class RHVAEMetric(LatentMetric):
    """The metric of the Riemannian Hamiltonian VAE (Chadebec et al. 2020, pythae's RHVAE), given by its inverse:

        G(z)^-1 = sum_i M_i w_i(z) + lam exp(-tau |z|^2) I,   M_i = L_i L_i^T,   w_i(z) = exp(-(z - c_i)^T M_i (z - c_i) / rho^2)

    The inverse is the sum that LatentMetric's fused op computes (one pass over the centroids, log-space weights), so
    every method is that op plus a batched Cholesky: G = (G^-1)^-1, dG[k] = -G dG^-1[k] G, and
    1/2 log det G = -1/2 log det G^-1 with the op's exact, fused gradient (negated).

    Note: pythae's RHVAE weighs the centroids by the Euclidean distance, w_i = exp(-|z - c_i|^2 / T^2); the fused op
    (shared with LatentMetric) weighs by the distance in M_i. The two agree when the M_i are multiples of I (diagonal
    matrices equal across dimensions), and otherwise differ in the weights only.

    Args:
        centroids: [N, d] centroids c_i (pythae: the training latent codes).
        matrices: the M_i = L_i L_i^T, [N, d, d] symmetric positive definite or [N, d] diagonal; or the factors L_i
            [N, d, d] with factors=True (pythae stores the lower-triangular L_psi_i).
        lam: the inverse's regulariser lam >= 0 (pythae's lbd; with tau = 0 it bounds G above by I / lam).
        tau, rho, backend: as LatentMetric (rho is pythae's temperature T).
    """

    def __init__(self, centroids: torch.Tensor, matrices: torch.Tensor, lam: float = 0.01, tau: float = 0.0,
                 rho: Optional[float] = None, backend: str = "auto", *, factors: bool = False):
        if factors:
            _checks.real_tensor("matrices (factors L_i)", matrices)
            if matrices.dim() != 3 or matrices.shape[-1] != matrices.shape[-2]:
                raise ValueError(f"factors=True needs matrices L_i of shape [N, d, d], got {tuple(matrices.shape)}")
            matrices = matrices @ matrices.transpose(-1, -2)
        super().__init__(centroids, matrices, lam=lam, tau=tau, rho=rho, backend=backend)

    def __repr__(self) -> str:
        return "RHVAEMetric" + super().__repr__()[len("LatentMetric"):]

    def to(self, device=None, dtype=None) -> "RHVAEMetric":
        return RHVAEMetric(self.centroids.to(device=device, dtype=dtype), self.precisions.to(device=device, dtype=dtype),
                           self.lam, self.tau, self.rho, self.backend)

    def inverse_metric(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., d] -> G^-1 [..., d, d] (the fused sum)."""
        return self._call(z).metric

    def _invert(self, inverse: torch.Tensor) -> torch.Tensor:
        L = _linalg.cholesky(inverse, name="RHVAEMetric's inverse metric G^-1(z)")
        return symmetric_part(torch.cholesky_inverse(L))

    def metric(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., d] -> G [..., d, d], differentiable in z."""
        return self._invert(self.inverse_metric(z))

    def metric_and_derivative(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """z [..., d] -> (G [..., d, d], dG [..., d, d, d]), dG[..., k] = -G dG^-1[..., k] G."""
        out = self._call(z, derivative=True)
        G = self._invert(out.metric)
        return G, symmetric_part(-(G.unsqueeze(-3) @ out.derivative @ G.unsqueeze(-3)))

    def log_volume(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., d] -> 1/2 log det G = -1/2 log det G^-1 [...], in log space; differentiable (fused gradient)."""
        return -self._call(z, log_volume=True).log_volume

    def log_volume_and_grad(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """z [..., d] -> (1/2 log det G [...], its gradient [..., d]) in one fused call, without autograd (samplers)."""
        out = self._call(z.detach(), log_volume=True)
        return -out.log_volume, -out.log_volume_grad
