import pytest
import torch
from torch import nn

from pygeo.models import VAE, train_vae


def test_vae_shapes_and_decoder_structure():
    vae = VAE(data_dim=20, latent_dim=3, hidden=(16, 8))
    x = torch.rand(5, 20)
    mu, logvar = vae.encoder(x)
    assert mu.shape == (5, 3) and logvar.shape == (5, 3)
    logits = vae.decoder(torch.randn(4, 6, 3))
    assert logits.shape == (4, 6, 20)
    # The decoder is a plain MLP with smooth activations (so the fused pullback path applies, curvature is meaningful).
    assert isinstance(vae.decoder, nn.Sequential)
    assert [type(layer) for layer in vae.decoder] == [nn.Linear, nn.Softplus, nn.Linear, nn.Softplus, nn.Linear]
    assert [layer.out_features for layer in vae.decoder if isinstance(layer, nn.Linear)] == [8, 16, 20]
    assert vae.elbo(x).shape == (5,) and vae.loss(x).dim() == 0
    assert vae.encode_means(x).shape == (5, 3)
    torch.testing.assert_close(vae.encode_means(x), mu.detach())


def test_elbo_matches_its_definition():
    torch.manual_seed(3)
    vae = VAE(data_dim=6, latent_dim=2, hidden=(5,))
    x = torch.rand(4, 6)
    torch.manual_seed(7)
    elbo = vae.elbo(x)
    torch.manual_seed(7)
    mu, logvar = vae.encoder(x)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    p = torch.sigmoid(vae.decoder(z))
    log_likelihood = (x * p.log() + (1 - x) * (1 - p).log()).sum(-1)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(elbo, log_likelihood - kl, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("activation", ["elu", "silu", "tanh", nn.Softplus])
def test_activations(activation):
    vae = VAE(data_dim=8, latent_dim=2, hidden=(4,), activation=activation)
    assert vae.decoder(torch.zeros(1, 2)).shape == (1, 8)


def test_training_decreases_loss_deterministically():
    torch.manual_seed(0)
    images = (torch.rand(64, 30) > 0.5).float()
    images[:32, :15] = 1.0  # some structure to learn
    def fit(epochs):
        torch.manual_seed(1)
        vae = VAE(data_dim=30, latent_dim=2, hidden=(16,))
        state = torch.get_rng_state()
        losses = train_vae(vae, images, epochs=epochs, batch_size=16, lr=1e-2, seed=5, progress=False)
        assert torch.equal(torch.get_rng_state(), state), "training must leave the global RNG alone"
        return vae, losses
    vae, losses = fit(8)
    assert len(losses) == 8 and losses[-1] < 0.9 * losses[0]
    assert not vae.training
    _, again = fit(8)
    assert again == losses


def test_training_keyboard_interrupt_keeps_model(monkeypatch):
    vae = VAE(data_dim=10, latent_dim=2, hidden=(4,))
    images = torch.rand(40, 10)
    calls = {"n": 0}
    original = VAE.loss

    def interrupting_loss(self, x):
        calls["n"] += 1
        if calls["n"] == 7:  # in the second epoch (4 batches per epoch)
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(VAE, "loss", interrupting_loss)
    before = [p.detach().clone() for p in vae.parameters()]
    losses = train_vae(vae, images, epochs=5, batch_size=10, progress=False)
    assert len(losses) == 2  # one full epoch and the interrupted one
    assert not vae.training
    assert any(not torch.equal(a, b) for a, b in zip(before, vae.parameters()))


def test_bad_inputs():
    with pytest.raises(ValueError, match="activation must be one of"):
        VAE(activation="relu6")
    with pytest.raises(TypeError, match="activation must be a name"):
        VAE(activation=3)
    with pytest.raises(ValueError, match="latent_dim must be a positive int"):
        VAE(latent_dim=0)
    with pytest.raises(ValueError, match="hidden must be a non-empty sequence"):
        VAE(hidden=())
    vae = VAE(data_dim=10, hidden=(4,))
    with pytest.raises(ValueError, match=r"x must have shape \[N, data_dim\]"):
        vae.loss(torch.rand(3, 11))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        vae.loss(torch.rand(3, 10) * 255)
    with pytest.raises(TypeError, match="x must be a real floating tensor"):
        vae.loss(torch.ones(3, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        train_vae(vae, torch.rand(3, 10), epochs=0)
    with pytest.raises(ValueError, match="lr must be positive"):
        train_vae(vae, torch.rand(3, 10), epochs=1, lr=-1.0)
    with pytest.raises(TypeError, match="model must be a pygeo.models.VAE"):
        train_vae(nn.Linear(2, 2), torch.rand(3, 10))
    with pytest.raises(ValueError, match="at least one example"):
        train_vae(vae, torch.rand(0, 10))
    with pytest.raises(TypeError, match="model parameters are torch.float32 but the data are torch.float64"):
        train_vae(vae, torch.rand(3, 10, dtype=torch.float64))
