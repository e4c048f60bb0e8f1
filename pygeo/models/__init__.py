"""Generative models whose latent spaces pygeo studies."""
from .vae import VAE, train_vae

__all__ = ["VAE", "train_vae"]
