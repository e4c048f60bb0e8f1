"""The demo's setting for the geodesic-distance benchmarks: the VAE of `python -m pygeo demo` (2-D latent, Bernoulli
decoder, 20 epochs on the 5,000 shipped digits, seed 0), its Bernoulli pullback metric and encoded digits.

The trained weights are cached (PYGEO_BENCH_CACHE, default ~/.cache/pygeo-bench) so that repeated runs time the
distances, not the training."""
from __future__ import annotations

import os
from pathlib import Path

import torch

import pygeo
from pygeo.cli import demo
from pygeo.data import load_digits
from pygeo.models import VAE, train_vae


def cache_dir() -> Path:
    path = Path(os.environ.get("PYGEO_BENCH_CACHE", Path.home() / ".cache" / "pygeo-bench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def demo_vae(seed: int = 0) -> VAE:
    """The demo's VAE (same data, widths, epochs, batch size, learning rate and seed), trained once and cached."""
    images, _ = load_digits(None, limit=demo.DEFAULT_IMAGES)
    torch.manual_seed(seed)
    vae = VAE(data_dim=images.shape[1], latent_dim=2)
    path = cache_dir() / f"demo_vae_seed{seed}.pt"
    if path.exists():
        vae.load_state_dict(torch.load(path))
    else:
        train_vae(vae, images, epochs=demo.DEFAULT_EPOCHS, batch_size=demo.BATCH_SIZE, lr=demo.LEARNING_RATE,
                  seed=seed, progress=False)
        torch.save(vae.state_dict(), path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    return vae.eval()


def demo_setting(n_points: int, seed: int = 0):
    """(metric, latents [n_points, 2] float32): the first n_points encoded digits of a fixed random draw."""
    vae = demo_vae(seed)
    images, _ = load_digits(None, limit=demo.DEFAULT_IMAGES)
    with torch.no_grad():
        latents = vae.encode_means(images)
    chosen = torch.randperm(len(latents), generator=torch.Generator().manual_seed(1234))[:n_points]
    for parameter in vae.parameters():
        parameter.requires_grad_(False)
    return pygeo.PullbackMetric(vae.decoder, likelihood="bernoulli"), latents[chosen].contiguous()
