import pytest
import torch

import pygeo
from pygeo.metrics import Metric

from conftest import backend_params
from geometry_metrics import LinearEmbedding, RADIUS, SphereEmbedding, half_plane, sphere_function_metric, sphere_points

BACKENDS = backend_params()


@pytest.mark.parametrize("metric, method", [(SphereEmbedding(), "gauss"), (SphereEmbedding(), "christoffel"),
                                            (sphere_function_metric, "auto")])
def test_sphere_has_curvature_one_over_r_squared(metric, method):
    z = sphere_points(7)
    curv = pygeo.curvature(metric, z, method=method)
    assert curv.riemann.shape == (7, 2, 2, 2, 2) and curv.ricci.shape == (7, 2, 2) and curv.scalar.shape == (7,)
    torch.testing.assert_close(curv.scalar / 2, torch.full((7,), 1 / RADIUS**2, dtype=torch.float64))
    # Constant curvature K: R[l,i,j,k] = K (delta[l,j] G[i,k] - delta[l,k] G[i,j]), Ric = K G (d = 2).
    G = curv.metric
    eye = torch.eye(2, dtype=torch.float64)
    expected = (torch.einsum("lj,bik->blijk", eye, G) - torch.einsum("lk,bij->blijk", eye, G)) / RADIUS**2
    torch.testing.assert_close(curv.riemann, expected)
    torch.testing.assert_close(curv.ricci, G / RADIUS**2)


def test_half_plane_has_curvature_minus_one():
    z = torch.rand(5, 2, dtype=torch.float64) * torch.tensor([4.0, 2.0], dtype=torch.float64) + torch.tensor([-2.0, 0.2], dtype=torch.float64)
    curv = pygeo.curvature(half_plane, z)
    torch.testing.assert_close(curv.scalar / 2, torch.full((5,), -1.0, dtype=torch.float64))
    u, v = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(pygeo.sectional_curvature(half_plane, z, u, v), torch.full((5,), -1.0, dtype=torch.float64))


def test_linear_map_is_flat():
    A, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    z = torch.randn(4, 3, dtype=torch.float64)
    for method in ("gauss", "christoffel"):
        curv = pygeo.curvature(LinearEmbedding(A, b), z, method=method)
        assert curv.riemann.abs().max() < 1e-10 and curv.scalar.abs().max() < 1e-10
    torch.testing.assert_close(pygeo.christoffel(LinearEmbedding(A, b), z), torch.zeros(4, 3, 3, 3, dtype=torch.float64))


class WarpedEmbedding(Metric):
    """A curved 3-D surface in R^5 with non-constant curvature: checks the two routes agree in d = 3."""

    has_flat_coordinates = True

    def flat_coordinates(self, z):
        x, y, w = z[..., 0], z[..., 1], z[..., 2]
        return torch.stack([x, y, w, torch.sin(x * y) + w**2, torch.tanh(x + 2 * w) * y], -1)

    def metric(self, z):
        J = torch.func.vmap(torch.func.jacfwd(self.flat_coordinates))(z.reshape(-1, 3))
        return (J.transpose(-1, -2) @ J).reshape(*z.shape[:-1], 3, 3)


def test_gauss_route_equals_christoffel_route():
    metric = WarpedEmbedding()
    z = torch.randn(2, 3, 3, dtype=torch.float64) * 0.7
    gauss = pygeo.curvature(metric, z, method="gauss")
    second = pygeo.curvature(metric, z, method="christoffel")
    assert gauss.riemann.shape == (2, 3, 3, 3, 3, 3)
    assert gauss.scalar.abs().max() > 0.1  # genuinely curved
    torch.testing.assert_close(gauss.riemann, second.riemann)
    torch.testing.assert_close(gauss.scalar, second.scalar)
    # Symmetries of the lowered tensor: antisymmetric in (l, i) and (j, k), pair-symmetric, first Bianchi identity.
    R = gauss.riemann_lowered
    torch.testing.assert_close(R, -R.transpose(-4, -3))
    torch.testing.assert_close(R, -R.transpose(-2, -1))
    torch.testing.assert_close(R, torch.einsum("...lijk->...jkli", R))
    bianchi = R + torch.einsum("...lijk->...ljki", R) + torch.einsum("...lijk->...lkij", R)
    assert bianchi.abs().max() < 1e-10


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_christoffel_of_sphere_closed_form(backend_device):
    backend, device = backend_device
    z = sphere_points(6)
    Gamma = pygeo.christoffel(sphere_function_metric, z.to(device), backend=backend).cpu()
    theta = z[:, 0]
    expected = torch.zeros(6, 2, 2, 2, dtype=torch.float64)
    expected[:, 0, 1, 1] = -theta.sin() * theta.cos()  # Gamma^theta_{phi phi}
    expected[:, 1, 0, 1] = expected[:, 1, 1, 0] = theta.cos() / theta.sin()  # Gamma^phi_{theta phi}
    torch.testing.assert_close(Gamma, expected)
    torch.testing.assert_close(Gamma, Gamma.transpose(-1, -2))


def test_sectional_curvature_of_sphere_and_batch_shape():
    z = sphere_points(6).reshape(2, 3, 2)
    u, v = torch.randn(2, 3, 2, dtype=torch.float64), torch.randn(2, 3, 2, dtype=torch.float64)
    K = pygeo.sectional_curvature(SphereEmbedding(), z, u, v)
    torch.testing.assert_close(K, torch.full((2, 3), 1 / RADIUS**2, dtype=torch.float64))


def test_curvature_bad_inputs():
    z = sphere_points(3)
    with pytest.raises(ValueError, match="method='gauss' needs a metric with has_flat_coordinates"):
        pygeo.curvature(sphere_function_metric, z, method="gauss")
    with pytest.raises(ValueError, match="method must be"):
        pygeo.curvature(sphere_function_metric, z, method="nope")
    with pytest.raises(ValueError, match="u and v must span a plane"):
        pygeo.sectional_curvature(sphere_function_metric, z, z, 2 * z)
    with pytest.raises(ValueError, match="u must have the shape of z"):
        pygeo.sectional_curvature(sphere_function_metric, z, z[:2], z)
    with pytest.raises(TypeError, match="metric must follow the pygeo metric contract"):
        pygeo.curvature(lambda z: z, z)
    with pytest.raises(ValueError, match="z contains NaN"):
        pygeo.christoffel(sphere_function_metric, torch.full((2, 2), float("nan"), dtype=torch.float64))


def test_curvature_through_a_kernel_backed_metric_is_not_silently_flat():
    # A metric computed by pygeo's own custom op: forward mode through it gives zeros, which must not be mistaken for
    # a flat metric. The half-plane metric I / y^2 written as jtj of a [1, 2] Jacobian row per axis has K = -1.
    def half_plane_by_kernel(z):
        scale = (1.0 / z[..., 1])[..., None, None] * torch.eye(2, dtype=z.dtype)
        return pygeo.ops.jtj(scale)

    z = torch.tensor([[0.3, 0.7], [-1.0, 1.5]], dtype=torch.float64)
    curv = pygeo.curvature(pygeo.FunctionMetric(half_plane_by_kernel), z, method="christoffel")
    torch.testing.assert_close(curv.scalar / 2, torch.full((2,), -1.0, dtype=torch.float64))
