"""pygeo.log_map against closed forms (the unit sphere through the inverse stereographic chart, the Poincare
half-plane), against exp_map (accurate to the integrator) and geodesic_distances, on pullbacks of MLP decoders and on
Christoffel-route metrics; float32 and float64; bad input."""
import math

import pytest
import torch

import pygeo
from pygeo.geometry.logmap import LogMapResult

# ------------------------------------------------------------------------------------------ closed-form metrics


def stereographic(z):
    """Inverse stereographic chart R^2 -> unit sphere in R^3 (from the north pole): a callable decoder (written with
    stack, not cat: forward-over-forward AD through cat decomposes into slow reference ops)."""
    x, y = z[..., 0], z[..., 1]
    s = x * x + y * y
    inverse = 1 / (s + 1)
    return torch.stack([2 * x * inverse, 2 * y * inverse, (s - 1) * inverse], -1)


def sphere_chart_metric():
    return pygeo.PullbackMetric(stereographic)  # G = 4 / (1 + |z|^2)^2 I, a flat-coordinates metric


def sphere_chart_G(z):
    s = (z * z).sum(-1)
    return (4 / (1 + s) ** 2)[..., None, None] * torch.eye(2, dtype=z.dtype)


class HalfPlane(pygeo.FunctionMetric):
    """G = I / y^2 on y > 0, with in_domain (the contract's way to tell where a metric is defined)."""

    def __init__(self):
        super().__init__(lambda z: torch.eye(2, dtype=z.dtype) / z[..., 1, None, None] ** 2, dim=2)

    def in_domain(self, z):
        return z[..., 1] > 0


def sphere_distance(z0, z1):
    return torch.arccos((stereographic(z0) * stereographic(z1)).sum(-1).clamp(-1, 1))


def sphere_log_closed_form(z0, z1):
    """log map in the chart: the embedded log theta (q - cos theta p) / sin theta, pulled back by J^+ = G^-1 J^T."""
    p, q = stereographic(z0), stereographic(z1)
    cosine = (p * q).sum(-1, keepdim=True).clamp(-1, 1)
    theta = torch.arccos(cosine)
    u = theta * (q - cosine * p) / torch.sin(theta)
    J = torch.func.vmap(torch.func.jacfwd(stereographic))(z0)  # [B, 3, 2]
    G = J.transpose(-1, -2) @ J
    return torch.linalg.solve(G, (J.transpose(-1, -2) @ u.unsqueeze(-1))).squeeze(-1)


def half_plane_distance(z0, z1):
    return torch.arccosh(1 + ((z0 - z1) ** 2).sum(-1) / (2 * z0[..., 1] * z1[..., 1]))


def disk_points(n, generator, radius=0.7):
    """Uniform in the disk |z| < radius of the chart (within the southern hemisphere, where 32 RK4 steps
    are accurate to ~1e-6: the chart's metric varies fast towards the north pole)."""
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    angle = 2 * math.pi * u[:, 0]
    return radius * u[:, 1].sqrt()[:, None] * torch.stack([angle.cos(), angle.sin()], -1)


def sphere_pairs(n, dtype, generator):
    return disk_points(n, generator).to(dtype), disk_points(n, generator).to(dtype)


def half_plane_pairs(n, dtype, generator):
    x = torch.rand(n, 2, generator=generator, dtype=torch.float64) * torch.tensor([3.0, 2.0]) + torch.tensor([-1.5, 0.3])
    y = torch.rand(n, 2, generator=generator, dtype=torch.float64) * torch.tensor([3.0, 2.0]) + torch.tensor([-1.5, 0.3])
    return x.to(dtype), y.to(dtype)


def mlp_metric(dtype, likelihood="euclidean", sigma=None, d=3, seed=0):
    torch.manual_seed(seed)
    decoder = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.Softplus(), torch.nn.Linear(16, 24)).to(dtype)
    return pygeo.PullbackMetric(decoder, likelihood=likelihood, sigma=sigma)


