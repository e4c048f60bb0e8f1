import warnings

import numpy as np
import pytest
import torch
from scipy import integrate, stats

import pygeo
from pygeo.sample import riemannian_uniform
from pygeo.sample.hmc import leapfrog, potential_and_grad


def single_centroid_density_1d(m, lam, tau, rho):
    """Unnormalised sqrt(det G) of a one-centroid latent metric in 1-D, and its CDF by quadrature."""
    density = lambda x: np.sqrt(m * np.exp(-m * x * x / rho**2) + lam * np.exp(-tau * x * x))
    total = integrate.quad(density, -np.inf, np.inf)[0]
    cdf = lambda xs: np.array([integrate.quad(density, -np.inf, x)[0] / total for x in np.atleast_1d(xs)])
    return density, total, cdf


def test_hmc_single_centroid_matches_quadrature():
    # A two-scale target: a sharp centre (precision 4) on a broad lam-tau floor. 400 chains, 5 states each (8 steps
    # apart) after warm-up, compared with the quadrature CDF (KS test and second moment at a fixed seed).
    m, lam, tau, rho = 4.0, 0.3, 0.3, 1.0
    metric = pygeo.LatentMetric(torch.zeros(1, 1, dtype=torch.float64), torch.full((1, 1), m, dtype=torch.float64),
                                lam=lam, tau=tau, rho=rho)
    result = riemannian_uniform(metric, 2000, n_chains=400, n_steps=40, n_leapfrog=8, step_size=0.1, seed=0, warmup=40,
                                init=torch.randn(400, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
                                progress=False)
    assert result.samples.shape == (2000, 1) and result.acceptance.shape == (400,)
    assert 0.4 < float(result.acceptance.mean()) < 0.95
    density, total, cdf = single_centroid_density_1d(m, lam, tau, rho)
    test = stats.kstest(result.samples[:, 0].numpy(), cdf)
    assert test.pvalue > 0.01, test
    second_moment = integrate.quad(lambda x: x * x * density(x), -np.inf, np.inf)[0] / total
    assert abs(float((result.samples**2).mean()) - second_moment) < 0.1 * second_moment
    assert torch.allclose(result.log_volume, metric.log_volume(result.samples))


def test_hmc_full_precision_2d_marginal_variances():
    precision = torch.tensor([[[3.0, 1.2], [1.2, 1.0]]], dtype=torch.float64)
    lam, tau, rho = 0.2, 0.4, 1.0
    metric = pygeo.LatentMetric(torch.zeros(1, 2, dtype=torch.float64), precision, lam=lam, tau=tau, rho=rho)
    result = riemannian_uniform(metric, 600, n_chains=200, n_steps=30, n_leapfrog=6, step_size=0.1, seed=1,
                                warmup=30, init=torch.zeros(2, dtype=torch.float64), progress=False)
    grid = torch.linspace(-9, 9, 361, dtype=torch.float64)
    X, Y = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([X, Y], -1).reshape(-1, 2)
    weights = metric.log_volume(points).exp()
    weights = weights / weights.sum()
    expected = (weights[:, None] * points**2).sum(0)
    got = (result.samples**2).mean(0)
    assert torch.allclose(got, expected, rtol=0.2), (got, expected)
    assert float(result.n_divergent.sum()) == 0


def test_hmc_generic_metric_through_autograd():
    # G = exp(-z^2) in 1-D: sqrt(det G) = exp(-z^2 / 2), the standard normal. FunctionMetric has no fused gradient,
    # so this runs the autograd path.
    metric = pygeo.FunctionMetric(lambda z: torch.exp(-(z * z).sum(-1))[..., None, None])
    result = riemannian_uniform(metric, 300, n_steps=30, n_leapfrog=5, step_size=0.3, seed=2, warmup=30,
                                init=torch.zeros(300, 1, dtype=torch.float64), progress=False)
    assert stats.kstest(result.samples[:, 0].numpy(), "norm").pvalue > 0.01


def test_hmc_log_prob_is_added_and_nan_energies_are_rejected():
    # Flat metric (log_volume = 0) with a base density N(1, 1) that is NaN above z = 2.5: the chains must target the
    # truncated normal and never hold a NaN or a point beyond the cut.
    flat = pygeo.FunctionMetric(lambda z: torch.ones_like(z)[..., None] * torch.eye(1, dtype=z.dtype))

    def log_prob(z):
        value = -0.5 * ((z[:, 0] - 1) ** 2)
        return torch.where(z[:, 0] > 2.5, torch.full_like(value, float("nan")), value)

    result = riemannian_uniform(flat, 300, n_steps=40, n_leapfrog=5, step_size=0.5, seed=3, warmup=20,
                                init=torch.ones(300, 1, dtype=torch.float64), log_prob=log_prob, progress=False)
    samples = result.samples[:, 0]
    assert torch.isfinite(samples).all() and float(samples.max()) <= 2.5
    truncated = stats.truncnorm(-np.inf, 1.5, loc=1.0, scale=1.0)
    assert stats.kstest(samples.numpy(), truncated.cdf).pvalue > 0.01
    assert int(result.n_divergent.sum()) > 0  # some trajectories did cross the cut and were rejected


def test_leapfrog_is_reversible():
    g = torch.Generator().manual_seed(4)
    centroids = torch.randn(5, 3, generator=g, dtype=torch.float64)
    metric = pygeo.LatentMetric(centroids, 0.5 + torch.rand(5, 3, generator=g, dtype=torch.float64), lam=0.1, tau=0.2)
    potential_grad = potential_and_grad(metric, None)
    z0 = torch.randn(7, 3, generator=g, dtype=torch.float64)
    p0 = torch.randn(7, 3, generator=g, dtype=torch.float64)
    _, grad0 = potential_grad(z0)
    z1, p1, _, grad1 = leapfrog(potential_grad, z0, p0, grad0, 0.05, 20)
    assert not torch.allclose(z1, z0)
    z2, p2, _, _ = leapfrog(potential_grad, z1, -p1, grad1, 0.05, 20)
    torch.testing.assert_close(z2, z0, rtol=0, atol=1e-10)
    torch.testing.assert_close(-p2, p0, rtol=0, atol=1e-10)


def test_hmc_is_deterministic_with_a_seed_and_starts_at_centroids():
    metric = pygeo.LatentMetric(torch.randn(6, 2, dtype=torch.float64), torch.ones(6, 2, dtype=torch.float64), tau=0.1)
    first = riemannian_uniform(metric, 20, n_chains=10, n_steps=6, n_leapfrog=3, seed=5, progress=False)
    second = riemannian_uniform(metric, 20, n_chains=10, n_steps=6, n_leapfrog=3, seed=5, progress=False)
    assert torch.equal(first.samples, second.samples) and first.samples.shape == (20, 2)
    assert first.chains.shape == (2, 10, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_samples=0), "n_samples must be"),
    (dict(n_samples=10, n_chains=2, n_steps=3), "raise n_steps"),
    (dict(n_samples=10, step_size=-1.0), "step_size must be"),
    (dict(n_samples=10, init=torch.zeros(2, 2, 2)), "init must have shape"),
])
def test_hmc_bad_input(kwargs, message):
    metric = pygeo.LatentMetric(torch.randn(3, 2), torch.ones(3, 2))
    with pytest.raises(ValueError, match=message):
        riemannian_uniform(metric, progress=False, **kwargs)


