"""A small Bernoulli VAE for flat images in [0, 1], with a smooth MLP decoder (an nn.Sequential of nn.Linear and
elementwise activations), so that its pullback metric has meaningful curvature and qualifies for the fused MLP path."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ._training import fit

# Smooth activations only: ReLU decoders have zero second derivative almost everywhere (no curvature, MATH.md §1).
ACTIVATIONS = {"softplus": nn.Softplus, "elu": nn.ELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _activation_factory(activation: Union[str, Callable[[], nn.Module]]) -> Callable[[], nn.Module]:
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)} or a callable returning an nn.Module, "
                             f"got {activation!r}")
        return ACTIVATIONS[activation]
    if not callable(activation):
        raise TypeError(f"activation must be a name in {tuple(ACTIVATIONS)} or a callable returning an nn.Module "
                        f"(e.g. nn.Softplus), got {type(activation).__name__}")
    return activation


def _mlp(sizes: Sequence[int], make_activation: Callable[[], nn.Module], final_activation: bool) -> nn.Sequential:
    layers: List[nn.Module] = []
    for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if final_activation or index < len(sizes) - 2:
            layers.append(make_activation())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x [..., data_dim] -> (mu [..., latent_dim], logvar [..., latent_dim]) of the Gaussian posterior q(z | x)."""

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int], make_activation: Callable[[], nn.Module]):
        super().__init__()
        self.body = _mlp([data_dim, *hidden], make_activation, final_activation=True)
        self.mean = nn.Linear(hidden[-1], latent_dim)
        self.log_variance = nn.Linear(hidden[-1], latent_dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.mean(features), self.log_variance(features)


class VAE(nn.Module):
    """Gaussian encoder, Bernoulli decoder, standard normal prior.

    Args:
        data_dim: D, pixels per image (784 for MNIST).
        latent_dim: d.
        hidden: encoder hidden widths, data side first; the decoder mirrors them (e.g. (256, 64): 784-256-64-d encoder,
            d-64-256-784 decoder).
        activation: "softplus", "elu", "silu", "tanh" or a callable returning a fresh nn.Module per layer.
    Attributes:
        encoder: x [..., D] -> (mu, logvar) [..., d] each.
        decoder: nn.Sequential of nn.Linear and activations, z [..., d] -> Bernoulli logits [..., D].
    """

    def __init__(self, data_dim: int = 784, latent_dim: int = 2, hidden: Sequence[int] = (256, 64),
                 activation: Union[str, Callable[[], nn.Module]] = "softplus"):
        super().__init__()
        for name, value in (("data_dim", data_dim), ("latent_dim", latent_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        hidden = tuple(hidden)
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of positive ints, got {hidden!r}")
        make_activation = _activation_factory(activation)
        self.data_dim, self.latent_dim, self.hidden = data_dim, latent_dim, hidden
        self.encoder = Encoder(data_dim, latent_dim, hidden, make_activation)
        self.decoder = _mlp([latent_dim, *reversed(hidden), data_dim], make_activation, final_activation=False)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (logits [N, D] decoded from one reparameterised sample, mu [N, d], logvar [N, d])."""
        mu, logvar = self.encoder(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decoder(z), mu, logvar

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Single-sample ELBO per image [N] (nats) for x [N, D] in [0, 1]; KL to N(0, I) in closed form."""
        self._check_images(x)
        logits, mu, logvar = self(x)
        log_likelihood = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1)
        return log_likelihood - kl

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Negative ELBO averaged over the batch (scalar) for x [N, D] in [0, 1]."""
        return -self.elbo(x).mean()

    @torch.no_grad()
    def encode_means(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Posterior means mu [N, d] for x [N, D], in batches, without gradients."""
        self._check_images(x, check_range=False)
        return torch.cat([self.encoder(x[start:start + batch_size])[0] for start in range(0, len(x), batch_size)])

    def _check_images(self, x: torch.Tensor, check_range: bool = True) -> None:
        _checks.real_tensor("x", x, min_dim=2)
        _checks.last_dims("x", x, (self.data_dim,), "[N, data_dim]")
        if check_range and x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"x must hold Bernoulli targets in [0, 1], got values in [{float(x.min())}, {float(x.max())}]")


def train_vae(model: VAE, images: torch.Tensor, epochs: int = 20, batch_size: int = 128, lr: float = 1e-3,
              seed: int = 0, progress: bool = True, optimizer: str = "adam",
              optimizer_options: Optional[dict] = None) -> List[float]:
    """Fit `model` to images [N, D] in [0, 1] with Adam on the negative ELBO; model and images on one device.

    optimizer="natural" uses pygeo.optim.NaturalGradient (K-FAC with the Fisher of the decoder's likelihood and the
    encoder's Gaussian posterior) with learning rate lr (its scale differs from Adam's: e.g. lr=0.1) and
    optimizer_options passed on (damping, momentum, curvature_every, ...); for "adam" they go to torch.optim.Adam.

    Deterministic for a given seed (the global RNG is left as it was). Ctrl-C stops training cleanly and keeps the model
    as trained so far. Returns the mean loss (negative ELBO, nats per image) of each epoch run, the interrupted one included.
    The model is left in eval mode.
    """
    if not isinstance(model, VAE):
        raise TypeError(f"model must be a pygeo.models.VAE, got {type(model).__name__}")
    model._check_images(images)
    return fit(model, images, epochs, batch_size, lr, seed, progress, "training VAE", optimizer=optimizer,
               optimizer_options=optimizer_options)