# ------------------------------------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sphere_chart_log_map_matches_the_closed_form(dtype):
    generator = torch.Generator().manual_seed(1)
    z0, z1 = sphere_pairs(5, dtype, generator)
    result = pygeo.log_map(sphere_chart_metric(), z0, z1, return_result=True)
    assert isinstance(result, LogMapResult) and bool(result.converged.all())
    expected = sphere_log_closed_form(z0.double(), z1.double())
    rtol = 1e-6 if dtype == torch.float64 else 2e-3
    torch.testing.assert_close(result.v.double(), expected, rtol=rtol, atol=rtol)
    torch.testing.assert_close(result.distance.double(), sphere_distance(z0.double(), z1.double()), rtol=rtol,
                               atol=rtol)
    assert result.v.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_half_plane_log_map_lands_on_the_target_and_has_the_hyperbolic_length(dtype):
    generator = torch.Generator().manual_seed(2)
    z0, z1 = half_plane_pairs(9, dtype, generator)
    metric = HalfPlane()
    v = pygeo.log_map(metric, z0, z1)
    assert v.shape == (9, 2) and v.dtype == dtype
    end = pygeo.exp_map(metric, z0, v)
    miss = ((end - z1).norm(dim=-1) / (z1 - z0).norm(dim=-1)).max()
    assert miss < (1e-6 if dtype == torch.float64 else 1e-3)
    length = metric.norm(z0, v)
    rtol = 1e-6 if dtype == torch.float64 else 1e-3  # v is exact for the integrator, whose own error is ~1e-7 here
    torch.testing.assert_close(length.double(), half_plane_distance(z0.double(), z1.double()), rtol=rtol, atol=rtol)


def test_log_map_is_accurate_to_the_integrator_not_the_curve():
    """With a coarse energy curve (3 points) Newton still lands on z1 to 1e-9; the curve's own velocity is ~1% off."""
    generator = torch.Generator().manual_seed(3)
    z0, z1 = half_plane_pairs(5, torch.float64, generator)
    metric = HalfPlane()
    result = pygeo.log_map(metric, z0, z1, n_points=3, return_result=True)
    assert bool(result.converged.all())
    end = pygeo.exp_map(metric, z0, result.v)
    assert float(((end - z1).norm(dim=-1) / (z1 - z0).norm(dim=-1)).max()) < 1e-9
    coarse = pygeo.log_map(metric, z0, z1, n_points=3, max_iter=0, return_result=True)  # the curve's velocity only
    assert float(coarse.residual.max()) > 1e3 * float(result.residual.max())
    torch.testing.assert_close(result.residual, (end - z1).norm(dim=-1), rtol=0, atol=1e-12)
    # the integrated curve ends at exp_map(z0, v)
    torch.testing.assert_close(result.points[:, -1], end, rtol=0, atol=1e-12)
    torch.testing.assert_close(result.points[:, 0], z0, rtol=0, atol=0)


def test_one_base_point_for_many_targets_and_single_pairs():
    generator = torch.Generator().manual_seed(4)
    metric = sphere_chart_metric()
    base = torch.tensor([0.2, -0.3], dtype=torch.float64)
    targets = disk_points(6, generator)
    many = pygeo.log_map(metric, base, targets)
    assert many.shape == (6, 2)
    # to the integrator's accuracy (32 RK4 steps: ~1e-6 here)
    torch.testing.assert_close(many, sphere_log_closed_form(base.expand(6, 2), targets), rtol=2e-6, atol=2e-6)
    one = pygeo.log_map(metric, base, targets[2])
    assert one.shape == (2,)
    torch.testing.assert_close(one, many[2], rtol=1e-8, atol=1e-10)
    same = pygeo.log_map(metric, targets, targets)
    assert float(same.abs().max()) < 1e-10


def test_warm_start_from_earlier_curves():
    generator = torch.Generator().manual_seed(5)
    z0, z1 = half_plane_pairs(6, torch.float64, generator)
    metric = HalfPlane()
    first = pygeo.log_map(metric, z0, z1, return_result=True)
    again = pygeo.log_map(metric, z0, z1, init=first.points, return_result=True)
    assert bool(again.converged.all())
    torch.testing.assert_close(again.v, first.v, rtol=1e-8, atol=1e-10)
    assert int(again.iterations.sum()) <= int(first.iterations.sum())


# -------------------------------------------------------------------------------------------- decoder metrics
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("likelihood,sigma", [("euclidean", None), ("gaussian", 0.5), ("bernoulli", None)])
def test_mlp_pullback_log_map_inverts_exp_map_and_matches_the_distances(dtype, likelihood, sigma):
    metric = mlp_metric(dtype, likelihood, sigma)
    generator = torch.Generator().manual_seed(6)
    z0 = torch.randn(7, 3, generator=generator, dtype=torch.float64).to(dtype)
    z1 = torch.randn(7, 3, generator=generator, dtype=torch.float64).to(dtype)
    result = pygeo.log_map(metric, z0, z1, return_result=True)
    assert bool(result.converged.all())
    end = pygeo.exp_map(metric, z0, result.v)
    miss = float(((end - z1).norm(dim=-1) / (z1 - z0).norm(dim=-1)).max())
    assert miss < (1e-6 if dtype == torch.float64 else 1e-3)
    torch.testing.assert_close(result.distance, metric.norm(z0, result.v), rtol=1e-5, atol=1e-6)
    # geodesic_distances (13-point minimum-energy curves, extrapolated) agrees to its discretisation error
    distances = pygeo.geodesic_distances(metric, z0.double().to(dtype), z1, n_points=13, progress=False).diagonal()
    torch.testing.assert_close(result.distance.double(), distances.double(), rtol=2e-3, atol=1e-4)


