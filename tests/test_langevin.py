"""Stationary laws of pygeo.sample.riemannian_langevin at fixed seeds. Statistics use the final states of many
independent chains (independent draws once the chains have mixed), so classical tests apply."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import pygeo
from pygeo.sample import riemannian_langevin


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def final_states(result):
    return result.chains[-1]


def constant_metric(A):
    return pygeo.FunctionMetric(lambda z: A.expand(*z.shape[:-1], *A.shape))


def test_constant_metric_gaussian_target():
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    S = torch.tensor([[1.0, 0.6], [0.6, 2.0]])
    m = torch.tensor([1.0, -2.0])
    precision = torch.linalg.inv(S)

    def log_prob(z):
        return -0.5 * (((z - m) @ precision) * (z - m)).sum(-1)

    n = 400
    result = riemannian_langevin(constant_metric(A), 2 * n, log_prob, n_chains=n, dim=2, seed=1, warmup=100, n_steps=60,
                                 progress=False)
    assert result.samples.shape == (2 * n, 2) and result.chains.shape == (2, n, 2)
    assert result.n_failed == 0 and not result.interrupted
    assert abs(float(result.acceptance.mean()) - 0.57) < 0.1, "dual averaging should reach about 0.57 acceptance"
    x = final_states(result)
    standard_error = (S.diagonal() / n).sqrt()
    assert ((x.mean(0) - m).abs() < 4 * standard_error).all()
    # Whitened draws are N(0, I): each coordinate passes a KS test, and the sum of squares is chi-square(2).
    white = torch.linalg.solve_triangular(torch.linalg.cholesky(S), (x - m).T, upper=False).T
    for column in white.T:
        assert stats.kstest(column.numpy(), stats.norm.cdf).pvalue > 0.01
    assert stats.kstest((white ** 2).sum(-1).numpy(), stats.chi2(2).cdf).pvalue > 0.01


@pytest.mark.parametrize("full_drift", [True, False])
def test_position_dependent_1d_metric_riemannian_uniform_is_normal(full_drift):
    """G(z) = exp(-z^2): the Riemannian uniform law sqrt(G) is exactly N(0, 1)."""
    metric = pygeo.FunctionMetric(lambda z: torch.exp(-z ** 2).unsqueeze(-1))
    result = riemannian_langevin(metric, 400, None, n_chains=400, dim=1, seed=2, warmup=100, n_steps=60,
                                 full_drift=full_drift, progress=False)
    assert stats.kstest(final_states(result).squeeze(-1).numpy(), stats.norm.cdf).pvalue > 0.01
    assert 0.4 < float(result.acceptance.mean()) < 0.75


def test_position_dependent_1d_metric_with_target():
    """G(z) = 1 + z^2 preconditions a N(0, 1) target; the chain must still be exact."""
    metric = pygeo.FunctionMetric(lambda z: (1 + z ** 2).unsqueeze(-1))
    result = riemannian_langevin(metric, 400, lambda z: -0.5 * (z ** 2).sum(-1), n_chains=400, dim=1, seed=3,
                                 warmup=100, n_steps=60, progress=False)
    assert stats.kstest(final_states(result).squeeze(-1).numpy(), stats.norm.cdf).pvalue > 0.01


def test_unadjusted_chain_is_biased_and_mala_is_not():
    """Negative control: with a large fixed step the unadjusted chain has variance 1 / (1 - h/4), MALA has 1."""
    metric = constant_metric(torch.ones(1, 1))
    h = 1.5
    common = dict(n_chains=400, dim=1, seed=4, warmup=50, n_steps=40, step_size=h, progress=False)
    biased = riemannian_langevin(metric, 400, lambda z: -0.5 * (z ** 2).sum(-1), mala=False, **common)
    exact = riemannian_langevin(metric, 400, lambda z: -0.5 * (z ** 2).sum(-1), mala=True, **common)
    assert float(biased.acceptance.mean()) == 1.0
    assert abs(float(final_states(biased).var()) - 1 / (1 - h / 4)) < 0.2
    n = final_states(biased).shape[0]
    variance_test = stats.chi2(n - 1)  # (n - 1) s^2 / sigma^2 for sigma^2 = 1
    assert variance_test.sf((n - 1) * float(final_states(biased).var())) < 1e-6
    p_exact = variance_test.sf((n - 1) * float(final_states(exact).var()))
    assert 0.005 < p_exact < 0.995
    assert stats.kstest(final_states(exact).squeeze(-1).numpy(), stats.norm.cdf).pvalue > 0.01
    assert exact.step_size == h


def _metric_2d(z):
    """exp(-|z|^2 / 2) (I + a a^T), a = (z2 + 0.5, sin z1 + 0.3 z2): sqrt(det G) = exp(-|z|^2 / 2) sqrt(1 + |a|^2)."""
    a = torch.stack([z[..., 1] + 0.5, torch.sin(z[..., 0]) + 0.3 * z[..., 1]], -1)
    eye = torch.eye(2, dtype=z.dtype)
    return torch.exp(-0.5 * (z * z).sum(-1))[..., None, None] * (eye + a[..., :, None] * a[..., None, :])


def test_riemannian_uniform_2d_against_quadrature():
    grid = torch.linspace(-8, 8, 801)
    z1, z2 = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([z1, z2], -1)
    density = torch.linalg.det(_metric_2d(points)).sqrt()
    density = density / density.sum()
    moments = {"z1": (density * z1).sum(), "z2": (density * z2).sum(), "z1^2": (density * z1 ** 2).sum(),
               "z2^2": (density * z2 ** 2).sum(), "z1 z2": (density * z1 * z2).sum()}

    n = 500
    result = riemannian_langevin(pygeo.FunctionMetric(_metric_2d), n, None, n_chains=n, dim=2, seed=5, warmup=100,
                                 n_steps=60, progress=False)
    x = final_states(result)
    sample = {"z1": x[:, 0], "z2": x[:, 1], "z1^2": x[:, 0] ** 2, "z2^2": x[:, 1] ** 2, "z1 z2": x[:, 0] * x[:, 1]}
    for name, values in sample.items():
        error = float(values.mean() - moments[name])
        assert abs(error) < 4 * float(values.std()) / math.sqrt(n), f"{name}: sample {float(values.mean()):.3f} vs quadrature {float(moments[name]):.3f}"
    # Whole law: the radial CDF of the samples against quadrature.
    radius = points.norm(dim=-1).flatten()
    order = radius.argsort()
    cdf_radius, cdf = radius[order].numpy(), density.flatten()[order].cumsum(0).numpy()
    assert stats.kstest(x.norm(dim=-1).numpy(), lambda r: np.interp(r, cdf_radius, cdf)).pvalue > 0.01


def test_non_spd_region_is_rejected_and_law_is_exact():
    """G(z) = z is not positive definite for z < 0 and log pi = log z - z (Gamma(2, 1)) is NaN there: such proposals
    are rejected (counted in n_failed), never a NaN in the chains, and the law stays exact."""
    metric = pygeo.FunctionMetric(lambda z: z.unsqueeze(-1))
    init = torch.full((300, 1), 2.0)
    result = riemannian_langevin(metric, 300, lambda z: torch.log(z).sum(-1) - z.sum(-1), n_chains=300, init=init,
                                 seed=6, warmup=100, n_steps=60, progress=False)
    x = final_states(result).squeeze(-1)
    assert torch.isfinite(result.chains).all() and (x > 0).all()
    assert result.n_failed > 0
    assert stats.kstest(x.numpy(), stats.gamma(2).cdf).pvalue > 0.01


def test_init_rows_seed_and_interrupt():
    metric = constant_metric(torch.eye(2))
    data = torch.randn(10, 2)
    one = riemannian_langevin(metric, 30, lambda z: -0.5 * (z ** 2).sum(-1), n_chains=8, init=data, seed=7, warmup=5,
                              n_steps=10, progress=False)
    two = riemannian_langevin(metric, 30, lambda z: -0.5 * (z ** 2).sum(-1), n_chains=8, init=data, seed=7, warmup=5,
                              n_steps=10, progress=False)
    assert torch.equal(one.samples, two.samples), "same seed, same samples"
    assert one.samples.shape == (30, 2) and one.chains.shape == (4, 8, 2) and one.acceptance.shape == (8,)
    calls = []

    def interrupting(z):
        calls.append(1)
        if len(calls) > 12:
            raise KeyboardInterrupt
        return -0.5 * (z ** 2).sum(-1)

    stopped = riemannian_langevin(metric, 40, interrupting, n_chains=4, dim=2, seed=0, warmup=2, n_steps=10,
                                  progress=False)
    assert stopped.interrupted and 0 < stopped.chains.shape[0] < 10
    assert stopped.samples.shape[1] == 2 and torch.isfinite(stopped.samples).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_samples=0), "n_samples must be an integer >= 1"),
    (dict(n_chains=0), "n_chains must be an integer >= 1"),
    (dict(step_size=-0.1), "step_size must be 'auto' or a positive float"),
    (dict(step_size="fast"), "step_size must be 'auto' or a positive float"),
    (dict(n_steps=2), "n_steps must be an integer >= ceil"),
    (dict(dim=None), "pass init"),
    (dict(init=torch.randn(5)), "init must have last dimension 2"),
    (dict(init=torch.randn(2, 3, 2)), "init must have shape"),
])
def test_riemannian_langevin_bad_input(kwargs, message):
    arguments = dict(n_samples=20, n_chains=4, dim=2, progress=False)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        riemannian_langevin(constant_metric(torch.eye(2)), **arguments)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sampler_backends_agree(backend):
    """The sampler with another backend of the fused step takes the same path (same seed, float64)."""
    if not pygeo.backends()[backend].available or (backend == "triton" and torch.cuda.is_available()):
        pytest.skip(f"backend {backend} unavailable for CPU tensors")
    metric = pygeo.FunctionMetric(_metric_2d)
    common = dict(n_chains=6, dim=2, seed=8, warmup=4, n_steps=6, progress=False)
    expected = riemannian_langevin(metric, 12, None, backend="cpp" if pygeo.backends()["cpp"].available else "torch", **common)
    result = riemannian_langevin(metric, 12, None, backend=backend, **common)
    torch.testing.assert_close(result.chains, expected.chains)
    assert torch.equal(result.acceptance, expected.acceptance)


@pytest.mark.parametrize("full_drift", [True, False])
def test_proposals_where_the_metric_is_not_positive_definite_are_rejected_not_fatal(full_drift):
    """G(z) = 1 - (z / 1.5)^2 is negative beyond |z| = 1.5: the Riemannian uniform target is undefined there, so such
    proposals are rejected (counted in n_failed) and the chains stay inside, whichever drift is used."""
    metric = pygeo.FunctionMetric(lambda z: (1.0 - (z / 1.5) ** 2).unsqueeze(-1), dim=1)
    result = riemannian_langevin(metric, 100, n_chains=20, n_steps=20, warmup=20, seed=0, progress=False,
                                 full_drift=full_drift, init=torch.zeros(20, 1))
    assert result.n_failed > 0
    assert bool((result.samples.abs() < 1.5).all())


def test_a_target_without_a_graph_to_z_has_zero_gradient():
    """A constant log_prob (no autograd graph to z) is a flat target: zero gradient, not an autograd error."""
    metric = pygeo.FunctionMetric(lambda z: (1 + z ** 2).unsqueeze(-1), dim=1)
    result = riemannian_langevin(metric, 8, log_prob=lambda z: z.new_zeros(z.shape[0]), n_chains=4, n_steps=5,
                                 warmup=1, seed=0, progress=False)
    assert result.samples.shape == (8, 1) and bool(torch.isfinite(result.samples).all())


def test_base_log_prob_multiplies_the_riemannian_uniform_target():
    """base_log_prob w with log_prob=None targets w(z) sqrt(det G): the same chains as log_prob = log_volume + log w."""
    metric = pygeo.FunctionMetric(lambda z: (1 + z ** 2).unsqueeze(-1), dim=1)
    base = lambda z: -0.5 * (z ** 2).sum(-1)  # noqa: E731
    settings = dict(n_chains=8, n_steps=10, warmup=5, seed=3, progress=False, init=torch.linspace(-1, 1, 8)[:, None])
    with_base = riemannian_langevin(metric, 16, base_log_prob=base, **settings)
    combined = riemannian_langevin(metric, 16, log_prob=lambda z: metric.log_volume(z) + base(z), **settings)
    torch.testing.assert_close(with_base.samples, combined.samples)
    with pytest.raises(ValueError, match="base_log_prob"):
        riemannian_langevin(metric, 16, log_prob=base, base_log_prob=base, **settings)


def test_a_metric_that_raises_outside_its_chart_rejects_those_proposals():
    """Both samplers treat a point where the metric raises ValueError (outside its chart) as a rejected proposal."""
    def chart_metric(z):
        if bool((z.abs() > 1.5).any()):
            raise ValueError("outside the chart")
        return (1 + z ** 2).unsqueeze(-1)

    metric = pygeo.FunctionMetric(chart_metric, dim=1)
    for full_drift in (True, False):
        result = riemannian_langevin(metric, 100, n_chains=20, n_steps=20, warmup=20, seed=0, progress=False,
                                     full_drift=full_drift, init=torch.zeros(20, 1))
        assert result.n_failed > 0 and bool((result.samples.abs() <= 1.5).all())
    hmc = pygeo.sample.riemannian_uniform(metric, 40, n_chains=20, n_steps=10, step_size=0.5, seed=0, progress=False,
                                          init=torch.zeros(20, 1))
    assert bool((hmc.samples.abs() <= 1.5).all())


def test_improper_latent_metric_warns_and_escaped_chains_are_reported():
    """The Riemannian uniform law of a LatentMetric with tau = 0 does not integrate (sqrt(det G) -> lam^(d/2)):
    one warning per call says so; chains started in its flat tail accept everything, the adapted step grows without
    bound, and the result marks them as escaped (with a second warning) instead of returning |z| ~ 1e10 silently."""
    import warnings

    metric = pygeo.LatentMetric(torch.zeros(1, 2), torch.ones(1, 2), lam=0.01, tau=0.0, rho=1.0)
    init = 30.0 + torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning) as record:
        result = riemannian_langevin(metric, 16, n_chains=16, init=init, n_steps=20, warmup=60, seed=0,
                                     full_drift=False, progress=False)
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert sum("the target is improper" in m for m in messages) == 1
    assert sum(f"{int(result.escaped.sum())} of 16 chains ended more than" in m for m in messages) == 1
    assert bool(result.escaped.all()) and float(result.samples.norm(dim=-1).min()) > result.escape_radius
    # A proper target (log_prob given): no improper-target warning, and the chains stay.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = riemannian_langevin(metric, 16, lambda z: metric.log_volume(z) - 0.5 * (z ** 2).sum(-1), n_chains=16,
                                     init=init, n_steps=20, warmup=60, seed=0, full_drift=False, progress=False)
    assert not [w for w in record if issubclass(w.category, RuntimeWarning)]
    assert not bool(result.escaped.any())
