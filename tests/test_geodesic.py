import math

import pytest
import torch

import pygeo

from geometry_metrics import (LinearEmbedding, SphereEmbedding, great_circle, half_plane, sphere_function_metric,
                              sphere_points, unit_sphere_point)


def pairs_on_sphere(n):
    generator = torch.Generator().manual_seed(3)
    return sphere_points(n, generator), sphere_points(n, generator)


@pytest.mark.parametrize("metric", [SphereEmbedding(), sphere_function_metric], ids=["flat-coordinates", "function"])
def test_energy_geodesics_on_sphere_are_great_circles(metric):
    z0, z1 = pairs_on_sphere(5)
    result = pygeo.geodesic(metric, z0, z1, n_points=16, method="energy")
    assert result.points.shape == (5, 16, 2) and result.converged.all()
    torch.testing.assert_close(result.points[:, 0], z0)
    torch.testing.assert_close(result.points[:, -1], z1)
    torch.testing.assert_close(result.length, great_circle(z0, z1), rtol=1e-3, atol=0)
    # Minimisers of the discrete energy have (nearly) constant speed, so E ~ L^2.
    torch.testing.assert_close(result.energy, result.length**2, rtol=1e-3, atol=0)
    # Every point lies on the great circle through the end points (its normal is orthogonal to them all).
    normal = torch.linalg.cross(unit_sphere_point(z0), unit_sphere_point(z1))
    normal = normal / normal.norm(dim=-1, keepdim=True)
    assert (unit_sphere_point(result.points) * normal[:, None]).sum(-1).abs().max() < 1e-3


def test_shooting_geodesics_on_sphere_are_great_circles():
    z0, z1 = pairs_on_sphere(4)
    result = pygeo.geodesic(sphere_function_metric, z0, z1, n_points=9, method="shooting")
    assert result.converged.all() and result.points.shape == (4, 9, 2)
    torch.testing.assert_close(result.length, great_circle(z0, z1), rtol=1e-5, atol=0)
    torch.testing.assert_close(result.points[:, -1], z1, rtol=0, atol=1e-5)


def half_plane_distance(z0, z1):
    return torch.arccosh(1 + (z0 - z1).pow(2).sum(-1) / (2 * z0[:, 1] * z1[:, 1]))


@pytest.mark.parametrize("method", ["energy", "shooting"])
def test_half_plane_geodesics_are_circle_arcs_on_the_x_axis(method):
    z0 = torch.tensor([[-1.0, 0.5], [0.0, 1.0], [0.3, 0.4]], dtype=torch.float64)
    z1 = torch.tensor([[1.0, 0.7], [0.5, 2.0], [1.2, 1.0]], dtype=torch.float64)
    result = pygeo.geodesic(half_plane, z0, z1, n_points=24, method=method)
    assert result.converged.all()
    rtol = 2e-3 if method == "energy" else 1e-6
    torch.testing.assert_close(result.length, half_plane_distance(z0, z1), rtol=rtol, atol=0)
    centre = (z1.pow(2).sum(-1) - z0.pow(2).sum(-1)) / (2 * (z1[:, 0] - z0[:, 0]))
    radius = torch.stack([z0[:, 0] - centre, z0[:, 1]], -1).norm(dim=-1)
    from_centre = torch.stack([result.points[..., 0] - centre[:, None], result.points[..., 1]], -1).norm(dim=-1)
    assert ((from_centre - radius[:, None]).abs() / radius[:, None]).max() < (2e-3 if method == "energy" else 1e-4)


def test_shooting_agrees_with_the_energy_method_where_a_straight_start_overshoots():
    """In the half-plane the straight-line velocity z1 - z0 overshoots far (hyperbolic distances grow like log); the
    shooting method starts from a coarse minimum-energy curve instead and lands on the closed-form distance."""
    z0 = torch.tensor([[-2.0, 0.5], [-1.0, 0.2], [0.0, 0.1]], dtype=torch.float64)
    z1 = torch.tensor([[2.0, 0.5], [1.0, 0.2], [0.0, 10.0]], dtype=torch.float64)
    shot = pygeo.geodesic(half_plane, z0, z1, n_points=9, method="shooting")
    assert shot.converged.all()
    torch.testing.assert_close(shot.length, half_plane_distance(z0, z1), rtol=1e-4, atol=0)  # RK4, 32 steps
    assert torch.equal(shot.points[:, -1], z1) and torch.equal(shot.points[:, 0], z0)


def test_shooting_trials_that_leave_the_metrics_domain_are_failed_trials_not_errors():
    """G = I / y^2 in float32 overflows on paths that dip toward y = 0, and a tanh decoder's metric degenerates far
    out: Newton trials that go there are rejected per pair; the batch still solves, or flags, every pair."""
    result = pygeo.geodesic(half_plane, torch.tensor([[-1.0, 0.5]]), torch.tensor([[1.0, 0.7]]), method="shooting")
    assert result.converged.all()
    torch.testing.assert_close(result.length, half_plane_distance(torch.tensor([[-1.0, 0.5]]), torch.tensor([[1.0, 0.7]])),
                               rtol=1e-4, atol=0)
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    z0 = torch.zeros(2, 2, dtype=torch.float64)
    z1 = torch.tensor([[0.3, 0.2], [6.0, -5.0]], dtype=torch.float64)
    shot = pygeo.geodesic(pygeo.PullbackMetric(decoder), z0, z1, n_points=9, method="shooting", max_iter=20)
    assert shot.converged[0] and bool(torch.isfinite(shot.length).all())
    energy = pygeo.geodesic(pygeo.PullbackMetric(decoder), z0[:1], z1[:1], n_points=33)
    torch.testing.assert_close(shot.length[:1], energy.length, rtol=1e-3, atol=0)