def test_christoffel_route_agrees_with_the_flat_route():
    """The same G as a FunctionMetric (L-BFGS curves, Christoffel symbols) gives the same log map."""
    metric = mlp_metric(torch.float64, d=2)
    function_metric = pygeo.FunctionMetric(metric.metric)
    generator = torch.Generator().manual_seed(7)
    z0 = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    z1 = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    flat = pygeo.log_map(metric, z0, z1)
    generic = pygeo.log_map(function_metric, z0, z1)
    torch.testing.assert_close(flat, generic, rtol=1e-7, atol=1e-8)


def test_d1_and_odd_sizes():
    metric = pygeo.FunctionMetric(lambda z: (1 + z[..., :1, None] ** 2) * torch.ones(*z.shape, 1, dtype=z.dtype))
    z0 = torch.linspace(-1, 1, 7, dtype=torch.float64)[:, None]
    z1 = z0.flip(0) + 0.3
    v = pygeo.log_map(metric, z0, z1)
    # in 1-D the distance is |integral sqrt(1 + z^2) dz|
    def primitive(x):
        return 0.5 * (x * torch.sqrt(1 + x * x) + torch.asinh(x))
    expected = (primitive(z1) - primitive(z0)).abs().squeeze(-1)
    torch.testing.assert_close(metric.norm(z0, v), expected, rtol=1e-6, atol=1e-8)  # the integrator's accuracy
    assert bool((torch.sign(v) == torch.sign(z1 - z0)).all())


def test_non_converged_pairs_warn_and_are_reported():
    metric = HalfPlane()
    z0 = torch.tensor([[0.0, 0.1], [0.0, 1.0]], dtype=torch.float64)
    z1 = torch.tensor([[30.0, 0.1], [0.0, 1.0]], dtype=torch.float64)  # a far pair, and one that is done at once
    with pytest.warns(RuntimeWarning, match="1 of 2 pairs did not converge"):
        pygeo.log_map(metric, z0, z1, max_iter=1, energy_max_iter=0)
    result = pygeo.log_map(metric, z0, z1, max_iter=1, energy_max_iter=0, return_result=True)
    assert result.converged.tolist() == [False, True]


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("z0,z1,error,message", [
    (torch.zeros(3, 2, dtype=torch.float64) + 1, torch.ones(4, 2, dtype=torch.float64), ValueError, "same number"),
    (torch.ones(3, 2, dtype=torch.float64), torch.ones(3, 3, dtype=torch.float64), ValueError, "point dimension"),
    (torch.ones(3, 2), torch.ones(3, 2, dtype=torch.float64), TypeError, "dtype"),
    (torch.ones(3, 2, dtype=torch.int64), torch.ones(3, 2), TypeError, "z0"),
    (torch.ones(2, 3, 2, dtype=torch.float64), torch.ones(2, 3, 2, dtype=torch.float64), ValueError, r"\[B, d\]"),
    (torch.tensor([[0.0, math.nan]], dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64), ValueError, "z0"),
    (torch.tensor([[0.0, -1.0]], dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64), ValueError,
     "z0 is outside the metric's domain"),
    (torch.ones(1, 2, dtype=torch.float64), torch.tensor([[0.0, 0.0]], dtype=torch.float64), ValueError, "z1"),
])
def test_bad_input(z0, z1, error, message):
    with pytest.raises(error, match=message):
        pygeo.log_map(HalfPlane(), z0, z1)


def test_bad_input_without_in_domain_is_refused_through_the_metric():
    singular = pygeo.FunctionMetric(lambda z: torch.diag_embed(torch.stack([z[..., 0] * 0 + 1, z[..., 1]], -1)))
    with pytest.raises(ValueError, match="not positive definite.*z1"):
        pygeo.log_map(singular, torch.ones(2, 2, dtype=torch.float64),
                      torch.tensor([[1.0, 1.0], [1.0, -2.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="init must have shape"):
        pygeo.log_map(HalfPlane(), torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64),
                      init=torch.ones(2, 4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_points"):
        pygeo.log_map(HalfPlane(), torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64),
                      n_points=2)
    with pytest.raises(TypeError, match="metric contract"):
        pygeo.log_map(object(), torch.ones(2, 2), torch.ones(2, 2))
