"""The demo section "Gaussian balls" on a tiny untrained VAE: figures written, numbers from pygeo.diagnostics."""
import re

import torch

import pygeo
from pygeo import diagnostics
from pygeo.cli.context import DemoContext
from pygeo.cli.sections import balls
from pygeo.models import VAE


def test_balls_section_quick(tmp_path):
    torch.manual_seed(0)
    vae = VAE(data_dim=16, latent_dim=2, hidden=(8,))
    images = torch.rand(60, 16)
    labels = torch.arange(60) % 3
    ctx = DemoContext(out_dir=tmp_path, vae=vae, images=images, labels=labels, latents=vae.encode_means(images),
                      metric=pygeo.PullbackMetric(vae.decoder, likelihood="bernoulli"), quick=True,
                      show_progress=False)
    text = balls.run(ctx)
    for figure in ("balls_ellipses.png", "balls_overlap_coverage.png"):
        assert (tmp_path / figure).stat().st_size > 0 and f"]({figure})" in text
    mu, logvar = vae.encode(images)
    expected = diagnostics.posterior_balls(mu, logvar, k=5, n_prior=500, seed=0)
    coverage = re.search(r"and (\d+) % of 500 draws from the prior", text)
    assert coverage and int(coverage.group(1)) == round(100 * expected.prior_coverage)
    assert f"median overlap {float(expected.overlap.median()):.2f}" in text
    assert "VQ-VAE" in text and "Below, each of 60 digits" in text  # 20 per class of the 3 classes
