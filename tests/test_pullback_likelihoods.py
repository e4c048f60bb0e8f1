"""PullbackMetric with the categorical (logits, categories on the last dim) and poisson (log-rates) likelihoods:
G, dG and the flat coordinates against explicit float64 references (the C x C Fisher blocks formed), curvature from the
Gauss equation against the Christoffel route, and geodesic distances through the Gauss-Newton solver."""
import pytest
import torch

import pygeo
from pygeo.metrics.pullback import PullbackMetric

from conftest import assert_close

F64 = torch.float64
L = torch.nn


class PermutedConv(L.Module):
    """Not an nn.Sequential (the vmap(jvp) path): conv features [B, C, H, W] -> logits [B, H, W, C]."""

    def __init__(self, d=3, C=4):
        super().__init__()
        self.linear = L.Linear(d, 3 * 3 * 3)
        self.conv = L.ConvTranspose2d(3, C, 3, 2, 1)

    def forward(self, z):
        h = torch.nn.functional.softplus(self.linear(z)).reshape(-1, 3, 3, 3)
        return self.conv(h).permute(0, 2, 3, 1)


def make_decoder(kind, d=3, C=4):
    if kind == "mlp":  # an MLP the fused-op recogniser knows: one position of C categories
        return L.Sequential(L.Linear(d, 7), L.Tanh(), L.Linear(7, C))
    if kind == "mlp-positions":  # [B, 3, C]
        return L.Sequential(L.Linear(d, 9), L.Softplus(), L.Linear(9, 3 * C), L.Unflatten(1, (3, C)))
    if kind == "conv":  # a Sequential of conv layers: [B, 2, 5, 5], the last dim (5) holds the categories
        return L.Sequential(L.Linear(d, 2 * 3 * 3), L.Unflatten(1, (2, 3, 3)), L.ConvTranspose2d(2, 3, 3, 2, 1),
                            L.SiLU(), L.Conv2d(3, 2, 3, padding=1))
    return PermutedConv(d, C)


KINDS = ("mlp", "mlp-positions", "conv", "module")


def per_point_jacobian(decoder, z):
    """d output / dz [B, ..., d] by reverse mode, point by point (independent of pygeo's forward-mode paths)."""
    return torch.func.vmap(torch.func.jacrev(lambda x: decoder(x[None])[0]))(z)


def reference_metric(decoder, likelihood, z):
    """The Fisher metric with its blocks formed explicitly: sum over positions J^T (diag p - p p^T) J (categorical),
    J^T diag(exp l) J (poisson)."""
    out = decoder(z)
    B, d = z.shape
    J = per_point_jacobian(decoder, z)
    if likelihood == "categorical":
        C = out.shape[-1]
        J = J.reshape(B, -1, C, d)
        p = torch.softmax(out.reshape(B, -1, C), -1)
        fisher = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # [B, P, C, C]
        return torch.einsum("bpci,bpce,bpej->bij", J, fisher, J)
    J = J.reshape(B, -1, d)
    return torch.einsum("bri,br,brj->bij", J, out.reshape(B, -1).exp(), J)


def central_difference(fn, z, h=1e-5):
    """d fn / dz_k [B, d(k), ...] by central differences (float64)."""
    columns = []
    for k in range(z.shape[-1]):
        step = torch.zeros_like(z)
        step[:, k] = h
        columns.append((fn(z + step) - fn(z - step)) / (2 * h))
    return torch.stack(columns, 1)


