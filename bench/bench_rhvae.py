"""RHVAE metric (given by its inverse G^-1 = sum_i L_i L_i^T w_i(z) + lam I): what the sampler needs per point,
1/2 log det G and its gradient, from pygeo.metrics.RHVAEMetric (the fused latent-metric op + Cholesky) against the
plain-PyTorch way pythae writes it (the inverse by broadcasting over centroids, torch.linalg.inv, logdet, autograd).

    cd bench && python -m pytest bench_rhvae.py -q --benchmark-columns=median,iqr
"""
import pytest
import torch

from pygeo.metrics import RHVAEMetric

from conftest import pygeo_backends_for

LAM, RHO = 0.01, 1.0


def problem(B, N, d, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, d, generator=g)
    centroids = torch.randn(N, d, generator=g)
    factors = torch.tril(torch.randn(N, d, d, generator=g)) / d ** 0.5
    factors.diagonal(dim1=-2, dim2=-1).abs_().add_(0.5)
    to = dict(device=device, dtype=dtype)
    return z.to(**to), centroids.to(**to), factors.to(**to)


def plain_log_volume_and_grad(z, centroids, factors):
    """pythae's RHVAE form with the same (Mahalanobis) weights as pygeo's op, then autograd."""
    M = factors @ factors.transpose(-1, -2)  # [N, d, d]
    point = z.detach().requires_grad_(True)
    diff = point[:, None, :] - centroids[None]  # [B, N, d]
    weights = torch.exp(-torch.einsum("bni,nij,bnj->bn", diff, M, diff) / RHO ** 2)
    inverse = torch.einsum("bn,nij->bij", weights, M) + LAM * torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    G = torch.linalg.inv(inverse)
    log_volume = 0.5 * torch.logdet(G)
    (grad,) = torch.autograd.grad(log_volume.sum(), point)
    return log_volume.detach(), grad


CASES = [(500, 100, 16), (500, 1000, 16), (4096, 100, 8)]


@pytest.mark.parametrize("B,N,d", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("provider", ["pythae-style", "pygeo-cpp"])
def test_rhvae_log_volume_and_grad(benchmark, provider, B, N, d):
    z, centroids, factors = problem(B, N, d)
    if provider == "pygeo-cpp":
        if "cpp" not in pygeo_backends_for("cpu"):
            pytest.skip("the cpp backend is not built")
        metric = RHVAEMetric(centroids, factors, lam=LAM, rho=RHO, backend="cpp", factors=True)
        fn = lambda: metric.log_volume_and_grad(z)
    else:
        fn = lambda: plain_log_volume_and_grad(z, centroids, factors)
    benchmark.group = f"rhvae log_volume_and_grad B={B} N={N} d={d}"
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
