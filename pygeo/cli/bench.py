"""`pygeo bench`: each op of pygeo against the plain-PyTorch way of computing the same thing, side by side in one run on
this machine, as a markdown table. A quick look, not the benchmark suite: bench/ in the repository has the full size
sweeps (pytest-benchmark) and bench/gpu.py the GPU roofline figures."""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch
from tqdm.auto import tqdm

import pygeo
from pygeo.reference import christoffel as christoffel_reference
from pygeo.reference import langevin_step as langevin_reference
from pygeo.reference import latent_metric as latent_reference
from pygeo.reference import lse_kahler_metric as kahler_reference

from .context import compare_providers

Case = Tuple[str, str, Callable[[], torch.Tensor], Callable[[], torch.Tensor]]  # op, size, baseline, pygeo


def run_bench(device: torch.device, quick: bool = False, repeats: int = 5, progress: bool = True) -> str:
    """The markdown table: per op, the size, the plain-PyTorch and pygeo times (best of `repeats`, round robin), the
    speed-up and the largest deviation of pygeo's result from the baseline's, relative to its largest entry."""
    scale = 1 if quick else (8 if device.type == "cuda" else 1) * 16
    cases = _cases(device, scale)
    available = ", ".join(name for name, entry in pygeo.backends().items() if entry.available)
    lines = [f"pygeo {pygeo.__version__}, torch {torch.__version__}, device {device}, float32, best of {repeats} "
             f"round-robin runs after a warm-up; pygeo with backend='auto' (available here: {available})",
             "",
             "| op | size | plain PyTorch (ms) | pygeo (ms) | speed-up | max rel. deviation |",
             "|---|---|---:|---:|---:|---:|"]
    for op, size, baseline, fused in tqdm(cases, desc="pygeo bench", disable=not progress, leave=False):
        (_, base_seconds, _), (_, pygeo_seconds, deviation) = compare_providers(
            [("baseline", baseline), ("pygeo", fused)], repeats, device)
        lines.append(f"| {op} | {size} | {1e3 * base_seconds:.2f} | {1e3 * pygeo_seconds:.2f} | "
                     f"{base_seconds / pygeo_seconds:.1f}x | {deviation:.1e} |")
    return "\n".join(lines)


def _cases(device: torch.device, scale: int) -> List[Case]:
    """One representative size per op (B = 64 * scale points); inputs drawn with a fixed seed."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    def rand(*shape):
        return torch.rand(*shape, generator=generator).to(device)

    B, d = 64 * scale, 16
    cases: List[Case] = []

    J, weight = randn(B, 784, d), rand(784)
    cases.append(("jtj (weighted Gram)", f"B={B}, D=784, d={d}",
                  lambda: torch.einsum("bri,r,brj->bij", J, weight, J), lambda: pygeo.ops.jtj(J, weight)))

    decoder = torch.nn.Sequential(torch.nn.Linear(d, 512), torch.nn.Tanh(), torch.nn.Linear(512, 784)).to(device)
    z = randn(B, d)
    metric = pygeo.PullbackMetric(decoder)

    def jacfwd_metric():
        jacobian = torch.func.vmap(torch.func.jacfwd(decoder))(z)
        return jacobian.transpose(-1, -2) @ jacobian
    cases.append(("pullback metric, MLP 16-512-784", f"B={B}", jacfwd_metric, lambda: metric.metric(z)))
    cases.append(("gradient of 1/2 log det G, same decoder", f"B={B}",
                  lambda: _gradient(lambda x: 0.5 * torch.linalg.slogdet(
                      (lambda J: J.transpose(-1, -2) @ J)(torch.func.vmap(torch.func.jacfwd(decoder))(x)))[1], z),
                  lambda: metric.log_volume_and_grad(z)[1]))

    N = 100 if scale == 1 else 1000
    centroids, precisions = randn(N, d), rand(N, d) + 0.5
    latent = pygeo.LatentMetric(centroids, precisions, lam=0.01, tau=0.0)
    cases.append(("latent metric (diagonal precisions)", f"B={B}, N={N}, d={d}",
                  lambda: latent_reference.gemm_metric(z, centroids, precisions, latent.lam, latent.tau, latent.rho),
                  lambda: latent.metric(z)))

    A = randn(B, d, d)
    G = A @ A.transpose(-1, -2) / d + torch.eye(d, device=device)
    dG = randn(B, d, d, d)
    dG = dG + dG.transpose(-1, -2)
    cases.append(("Christoffel symbols from (G, dG)", f"B={B}, d={d}",
                  lambda: christoffel_reference.christoffel(G, dG), lambda: pygeo.ops.christoffel(G, dG)))

    grad, noise, step = randn(B, d), randn(B, d), torch.full((B,), 0.1, device=device)
    cases.append(("Langevin step (simplified drift)", f"B={B}, d={d}",
                  lambda: langevin_reference.langevin_step(z, G, grad, step, noise).proposal,
                  lambda: pygeo.ops.langevin_step(z, G, grad, step, noise).proposal))

    n, K = 8, 16 * scale
    points = torch.complex(randn(B, n), randn(B, n))
    centers = torch.complex(randn(K, n), randn(K, n))
    diagonal, log_weights = rand(K, n) + 0.5, torch.zeros(K, device=device)
    cases.append(("LSE Kahler metric (diagonal precisions)", f"B={B}, K={K}, n={n}",
                  lambda: kahler_reference.lse_kahler_metric(points, centers, diagonal, log_weights, 1.0),
                  lambda: pygeo.ops.lse_kahler_metric(points, centers, diagonal, log_weights, 1.0)))
    kahler = pygeo.LSEKahlerMetric(centers, diagonal, log_weights)
    cases.append(("gradient of log det G, same Kahler metric", f"B={B}, K={K}, n={n}",
                  lambda: _gradient(lambda x: torch.linalg.slogdet(
                      kahler_reference.lse_kahler_metric(x, centers, diagonal, log_weights, 1.0))[1], points),
                  lambda: kahler.log_volume_and_grad(points)[1]))
    return cases


def _gradient(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """d sum(fn(z)) / dz by autograd (the plain-PyTorch way; the bench runs under no_grad)."""
    with torch.enable_grad():
        point = z.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(point).sum(), point)
    return grad
