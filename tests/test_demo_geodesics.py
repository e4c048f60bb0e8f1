"""The demo section `geodesics` on a tiny stand-in context (the demo framework builds the real one)."""
import contextlib
import math
import types

import torch

from pygeo.cli.sections import geodesics
from pygeo.metrics import Metric


class BernoulliDecoderMetric(Metric):
    """Fisher metric of a Bernoulli-logit decoder through its flat coordinates phi = 2 arcsin sqrt(sigmoid(l))."""

    has_flat_coordinates = True

    def __init__(self, decoder):
        self.decoder = decoder

    def flat_coordinates(self, z):
        return 2 * torch.atan(torch.exp(0.5 * self.decoder(z)))

    def metric(self, z):
        flat = z.reshape(-1, z.shape[-1])
        J = torch.func.vmap(torch.func.jacfwd(self.flat_coordinates))(flat)
        return (J.transpose(-1, -2) @ J).reshape(*z.shape[:-1], z.shape[-1], z.shape[-1])


def test_geodesics_section_runs_on_a_tiny_context(tmp_path):
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Softplus(), torch.nn.Linear(16, 784))
    labels = torch.arange(4).repeat_interleave(6)  # few classes: few pairs
    angles = labels.float() * 2 * math.pi / 4
    latents = torch.stack([angles.cos(), angles.sin()], -1) * 2 + 0.3 * torch.randn(24, 2)
    timings = []

    @contextlib.contextmanager
    def timed(name):
        yield
        timings.append(name)

    ctx = types.SimpleNamespace(out_dir=tmp_path, vae=types.SimpleNamespace(decoder=decoder), images=torch.rand(24, 784),
                                labels=labels, latents=latents, metric=BernoulliDecoderMetric(decoder), seed=0,
                                quick=True, device=torch.device("cpu"), show_progress=False, timed=timed,
                                progress=lambda iterable, desc=None: iterable)
    markdown = geodesics.run(ctx)
    assert geodesics.TITLE
    assert "geodesics_paths.png" in markdown and "geodesics_distance_matrices.png" in markdown
    assert (tmp_path / "geodesics_paths.png").stat().st_size > 0
    assert (tmp_path / "geodesics_distance_matrices.png").stat().st_size > 0
    assert "| 0 -> 1 |" in markdown and "Separation" in markdown
    assert len(timings) == 3