def test_hmc_needs_init_without_centroids():
    metric = pygeo.FunctionMetric(lambda z: torch.ones_like(z)[..., None] * torch.eye(1))
    with pytest.raises(ValueError, match="pass init"):
        riemannian_uniform(metric, 4, progress=False)


def test_samplers_start_from_dim_when_the_metric_has_no_centroids():
    metric = pygeo.FunctionMetric(lambda z: torch.eye(2, dtype=z.dtype) * (1 + (z ** 2).sum(-1))[..., None, None] ** -2)
    with pytest.raises(ValueError, match="pass init"):
        pygeo.sample.riemannian_uniform(metric, 10, progress=False)
    with pytest.raises(ValueError, match="pass init"):
        pygeo.sample.riemannian_langevin(metric, 10, progress=False)
    hmc = pygeo.sample.riemannian_uniform(metric, 40, n_chains=8, n_steps=6, dim=2, seed=0, progress=False)
    assert hmc.samples.shape == (40, 2) and torch.isfinite(hmc.samples).all()
    with_dim = pygeo.FunctionMetric(metric.fn, dim=2)
    mala = pygeo.sample.riemannian_langevin(with_dim, 40, n_chains=8, n_steps=10, warmup=5, seed=0, progress=False)
    assert mala.samples.shape == (40, 2) and torch.isfinite(mala.samples).all()


