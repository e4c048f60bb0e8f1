"""Latent metric G(z) (Chadebec-Allassonniere): pygeo's fused backends against the plain-PyTorch ways.

Providers: "broadcast" (the paper's formula, broadcasting over centroids), "gemm" (the fast plain-PyTorch way: two
matrix products over z outer products), "pykeops" (when installed), and pygeo's backends ("pygeo-cpp" on CPU,
"pygeo-triton" / "pygeo-cuda" on CUDA). Also one HMC step (10 leapfrog steps, 500 chains, d=16, N=1000): pygeo's
sampler against the same loop written with the paper's formula and autograd.

    cd bench && python -m pytest bench_latent_metric.py -q --benchmark-columns=median,iqr
"""
import pytest
import torch

import pygeo
from pygeo.reference import latent_metric as reference
from pygeo.sample import riemannian_uniform

CUDA = torch.cuda.is_available()
CPU_B = 512
GPU_B = 65536
# The paper's formula materialises [B, N, d, d]; skip it where that would not fit.
BROADCAST_LIMIT = 2**27


def problem(B, N, d, kind, device):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, d, generator=g)
    centroids = torch.randn(N, d, generator=g)
    if kind == "diagonal":
        precisions = 0.5 + torch.rand(N, d, generator=g)
    else:
        A = torch.randn(N, d, d, generator=g)
        precisions = A @ A.transpose(-1, -2) / d + 0.5 * torch.eye(d)
    return z.to(device), centroids.to(device), precisions.to(device)


def providers(device):
    names = ["broadcast", "gemm", "pykeops"]
    names += ["pygeo-triton", "pygeo-cuda"] if device == "cuda" else ["pygeo-cpp"]
    return names


def run(provider, z, centroids, precisions):
    lam, tau, rho = 0.01, 0.0, 1.0
    if provider == "broadcast":
        return reference.broadcast_metric(z, centroids, precisions, lam, tau, rho)
    if provider == "gemm":
        return reference.gemm_metric(z, centroids, precisions, lam, tau, rho)
    if provider == "pykeops":
        return keops_metric(z, centroids, precisions, lam, tau, rho)
    backend = provider.split("-")[1]
    return pygeo.ops.latent_metric(z, centroids, precisions, lam, tau, rho, backend=backend).metric


def keops_metric(z, centroids, precisions, lam, tau, rho):
    from pykeops.torch import LazyTensor

    B, d = z.shape
    zi = LazyTensor(z[:, None, :])
    cj = LazyTensor(centroids[None, :, :])
    if precisions.dim() == 2:
        mj = LazyTensor(precisions[None, :, :])
        w = (-(((zi - cj) ** 2) * mj).sum(-1) / rho**2).exp()
        G = torch.diag_embed((w * mj).sum(1))
    else:
        mj = LazyTensor(precisions.reshape(1, -1, d * d))
        diff = zi - cj
        q = (diff.tensorprod(diff) * mj).sum(-1)
        G = ((-q / rho**2).exp() * mj).sum(1).reshape(B, d, d)
    return G + lam * torch.exp(-tau * (z * z).sum(-1))[:, None, None] * torch.eye(d, dtype=z.dtype, device=z.device)


def timed(benchmark, fn, device):
    def call():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    call()  # warm-up (compilation, caches)
    benchmark.pedantic(call, rounds=10 if device == "cuda" else 3, iterations=1, warmup_rounds=1)


CASES = [(device, B, N, d, "diagonal") for device, B in [("cpu", CPU_B)] + ([("cuda", GPU_B)] if CUDA else [])
         for d in (2, 16, 64) for N in (100, 1000, 10000)]
CASES += [(device, B, 1000, 16, "full") for device, B in [("cpu", CPU_B)] + ([("cuda", GPU_B)] if CUDA else [])]


@pytest.mark.parametrize("device,B,N,d,kind", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("provider", ["broadcast", "gemm", "pykeops", "pygeo-cpp", "pygeo-triton", "pygeo-cuda"])
def test_latent_metric(benchmark, provider, device, B, N, d, kind):
    if provider not in providers(device):
        pytest.skip(f"{provider} does not run on {device}")
    if provider == "pykeops":
        pytest.importorskip("pykeops")
    if provider.startswith("pygeo-") and not pygeo.backends()[provider.split("-")[1]].available:
        pytest.skip(f"{provider} unavailable")
    if provider == "broadcast" and B * N * (d if kind == "diagonal" else d * d) > BROADCAST_LIMIT:
        pytest.skip("the broadcast formula would not fit in memory")
    benchmark.group = f"latent_metric {device} {kind} B={B} N={N} d={d}"
    z, centroids, precisions = problem(B, N, d, kind, device)
    timed(benchmark, lambda: run(provider, z, centroids, precisions), device)


def paper_hmc_step(z, centroids, precisions, lam, tau, rho, step_size, n_leapfrog, generator):
    """One HMC step written with the paper's broadcast formula and autograd (the equivalent user loop)."""

    def potential_and_grad(x):
        x = x.detach().requires_grad_(True)
        G = reference.broadcast_metric(x, centroids, precisions, lam, tau, rho)
        potential = -0.5 * torch.logdet(G)
        (grad,) = torch.autograd.grad(potential.sum(), x)
        return potential.detach(), grad

    p = torch.randn(z.shape, generator=generator).to(z.device)
    potential, grad = potential_and_grad(z)
    energy0 = potential + 0.5 * (p * p).sum(-1)
    x = z
    p = p - 0.5 * step_size * grad
    for step in range(n_leapfrog):
        x = x + step_size * p
        potential_new, grad = potential_and_grad(x)
        p = p - (step_size if step < n_leapfrog - 1 else 0.5 * step_size) * grad
    energy1 = potential_new + 0.5 * (p * p).sum(-1)
    accept = torch.rand(z.shape[0], generator=generator).to(z.device).log() < energy0 - energy1
    return torch.where(accept[:, None], x, z)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
@pytest.mark.parametrize("provider", ["paper-loop", "pygeo"])
def test_hmc_step(benchmark, provider, device):
    benchmark.group = f"one HMC step {device} 500 chains d=16 N=1000 (10 leapfrog)"
    z, centroids, precisions = problem(500, 1000, 16, "diagonal", device)
    lam, tau, rho = 0.01, 0.1, 1.0
    if provider == "paper-loop":
        generator = torch.Generator().manual_seed(0)
        fn = lambda: paper_hmc_step(z, centroids, precisions, lam, tau, rho, 0.01, 10, generator)
    else:
        metric = pygeo.LatentMetric(centroids, precisions, lam=lam, tau=tau, rho=rho)
        fn = lambda: riemannian_uniform(metric, 500, n_steps=1, n_leapfrog=10, step_size=0.01, init=z, seed=0,
                                        adapt_step_size=False, progress=False).samples
    timed(benchmark, fn, device)
