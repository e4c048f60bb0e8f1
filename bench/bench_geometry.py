"""Christoffel symbols, scalar curvature and geodesics of an MLP decoder's pullback metric: pygeo against nested
torch.func.jacfwd (how geomstats and the JAX libraries differentiate a metric), and pygeo's two geodesic solvers.

Run: cd bench && python -m pytest bench_geometry.py -q --benchmark-columns=median,iqr
"""
import pytest
import torch

import pygeo

from conftest import timed

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
BATCHES = {"cpu": [64, 256], "cuda": [256, 4096]}


def make_decoder(d, hidden=128, out=784, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.Softplus(), torch.nn.Linear(hidden, hidden),
                               torch.nn.Softplus(), torch.nn.Linear(hidden, out)).double()


def metric_by_jacfwd(decoder):
    def G(z):  # one point [d] -> [d, d]
        J = torch.func.jacfwd(decoder)(z)
        return J.T @ J
    return G


def christoffel_by_jacfwd(decoder):
    G_fn = metric_by_jacfwd(decoder)

    def Gamma(z):
        G = G_fn(z)
        dG = torch.func.jacfwd(G_fn)(z).permute(2, 0, 1)  # [k, i, j] = d G_ij / d z_k
        first = torch.einsum("ilj->lij", dG) + torch.einsum("jli->lij", dG) - dG
        return 0.5 * torch.einsum("kl,lij->kij", torch.linalg.inv(G), first)
    return Gamma


def scalar_curvature_by_jacfwd(decoder):
    G_fn = metric_by_jacfwd(decoder)
    Gamma_fn = christoffel_by_jacfwd(decoder)

    def scalar(z):
        Gamma = Gamma_fn(z)
        dGamma = torch.func.jacfwd(Gamma_fn)(z)  # [k, i, j, m] = d_m Gamma[k, i, j]
        R = (torch.einsum("likj->lijk", dGamma) - torch.einsum("lijk->lijk", dGamma)
             + torch.einsum("ljm,mik->lijk", Gamma, Gamma) - torch.einsum("lkm,mij->lijk", Gamma, Gamma))
        ricci = torch.einsum("jijk->ik", R)
        return torch.einsum("ik,ik->", torch.linalg.inv(G_fn(z)), ricci)
    return scalar


def case(device, B, d=16):
    decoder = make_decoder(d).to(device)
    z = 0.5 * torch.randn(B, d, dtype=torch.float64, device=device)
    return decoder, z


QUANTITIES = {
    # name: (pygeo on the metric, nested-jacfwd function of the decoder for one point, output shape per batch)
    "christoffel": (lambda metric, z: pygeo.christoffel(metric, z), christoffel_by_jacfwd, (16, 16, 16)),
    "scalar curvature": (lambda metric, z: pygeo.curvature(metric, z).scalar, scalar_curvature_by_jacfwd, ()),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B", [64, 256, 4096])
@pytest.mark.parametrize("quantity", list(QUANTITIES))
@pytest.mark.parametrize("provider", ["pygeo", "jacfwd"])
def test_geometry_d16(benchmark, device, B, quantity, provider):
    if B not in BATCHES[device]:
        pytest.skip("size not run on this device")
    decoder, z = case(device, B)
    by_pygeo, by_jacfwd, shape = QUANTITIES[quantity]
    benchmark.group = f"{quantity} d=16 B={B} {device}"
    if provider == "pygeo":
        metric = pygeo.PullbackMetric(decoder)
        fn = lambda: by_pygeo(metric, z)  # noqa: E731
    else:
        batched = torch.func.vmap(by_jacfwd(decoder))
        fn = lambda: batched(z)  # noqa: E731

    def run():
        with torch.no_grad():
            return fn()
    try:
        run()  # nested jacfwd's scalar curvature at B=4096 needs more than the 80 GB of an H100
    except torch.OutOfMemoryError:
        pytest.skip(f"{provider} ran out of memory at B={B}")
    out = benchmark.pedantic(timed(run, device), rounds=3, iterations=1, warmup_rounds=1)
    assert out.shape == (B, *shape)


def test_pygeo_curvature_matches_jacfwd():
    decoder, z = case("cpu", 4)
    expected = torch.func.vmap(scalar_curvature_by_jacfwd(decoder))(z)
    torch.testing.assert_close(pygeo.curvature(pygeo.PullbackMetric(decoder), z).scalar, expected)
    torch.testing.assert_close(pygeo.christoffel(pygeo.PullbackMetric(decoder), z),
                               torch.func.vmap(christoffel_by_jacfwd(decoder))(z))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["energy", "shooting"])
def test_geodesics_d2(benchmark, device, method):
    pairs = 8 if device == "cpu" else 1000
    decoder = make_decoder(2, hidden=64, out=784, seed=1).to(device)
    metric = pygeo.PullbackMetric(decoder)
    generator = torch.Generator(device="cpu").manual_seed(0)
    z0 = torch.randn(pairs, 2, dtype=torch.float64, generator=generator).to(device)
    z1 = torch.randn(pairs, 2, dtype=torch.float64, generator=generator).to(device)
    benchmark.group = f"geodesics d=2, {pairs} pairs, 16 points {device}"

    def run():
        return pygeo.geodesic(metric, z0, z1, n_points=16, method=method, max_iter=200)
    result = benchmark.pedantic(timed(run, device), rounds=1, iterations=1)
    benchmark.extra_info["mean_length"] = float(result.length.mean())
    benchmark.extra_info["converged"] = int(result.converged.sum())