def _runtime_warnings(record, text):
    return [w for w in record if issubclass(w.category, RuntimeWarning) and text in str(w.message)]


def test_improper_latent_metric_warns_once_per_call():
    # tau = 0 and lam > 0: sqrt(det G) -> lam^(d/2) far from the centroids, the target does not integrate.
    improper = pygeo.LatentMetric(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64),
                                  lam=0.01, tau=0.0, rho=1.0)
    settings = dict(n_chains=4, n_steps=3, n_leapfrog=2, seed=0, progress=False)
    for _ in range(2):  # every call says it, not only the first of the session
        with pytest.warns(RuntimeWarning) as record:
            riemannian_uniform(improper, 4, **settings)
        assert len(_runtime_warnings(record, "the target is improper")) == 1
    proper = pygeo.LatentMetric(improper.centroids, improper.precisions, lam=0.01, tau=0.1, rho=1.0)
    no_floor = pygeo.LatentMetric(improper.centroids, improper.precisions, lam=0.0, tau=0.0, rho=1.0)
    for metric, base in ((proper, None), (no_floor, None), (improper, lambda z: -0.5 * (z * z).sum(-1))):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            riemannian_uniform(metric, 4, base_log_prob=base, **settings)
        assert not _runtime_warnings(record, "improper"), (metric, base)


def test_adaptation_on_the_improper_target_reports_the_escaped_chains():
    # Chains started in the flat tail of a tau = 0 latent metric accept every move, so dual averaging grows the step
    # without bound and the chains fly off (|z| ~ 1e18 and more): the result must say so, not only return them.
    metric = pygeo.LatentMetric(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64),
                                lam=0.01, tau=0.0, rho=1.0)
    init = 30.0 + torch.randn(20, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.warns(RuntimeWarning) as record:
        result = riemannian_uniform(metric, 20, n_steps=60, n_leapfrog=5, step_size=0.1, seed=0, init=init,
                                    progress=False)
    assert len(_runtime_warnings(record, "the target is improper")) == 1
    escapes = _runtime_warnings(record, "chains ended more than")
    assert len(escapes) == 1 and f"{int(result.escaped.sum())} of 20 chains" in str(escapes[0].message)
    assert result.escaped.shape == (20,) and bool(result.escaped.all())
    assert float(result.samples.norm(dim=-1).min()) > result.escape_radius and result.step_size > 1e3
    # The same chains with tau > 0 (a proper target): nothing escapes and nothing is said about it.
    proper = pygeo.LatentMetric(metric.centroids, metric.precisions, lam=0.01, tau=0.05, rho=1.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = riemannian_uniform(proper, 20, n_steps=60, n_leapfrog=5, step_size=0.1, seed=0, init=init,
                                    progress=False)
    assert not _runtime_warnings(record, "chains ended") and not bool(result.escaped.any())
