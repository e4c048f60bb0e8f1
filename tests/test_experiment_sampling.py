"""The sampling experiment: the released sampler's deviations reproduced exactly, and an end-to-end run at a tiny size."""
import dataclasses

import pytest
import torch

from pygeo import LatentMetric
from pygeo.cli.experiments import common, sampling


def small_metric(seed=0, n_centroids=7, dim=3):
    generator = torch.Generator().manual_seed(seed)
    centroids = torch.randn(n_centroids, dim, generator=generator, dtype=torch.float64)
    precisions = torch.exp(2 * torch.randn(n_centroids, dim, generator=generator, dtype=torch.float64))
    return LatentMetric(centroids, precisions, lam=0.01, tau=0.0, rho=0.8)


def test_released_gradient_is_the_released_formula():
    # sampling.py of the paper: num / denom summed over j, with denom_j = sum_i (m_ij w_i + lam) (lam N times) and no
    # 1/2; the experiment builds it as 2 x the exact gradient of the metric with lam' = N lam.
    metric = small_metric()
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    diff = z[:, None, :] - metric.centroids[None]  # [B, N, d]
    weights = torch.exp(-(diff.square() * metric.precisions).sum(-1) / metric.rho ** 2)  # [B, N]
    d_weights = -2 * metric.precisions * diff / metric.rho ** 2 * weights[..., None]  # [B, N, d]: d w_i / d z_k
    numerator = torch.einsum("bik,ij->bkj", d_weights, metric.precisions)  # d G_jj / d z_k
    denominator = (metric.precisions * weights[..., None] + metric.lam).sum(1)  # [B, d]
    released = (numerator / denominator[:, None, :]).sum(-1)
    inflated = LatentMetric(metric.centroids, metric.precisions, lam=metric.lam * metric.n_centroids, rho=metric.rho)
    assert torch.allclose(2 * inflated.log_volume_and_grad(z)[1], released, rtol=1e-10, atol=1e-12)
    # and it differs from the exact gradient 1/2 tr(G^-1 dG), which uses lam once
    exact = 0.5 * (numerator / (metric.precisions * weights[..., None]).sum(1)[:, None, :].add(metric.lam)).sum(-1)
    assert torch.allclose(metric.log_volume_and_grad(z)[1], exact, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(released, exact, rtol=1e-2)


def test_released_sampler_without_deviations_is_exact_hmc():
    # All three deviations off: plain HMC on sqrt(det G); with a tiny step nearly every proposal is accepted, and the
    # chains move. With the clamp on, det G above 1e10 flattens the acceptance test (log pi capped at 0.5 log 1e10).
    metric = small_metric()
    starts = metric.centroids.repeat(4, 1).float()
    z, acceptance = sampling.released_sampler(metric, starts, seed=0, momentum_scale=1.0, released_gradient=False,
                                              clamped_acceptance=False, progress=False)
    assert z.shape == starts.shape and torch.isfinite(z).all()
    assert acceptance > 0.9 and float((z - starts).norm(dim=-1).median()) > 0.05
    again, _ = sampling.released_sampler(metric, starts, seed=0, momentum_scale=1.0, released_gradient=False,
                                         clamped_acceptance=False, progress=False)
    assert torch.equal(z, again)  # deterministic for a seed


def test_decode_turns_blown_up_latents_into_grey_images():
    decoder = torch.nn.Linear(2, 784)
    z = torch.tensor([[0.0, 1.0], [float("inf"), 0.0], [float("nan"), 1.0]])
    images = sampling.decode(decoder, z)
    assert images.shape == (3, 784) and torch.isfinite(images).all()
    assert torch.all(images[1:] == 0.5)


def test_sampling_experiment_end_to_end_tiny(tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="the experiment's GMM needs scikit-learn (the [experiments] extra)")
    monkeypatch.setenv("PYGEO_CACHE", str(tmp_path / "cache"))
    tiny = dataclasses.replace(sampling.QUICK, n_train=600, vae_epochs=1, hidden=(32,), n_samples=16, n_reference=200,
                               classifier_limit=400, paper_batch=8, langevin_warmup=2, complex_epochs=1,
                               complex_chains=6, complex_steps=1, complex_leapfrog=2)
    monkeypatch.setattr(sampling, "QUICK", tiny)
    monkeypatch.setattr(sampling, "PAPER_STEPS", 6)
    monkeypatch.setattr(sampling, "N_CENTROIDS", 10)
    report = common.run_experiment("sampling", tmp_path / "out", data_dir=None, quick=True, seeds=2, progress=False,
                                   command="cmd")
    text = report.read_text()
    for expected in ("| N(0, I) prior |", "released sampler (all 3 deviations)", "Riemannian Langevin",
                     "complex VAE", "test accuracy", "## What the data show", "## Deviations"):
        assert expected in text, expected
    assert (tmp_path / "out" / "sampling_grids.png").is_file() and (tmp_path / "out" / "sampling_scores.png").is_file()
    assert "nan" not in text.split("## Results")[1].split("## Sample grids")[0].lower().replace("nanmedian", "")
