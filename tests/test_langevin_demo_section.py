"""The demo section runs end to end on a tiny fake demo context (the real one trains a VAE on MNIST)."""
import types

import torch

import pygeo
from pygeo.cli.context import DemoContext
from pygeo.cli.sections import langevin as section


def bernoulli_pullback(decoder):
    """G = J^T diag(p (1 - p)) J for a decoder returning logits, by forward-mode autodiff."""
    def single(z):
        J = torch.func.jacfwd(decoder)(z)  # [D, d]
        p = torch.sigmoid(decoder(z))
        return J.T @ (J * (p * (1 - p))[:, None])

    def metric(z):
        flat = z.reshape(-1, z.shape[-1])
        return torch.func.vmap(single)(flat).reshape(*z.shape, z.shape[-1])

    return pygeo.FunctionMetric(metric)


def fake_context(tmp_path, hidden=16):
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 784))
    latents = torch.randn(50, 2)
    return DemoContext(out_dir=tmp_path, vae=types.SimpleNamespace(decoder=decoder), latents=latents,
                       images=torch.rand(50, 784), labels=torch.zeros(50, dtype=torch.long),
                       metric=bernoulli_pullback(decoder), quick=True, show_progress=False)


def test_langevin_section_runs_quick(tmp_path):
    ctx = fake_context(tmp_path)
    markdown = section.run(ctx)
    assert section.TITLE and "acceptance per chain" in markdown
    assert "N(z; 0, I) sqrt(det G(z))" in markdown  # says which target it samples
    for name in ("langevin_latents.png", "langevin_decoded.png"):
        assert (tmp_path / name).stat().st_size > 0 and f"]({name})" in markdown and name in ctx.figures


def test_the_target_is_prior_times_volume():
    """The section's base density is the standard normal prior (up to a constant): with it the sampler's target is
    N(z; 0, I) sqrt(det G), a proper density for a bounded metric."""
    z = torch.randn(7, 2)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    difference = section.standard_normal_log_prob(z) - expected
    torch.testing.assert_close(difference, difference[:1].expand(7))