def test_float32_shooting_lands_on_the_end_point():
    z0, z1 = pairs_on_sphere(4)
    result = pygeo.geodesic(sphere_function_metric, z0.float(), z1.float(), n_points=9, method="shooting")
    assert result.converged.all() and torch.equal(result.points[:, -1], z1.float())
    torch.testing.assert_close(result.length, great_circle(z0, z1).float(), rtol=1e-4, atol=0)


def test_empty_batches():
    z = torch.ones(0, 2, dtype=torch.float64)
    result = pygeo.geodesic(half_plane, z, z, n_points=5)
    assert result.points.shape == (0, 5, 2) and result.converged.shape == (0,)
    assert pygeo.geodesic_distances(half_plane, z, progress=False).shape == (0, 0)


def test_linear_map_geodesics_are_straight_and_evenly_spaced():
    torch.manual_seed(1)
    metric = LinearEmbedding(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64))
    z0, z1 = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    # Start from a bent curve so the solver has something to do.
    weights = torch.linspace(0, 1, 10, dtype=torch.float64)[:, None]
    init = z0[:, None] * (1 - weights) + z1[:, None] * weights + 0.3 * torch.sin(math.pi * weights)
    result = pygeo.geodesic(metric, z0, z1, n_points=10, init=init)
    assert result.converged.all()
    torch.testing.assert_close(result.points, z0[:, None] * (1 - weights) + z1[:, None] * weights, rtol=0, atol=1e-5)
    expected = ((z1 - z0) @ metric.A.T).norm(dim=-1)
    torch.testing.assert_close(result.length, expected)


def test_exp_map_of_a_solved_geodesics_initial_velocity_lands_on_its_end_point():
    z0, z1 = pairs_on_sphere(3)
    result = pygeo.geodesic(SphereEmbedding(), z0, z1, n_points=33)
    assert result.converged.all()
    step = 1.0 / 32
    velocity = (-3 * result.points[:, 0] + 4 * result.points[:, 1] - result.points[:, 2]) / (2 * step)
    landed = pygeo.exp_map(SphereEmbedding(), z0, velocity)
    assert (landed - z1).norm(dim=-1).max() < 1e-2 * (z1 - z0).norm(dim=-1).min()


@pytest.mark.parametrize("likelihood, sigma, activation", [
    ("euclidean", None, torch.nn.Softplus), ("gaussian", 0.3, torch.nn.Tanh), ("gaussian", "vector", torch.nn.SiLU),
    ("bernoulli", None, torch.nn.ELU)])  # bernoulli: no fused path, the jvp-of-jvp route
def test_mlp_geodesic_acceleration_equals_the_christoffel_route(likelihood, sigma, activation):
    """exp_map's right-hand side for MLP decoders (tangents through the layers as GEMMs) against -Gamma[v, v] from the
    Christoffel symbols, float64."""
    from pygeo.geometry.geodesic import _flat_acceleration

    torch.manual_seed(2)
    decoder = torch.nn.Sequential(torch.nn.Linear(3, 7), activation(), torch.nn.Linear(7, 9), activation(),
                                  torch.nn.Linear(9, 20)).double()
    if sigma == "vector":
        sigma = torch.rand(20, dtype=torch.float64) + 0.5
    metric = pygeo.PullbackMetric(decoder, likelihood, sigma=sigma)
    z, v = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    expected = -torch.einsum("...kij,...i,...j->...k", pygeo.christoffel(metric, z), v, v)
    torch.testing.assert_close(_flat_acceleration(metric, z, v), expected, rtol=1e-9, atol=1e-11)
    fused = metric._fused_geodesic_acceleration(z.reshape(-1, 3), v.reshape(-1, 3))
    assert (fused is None) == (likelihood == "bernoulli")


def test_exp_map_on_sphere_matches_closed_form():
    # From a point on the equator heading along it, time-1 flow covers an angle |v| (in phi, for r-independent coords).
    z = torch.tensor([[math.pi / 2, 0.3]], dtype=torch.float64)
    v = torch.tensor([[0.0, 1.1]], dtype=torch.float64)
    torch.testing.assert_close(pygeo.exp_map(sphere_function_metric, z, v), torch.tensor([[math.pi / 2, 1.4]], dtype=torch.float64))
    # Heading north-east: the end point lies at great-circle distance |v|_G from the start.
    z = sphere_points(4)
    v = torch.randn(4, 2, dtype=torch.float64) * 0.4
    end = pygeo.exp_map(sphere_function_metric, z, v, n_steps=64)
    torch.testing.assert_close(great_circle(z, end), sphere_function_metric.norm(z, v), rtol=1e-6, atol=0)


