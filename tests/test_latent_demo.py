import types

import torch

from pygeo.cli.context import DemoContext
from pygeo.cli.sections import latent_metric as section


def test_latent_metric_section_runs_on_a_tiny_context(tmp_path):
    torch.manual_seed(0)
    encoder_mu, encoder_logvar, decoder = torch.nn.Linear(784, 2), torch.nn.Linear(784, 2), torch.nn.Linear(2, 784)
    vae = types.SimpleNamespace(encoder=lambda x: (encoder_mu(x), encoder_logvar(x) * 0.01 - 2.0), decoder=decoder)
    images = torch.rand(60, 784)
    with torch.no_grad():
        latents = encoder_mu(images)
    ctx = DemoContext(out_dir=tmp_path, vae=vae, images=images, labels=torch.arange(60) % 10, latents=latents,
                      metric=None, quick=True, show_progress=False)
    markdown = section.run(ctx)
    for figure in ("latent_metric_samples.png", "latent_metric_scatter.png", "latent_metric_interpolation.png"):
        assert (tmp_path / figure).stat().st_size > 0 and f"]({figure})" in markdown and figure in ctx.figures
    assert "| pair | classes |" in markdown and section.TITLE


def test_interpolation_pairs_are_labelled_with_the_classes_of_their_digits():
    """The labels the report prints are the labels of the chosen digits (read from the data, in a shuffled order where
    index and class are unrelated), the two ends differ in class, and each end is its class's typical digit."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(100) % 10
    labels = labels[torch.randperm(100, generator=generator)]
    latents = labels.float().unsqueeze(-1) * torch.tensor([1.0, -0.5]) + 0.1 * torch.randn(100, 2, generator=generator)
    index_pairs, class_pairs = section.interpolation_pairs(latents, labels, 6, seed=3)
    assert len(index_pairs) == 6
    for (i, j), (a, b) in zip(index_pairs, class_pairs):
        assert (int(labels[i]), int(labels[j])) == (a, b) and a != b
        members = (labels == a).nonzero().squeeze(-1)
        median = latents[members].median(0).values
        assert i == int(members[(latents[members] - median).norm(dim=-1).argmin()])
