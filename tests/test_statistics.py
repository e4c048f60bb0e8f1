"""pygeo.statistics: Frechet mean (against direct minimisation of closed-form squared distances), tangent PCA (points
on a great circle), wrapped normals; float32 and float64; bad input."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import pygeo
import pygeo.statistics as statistics
from geometry_metrics import LinearEmbedding
from test_log_map import HalfPlane, half_plane_distance, sphere_chart_metric, stereographic


def half_plane_points(n, generator):
    return torch.rand(n, 2, generator=generator, dtype=torch.float64) * torch.tensor([1.6, 1.0]) \
        + torch.tensor([-0.8, 0.5])


def minimise(objective, start):
    found = minimize(lambda m: float(objective(torch.tensor(m, dtype=torch.float64))), start.numpy(),
                     method="Nelder-Mead", options=dict(xatol=1e-11, fatol=1e-15, maxiter=20000))
    return torch.tensor(found.x, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weighted_frechet_mean_on_the_half_plane_minimises_the_closed_form_variance(dtype):
    generator = torch.Generator().manual_seed(21)
    x = half_plane_points(7, generator)
    weights = torch.rand(7, generator=generator, dtype=torch.float64) + 0.1
    weights[2] = 0.0  # a zero weight is allowed
    result = statistics.frechet_mean(HalfPlane(), x.to(dtype), weights=weights.to(dtype))
    assert result.converged and result.n_iter >= 1 and result.mean.shape == (2,) and result.mean.dtype == dtype

    def variance(m):
        return (weights * half_plane_distance(m[None], x) ** 2).sum() / weights.sum()

    expected = minimise(variance, (weights @ x) / weights.sum())
    tol = 1e-6 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(result.mean.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(result.variance.double(), variance(expected), rtol=tol, atol=tol)
    assert float(result.gradient_norm) <= (1e-7 if dtype == torch.float64 else 1e-3)
    assert result.log_maps.shape == (7, 2) and bool(result.log_maps_converged.all())


def test_karcher_flow_is_quasi_newton_on_widely_spread_points():
    """Points spread over several units of hyperbolic distance, where the plain Karcher step contracts slowly (the
    flow before the secant steps needed 27 iterations here): the secant (Broyden) steps reach tol = 1e-8 in a few,
    at the minimiser of the closed-form variance."""
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(12, 2, generator=generator, dtype=torch.float64) * torch.tensor([4.0, 2.0]) \
        + torch.tensor([-2.0, 0.2])
    result = statistics.frechet_mean(HalfPlane(), x)
    assert result.converged and result.n_iter <= 12

    def variance(m):
        return (half_plane_distance(m[None], x) ** 2).mean()

    expected = minimise(variance, x.mean(0))
    torch.testing.assert_close(result.mean, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_frechet_mean_reports_accurate_log_maps_and_an_honest_gradient(dtype):
    """The Karcher flow starts on inexact log maps (energy-curve velocities); what it reports, and the convergence
    test, are on log maps solved by shooting (to log_map's tolerance) at the returned mean."""
    generator = torch.Generator().manual_seed(26)
    x = half_plane_points(9, generator).to(dtype)
    metric = HalfPlane()
    result = statistics.frechet_mean(metric, x)
    assert result.converged and bool(result.log_maps_converged.all())
    fresh = pygeo.log_map(metric, result.mean, x, return_result=True)
    assert bool(fresh.converged.all())
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(result.log_maps, fresh.v, rtol=tol, atol=tol)
    G = metric.metric(result.mean[None])[0]
    gradient = fresh.v.double().mean(0)
    norm = float((gradient @ G.double() @ gradient).sqrt())
    variance = float(torch.einsum("ni,ij,nj->n", fresh.v.double(), G.double(), fresh.v.double()).mean())
    torch.testing.assert_close(result.variance.double(), torch.tensor(variance, dtype=torch.float64), rtol=tol,
                               atol=tol)
    criterion = (1e-8 if dtype == torch.float64 else 2e-3) * math.sqrt(variance)  # tol sqrt(2 F): variance = 2 F
    assert norm <= criterion * 1.01 + (1e-9 if dtype == torch.float64 else 1e-4)


def test_weighted_frechet_mean_on_the_sphere_chart():
    generator = torch.Generator().manual_seed(22)
    x = torch.randn(5, 2, generator=generator, dtype=torch.float64) * 0.4
    weights = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0], dtype=torch.float64)
    result = statistics.frechet_mean(sphere_chart_metric(), x, weights=weights)
    assert result.converged
    points = stereographic(x)

    def variance(m):
        cosine = (stereographic(m[None]) * points).sum(-1).clamp(-1, 1)
        return (weights * torch.arccos(cosine) ** 2).sum() / weights.sum()

    expected = minimise(variance, x.mean(0))
    torch.testing.assert_close(result.mean, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flat_metric_frechet_mean_is_the_weighted_average(dtype):
    generator = torch.Generator().manual_seed(23)
    A = torch.randn(5, 3, generator=generator, dtype=torch.float64).to(dtype)
    metric = LinearEmbedding(A, torch.zeros(5, dtype=dtype))
    x = torch.randn(11, 3, generator=generator, dtype=torch.float64).to(dtype)
    weights = torch.rand(11, generator=generator, dtype=torch.float64).to(dtype)
    result = statistics.frechet_mean(metric, x, weights=weights, init=x[0])
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(result.mean, (weights @ x) / weights.sum(), rtol=tol, atol=tol)
    assert result.converged and result.n_iter <= 2


def test_tangent_pca_of_points_on_a_great_circle():
    """The chart's unit circle |z| = 1 is the equator: the mean is the point at the mean angle, one component
    carries all the variance, along the circle."""
    generator = torch.Generator().manual_seed(24)
    angles = (torch.rand(6, generator=generator, dtype=torch.float64) - 0.5) * 1.2
    x = torch.stack([angles.cos(), angles.sin()], -1)
    metric = sphere_chart_metric()
    pca = statistics.tangent_pca(metric, x)
    mean_angle = angles.mean()
    torch.testing.assert_close(pca.mean, torch.stack([mean_angle.cos(), mean_angle.sin()]), rtol=1e-6, atol=1e-6)
    assert pca.components.shape == (2, 2) and pca.scores.shape == (6, 2) and pca.explained_variance.shape == (2,)
    G = metric.metric(pca.mean[None])[0]
    torch.testing.assert_close(pca.components @ G @ pca.components.T, torch.eye(2, dtype=torch.float64), rtol=1e-9,
                               atol=1e-9)
    torch.testing.assert_close(pca.explained_variance[0], ((angles - mean_angle) ** 2).mean(), rtol=1e-6, atol=1e-8)
    assert float(pca.explained_variance[1]) < 1e-10
    torch.testing.assert_close(pca.explained_variance_ratio[0], torch.tensor(1.0, dtype=torch.float64), rtol=1e-8,
                               atol=1e-8)
    tangent = torch.stack([-mean_angle.sin(), mean_angle.cos()])  # along the circle; G = I on it
    assert abs(float(pca.components[0] @ G @ tangent)) == pytest.approx(1.0, abs=1e-7)
    # the scores are the signed arc lengths from the mean
    torch.testing.assert_close(pca.scores[:, 0].abs(), (angles - mean_angle).abs(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tangent_pca_components_are_g_orthonormal_and_explain_the_scores(dtype):
    generator = torch.Generator().manual_seed(25)
    x = half_plane_points(8, generator).to(dtype)
    metric = HalfPlane()
    mean = torch.tensor([0.1, 0.9], dtype=dtype)
    pca = statistics.tangent_pca(metric, x, n_components=1, mean=mean)
    assert pca.components.shape == (1, 2) and pca.scores.shape == (8, 1)
    G = metric.metric(mean[None])[0]
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(pca.components @ G @ pca.components.T, torch.eye(1, dtype=dtype), rtol=tol, atol=tol)
    torch.testing.assert_close(pca.explained_variance, (pca.scores ** 2).mean(0), rtol=tol, atol=tol)
    logs = pygeo.log_map(metric, mean, x)
    torch.testing.assert_close(pca.log_maps, logs, rtol=tol, atol=tol)
    # no direction carries more variance than the first component
    angles = torch.linspace(0, math.pi, 50, dtype=dtype)
    directions = torch.stack([angles.cos(), angles.sin()], -1)
    directions = directions / torch.einsum("ki,ij,kj->k", directions, G, directions).sqrt()[:, None]
    variances = ((logs @ G @ directions.T) ** 2).mean(0)
    assert float(variances.max()) <= float(pca.explained_variance[0]) * (1 + 10 * tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_wrapped_normal_on_a_flat_metric_is_the_gaussian(dtype):
    generator = torch.Generator().manual_seed(26)
    A = torch.randn(4, 2, generator=generator, dtype=torch.float64).to(dtype)
    metric = LinearEmbedding(A, torch.zeros(4, dtype=dtype))
    mean = torch.tensor([0.5, -1.0], dtype=dtype)
    covariance = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=dtype)
    samples = statistics.wrapped_normal(metric, mean, covariance, 4000, seed=3)
    assert samples.shape == (4000, 2) and samples.dtype == dtype
    torch.testing.assert_close(samples, statistics.wrapped_normal(metric, mean, covariance, 4000, seed=3), rtol=0,
                               atol=0)
    again = statistics.wrapped_normal(metric, mean, covariance, 4000, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(samples, again, rtol=0, atol=0)
    centred = (samples - mean).double()
    # standard errors: ~0.011 on the mean, ~0.011 - 0.016 on the covariance entries (n = 4000)
    assert float(centred.mean(0).abs().max()) < 0.05
    torch.testing.assert_close(centred.T @ centred / 4000, covariance.double(), rtol=0, atol=0.06)


def test_wrapped_normal_on_the_half_plane_has_the_tangent_spread():
    metric = HalfPlane()
    mean = torch.tensor([0.0, 1.0], dtype=torch.float64)
    s = 0.3
    covariance = s * s * torch.linalg.inv(metric.metric(mean[None])[0])  # isotropic in G
    samples = statistics.wrapped_normal(metric, mean, covariance, 300, seed=0)
    assert bool((samples[:, 1] > 0).all())
    logs = pygeo.log_map(metric, mean, samples)
    squared = metric.inner(mean.expand(300, 2), logs, logs) / s ** 2  # chi-square with 2 degrees of freedom
    assert abs(float(squared.mean()) - 2.0) < 4 * 2 / math.sqrt(300)


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_input():
    metric = HalfPlane()
    x = torch.tensor([[0.0, 1.0], [0.5, 1.5], [-0.3, 0.8]], dtype=torch.float64)
    with pytest.raises(ValueError, match="weights must be non-negative"):
        statistics.frechet_mean(metric, x, weights=torch.tensor([1.0, -0.5, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="weights must not all be zero"):
        statistics.frechet_mean(metric, x, weights=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"weights must have shape \[N\] = \[3\]"):
        statistics.frechet_mean(metric, x, weights=torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must have"):
        statistics.frechet_mean(metric, x[0])
    with pytest.raises(ValueError, match="x is outside the metric's domain"):
        statistics.frechet_mean(metric, torch.tensor([[0.0, 1.0], [0.0, -1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="init must have shape"):
        statistics.frechet_mean(metric, x, init=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="step must be in"):
        statistics.frechet_mean(metric, x, step=0.0)
    with pytest.raises(ValueError, match=r"n_components must be an integer in \[1, d\] = \[1, 2\]"):
        statistics.tangent_pca(metric, x, n_components=3)
    with pytest.raises(ValueError, match="n_components"):
        statistics.tangent_pca(metric, x, n_components=0)
    with pytest.raises(ValueError, match="mean must have shape"):
        statistics.tangent_pca(metric, x, mean=torch.ones(3, dtype=torch.float64))
    mean = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="covariance must have shape"):
        statistics.wrapped_normal(metric, mean, torch.eye(3, dtype=torch.float64), 5)
    with pytest.raises(ValueError, match="covariance must be symmetric"):
        statistics.wrapped_normal(metric, mean, torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=torch.float64), 5)
    with pytest.raises(ValueError, match="positive semi-definite"):
        statistics.wrapped_normal(metric, mean, -torch.eye(2, dtype=torch.float64), 5)
    with pytest.raises(ValueError, match="mean is outside"):
        statistics.wrapped_normal(metric, -mean, torch.eye(2, dtype=torch.float64), 5)
    with pytest.raises(ValueError, match="seed or generator"):
        statistics.wrapped_normal(metric, mean, torch.eye(2, dtype=torch.float64), 5, seed=1,
                                  generator=torch.Generator())
    with pytest.raises(ValueError, match="n must be"):
        statistics.wrapped_normal(metric, mean, torch.eye(2, dtype=torch.float64), -1)


# ------------------------------------------------------------------------------------------------ demo section
def test_the_demo_section_runs_quick_and_its_figures_pass_the_figure_checks(tmp_path):
    from pygeo.cli.demo import run_demo
    from test_demo_figures import check_figure

    result = run_demo(tmp_path, quick=True, device="cpu", sections=["statistics"], progress=False)
    report = (tmp_path / "report.md").read_text()
    assert not result.failed_sections, report
    for name in ("statistics_means.png", "statistics_principal_geodesics.png", "statistics_transported_edit.png"):
        assert name in result.figures and f"]({name})" in report
        check_figure(result.figures[name], name)
    assert "Frechet mean" in report and "parallel transport" in report
