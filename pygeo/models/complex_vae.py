"""A small VAE with a complex latent space C^n (MATH.md section 5): complex Gaussian posterior CN(mu, diag(s^2), 0),
prior CN(0, I), any decoder taking complex z. Inside, complex numbers travel as (real, imaginary) pairs of real layers."""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .. import _checks
from ._training import fit


class ComplexGaussianEncoder(nn.Module):
    """x [..., data_dim] -> (mu [..., n] complex, logvar [..., n] real): q(z|x) = CN(mu, diag(exp(logvar)), 0), i.e.
    real and imaginary parts independent with variance exp(logvar) / 2 each."""

    def __init__(self, data_dim: int, latent_dim: int, hidden: int = 256):
        super().__init__()
        self.latent_dim = latent_dim
        self.body = nn.Sequential(nn.Linear(data_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.head = nn.Linear(hidden, 3 * latent_dim)

    def forward(self, x: torch.Tensor):
        mu_re, mu_im, logvar = self.head(self.body(x)).split(self.latent_dim, dim=-1)
        return torch.complex(mu_re, mu_im), logvar.clamp(-12.0, 8.0)


class RealPairDecoder(nn.Module):
    """Complex z [..., n] -> [Re z, Im z] -> MLP -> [..., data_dim] (logits for a Bernoulli likelihood)."""

    def __init__(self, latent_dim: int, data_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, data_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z.real, z.imag], dim=-1))


class ComplexVAE(nn.Module):
    """VAE with latent z in C^n.

    Args:
        data_dim: D, the size of a flattened data point.
        latent_dim: n, the complex latent dimension (2n real dimensions).
        hidden: width of the default encoder / decoder MLPs.
        decoder: any module complex z [..., n] -> [..., D]; default RealPairDecoder.
        likelihood: "bernoulli" (decoder returns logits, data in [0, 1]) or "gaussian" (decoder returns the mean m of
            CN(m, sigma^2 I, 0); real data are compared as complex numbers with zero imaginary part).
        sigma: the Gaussian likelihood's scale.
    """

    def __init__(self, data_dim: int, latent_dim: int = 1, hidden: int = 256, decoder: Optional[nn.Module] = None,
                 likelihood: str = "bernoulli", sigma: float = 1.0):
        super().__init__()
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
        for name, value in (("data_dim", data_dim), ("latent_dim", latent_dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        sigma = _checks.number("sigma", sigma)
        if not 0 < sigma < math.inf:
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        self.data_dim, self.latent_dim, self.likelihood, self.sigma = data_dim, latent_dim, likelihood, sigma
        self.encoder = ComplexGaussianEncoder(data_dim, latent_dim, hidden)
        self.decoder = decoder if decoder is not None else RealPairDecoder(latent_dim, data_dim, hidden)

    @staticmethod
    def sample_posterior(mu: torch.Tensor, logvar: torch.Tensor, n_samples: Optional[int] = None) -> torch.Tensor:
        """z ~ CN(mu, diag(exp(logvar))) by reparameterisation: [..., n], or [n_samples, ..., n]."""
        shape = mu.shape if n_samples is None else (n_samples, *mu.shape)
        noise = torch.complex(torch.randn(shape, dtype=logvar.dtype, device=mu.device),
                              torch.randn(shape, dtype=logvar.dtype, device=mu.device))
        return mu + (0.5 * logvar).exp() * noise / 2 ** 0.5

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Negative ELBO per data point, averaged over the batch x [B, D]."""
        mu, logvar = self.encoder(x)
        z = self.sample_posterior(mu, logvar)
        out = self.decoder(z)
        if self.likelihood == "bernoulli":
            reconstruction = F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1)
        else:
            reconstruction = (out - x).abs().pow(2).sum(-1) / self.sigma ** 2
        # KL(CN(mu, s^2) || CN(0, 1)) per complex coordinate = |mu|^2 + s^2 - 1 - log s^2
        kl = (mu.abs() ** 2 + logvar.exp() - 1 - logvar).sum(-1)
        return (reconstruction + kl).mean()


def train_complex_vae(model: ComplexVAE, data: torch.Tensor, epochs: int = 10, batch_size: int = 128, lr: float = 1e-3,
                      max_seconds: Optional[float] = None, seed: int = 0, progress: bool = True) -> List[float]:
    """Adam on the negative ELBO over data [N, D]; returns the mean loss of each epoch run (the last one possibly
    partial). Deterministic for a given seed (the global random state is left as it was); stops after max_seconds
    (checked after every step); Ctrl-C returns the losses so far, the model as trained up to that step. Shows a tqdm
    bar (progress=False to hide)."""
    if not isinstance(model, ComplexVAE):
        raise TypeError(f"model must be a pygeo.models.ComplexVAE, got {type(model).__name__}")
    _checks.real_tensor("data", data, min_dim=2)
    _checks.last_dims("data", data, (model.data_dim,), "[N, data_dim]")
    if model.likelihood == "bernoulli" and data.numel() and (data.min() < 0 or data.max() > 1):
        raise ValueError(f"data must hold Bernoulli targets in [0, 1] (likelihood='bernoulli'), got values in "
                         f"[{float(data.min())}, {float(data.max())}]")
    return fit(model, data, epochs, batch_size, lr, seed, progress, "complex VAE", max_seconds=max_seconds)
