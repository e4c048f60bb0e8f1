"""The fixed-sigma Gaussian likelihood of pygeo.models.VAE and the linear VAE (pPCA at its optimum)."""
import pytest
import torch

from pygeo import diagnostics
from pygeo.models import VAE, LinearVAE, train_vae


def test_gaussian_elbo_matches_its_definition():
    torch.manual_seed(3)
    sigma = 0.7
    vae = VAE(data_dim=6, latent_dim=2, hidden=(5,), likelihood="gaussian", sigma=sigma)
    x = 3.0 * torch.randn(4, 6)  # any real data: no [0, 1] range for a Gaussian likelihood
    torch.manual_seed(7)
    elbo = vae.elbo(x)
    torch.manual_seed(7)
    mu, logvar = vae.encoder(x)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    log_likelihood = torch.distributions.Normal(vae.decoder(z), sigma).log_prob(x).sum(-1)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(elbo, log_likelihood - kl, rtol=1e-5, atol=1e-4)
    metric = vae.pullback_metric()
    assert metric.likelihood == "gaussian" and float(metric.sigma) == pytest.approx(sigma)
    assert VAE(data_dim=6, hidden=(5,)).pullback_metric().likelihood == "bernoulli"


def test_likelihood_arguments_are_checked():
    with pytest.raises(ValueError, match="likelihood must be one of"):
        VAE(likelihood="poisson")
    with pytest.raises(ValueError, match="needs sigma"):
        VAE(likelihood="gaussian")
    with pytest.raises(ValueError, match="sigma must be a positive finite number"):
        VAE(likelihood="gaussian", sigma=0.0)
    with pytest.raises(ValueError, match="sigma is only used by likelihood='gaussian'"):
        VAE(sigma=1.0)
    with pytest.raises(TypeError, match="sigma must be a real number"):
        LinearVAE(data_dim=4, latent_dim=2, sigma="1")
    with pytest.raises(ValueError, match="latent_dim must be a positive int"):
        LinearVAE(data_dim=4, latent_dim=0, sigma=1.0)


def test_linear_vae_structure():
    vae = LinearVAE(data_dim=5, latent_dim=3, sigma=2.0)
    x = torch.randn(7, 5)
    mu, logvar = vae.encoder(x)
    assert mu.shape == logvar.shape == (7, 3)
    assert torch.equal(logvar, vae.encoder.log_variance.expand(7, 3))  # one variance per unit, shared by all x
    assert len(vae.decoder) == 1 and isinstance(vae.decoder[0], torch.nn.Linear)
    # a linear decoder's pullback metric is the constant W^T W / sigma^2: a flat latent space
    z = torch.randn(4, 3)
    W = vae.decoder[0].weight.detach()
    torch.testing.assert_close(vae.pullback_metric().metric(z), (W.T @ W / 4.0).expand(4, 3, 3))


def test_linear_vae_recovers_ppca_surviving_directions():
    """Lucas et al. 2019: at the optimum W^T W has eigenvalues (lambda_i - sigma^2)_+ over the data covariance's
    eigenvalues lambda_i, and the directions with lambda_i <= sigma^2 collapse."""
    torch.manual_seed(0)
    D, d, N, sigma = 6, 4, 2000, 1.0
    eigenvalues = torch.tensor([4.0, 2.5, 0.6, 0.3, 0.2, 0.1])
    basis, _ = torch.linalg.qr(torch.randn(D, D))
    x = torch.randn(N, D) * eigenvalues.sqrt() @ basis.T + 0.5
    torch.manual_seed(1)
    vae = LinearVAE(D, d, sigma)
    train_vae(vae, x, epochs=150, batch_size=500, lr=2e-2, seed=0, progress=False)
    sample_eigenvalues, sample_basis = torch.linalg.eigh(torch.cov(x.T))
    sample_eigenvalues, sample_basis = sample_eigenvalues.flip(0), sample_basis.flip(1)
    predicted = (sample_eigenvalues[:d] - sigma ** 2).clamp_min(0)
    assert int((predicted > 0).sum()) == 2
    W = vae.decoder[0].weight.detach()
    learned = torch.linalg.eigvalsh(W.T @ W).flip(0)
    torch.testing.assert_close(learned, predicted, rtol=0.12, atol=0.02)
    # the surviving columns span the top two principal directions
    top = sample_basis[:, :2]
    projection = top @ top.T @ W
    assert float(projection.norm() / W.norm()) > 0.99
    count, activity = diagnostics.active_units(vae.encode_means(x))
    assert count == 2, activity
