"""The demo section `geodesics` on a tiny stand-in context (the demo framework builds the real one)."""
import math
import types

import torch

import pygeo
from pygeo.cli.context import DemoContext
from pygeo.cli.sections import geodesics


def tiny_context(tmp_path):
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Softplus(), torch.nn.Linear(16, 784))
    labels = torch.arange(4).repeat_interleave(6)  # few classes: few pairs
    angles = labels.float() * 2 * math.pi / 4
    latents = torch.stack([angles.cos(), angles.sin()], -1) * 2 + 0.3 * torch.randn(24, 2)
    return DemoContext(out_dir=tmp_path, vae=types.SimpleNamespace(decoder=decoder), images=torch.rand(24, 784),
                       labels=labels, latents=latents, metric=pygeo.PullbackMetric(decoder, likelihood="bernoulli"),
                       quick=True, show_progress=False)


def test_geodesics_section_runs_on_a_tiny_context(tmp_path):
    ctx = tiny_context(tmp_path)
    markdown = geodesics.run(ctx)
    assert geodesics.TITLE
    for name in ("geodesics_paths.png", "geodesics_distance_matrices.png"):
        assert f"]({name})" in markdown and (tmp_path / name).stat().st_size > 0 and name in ctx.figures
    assert markdown.count("| with the term |") == 2 and markdown.count("| without the term |") == 2
    for name in ("Euclidean", "geodesic without the term", "geodesic with the term"):
        assert f"| {name} | " in markdown
    assert "The blog's claims" in markdown and "--quick smoke run" in markdown
    assert any(name.startswith("geodesics: distance matrix with the term") for name, _ in ctx.timings)


def test_pairs_cross_the_highest_std_and_carry_the_classes_of_their_digits():
    """The chosen pairs are labelled with the classes of the chosen digits, no class is used twice, and the pair whose
    straight line crosses the gap between two clusters comes first."""
    torch.manual_seed(0)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [-3.0, 0.6], [3.0, 0.6]])
    labels = torch.arange(4).repeat_interleave(20)
    latents = centres[labels] + 0.1 * torch.randn(80, 2)
    mean = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
    with torch.no_grad():
        data = mean(latents) + 0.05 * torch.randn(80, 5)
    decoder, _ = pygeo.models.fit_uncertainty_decoder(mean, latents, data, n_centers=4, steps=100, progress=False)
    pairs, indices, scores = geodesics._pairs_across_gaps(latents, labels, decoder, 2)
    assert pairs == [(int(labels[i]), int(labels[j])) for i, j in indices]
    assert len({c for pair in pairs for c in pair}) == 4
    assert scores[0] >= scores[1] > 1
    left, right = {0, 2}, {1, 3}
    assert set(pairs[0]) & left and set(pairs[0]) & right  # the first pair crosses the gap at z1 = 0
