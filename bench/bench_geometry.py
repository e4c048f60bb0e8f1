"""Christoffel symbols, scalar curvature and geodesics of an MLP decoder's pullback metric: pygeo against nested
torch.func.jacfwd (how geomstats and the JAX libraries differentiate a metric), pygeo's two geodesic solvers, and
pygeo's energy solver against stochman's (pip install stochman, or pygeo-latent[compare]) on the same decoder, both
curves' lengths measured the same way.

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


def curved_decoder(device):
    """The geodesic benchmarks' decoder: 2-64-64-784 softplus, first layer scaled up so the geometry is curved."""
    decoder = make_decoder(2, hidden=64, out=784, seed=1).to(device)
    with torch.no_grad():
        decoder[0].weight.mul_(4.0)
    return decoder


def embedded_length(decoder, points, samples=64):
    """Length of the decoded polyline through `samples` latent points along each curve points [B, T, d] (linear in
    between): one measure for curves from either solver."""
    B, T, d = points.shape
    s = torch.linspace(0, T - 1, samples, dtype=points.dtype, device=points.device)
    lo = s.floor().long().clamp(max=T - 2)
    frac = (s - lo).unsqueeze(-1)
    fine = points[:, lo] * (1 - frac) + points[:, lo + 1] * frac
    with torch.no_grad():
        out = decoder(fine.reshape(-1, d)).reshape(B, samples, -1)
    return (out[:, 1:] - out[:, :-1]).norm(dim=-1).sum(-1)


def stochman_geodesics(decoder, z0, z1):
    """stochman's energy solver (cubic spline with 8 nodes, Adam, 150 iterations) on the same decoder; curve points
    [B, 64, d]."""
    from stochman.curves import CubicSpline
    from stochman.geodesic import geodesic_minimizing_energy
    from stochman.manifold import EmbeddedManifold

    class Decoded(EmbeddedManifold):
        def embed(self, c, jacobian=False):
            return decoder(c)

    curve = CubicSpline(begin=z0, end=z1, num_nodes=8, requires_grad=True)
    geodesic_minimizing_energy(curve, Decoded(), max_iter=150, eval_grid=16)
    with torch.no_grad():
        return curve(torch.linspace(0, 1, 64, dtype=z0.dtype, device=z0.device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", ["pygeo-energy", "stochman"])
def test_geodesics_against_stochman(benchmark, device, provider):
    """The issue's comparison: 1,000 pairs (100 on CPU) on the same decoder; both curves measured the same way."""
    if provider == "stochman":
        pytest.importorskip("stochman")
    pairs = 100 if device == "cpu" else 1000
    decoder = curved_decoder(device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    z0 = torch.randn(pairs, 2, dtype=torch.float64, generator=generator).to(device)
    z1 = torch.randn(pairs, 2, dtype=torch.float64, generator=generator).to(device)
    benchmark.group = f"geodesics against stochman, d=2, {pairs} pairs {device}"
    if provider == "stochman":
        run = lambda: stochman_geodesics(decoder, z0, z1)  # noqa: E731
    else:
        metric = pygeo.PullbackMetric(decoder)
        run = lambda: pygeo.geodesic(metric, z0, z1, n_points=16, method="energy", max_iter=200).points  # noqa: E731
    points = benchmark.pedantic(timed(run, device), rounds=1, iterations=1)
    length = embedded_length(decoder, points)
    benchmark.extra_info["mean_length"] = float(length.mean())
    benchmark.extra_info["straight_mean_length"] = float(embedded_length(decoder, torch.stack([z0, z1], 1)).mean())


def test_pygeo_geodesics_are_no_longer_than_stochmans():
    pytest.importorskip("stochman")
    decoder = curved_decoder("cpu")
    generator = torch.Generator().manual_seed(1)
    z0, z1 = (torch.randn(20, 2, dtype=torch.float64, generator=generator) for _ in range(2))
    ours = embedded_length(decoder, pygeo.geodesic(pygeo.PullbackMetric(decoder), z0, z1, n_points=16).points)
    theirs = embedded_length(decoder, stochman_geodesics(decoder, z0, z1))
    assert bool((ours <= theirs * (1 + 1e-3)).all())
