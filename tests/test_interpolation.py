import math

import pytest
import torch

import pygeo
from pygeo.geometry import conformal_interpolation


def half_plane_conformal_metric():
    """G = y I in 2-D: det G = y^2, so the conformal metric det(G)^-1 I = I / y^2 is the Poincare half-plane."""
    return pygeo.FunctionMetric(lambda z: z[..., 1:2, None] * torch.eye(2, dtype=z.dtype))


def test_flat_metric_keeps_the_straight_line():
    flat = pygeo.FunctionMetric(lambda z: torch.ones_like(z[..., :1, None]) * torch.eye(2, dtype=z.dtype))
    z0 = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    z1 = torch.tensor([[3.0, 4.0], [-1.0, 2.0]], dtype=torch.float64)
    result = conformal_interpolation(flat, z0, z1, n_points=9, n_iter=50, progress=False)
    assert result.points.shape == (2, 9, 2)
    torch.testing.assert_close(result.length, torch.tensor([5.0, 2.0], dtype=torch.float64))
    line = z0[:, None] + torch.linspace(0, 1, 9, dtype=torch.float64)[None, :, None] * (z1 - z0)[:, None]
    torch.testing.assert_close(result.points, line, atol=1e-6, rtol=0)


def test_half_plane_geodesic_is_the_semicircle():
    z0 = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    z1 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    result = conformal_interpolation(half_plane_conformal_metric(), z0, z1, n_points=17, n_iter=150, lr=0.03,
                                     progress=False)
    exact = math.acosh(1 + 4 / 2)  # hyperbolic distance, 1.7627; the straight segment has length 2
    assert result.straight_length == pytest.approx(2.0, rel=1e-3)
    assert result.length == pytest.approx(exact, rel=5e-3)
    # the geodesic is the arc of the circle centred at the origin with radius sqrt(2)
    radii = result.points.norm(dim=-1)
    torch.testing.assert_close(radii, torch.full_like(radii, math.sqrt(2)), atol=2e-2, rtol=0)
    torch.testing.assert_close(result.points[0], z0)
    torch.testing.assert_close(result.points[-1], z1)


def test_latent_metric_interpolation_is_shorter_than_the_line():
    g = torch.Generator().manual_seed(0)
    centroids = torch.cat([torch.randn(20, 2, generator=g) * 0.3 + torch.tensor([2.0, 0.0]),
                           torch.randn(20, 2, generator=g) * 0.3 + torch.tensor([-2.0, 0.0]),
                           torch.randn(20, 2, generator=g) * 0.3 + torch.tensor([0.0, 2.0])]).double()
    metric = pygeo.LatentMetric(centroids, torch.full((60, 2), 4.0, dtype=torch.float64), lam=1e-3, tau=0.1)
    z0 = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    z1 = torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    result = conformal_interpolation(metric, z0, z1, n_points=16, n_iter=80, progress=False)
    assert (result.length < 0.9 * result.straight_length).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(z0=torch.zeros(2), z1=torch.zeros(3)), "z0 and z1 must both have shape"),
    (dict(z0=torch.zeros(2), z1=torch.ones(2), n_points=2), "n_points must be"),
    (dict(z0=torch.zeros(2), z1=torch.full((2,), float("nan"))), "z1 contains NaN"),
])
def test_interpolation_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        conformal_interpolation(half_plane_conformal_metric(), progress=False, **kwargs)


def test_the_returned_curve_is_the_best_one_found():
    """With a step so large that Adam overshoots, the result is still each pair's lowest-energy curve seen, never
    worse than the straight line it starts from."""
    from pygeo.geometry.interpolation import _log_segment_terms

    generator = torch.Generator().manual_seed(0)
    metric = pygeo.LatentMetric(torch.randn(8, 2, generator=generator, dtype=torch.float64),
                                torch.rand(8, 2, generator=generator, dtype=torch.float64) + 0.5, lam=0.01, tau=0.05)
    z0 = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    z1 = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    result = conformal_interpolation(metric, z0, z1, n_points=9, n_iter=15, lr=3.0, progress=False)
    t = torch.linspace(0, 1, 9, dtype=torch.float64)[None, :, None]
    straight = z0[:, None] + t * (z1 - z0)[:, None]

    def log_energy(points):
        return torch.logsumexp(2 * _log_segment_terms(metric, points), -1)

    assert bool((log_energy(result.points) <= log_energy(straight) + 1e-12).all())
