"""Closed-form test metrics shared by the geometry tests: sphere of radius r (as a FunctionMetric and as a
flat-coordinates embedding), the Poincare half-plane, and a linear map."""
import torch

import pygeo
from pygeo.metrics import Metric

RADIUS = 2.0


def sphere_G(z, r=RADIUS):
    theta = z[..., 0]
    return torch.diag_embed(torch.stack([torch.full_like(theta, r * r), r * r * theta.sin() ** 2], -1))


def unit_sphere_point(z):
    theta, phi = z[..., 0], z[..., 1]
    return torch.stack([theta.sin() * phi.cos(), theta.sin() * phi.sin(), theta.cos()], -1)


class SphereEmbedding(Metric):
    """Spherical coordinates (theta, phi) -> the sphere of radius r in R^3, by the flat-coordinates contract."""

    has_flat_coordinates = True

    def __init__(self, r=RADIUS):
        self.r = r

    def flat_coordinates(self, z):
        return self.r * unit_sphere_point(z)

    def metric(self, z):
        return sphere_G(z, self.r)


class LinearEmbedding(Metric):
    """z -> A z + b: flat, K = 0, straight geodesics."""

    has_flat_coordinates = True

    def __init__(self, A, b):
        self.A, self.b = A, b

    def flat_coordinates(self, z):
        return z @ self.A.T + self.b

    def metric(self, z):
        d = self.A.shape[1]
        return (self.A.T @ self.A).expand(*z.shape[:-1], d, d).clone()


def great_circle(z0, z1, r=RADIUS):
    cosine = (unit_sphere_point(z0) * unit_sphere_point(z1)).sum(-1).clamp(-1, 1)
    return r * torch.arccos(cosine)


sphere_function_metric = pygeo.FunctionMetric(sphere_G)
half_plane = pygeo.FunctionMetric(lambda z: torch.eye(z.shape[-1], dtype=z.dtype) / z[..., 1, None, None] ** 2)


def sphere_points(n, generator=None):
    """Points away from the poles (theta in [0.7, 2.4]), phi in [0, 2)."""
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    return torch.stack([0.7 + 1.7 * u[:, 0], 2.0 * u[:, 1]], -1)
