"""pygeo.parallel_transport: closed forms (unit sphere through the stereographic chart, the half-plane), the preserved
inner products, the geodesic's own velocity, the fused MLP path against the generic flat-coordinates and Christoffel
routes, transport along given curves; float32 and float64; bad input."""
import math

import pytest
import torch

import pygeo
from pygeo.geometry import _rates
from test_log_map import (HalfPlane, disk_points, half_plane_pairs, mlp_metric, sphere_chart_metric,
                          stereographic)


def inner(metric, z, u, w):
    return torch.einsum("bi,bij,bj->b", u, metric.metric(z), w)


def sphere_transport_closed_form(z0, z1, u):
    """Transport along the great circle p -> q in R^3: the component along e = the unit initial direction turns
    into cos(theta) e - sin(theta) p, the normal one stays; then back to chart coordinates at z1 (J^+)."""
    p, q = stereographic(z0), stereographic(z1)
    J0 = torch.func.vmap(torch.func.jacfwd(stereographic))(z0)
    J1 = torch.func.vmap(torch.func.jacfwd(stereographic))(z1)
    cosine = (p * q).sum(-1, keepdim=True).clamp(-1, 1)
    theta = torch.arccos(cosine)
    e = (q - cosine * p) / torch.sin(theta)
    U = (J0 @ u.unsqueeze(-1)).squeeze(-1)
    along = (U * e).sum(-1, keepdim=True)
    moved = U + along * (torch.cos(theta) * e - torch.sin(theta) * p - e)
    G1 = J1.transpose(-1, -2) @ J1
    return torch.linalg.solve(G1, (J1.transpose(-1, -2) @ moved.unsqueeze(-1))).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sphere_chart_transport_matches_the_closed_form(dtype):
    generator = torch.Generator().manual_seed(11)
    z0, z1 = disk_points(4, generator), disk_points(4, generator)
    u = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    moved = pygeo.parallel_transport(sphere_chart_metric(), z0.to(dtype), z1.to(dtype), u.to(dtype))
    assert moved.shape == (4, 2) and moved.dtype == dtype
    rtol = 1e-6 if dtype == torch.float64 else 2e-3
    torch.testing.assert_close(moved.double(), sphere_transport_closed_form(z0, z1, u), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_half_plane_transport_preserves_inner_products_and_carries_the_velocity(dtype):
    generator = torch.Generator().manual_seed(12)
    z0, z1 = half_plane_pairs(5, dtype, generator)
    metric = HalfPlane()
    u = torch.randn(5, 2, generator=generator, dtype=torch.float64).to(dtype)
    w = torch.randn(5, 2, generator=generator, dtype=torch.float64).to(dtype)
    Pu, Pw = (pygeo.parallel_transport(metric, z0, z1, vector) for vector in (u, w))
    rtol = 1e-6 if dtype == torch.float64 else 1e-3  # RK4 with 32 steps: ~1e-7 relative here
    torch.testing.assert_close(inner(metric, z1, Pu, Pw), inner(metric, z0, u, w), rtol=rtol, atol=rtol)
    torch.testing.assert_close(inner(metric, z1, Pu, Pu), inner(metric, z0, u, u), rtol=rtol, atol=rtol)
    # The geodesic's initial velocity arrives as its final velocity: P log_z0(z1) = -log_z1(z0).
    forward = pygeo.log_map(metric, z0, z1)
    backward = pygeo.log_map(metric, z1, z0)
    carried = pygeo.parallel_transport(metric, z0, z1, forward, velocity=forward)
    torch.testing.assert_close(carried, -backward, rtol=10 * rtol, atol=10 * rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_half_plane_transport_along_a_horizontal_line_rotates_by_its_length(dtype):
    """Along y = 1 the half-plane's transport turns vectors clockwise at unit rate (Gamma^x_xy = -1/y,
    Gamma^y_xx = 1/y): after the line from (0, 1) to (L, 1) by the angle L."""
    L = 1.3
    curve = torch.stack([torch.linspace(0, L, 9, dtype=dtype), torch.ones(9, dtype=dtype)], -1)[None].repeat(2, 1, 1)
    u = torch.tensor([[1.0, 0.0], [0.3, -0.7]], dtype=dtype)
    moved = pygeo.parallel_transport(HalfPlane(), v=u, along=curve)
    c, s = math.cos(L), math.sin(L)
    expected = torch.stack([c * u[:, 0] + s * u[:, 1], -s * u[:, 0] + c * u[:, 1]], -1)
    tol = 1e-7 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(moved, expected, rtol=tol, atol=tol)
    single = pygeo.parallel_transport(HalfPlane(), v=u[1], along=curve[1])
    assert single.shape == (2,)
    torch.testing.assert_close(single, moved[1], rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)


def test_transport_along_a_curve_preserves_norms_and_matches_the_geodesic_route():
    metric = HalfPlane()
    generator = torch.Generator().manual_seed(13)
    z0, z1 = half_plane_pairs(3, torch.float64, generator)
    u = torch.randn(3, 2, generator=generator, dtype=torch.float64)
    # a bent curve (not a geodesic): the norm is still preserved
    t = torch.linspace(0, 1, 17, dtype=torch.float64)[None, :, None]
    bump = torch.stack([torch.zeros_like(t[..., 0]), 0.3 * torch.sin(math.pi * t[..., 0])], -1)
    curve = z0[:, None] * (1 - t) + z1[:, None] * t + bump
    moved = pygeo.parallel_transport(metric, z0, z1, u, along=curve, n_steps=64)
    torch.testing.assert_close(inner(metric, z1, moved, moved), inner(metric, z0, u, u), rtol=1e-7, atol=1e-9)
    # along the geodesic's own points the result is the geodesic transport, to the curve's O(1/T^2) sampling
    result = pygeo.log_map(metric, z0, z1, n_points=33, return_result=True)
    by_curve = pygeo.parallel_transport(metric, v=u, along=result.points)
    by_geodesic = pygeo.parallel_transport(metric, z0, z1, u, velocity=result.v)
    torch.testing.assert_close(by_curve, by_geodesic, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("likelihood,sigma", [("euclidean", None), ("gaussian", 0.7), ("bernoulli", None)])
def test_fused_mlp_rates_equal_the_generic_and_christoffel_routes(likelihood, sigma):
    metric = mlp_metric(torch.float64, likelihood, sigma)
    generator = torch.Generator().manual_seed(14)
    c, w, V = (torch.randn(5, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    fused = _rates.mlp_rates(metric, c, w, V)
    assert fused is not None  # the fast path applies to this decoder
    generic = _rates.flat_rates(metric, c, w, V)
    gamma = pygeo.christoffel(metric, c)
    by_christoffel = (-torch.einsum("bkij,bi,bj->bk", gamma, w, w), -torch.einsum("bkij,bi,bj->bk", gamma, w, V))
    for a, b, e in zip(fused, generic, by_christoffel):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("activation", [torch.nn.Softplus(beta=2.0, threshold=1.0), torch.nn.Tanh()])
def test_fused_mlp_rates_with_two_hidden_layers_other_activations_and_softplus_branches(activation):
    """The closed-form Softplus jet (beta != 1, inputs on both sides of its threshold, where it turns linear) and the
    generic jet (tanh), over two hidden layers (first tangents as combinations of the basis rows at every layer)."""
    torch.manual_seed(3)
    decoder = torch.nn.Sequential(torch.nn.Linear(3, 12), activation, torch.nn.Linear(12, 10), activation,
                                  torch.nn.Linear(10, 20)).double()
    metric = pygeo.PullbackMetric(decoder, likelihood="bernoulli")
    generator = torch.Generator().manual_seed(16)
    c, w, V = (torch.randn(6, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    if isinstance(activation, torch.nn.Softplus):
        h = decoder[0](c) * activation.beta
        assert bool((h > activation.threshold).any()) and bool((h < activation.threshold).any())
    fused = _rates.mlp_rates(metric, c, w, V)
    assert fused is not None
    for a, b in zip(fused, _rates.flat_rates(metric, c, w, V)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("layers", ["no output bias", "hidden layer without activation", "single layer"])
@pytest.mark.parametrize("with_V", [False, True])
def test_fused_mlp_rates_output_layer_layouts(layers, with_V):
    """The output layer's value, tangents and second tangents go through one GEMM and G | rhs come out of one product
    where both kinds of rows exist; the other layouts (no second tangents, no hidden layer, no bias) agree too."""
    torch.manual_seed(5)
    decoder = {"no output bias": torch.nn.Sequential(torch.nn.Linear(3, 12), torch.nn.Tanh(),
                                                     torch.nn.Linear(12, 20, bias=False)),
               "hidden layer without activation": torch.nn.Sequential(torch.nn.Linear(3, 12), torch.nn.Linear(12, 20)),
               "single layer": torch.nn.Sequential(torch.nn.Linear(3, 20))}[layers].double()
    metric = pygeo.PullbackMetric(decoder, likelihood="bernoulli")
    generator = torch.Generator().manual_seed(17)
    c, w, V = (torch.randn(6, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    V = V if with_V else None
    fused = _rates.mlp_rates(metric, c, w, V)
    assert fused is not None and (fused[1] is None) == (V is None)
    for a, b in zip(fused, _rates.flat_rates(metric, c, w, V)):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("likelihood", ["euclidean", "bernoulli"])
def test_mlp_pullback_transport_preserves_inner_products(dtype, likelihood):
    metric = mlp_metric(dtype, likelihood)
    generator = torch.Generator().manual_seed(15)
    z0, z1, u, w = (torch.randn(5, 3, generator=generator, dtype=torch.float64).to(dtype) for _ in range(4))
    velocity = pygeo.log_map(metric, z0, z1)
    Pu = pygeo.parallel_transport(metric, z0, z1, u, velocity=velocity)
    Pw = pygeo.parallel_transport(metric, z0, z1, w, velocity=velocity)
    rtol = 1e-7 if dtype == torch.float64 else 2e-3
    torch.testing.assert_close(inner(metric, z1, Pu, Pw), inner(metric, z0, u, w), rtol=rtol, atol=rtol)
    # the same G without flat coordinates (Christoffel symbols) transports alike
    generic = pygeo.parallel_transport(pygeo.FunctionMetric(metric.metric), z0, z1, u, velocity=velocity)
    torch.testing.assert_close(generic, Pu, rtol=10 * rtol, atol=10 * rtol)


def test_bad_input():
    metric = HalfPlane()
    z0 = torch.ones(3, 2, dtype=torch.float64)
    z1 = torch.ones(3, 2, dtype=torch.float64) * 1.5
    with pytest.raises(ValueError, match="v must have shape"):
        pygeo.parallel_transport(metric, z0, z1, torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="along must be curves"):
        pygeo.parallel_transport(metric, v=torch.ones(3, 2, dtype=torch.float64), along=z0[:, None])
    curve = torch.stack([z0, z1], 1)
    with pytest.raises(ValueError, match="z0 must be the first point"):
        pygeo.parallel_transport(metric, z1, None, torch.ones(3, 2, dtype=torch.float64), along=curve)
    with pytest.raises(ValueError, match="along is outside the metric's domain"):
        pygeo.parallel_transport(metric, v=torch.ones(3, 2, dtype=torch.float64), along=-curve)
    with pytest.raises(ValueError, match="needs z0, z1 and v"):
        pygeo.parallel_transport(metric, z0, z1)
    with pytest.raises(ValueError, match="velocity must have shape"):
        pygeo.parallel_transport(metric, z0, z1, z0, velocity=torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="v contains NaN"):
        pygeo.parallel_transport(metric, z0, z1, torch.full((3, 2), math.nan, dtype=torch.float64))