@pytest.mark.parametrize("likelihood", ["categorical", "poisson"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("B, d", [(7, 3), (1, 1), (4, 5)])
def test_metric_matches_explicit_fisher(likelihood, kind, dtype, B, d):
    decoder = make_decoder(kind, d).to(F64)
    z = torch.randn(B, d, dtype=F64)
    expected = reference_metric(decoder, likelihood, z)
    metric = PullbackMetric(decoder.to(dtype), likelihood)
    G = metric.metric(z.to(dtype))
    assert G.dtype == dtype and G.shape == (B, d, d)
    assert_close(G.detach(), expected.detach(), dtype)
    assert torch.equal(G, G.transpose(-1, -2))


@pytest.mark.parametrize("likelihood", ["categorical", "poisson"])
@pytest.mark.parametrize("kind", KINDS)
def test_metric_and_derivative_against_central_differences(likelihood, kind):
    decoder = make_decoder(kind).to(F64)
    z = torch.randn(5, 3, dtype=F64)
    metric = PullbackMetric(decoder, likelihood)
    G, dG = metric.metric_and_derivative(z)
    assert_close(G.detach(), reference_metric(decoder, likelihood, z).detach(), F64)
    with torch.no_grad():
        expected = central_difference(lambda x: reference_metric(decoder, likelihood, x), z)
    torch.testing.assert_close(dG.detach(), expected, rtol=1e-6, atol=1e-7 * float(expected.abs().max()))


@pytest.mark.parametrize("likelihood", ["categorical", "poisson"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("saturated", [False, True])
def test_flat_coordinates_pull_back_to_the_metric(likelihood, kind, saturated):
    """J_phi^T J_phi == G, also where logits are large enough that the clamp of p into [eps, 1 - eps] is active."""
    decoder = make_decoder(kind).to(F64)
    z = torch.randn(6, 3, dtype=F64)
    if saturated:  # logits of order 50
        last = [m for m in decoder.modules() if isinstance(m, (L.Linear, L.Conv2d, L.ConvTranspose2d))][-1]
        with torch.no_grad():
            last.weight.mul_(40)
            last.bias.mul_(40)
    metric = PullbackMetric(decoder, likelihood, eps=1e-4)
    if saturated and likelihood == "categorical":  # the clamp is active somewhere (else the test proves nothing)
        p = torch.softmax(decoder(z), -1)
        assert bool(((p < 1e-4) | (p > 1 - 1e-4)).any())
    phi = metric.flat_coordinates(z)
    assert phi.shape == (6, decoder(z[:1])[0].numel()) and bool(torch.isfinite(phi).all())
    J_phi = per_point_jacobian(metric.flat_coordinates, z)  # [B, D, d]
    G = metric.metric(z)
    assert bool(torch.isfinite(G).all())
    assert_close(J_phi.transpose(1, 2) @ J_phi, G.detach(), F64)


def test_categorical_flat_coordinates_lie_on_the_sphere_of_radius_two():
    decoder = make_decoder("mlp-positions").to(F64)
    z = torch.randn(5, 3, dtype=F64)
    phi = PullbackMetric(decoder, "categorical").flat_coordinates(z).reshape(5, 3, 4)
    torch.testing.assert_close(phi.pow(2).sum(-1), torch.full((5, 3), 4.0, dtype=F64))
    torch.testing.assert_close(PullbackMetric(decoder, "poisson").flat_coordinates(z),
                               2 * torch.exp(decoder(z).reshape(5, -1) / 2))


@pytest.mark.parametrize("likelihood", ["categorical", "poisson"])
@pytest.mark.parametrize("kind", ["mlp-positions", "conv"])
def test_curvature_gauss_equation_equals_christoffel_route(likelihood, kind):
    decoder = make_decoder(kind, d=2).to(F64)
    z = torch.randn(3, 2, dtype=F64)
    metric = PullbackMetric(decoder, likelihood)
    gauss = pygeo.curvature(metric, z, method="gauss")
    christoffel = pygeo.curvature(metric, z, method="christoffel")
    assert bool((gauss.scalar.abs() > 1e-6).any())  # curved: the comparison is not 0 == 0
    torch.testing.assert_close(gauss.riemann, christoffel.riemann, rtol=1e-6,
                               atol=1e-8 * float(christoffel.riemann.detach().abs().max()))


@pytest.mark.parametrize("likelihood", ["categorical", "poisson"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_geodesic_distances(likelihood, kind):
    """Gauss-Newton distances: a symmetric matrix with a zero diagonal, below the straight segments' lengths, and equal
    to the lengths of the energy solver on the metric alone (a FunctionMetric: no flat coordinates)."""
    decoder = make_decoder(kind, d=2).to(F64)
    x = torch.randn(3, 2, dtype=F64)
    metric = PullbackMetric(decoder, likelihood)
    D = pygeo.geodesic_distances(metric, x, progress=False)
    assert D.shape == (3, 3) and bool(torch.isfinite(D).all())
    torch.testing.assert_close(D, D.T)
    assert bool((D.diagonal() == 0).all())
    t = torch.linspace(0, 1, 401, dtype=F64)[:, None]
    for a in range(3):
        for b in range(a + 1, 3):
            line = x[a] + t * (x[b] - x[a])
            mid = 0.5 * (line[1:] + line[:-1])
            step = line[1:] - line[:-1]
            straight = metric.norm(mid, step).sum()
            assert 0 < D[a, b] <= straight * (1 + 1e-6)
    plain = pygeo.FunctionMetric(metric.metric)
    result = pygeo.geodesic(plain, x[:1], x[1:2], n_points=24)
    torch.testing.assert_close(D[0, 1], result.length[0].detach(), rtol=2e-2, atol=0)


def test_mlp_categorical_takes_the_tangent_rows_path(monkeypatch):
    """The fused op has no categorical weight; an MLP decoder still avoids vmap(jvp): its tangents go through the
    layers as GEMM rows."""
    decoder = make_decoder("mlp").to(F64)
    z = torch.randn(5, 3, dtype=F64)
    expected = reference_metric(decoder, "categorical", z)

    def no_vmap(*args, **kwargs):
        raise AssertionError("the vmap(jvp) path was taken")

    monkeypatch.setattr(PullbackMetric, "_rows_and_jacobian", no_vmap)
    for likelihood in ("categorical", "poisson"):
        metric = PullbackMetric(decoder, likelihood)
        assert metric._tangent_layers(z) is not None
        G = metric.metric(z)
        if likelihood == "categorical":
            assert_close(G.detach(), expected.detach(), F64)


@pytest.mark.parametrize("likelihood", ["categorical", "poisson"])
@pytest.mark.parametrize("kind", ["mlp-positions", "module"])
def test_gradcheck(likelihood, kind):
    decoder = make_decoder(kind, d=2).to(F64)
    metric = PullbackMetric(decoder, likelihood)
    z = torch.randn(3, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(metric.metric, (z,))
    assert torch.autograd.gradcheck(metric.log_volume, (z,))


def test_bad_outputs_are_refused():
    z = torch.randn(4, 3, dtype=F64)
    vector = L.Sequential(L.Linear(3, 5), L.Tanh(), L.Linear(5, 1), L.Flatten(0)).to(F64)  # [B]: no category dim
    with pytest.raises(ValueError, match=r"logits \[B, \.\.\., C\]"):
        PullbackMetric(lambda x: vector(x), "categorical").metric(z)
    one_category = L.Sequential(L.Linear(3, 5), L.Tanh(), L.Linear(5, 1)).to(F64)
    with pytest.raises(ValueError, match="C >= 2"):
        PullbackMetric(one_category, "categorical").metric(z)
    huge = L.Sequential(L.Linear(3, 4)).to(F64)
    with torch.no_grad():
        huge[0].bias.fill_(800.0)
    with pytest.raises(ValueError, match="overflows"):
        PullbackMetric(huge, "poisson").metric(z)
    with pytest.raises(ValueError, match="sigma is only used"):
        PullbackMetric(huge, "poisson", sigma=1.0)


@pytest.mark.parametrize("likelihood", ["categorical", "poisson"])
@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch(likelihood, kind):
    """B = 0 gives empty results of the right shapes on every path (fuzz campaign 2026-12-07: the categorical
    likelihood's reshape(B, -1, C) could not infer the positions of 0 points, a RuntimeError)."""
    decoder = make_decoder(kind, d=2).to(F64)
    metric = PullbackMetric(decoder, likelihood)
    z = torch.zeros(0, 2, dtype=F64)
    G, dG = metric.metric_and_derivative(z)
    assert G.shape == (0, 2, 2) and dG.shape == (0, 2, 2, 2)
    assert metric.metric(z).shape == (0, 2, 2)
    value, grad = metric.log_volume_and_grad(z)
    assert value.shape == (0,) and grad.shape == (0, 2)
    assert metric.flat_coordinates(z).shape[0] == 0
