"""The demo section runs end to end on a tiny fake demo context (the real one trains a VAE on MNIST)."""
import contextlib
import types

import torch

import pygeo
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
    return types.SimpleNamespace(out_dir=tmp_path, vae=types.SimpleNamespace(decoder=decoder), latents=latents,
                                 images=torch.rand(50, 784), labels=torch.zeros(50, dtype=torch.long),
                                 metric=bernoulli_pullback(decoder), seed=0, quick=True, device=torch.device("cpu"),
                                 timed=lambda name: contextlib.nullcontext(), show_progress=False)


def test_langevin_section_runs_quick(tmp_path):
    ctx = fake_context(tmp_path)
    markdown = section.run(ctx)
    assert section.TITLE and "acceptance per chain" in markdown
    for name in ("langevin_latents.png", "langevin_decoded.png", "langevin_prior_decoded.png"):
        assert (tmp_path / name).stat().st_size > 0 and name in markdown
