"""pygeo.diagnostics against closed forms: KL per unit, active units, mutual information, Bhattacharyya overlap,
posterior balls, and the collapse report's curvature."""
import math

import pytest
import torch

import pygeo
from pygeo import diagnostics
from pygeo.models import VAE, LinearVAE

DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_per_dimension_matches_torch_distributions(dtype):
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(50, 4, generator=generator, dtype=dtype)
    logvar = torch.randn(50, 4, generator=generator, dtype=dtype)
    mu[:, 2], logvar[:, 2] = 0.0, 0.0  # posterior = prior on unit 2
    kl = diagnostics.kl_per_dimension(mu, logvar)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).mean(0)
    assert kl.shape == (4,) and kl.dtype == dtype
    torch.testing.assert_close(kl, expected)
    assert float(kl[2]) == 0.0


def test_active_units_on_an_encoder_that_ignores_chosen_units():
    torch.manual_seed(0)
    vae = VAE(data_dim=12, latent_dim=5, hidden=(8,))
    ignored = [1, 3]
    with torch.no_grad():  # these units' means no longer depend on x: their activity is exactly 0
        vae.encoder.mean.weight[ignored] = 0.0
        vae.encoder.mean.bias[ignored] = 0.3
    mu = vae.encode_means(torch.rand(40, 12))
    count, activity = diagnostics.active_units(mu, threshold=1e-8)
    assert count == 3
    assert torch.all(activity[ignored] == 0) and torch.all(activity[[0, 2, 4]] > 1e-8)
    torch.testing.assert_close(activity, ((mu - mu.mean(0)) ** 2).sum(0) / (len(mu) - 1))  # unbiased, n - 1
    # the default threshold 0.01 (Burda et al.) against a chosen spread
    spread = torch.stack([torch.linspace(-1, 1, 11), 0.01 * torch.linspace(-1, 1, 11)], -1)
    count, activity = diagnostics.active_units(spread)
    assert count == 1 and float(activity[1]) < 0.01 <= float(activity[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_mutual_information_limits(dtype):
    N, d = 300, 3
    generator = torch.Generator().manual_seed(1)
    same_mu = torch.randn(1, d, generator=generator, dtype=dtype).expand(N, d).contiguous()
    same_logvar = torch.randn(1, d, generator=generator, dtype=dtype).expand(N, d).contiguous()
    assert abs(diagnostics.mutual_information(same_mu, same_logvar, n_samples=2)) < 1e-9  # q(z | x) = q(z)
    far_mu = 100.0 * torch.arange(N, dtype=dtype).unsqueeze(-1).expand(N, d).contiguous()
    tiny = torch.full((N, d), -8.0, dtype=dtype)
    assert diagnostics.mutual_information(far_mu, tiny) == pytest.approx(math.log(N), abs=1e-6)
    # anything in between stays at most log N (by construction, for any draw)
    mu = torch.randn(N, d, generator=generator, dtype=dtype)
    logvar = torch.randn(N, d, generator=generator, dtype=dtype) - 3
    value = diagnostics.mutual_information(mu, logvar, seed=4)
    assert 0.0 < value <= math.log(N) + 1e-9


def test_mutual_information_matches_a_direct_computation_and_chunking(monkeypatch):
    N, d, seed = 60, 2, 3
    generator = torch.Generator().manual_seed(2)
    mu = torch.randn(N, d, generator=generator, dtype=torch.float64)
    logvar = torch.randn(N, d, generator=generator, dtype=torch.float64) - 1
    noise = torch.randn(N, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = mu + (0.5 * logvar).exp() * noise
    posteriors = torch.distributions.Normal(mu.unsqueeze(0), (0.5 * logvar).exp().unsqueeze(0))
    log_q = posteriors.log_prob(z.unsqueeze(1)).sum(-1)  # [N (draws), N (posteriors)]
    expected = float((log_q.diagonal() - (torch.logsumexp(log_q, 1) - math.log(N))).mean())
    assert diagnostics.mutual_information(mu, logvar, seed=seed) == pytest.approx(expected, rel=1e-10)
    # blocks of 7 rows: the same draws, the same value
    monkeypatch.setattr(diagnostics, "_BLOCK_ELEMENTS", 7 * N)
    chunked = diagnostics.mutual_information(mu, logvar, seed=seed)
    draws_by_chunk = torch.cat([torch.randn(7 if start + 7 <= N else N - start, d, dtype=torch.float64,
                                             generator=g) for g in [torch.Generator().manual_seed(seed)]
                                 for start in range(0, N, 7)])
    z = mu + (0.5 * logvar).exp() * draws_by_chunk
    log_q = posteriors.log_prob(z.unsqueeze(1)).sum(-1)
    expected = float((log_q.diagonal() - (torch.logsumexp(log_q, 1) - math.log(N))).mean())
    assert chunked == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bhattacharyya_coefficient_closed_forms(dtype):
    generator = torch.Generator().manual_seed(5)
    mu = torch.randn(7, 3, generator=generator, dtype=dtype)
    logvar = torch.randn(7, 3, generator=generator, dtype=dtype)
    torch.testing.assert_close(diagnostics.bhattacharyya_coefficient(mu, logvar, mu, logvar),
                               torch.ones(7, dtype=dtype))
    # 1-D: BC = sqrt(2 s1 s2 / (s1^2 + s2^2)) exp(-(m1 - m2)^2 / (4 (s1^2 + s2^2))); per-unit product in d dims
    other_mu = torch.randn(7, 3, generator=generator, dtype=dtype)
    other_logvar = torch.randn(7, 3, generator=generator, dtype=dtype)
    v1, v2 = logvar.exp(), other_logvar.exp()
    per_unit = (2 * (v1 * v2).sqrt() / (v1 + v2)).sqrt() * torch.exp(-(mu - other_mu) ** 2 / (4 * (v1 + v2)))
    bc = diagnostics.bhattacharyya_coefficient(mu, logvar, other_mu, other_logvar)
    torch.testing.assert_close(bc, per_unit.prod(-1))
    assert torch.all((bc > 0) & (bc <= 1))
    far = diagnostics.bhattacharyya_coefficient(mu, logvar, mu + 1e3, logvar)
    assert float(far.max()) < 1e-30
    # broadcasting: one ball against many
    many = diagnostics.bhattacharyya_coefficient(mu[:1], logvar[:1], other_mu, other_logvar)
    assert many.shape == (7,)
    torch.testing.assert_close(many[3], diagnostics.bhattacharyya_coefficient(mu[0], logvar[0], other_mu[3],
                                                                             other_logvar[3]))


def test_posterior_balls():
    generator = torch.Generator().manual_seed(6)
    mu = torch.randn(30, 2, generator=generator, dtype=torch.float64)
    logvar = torch.randn(30, 2, generator=generator, dtype=torch.float64) - 2
    balls = diagnostics.posterior_balls(mu, logvar, k=3, n_prior=500)
    torch.testing.assert_close(balls.radius, (logvar.exp().prod(-1) ** 0.25))  # geometric mean of the sigmas
    distances = torch.cdist(mu, mu).fill_diagonal_(math.inf)
    torch.testing.assert_close(balls.neighbours, distances.topk(3, largest=False).indices)
    expected = torch.stack([diagnostics.bhattacharyya_coefficient(mu[i].expand(3, 2), logvar[i].expand(3, 2),
                                                                  mu[balls.neighbours[i]],
                                                                  logvar[balls.neighbours[i]]).mean()
                            for i in range(30)])
    torch.testing.assert_close(balls.overlap, expected)
    # two unit balls at the origin: covered = within Mahalanobis 2 of N(0, I), P(chi2_2 <= 4) = 1 - exp(-2)
    origin = torch.zeros(2, 2, dtype=torch.float64)
    balls = diagnostics.posterior_balls(origin, origin, k=1, n_prior=20000, seed=1)
    assert balls.prior_coverage == pytest.approx(1 - math.exp(-2), abs=0.01)
    assert torch.all(balls.overlap == 1.0)
    covered = balls.prior_draws.square().sum(-1) <= 4.0
    assert torch.equal(balls.covered, covered)


def test_bad_inputs_are_refused_by_name():
    mu, logvar = torch.zeros(5, 2), torch.zeros(5, 2)
    with pytest.raises(ValueError, match=r"logvar must have the shape of mu"):
        diagnostics.kl_per_dimension(mu, torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"mu must have shape \[N, d\]"):
        diagnostics.kl_per_dimension(torch.zeros(5), torch.zeros(5))
    with pytest.raises(TypeError, match="mu must be a real floating tensor"):
        diagnostics.active_units(torch.zeros(5, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="all tensors must have the same dtype"):
        diagnostics.mutual_information(mu, logvar.double())
    with pytest.raises(ValueError, match="logvar contains NaN"):
        diagnostics.mutual_information(mu, torch.full((5, 2), math.nan))
    with pytest.raises(ValueError, match="at least two posteriors"):
        diagnostics.active_units(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="threshold must be"):
        diagnostics.active_units(mu, threshold=-1.0)
    with pytest.raises(ValueError, match="n_samples must be a positive int"):
        diagnostics.mutual_information(mu, logvar, n_samples=0)
    with pytest.raises(ValueError, match="k must be at most N - 1"):
        diagnostics.posterior_balls(mu, logvar, k=5)
    with pytest.raises(ValueError, match="mu_a and mu_b must have the same last dimension"):
        diagnostics.bhattacharyya_coefficient(mu, logvar, torch.zeros(5, 3), torch.zeros(5, 3))
    with pytest.raises(TypeError, match="vae must be a pygeo.models.VAE"):
        diagnostics.collapse_report(torch.nn.Linear(2, 2), torch.rand(5, 2))
    with pytest.raises(ValueError, match="images must hold at least two"):
        diagnostics.collapse_report(VAE(data_dim=4, hidden=(3,)), torch.rand(1, 4))


def test_collapse_report_curvature_and_kappa_c():
    torch.manual_seed(0)
    sigma = 0.5
    vae = VAE(data_dim=10, latent_dim=3, hidden=(6,), likelihood="gaussian", sigma=sigma)
    images = torch.randn(40, 10)
    report = diagnostics.collapse_report(vae, images, n_curvature_points=5, n_prior=200)
    assert report.kappa_c == pytest.approx(1 / (2 * sigma ** 2))
    mu, logvar = vae.encode(images)
    torch.testing.assert_close(report.kl_per_dimension, diagnostics.kl_per_dimension(mu, logvar))
    assert report.planes.tolist() == [[0, 1], [0, 2], [1, 2]] and report.sectional.shape == (5, 3)
    assert report.log_n == pytest.approx(math.log(40)) and report.mutual_information <= report.log_n
    # each coordinate plane's value is pygeo.sectional_curvature of that plane, on the float64 Fisher metric
    metric = pygeo.PullbackMetric(vae.double().decoder, likelihood="gaussian", sigma=sigma)
    z = report.curvature_points.double()
    eye = torch.eye(3, dtype=torch.float64)
    for column, (i, j) in enumerate(report.planes.tolist()):
        expected = pygeo.sectional_curvature(metric, z, eye[i].expand_as(z), eye[j].expand_as(z))
        torch.testing.assert_close(report.sectional[:, column], expected.detach())
    values = report.sectional.flatten()
    assert report.share_above_kappa_c["all"] == pytest.approx(float((values > report.kappa_c).double().mean()))
    assert report.sectional_quantiles["all"][0.5] == pytest.approx(float(torch.quantile(values.double(), 0.5)))


def test_collapse_report_of_a_linear_vae_is_flat_and_bernoulli_has_no_kappa_c():
    torch.manual_seed(1)
    report = diagnostics.collapse_report(LinearVAE(data_dim=8, latent_dim=2, sigma=2.0), torch.randn(30, 8),
                                         n_curvature_points=4, n_prior=100)
    assert report.kappa_c == pytest.approx(0.125)
    assert report.sectional.shape == (4, 1) and float(report.sectional.abs().max()) < 1e-10  # a plane: K = 0
    assert float(report.scalar.abs().max()) < 1e-10
    bernoulli = diagnostics.collapse_report(VAE(data_dim=8, latent_dim=2, hidden=(5,)), torch.rand(30, 8),
                                            n_curvature_points=4, n_prior=100)
    assert bernoulli.kappa_c is None and bernoulli.share_above_kappa_c is None
    # in 2-D the one coordinate plane's sectional curvature is the Gaussian curvature, half the scalar curvature
    torch.testing.assert_close(bernoulli.sectional[:, 0], bernoulli.scalar / 2)


def test_collapse_report_without_curvature_and_in_one_dimension():
    torch.manual_seed(2)
    vae = VAE(data_dim=8, latent_dim=3, hidden=(5,), likelihood="gaussian", sigma=1.0)
    report = diagnostics.collapse_report(vae, torch.randn(20, 8), n_curvature_points=0, n_prior=50)
    assert report.sectional.numel() == 0 and all(math.isnan(v) for v in report.sectional_quantiles["all"].values())
    assert report.active_units + int((~report.active).sum()) == 3
    line = diagnostics.collapse_report(VAE(data_dim=8, latent_dim=1, hidden=(5,)), torch.rand(20, 8),
                                       n_curvature_points=3, n_prior=50)
    assert line.planes.shape == (0, 2) and line.scalar.shape == (3,) and float(line.scalar.abs().max()) == 0.0
    with pytest.raises(ValueError, match="n_curvature_points must be an int >= 0"):
        diagnostics.collapse_report(vae, torch.randn(20, 8), n_curvature_points=-1)
