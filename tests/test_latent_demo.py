import contextlib
import types

import torch

from pygeo.cli.sections import latent_metric as section


def test_latent_metric_section_runs_on_a_tiny_context(tmp_path):
    torch.manual_seed(0)
    encoder_mu, encoder_logvar, decoder = torch.nn.Linear(784, 2), torch.nn.Linear(784, 2), torch.nn.Linear(2, 784)
    vae = types.SimpleNamespace(encoder=lambda x: (encoder_mu(x), encoder_logvar(x) * 0.01 - 2.0), decoder=decoder)
    images = torch.rand(60, 784)
    with torch.no_grad():
        latents = encoder_mu(images)
    ctx = types.SimpleNamespace(out_dir=tmp_path, vae=vae, images=images, labels=torch.arange(60) % 10, latents=latents,
                                metric=None, seed=0, quick=True, device=torch.device("cpu"), show_progress=False,
                                timed=lambda name: contextlib.nullcontext(), progress=lambda it, desc=None: it)
    markdown = section.run(ctx)
    for figure in ("latent_metric_samples.png", "latent_metric_scatter.png", "latent_metric_interpolation.png"):
        assert (tmp_path / figure).stat().st_size > 0 and figure in markdown
    assert "| pair | classes |" in markdown and section.TITLE