def test_non_converged_pairs_are_reported_and_converged_pairs_stop_early():
    z0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    z1 = torch.tensor([[1.0, 0.0], [2.0, 1.5]], dtype=torch.float64)  # a trivial pair and a real one
    hurried = pygeo.geodesic(sphere_function_metric, z0, z1, n_points=16, max_iter=2)
    assert hurried.converged.tolist() == [True, False]
    assert hurried.iterations[0] == 0 and hurried.iterations[1] == 2
    patient = pygeo.geodesic(sphere_function_metric, z0, z1, n_points=16)
    assert patient.converged.all() and patient.length[0] == 0
    shot = pygeo.geodesic(sphere_function_metric, z0[1:], z1[1:], method="shooting", max_iter=0)
    assert not shot.converged.any()


def test_float32_geodesic():
    z0, z1 = pairs_on_sphere(3)
    result = pygeo.geodesic(SphereEmbedding(), z0.float(), z1.float(), n_points=12)
    assert result.points.dtype == torch.float32 and result.converged.all()
    torch.testing.assert_close(result.length, great_circle(z0, z1).float(), rtol=5e-3, atol=0)


def test_geodesic_distances_on_sphere():
    x = sphere_points(6, torch.Generator().manual_seed(5))
    D = pygeo.geodesic_distances(sphere_function_metric, x, n_points=16, progress=False)
    expected = great_circle(x[:, None], x[None, :])
    assert D.shape == (6, 6)
    assert torch.equal(D, D.T) and torch.equal(D.diagonal(), torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(D, expected, rtol=2e-3, atol=1e-6)
    y = sphere_points(2, torch.Generator().manual_seed(6))
    D_xy = pygeo.geodesic_distances(SphereEmbedding(), x, y, n_points=16, chunk_size=5, progress=False)
    assert D_xy.shape == (6, 2)
    torch.testing.assert_close(D_xy, great_circle(x[:, None], y[None, :]), rtol=2e-3, atol=1e-6)


def test_geodesic_distances_warns_about_non_converged_pairs():
    x = sphere_points(3, torch.Generator().manual_seed(7))
    with pytest.warns(UserWarning, match="did not converge"):
        pygeo.geodesic_distances(sphere_function_metric, x, max_iter=1, progress=False)


@pytest.mark.parametrize("bad, message", [
    (lambda: pygeo.geodesic(half_plane, torch.ones(3, 2), torch.ones(2, 2)), "z0 and z1 must have the same shape"),
    (lambda: pygeo.geodesic(half_plane, torch.ones(3, 2), torch.ones(3, 2), n_points=1), "n_points must be"),
    (lambda: pygeo.geodesic(half_plane, torch.ones(3, 2), torch.ones(3, 2), method="nope"), "method must be"),
    (lambda: pygeo.geodesic(half_plane, torch.ones(3, 2), torch.ones(3, 2), n_points=4, init=torch.ones(3, 5, 2)),
     r"init must have shape \[B, n_points, d\]"),
    (lambda: pygeo.geodesic(half_plane, torch.ones(3, 2), torch.ones(3, 2, dtype=torch.float64)), "same dtype"),
    (lambda: pygeo.geodesic("metric", torch.ones(3, 2), torch.ones(3, 2)), "metric must follow"),
    (lambda: pygeo.exp_map(half_plane, torch.ones(3, 2), torch.ones(3, 3)), "v must have the shape of z"),
    (lambda: pygeo.geodesic_distances(half_plane, torch.ones(3, 2), torch.ones(3, 3)), r"y must have shape \[M, d\]"),
    (lambda: pygeo.geodesic_distances(half_plane, torch.ones(3)), "x must have at least 2 dimensions"),
    (lambda: pygeo.geodesic_distances(half_plane, torch.ones(3, 2), chunk_size=0), "chunk_size must be"),
    (lambda: pygeo.exp_map(half_plane, torch.ones(3, 2), torch.ones(3, 2, dtype=torch.float64)), "same dtype"),
    (lambda: pygeo.sectional_curvature(half_plane, torch.ones(3, 2), torch.ones(3, 2, dtype=torch.float64),
                                       torch.ones(3, 2)), "same dtype"),
    (lambda: pygeo.geodesic(half_plane, torch.ones(3, 2), torch.ones(3, 2), tol=-1.0), "tol must be"),
])
def test_geodesic_bad_input(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        bad()


def test_exp_map_accepts_expanded_views():
    """One start point expanded over a batch (z0.expand(B, d)) is an aliased view: the result equals a real copy's."""
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Softplus(), torch.nn.Linear(16, 5)).double()
    metric = pygeo.PullbackMetric(decoder, likelihood="bernoulli")
    z0 = torch.tensor([0.3, -0.2], dtype=torch.float64)
    v = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expanded = pygeo.exp_map(metric, z0.expand(5, 2), v)
    copied = pygeo.exp_map(metric, z0.repeat(5, 1), v)
    torch.testing.assert_close(expanded, copied)
