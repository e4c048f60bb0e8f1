"""LSE Kahler metric G(z) for a batch of complex points: pygeo's fused kernels against the closed form written in
plain PyTorch (pygeo.reference: softmax, an einsum for y, GEMMs for sum p P and sum p y y^H) and against autodiff
Hessians of the potential (torch.func.hessian on R^{2n}, vmapped; small sizes only: it is memory-hungry).

    cd bench && python -m pytest bench_kahler.py -q --benchmark-columns=median,iqr
"""
import math

import pytest
import torch

import pygeo
from pygeo import _backend
from pygeo.reference.lse_kahler_metric import lse_kahler_metric as closed_form

CPU_SIZES = [  # (n, K, B, diagonal)
    (8, 256, 256, False),  # small enough for the autodiff Hessian
    (8, 256, 4096, False),
    (8, 256, 4096, True),
    (32, 256, 512, False),
    (32, 1024, 1024, False),  # the GPU goal's n and K at 1/16 of its batch
]
CUDA_SIZES = [(32, 1024, 16384, False), (8, 256, 16384, False)]
AUTODIFF_MAX_WORK = 256 * 256 * 64  # B * K * n^2 above which the autodiff Hessian is left out


def _problem(n, K, B, diagonal, device):
    generator = torch.Generator().manual_seed(0)

    def cn(*shape):
        return torch.complex(torch.randn(*shape, generator=generator), torch.randn(*shape, generator=generator)) / math.sqrt(2)

    z, centers = cn(B, n), cn(K, n)
    if diagonal:
        precisions = 0.3 + torch.rand(K, n, generator=generator)
    else:
        A = cn(K, n, n) / math.sqrt(n)
        precisions = A @ A.mH + 0.3 * torch.eye(n)
    log_weights = torch.randn(K, generator=generator)
    return tuple(t.to(device) for t in (z, centers, precisions, log_weights))


def _autodiff_hessian(z, centers, precisions, log_weights, temperature):
    """conj(d_a d_bbar Psi) from the real Hessian of Psi on x = [Re z, Im z]: what a user writes without pygeo."""
    n = z.shape[-1]

    def potential(x):
        point = torch.complex(x[:n], x[n:])
        diff = point - centers
        y = precisions * diff if not precisions.is_complex() else torch.einsum("kij,kj->ki", precisions, diff)
        u = (diff.conj() * y).real.sum(-1)
        return temperature * torch.logsumexp(log_weights + u / temperature, 0)

    H = torch.vmap(torch.func.hessian(potential))(torch.cat([z.real, z.imag], -1))
    Hxx, Hyy, Hxy, Hyx = H[:, :n, :n], H[:, n:, n:], H[:, :n, n:], H[:, n:, :n]
    return torch.complex(Hxx + Hyy, -(Hxy - Hyx)) / 4


def _providers(device):
    found = [("torch closed form", lambda *a: closed_form(*a))]
    found.append(("autodiff hessian", _autodiff_hessian))
    for name in (("cpp",) if device == "cpu" else ("triton", "cuda")):
        if _backend.status(name).available and not (name == "triton" and device == "cpu"):
            found.append((f"pygeo {name}", lambda *a, name=name: pygeo.ops.lse_kahler_metric(*a, backend=name)))
    return found


def _cases():
    cases = [("cpu", size) for size in CPU_SIZES]
    if torch.cuda.is_available():
        cases += [("cuda", size) for size in CUDA_SIZES]
    params = []
    for device, size in cases:
        for provider, _ in _providers(device):
            n, K, B, diagonal = size
            if provider == "autodiff hessian" and B * K * n * n > AUTODIFF_MAX_WORK:
                continue
            name = f"{provider.replace(' ', '_')}-{device}-n{n}-K{K}-B{B}-{'diag' if diagonal else 'full'}"
            params.append(pytest.param(device, size, provider, id=name))
    return params


@pytest.mark.parametrize("device, size, provider", _cases())
def test_lse_kahler_metric(benchmark, device, size, provider):
    n, K, B, diagonal = size
    z, centers, precisions, log_weights = _problem(n, K, B, diagonal, device)
    fn = dict(_providers(device))[provider]
    temperature = 2.0
    benchmark.group = f"lse_kahler_metric {device} n={n} K={K} B={B} {'diagonal' if diagonal else 'full'}"

    def call():
        G = fn(z, centers, precisions, log_weights, temperature)
        if device == "cuda":
            torch.cuda.synchronize()
        return G

    G = benchmark(call)
    expected = closed_form(z.cpu().to(torch.complex128), centers.cpu().to(torch.complex128),
                           precisions.cpu().to(torch.complex128 if not diagonal else torch.float64),
                           log_weights.cpu().double(), temperature)
    scale = float(expected.abs().max())
    assert float((G.cpu().to(torch.complex128) - expected).abs().max()) < 1e-3 * scale


GRADIENT_SIZES = [("cpu", (8, 256, 4096, False))] + ([("cuda", (32, 1024, 16384, False))] if torch.cuda.is_available()
                                                       else [])


@pytest.mark.parametrize("device, size, provider", [
    pytest.param(device, size, provider, id=f"{provider}-{device}-n{size[0]}-K{size[1]}-B{size[2]}")
    for device, size in GRADIENT_SIZES for provider in ("torch closed form+autograd", "pygeo log_volume+autograd")])
def test_log_det_gradient(benchmark, device, size, provider):
    """log det G and its gradient in z (what det-weighted HMC evaluates at every step): autograd through the closed
    form written in plain PyTorch against LSEKahlerMetric (fused forward, closed-form backward in z)."""
    n, K, B, diagonal = size
    z, centers, precisions, log_weights = _problem(n, K, B, diagonal, device)
    metric = pygeo.LSEKahlerMetric(centers, precisions, log_weights, temperature=2.0)
    benchmark.group = f"Kahler log det G and its gradient {device} n={n} K={K} B={B}"

    def plain(point):
        G = closed_form(point, centers, precisions, log_weights, 2.0)
        return 2 * torch.linalg.cholesky(G).diagonal(dim1=-2, dim2=-1).real.log().sum(-1)

    log_det = plain if provider.startswith("torch") else metric.log_volume

    def call():
        point = z.detach().requires_grad_(True)
        value = log_det(point)
        (grad,) = torch.autograd.grad(value.sum(), point)
        if device == "cuda":
            torch.cuda.synchronize()
        return value.detach(), grad

    value, grad = call()
    point = z.detach().requires_grad_(True)
    expected_value = plain(point)
    (expected_grad,) = torch.autograd.grad(expected_value.sum(), point)
    torch.testing.assert_close(value, expected_value.detach(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-2, atol=1e-2 * float(expected_grad.abs().max()))
    benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
