"""Generative models whose latent spaces pygeo studies."""
from .complex_vae import ComplexVAE, train_complex_vae
from .uncertainty import RBFVariance, UncertaintyDecoder, fit_uncertainty_decoder
from .vae import VAE, LinearVAE, train_vae

__all__ = ["VAE", "LinearVAE", "train_vae", "ComplexVAE", "train_complex_vae"]
__all__ += ["RBFVariance", "UncertaintyDecoder", "fit_uncertainty_decoder"]
