"""`python -m pygeo experiment collapse`: a tiny end-to-end run and the verdict logic on chosen measurements."""
import dataclasses
import math

import numpy as np
import pytest

from pygeo.cli.experiments import collapse, common



@pytest.mark.slow  # the real --quick run: about 20 s on 2 cores, most of it importing scipy and drawing figures
def test_quick_run_writes_report_and_figures(tmp_path):
    report = common.run_experiment("collapse", tmp_path / "out", quick=True, progress=False, command="cmd")
    text = report.read_text()
    for figure in ("active_units_vs_sigma.png", "curvature_vs_kappa_c.png", "kl_per_unit.png"):
        assert (tmp_path / "out" / figure).stat().st_size > 0 and f"]({figure})" in text
    assert "**Conclusion.** The data " in text
    rows = [line for line in text.splitlines() if line.startswith("| linear VAE") or line.startswith("| MLP VAE")]
    assert len(rows) == 2 * len(collapse.QUICK.sigmas)
    # the linear VAE is flat: its median curvature is exactly 0 at every sigma
    for row in rows[:len(collapse.QUICK.sigmas)]:
        assert row.split("|")[8].strip().startswith("0.000")


def _run(model, sigma, active, median_curvature):
    return collapse.Run(model=model, sigma=sigma, seed=0, active_units=active, kl_per_unit=np.zeros(2), total_kl=0.0,
                        mutual_information=0.0, elbo=0.0, median_curvature=median_curvature,
                        median_active_curvature=median_curvature, median_collapsed_curvature=math.nan,
                        quantiles={q: median_curvature for q in (0.05, 0.25, 0.5, 0.75, 0.95)}, share_above=0.0,
                        max_abs_curvature=abs(median_curvature), prior_coverage=0.0, metric_scale=1.0,
                        decoder_gram_error=0.0)


def test_verdict_follows_the_measurements():
    settings = dataclasses.replace(collapse.QUICK, sigmas=(0.5, 2.0), latent_dim=2)  # kappa_c = 2 and 0.125
    predicted = {0.5: 2, 2.0: 0}
    # runs where collapse comes exactly with curvature above kappa_c, and the linear VAE never collapses
    consistent = [_run("linear", 0.5, 2, 0.0), _run("linear", 2.0, 2, 0.0),
                  _run("mlp", 0.5, 2, 1.0), _run("mlp", 2.0, 1, 0.5)]
    text, agreement = collapse._verdict(consistent, settings, predicted)
    assert "The data support the claim" in text and agreement == {"linear": (2, 2), "mlp": (2, 2)}
    # the known contradiction: the flat linear VAE collapses at large sigma; the MLP collapses below kappa_c
    contradicting = [_run("linear", 0.5, 2, 0.0), _run("linear", 2.0, 0, 0.0),
                     _run("mlp", 0.5, 2, 1.0), _run("mlp", 2.0, 1, 0.01)]
    text, agreement = collapse._verdict(contradicting, settings, predicted)
    assert "do not support" in text and agreement == {"linear": (1, 2), "mlp": (1, 2)}
    assert "1 of 2 runs collapsed at least one unit with zero curvature" in text
    assert "sigma 2: collapse below kappa_c" in text
    assert "active units equal pPCA's count #(lambda_i > sigma^2) in 2 of 2 runs" in text
    reading = "\n".join(collapse._reading(contradicting, settings))
    assert "1 of 2 runs collapsed units (at sigma 2)" in reading
    assert "no run had both active and collapsed units" in reading  # median_collapsed_curvature is NaN above


def test_full_settings_span_the_collapse_range():
    # at least 8 sigma values, kept away from MNIST's top eigenvalues (5.20, 3.90, 3.23, 2.85, 2.49, 2.33, 1.77, 1.53)
    assert len(collapse.FULL.sigmas) >= 8
    eigenvalues = np.array([5.20, 3.90, 3.23, 2.85, 2.49, 2.33, 1.77, 1.53])
    for sigma in collapse.FULL.sigmas:
        assert np.min(np.abs(eigenvalues - sigma ** 2) / eigenvalues) > 0.03
    assert min(collapse.FULL.sigmas) ** 2 < eigenvalues.min() and max(collapse.FULL.sigmas) ** 2 > eigenvalues.max()
