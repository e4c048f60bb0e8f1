"""VAEs for flat images: a small MLP VAE with a smooth decoder (an nn.Sequential of nn.Linear and elementwise
activations, so that its pullback metric has meaningful curvature and qualifies for the fused MLP path), with a
Bernoulli likelihood (the default) or a Gaussian one of fixed sigma, and the linear VAE whose optimum is probabilistic PCA."""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ._training import fit

# Smooth activations only: ReLU decoders have zero second derivative almost everywhere (no curvature, MATH.md §1).
ACTIVATIONS = {"softplus": nn.Softplus, "elu": nn.ELU, "silu": nn.SiLU, "tanh": nn.Tanh}
LIKELIHOODS = ("bernoulli", "gaussian")


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
    """Gaussian encoder, standard normal prior, and a Bernoulli (default) or fixed-sigma Gaussian decoder.

    Args:
        data_dim: D, pixels per image (784 for MNIST).
        latent_dim: d.
        hidden: encoder hidden widths, data side first; the decoder mirrors them (e.g. (256, 64): 784-256-64-d encoder,
            d-64-256-784 decoder).
        activation: "softplus", "elu", "silu", "tanh" or a callable returning a fresh nn.Module per layer.
        likelihood: "bernoulli" (the decoder returns logits; images in [0, 1]) or "gaussian" (the decoder returns the
            mean of N(mean, sigma^2 I); any real images).
        sigma: the fixed standard deviation of the gaussian likelihood (a positive number; required there, refused
            with "bernoulli"). Large sigma weakens the likelihood against the KL term: the paper's collapse setting.
        n_decoders: M >= 1, the number of decoders sharing the encoder (a decoder ensemble, Syrota, Moreno-Munoz &
            Hauberg 2024, "Decoder ensembling for learned latent geometries"). The M decoders have one architecture
            and independent random initialisations; training follows the paper's scheme: for each mini-batch one
            member is drawn uniformly at random and the ELBO is taken through it, so the shared encoder is updated
            at every step and each decoder only on the batches it was drawn for (the members see different data
            orders and stay diverse, which is what makes their expected metric large off the data). M = 1 (the
            default) is the plain VAE, unchanged.
    Attributes:
        encoder: x [..., D] -> (mu, logvar) [..., d] each.
        decoder: nn.Sequential of nn.Linear and activations, z [..., d] -> logits or means [..., D]: the first member
            (all M members: the `decoders` property).
        likelihood, sigma, n_decoders: as given (sigma None for "bernoulli").
    """

    def __init__(self, data_dim: int = 784, latent_dim: int = 2, hidden: Sequence[int] = (256, 64),
                 activation: Union[str, Callable[[], nn.Module]] = "softplus", likelihood: str = "bernoulli",
                 sigma: Optional[float] = None, n_decoders: int = 1):
        super().__init__()
        self._set_sizes_and_likelihood(data_dim, latent_dim, likelihood, sigma)
        if isinstance(n_decoders, bool) or not isinstance(n_decoders, int) or n_decoders < 1:
            raise ValueError(f"n_decoders must be a positive int (the ensemble size M), got {n_decoders!r}")
        hidden = tuple(hidden)
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of positive ints, got {hidden!r}")
        make_activation = _activation_factory(activation)
        self.hidden = hidden
        self.encoder = Encoder(data_dim, latent_dim, hidden, make_activation)
        sizes = [latent_dim, *reversed(hidden), data_dim]
        self.decoder = _mlp(sizes, make_activation, final_activation=False)
        # Members 2..M after the encoder and the first decoder, so that M = 1 initialises exactly as before; kept
        # apart from `decoder` so that an M = 1 model's state_dict keys are unchanged.
        self.n_decoders = n_decoders
        if n_decoders > 1:
            self.other_decoders = nn.ModuleList(_mlp(sizes, make_activation, final_activation=False)
                                                for _ in range(n_decoders - 1))

    @property
    def decoders(self) -> nn.ModuleList:
        """The M decoders, the first being `decoder` (an nn.ModuleList view: the modules themselves, not copies)."""
        others = self._modules.get("other_decoders")
        return nn.ModuleList([self.decoder, *(others if others is not None else ())])

    def _member(self, member: Optional[int]) -> int:
        """The decoder index to use: `member` as given (checked), else 0, or with M > 1 in training mode one drawn
        uniformly at random (from torch's global generator: train_vae seeds it, so runs are reproducible)."""
        M = getattr(self, "n_decoders", 1)
        if member is None:
            return int(torch.randint(M, ()).item()) if (self.training and M > 1) else 0
        if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < M:
            raise ValueError(f"member must be an int in [0, {M}) (a decoder index), got {member!r}")
        return member

    def _set_sizes_and_likelihood(self, data_dim: int, latent_dim: int, likelihood: str, sigma) -> None:
        for name, value in (("data_dim", data_dim), ("latent_dim", latent_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if likelihood == "gaussian":
            if sigma is None:
                raise ValueError("likelihood='gaussian' needs sigma, the fixed standard deviation of the decoder")
            sigma = _checks.number("sigma", sigma)
            if not (sigma > 0 and math.isfinite(sigma)):
                raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
        elif sigma is not None:
            raise ValueError(f"sigma is only used by likelihood='gaussian', got sigma={sigma!r} with {likelihood!r}")
        self.data_dim, self.latent_dim, self.likelihood, self.sigma = data_dim, latent_dim, likelihood, sigma

    def forward(self, x: torch.Tensor, member: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (decoder output [N, D] (logits or means) from one reparameterised sample, mu [N, d],
        logvar [N, d]). member: the decoder to use (default: the first; with n_decoders > 1 in training mode one
        drawn uniformly at random per call, the ensemble's training scheme)."""
        mu, logvar = self.encoder(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decoders[self._member(member)](z), mu, logvar

    def log_likelihood(self, x: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        """log p(x | z) [N] (nats) of images x [N, D] given the decoder output [N, D] at z."""
        if self.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(decoded, x, reduction="none").sum(-1)
        # N(x; mean, sigma^2 I), constants included so that ELBOs compare across sigma
        squared = (x - decoded).square().sum(-1)
        return -0.5 * squared / self.sigma ** 2 - self.data_dim * (math.log(self.sigma) + 0.5 * math.log(2 * math.pi))

    def elbo(self, x: torch.Tensor, member: Optional[int] = None) -> torch.Tensor:
        """Single-sample ELBO per image [N] (nats) for x [N, D] (in [0, 1] for Bernoulli); KL to N(0, I) in closed
        form. With n_decoders > 1: through decoder `member` if given; else in training mode through one member drawn
        uniformly at random (the training scheme), in eval mode the mean over the members of their ELBOs at one
        shared latent sample (the ELBO averaged over the ensemble's uniform distribution on decoders)."""
        self._check_images(x)
        if getattr(self, "n_decoders", 1) > 1 and member is None and not self.training:
            mu, logvar = self.encoder(x)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            log_likelihood = torch.stack([self.log_likelihood(x, decoder(z)) for decoder in self.decoders]).mean(0)
        else:
            decoded, mu, logvar = self(x, member)
            log_likelihood = self.log_likelihood(x, decoded)
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1)
        return log_likelihood - kl

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Negative ELBO averaged over the batch (scalar) for x [N, D]."""
        return -self.elbo(x).mean()

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch_size: int = 4096) -> Tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters (mu [N, d], logvar [N, d]) for x [N, D], in batches, without gradients."""
        self._check_images(x, check_range=False)
        parts = [self.encoder(x[start:start + batch_size]) for start in range(0, len(x), batch_size)]
        if not parts:
            empty = x.new_zeros(0, self.latent_dim)
            return empty, empty.clone()
        return torch.cat([mu for mu, _ in parts]), torch.cat([logvar for _, logvar in parts])

    @torch.no_grad()
    def encode_means(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Posterior means mu [N, d] for x [N, D], in batches, without gradients."""
        return self.encode(x, batch_size)[0]

    def pullback_metric(self, **options):
        """The (first) decoder's Fisher metric as a pygeo.PullbackMetric: likelihood "bernoulli" on the logits, or
        "gaussian" with this model's sigma (G = J^T J / sigma^2). options go to PullbackMetric (eps, backend)."""
        from ..metrics import PullbackMetric

        return PullbackMetric(self.decoder, likelihood=self.likelihood, sigma=self.sigma, **options)

    def metric(self, likelihood: Optional[str] = None, **options):
        """The model's pullback metric: a pygeo.PullbackMetric of its decoder for n_decoders = 1, a
        pygeo.metrics.EnsembleMetric of the M decoders' PullbackMetrics (G = (1/M) sum_m J_m^T F J_m) for M > 1.

        likelihood: the likelihood the metric pulls back (default None: the model's own, with its sigma for
            "gaussian"); another one ("euclidean", say) is taken as given, with sigma from options where it needs one.
        options: passed to each PullbackMetric (eps, backend, sigma, ...).
        """
        from ..metrics import EnsembleMetric, PullbackMetric

        if likelihood is None:
            likelihood = self.likelihood
            options.setdefault("sigma", self.sigma)
        elif likelihood == self.likelihood == "gaussian":
            options.setdefault("sigma", self.sigma)
        members = [PullbackMetric(decoder, likelihood=likelihood, **options) for decoder in self.decoders]
        return members[0] if len(members) == 1 else EnsembleMetric(members)

    def _check_images(self, x: torch.Tensor, check_range: bool = True) -> None:
        _checks.real_tensor("x", x, min_dim=2)
        _checks.last_dims("x", x, (self.data_dim,), "[N, data_dim]")
        if check_range and self.likelihood == "bernoulli" and x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"x must hold Bernoulli targets in [0, 1], got values in [{float(x.min())}, {float(x.max())}]")


class LinearEncoder(nn.Module):
    """x [..., D] -> (mu = W x + b [..., d], logvar [..., d]): linear posterior means and one learned log-variance per
    latent dimension, shared by every input (the linear VAE of Lucas et al. 2019)."""

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.mean = nn.Linear(data_dim, latent_dim)
        self.log_variance = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        mu = self.mean(x)
        return mu, self.log_variance.expand_as(mu)


class LinearVAE(VAE):
    """The linear VAE: linear encoder means, per-dimension learned posterior log-variances, linear decoder
    z -> W z + b, Gaussian likelihood of fixed sigma. Its global optimum is probabilistic PCA (Lucas et al. 2019):
    the latent directions whose data-covariance eigenvalue is at most sigma^2 collapse (W's column 0, posterior =
    prior), while its pullback metric W^T W / sigma^2 is constant, so the latent space is flat. The control of the collapse
    experiment.

    Args:
        data_dim: D; latent_dim: d; sigma: the decoder's fixed standard deviation (positive).
    Attributes:
        encoder: LinearEncoder, x [..., D] -> (mu, logvar) [..., d]; decoder: nn.Sequential(nn.Linear(d, D)).
    Trained by pygeo.models.train_vae like any VAE (same loss: the negative ELBO).
    """

    def __init__(self, data_dim: int, latent_dim: int, sigma: float):
        # Not VAE.__init__: that builds MLPs; everything else (ELBO, loss, encode, checks, metric) is shared.
        nn.Module.__init__(self)
        self._set_sizes_and_likelihood(data_dim, latent_dim, "gaussian", sigma)
        self.hidden = ()
        self.n_decoders = 1
        self.encoder = LinearEncoder(data_dim, latent_dim)
        self.decoder = nn.Sequential(nn.Linear(latent_dim, data_dim))
        # nn.Linear's default scale 1/sqrt(d) would start W^T W near D / (3 d) (65 for MNIST at d = 4), far above
        # pPCA's lambda_i - sigma^2 (a few units for MNIST): start each column at about unit norm instead.
        with torch.no_grad():
            self.decoder[0].weight.normal_(0.0, data_dim ** -0.5)


def train_vae(model: VAE, images: torch.Tensor, epochs: int = 20, batch_size: int = 128, lr: float = 1e-3,
              seed: int = 0, progress: bool = True, optimizer: str = "adam",
              optimizer_options: Optional[dict] = None) -> List[float]:
    """Fit `model` (a VAE or LinearVAE) to images [N, D] (in [0, 1] for a Bernoulli likelihood) on the negative ELBO, with
    Adam by default; model and images on one device.

    optimizer="natural" uses pygeo.optim.NaturalGradient (K-FAC with the Fisher of the decoder's likelihood and the
    encoder's Gaussian posterior) with learning rate lr (its scale differs from Adam's: e.g. lr=0.1) and
    optimizer_options passed on (damping, momentum, curvature_every, ...); for "adam" they go to torch.optim.Adam.
    A decoder ensemble (n_decoders > 1, Adam only) trains as in Syrota et al. 2024: each mini-batch updates the shared
    encoder and one decoder drawn uniformly at random (see VAE).

    Deterministic for a given seed (the global RNG is left as it was). Ctrl-C stops training cleanly and keeps the model
    as trained so far. Returns the mean loss (negative ELBO, nats per image) of each epoch run, the interrupted one included.
    The model is left in eval mode.
    """
    if not isinstance(model, VAE):
        raise TypeError(f"model must be a pygeo.models.VAE, got {type(model).__name__}")
    if optimizer == "natural" and getattr(model, "n_decoders", 1) > 1:
        raise ValueError(f"optimizer='natural' (K-FAC) supports n_decoders=1, got a VAE with n_decoders="
                         f"{model.n_decoders}; use optimizer='adam' for a decoder ensemble")
    model._check_images(images)
    return fit(model, images, epochs, batch_size, lr, seed, progress, "training VAE", optimizer=optimizer,
               optimizer_options=optimizer_options)
