"""Riemannian Brownian motion of many paths through a decoder's pullback metric: pygeo.sample.brownian_motion (fused
metric and derivative of an MLP decoder, the fused Langevin step on each backend) against the plain-PyTorch
Euler-Maruyama loop a user would write today (G = J^T J and dG by torch.func.jacfwd, the Christoffel symbols from dG,
drift -1/2 G^ij Gamma^k_ij, noise by a Cholesky solve).

Run: cd bench && python -m pytest bench_brownian.py -q --benchmark-columns=median,iqr
"""
import math

import pytest
import torch

import pygeo
from conftest import devices, pygeo_backends_for

N_STEPS = 10
SIZES = [(2, 1000), (8, 1000)]  # (d, n_paths)


def make_decoder(d, device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, 512), torch.nn.Tanh(), torch.nn.Linear(512, 784)).to(device)


def plain_pytorch_brownian(decoder, z0, t, n_steps, generator):
    """Euler-Maruyama for dz = -1/2 G^ij Gamma^k_ij dt + C^-T dW, G = C C^T, written with torch.func."""
    def G_of(point):  # [d] -> [d, d]
        J = torch.func.jacfwd(decoder)(point)
        return J.T @ J

    metric_and_derivative = torch.func.vmap(lambda point: (G_of(point), torch.func.jacfwd(G_of)(point)))
    dt = t / n_steps
    z = z0.clone()
    for _ in range(n_steps):
        G, dG_last = metric_and_derivative(z)  # dG_last[b, i, j, k] = d G_ij / d z_k
        G_inv = torch.linalg.inv(G)
        # Gamma^k_ij = G^kl Gamma_lij, Gamma_lij = 1/2 (d_i G_lj + d_j G_li - d_l G_ij)
        first_kind = 0.5 * (dG_last.permute(0, 1, 3, 2) + dG_last - dG_last.permute(0, 3, 1, 2))  # [b, l, i, j]
        Gamma = torch.einsum("bkl,blij->bkij", G_inv, first_kind)
        drift = -0.5 * torch.einsum("bij,bkij->bk", G_inv, Gamma)
        C = torch.linalg.cholesky(G)
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype)
        z = z + dt * drift + math.sqrt(dt) * torch.linalg.solve_triangular(C.mT, noise[..., None], upper=True)[..., 0]
    return z


def _cases():
    cases = []
    for device in devices():
        for d, n_paths in SIZES:
            for provider in ["plain-pytorch", "pygeo-torch"] + [f"pygeo-{b}" for b in pygeo_backends_for(device)]:
                cases.append(pytest.param(device, provider, d, n_paths, id=f"{device}-{provider}-d{d}-P{n_paths}"))
    return cases


@pytest.mark.parametrize("device, provider, d, n_paths", _cases())
def test_brownian_motion(run_benchmark, benchmark, device, provider, d, n_paths):
    decoder = make_decoder(d, device)
    for parameter in decoder.parameters():
        parameter.requires_grad_(False)
    z0 = torch.zeros(n_paths, d, device=device)
    benchmark.group = f"brownian_motion {device} d={d} paths={n_paths} steps={N_STEPS} (MLP {d}-512-784, float32)"
    if provider == "plain-pytorch":
        def run():
            return plain_pytorch_brownian(decoder, z0, 1.0, N_STEPS, torch.Generator(device=device).manual_seed(0))
    else:
        metric = pygeo.PullbackMetric(decoder)
        backend = provider.split("-", 1)[1]

        def run():
            return pygeo.sample.brownian_motion(metric, z0, 1.0, N_STEPS, seed=0, progress=False,
                                                backend=backend).endpoints
    run_benchmark(run, device, rounds=3)


def test_plain_loop_is_the_same_process():
    """The baseline is a fair one: its drift equals pygeo's on the same decoder (float64)."""
    decoder = make_decoder(3, "cpu").double()
    z = torch.randn(5, 3, dtype=torch.float64)
    G = torch.func.vmap(lambda p: torch.func.jacfwd(decoder)(p).T @ torch.func.jacfwd(decoder)(p))(z)
    dt = 1e-3
    generator = torch.Generator().manual_seed(0)
    plain = plain_pytorch_brownian(decoder, z, dt, 1, generator)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0), dtype=z.dtype)
    C = torch.linalg.cholesky(G)
    scaled_noise = math.sqrt(dt) * torch.linalg.solve_triangular(C.mT, noise[..., None], upper=True)[..., 0]
    plain_drift = (plain - z - scaled_noise) / dt
    from pygeo.sample.brownian import laplace_beltrami_drift
    torch.testing.assert_close(plain_drift, laplace_beltrami_drift(pygeo.PullbackMetric(decoder), z),
                               rtol=1e-6, atol=1e-8)
