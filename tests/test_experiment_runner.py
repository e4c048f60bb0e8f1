"""The shared experiment runner: intervals, atomic output, clear errors (the experiments have tests of their own)."""
import math

import pytest

from pygeo.cli import experiments
from pygeo.cli.experiments import common


def test_mean_interval_matches_student_t():
    mean, half = common.mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    # t_{0.975, 2} = 4.302653, std = 1, n = 3
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert math.isnan(common.mean_interval([5.0])[1])
    assert common.format_interval([5.0]) == "5.00"
    with pytest.raises(ValueError, match="at least one"):
        common.mean_interval([])


@pytest.fixture
def fake_experiment(monkeypatch):
    """Registers a tiny experiment module that writes one figure, or raises when asked to."""
    import sys
    import types

    module = types.ModuleType("pygeo.cli.experiments.fake")
    module.TITLE = "Fake"
    module.DESCRIPTION = "test"
    module.fail = None

    def run(ctx):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots()
        axes.plot([0, 1], [0, 1])
        shown = ctx.save_figure(figure, "line.png")
        if module.fail is not None:
            raise module.fail
        return f"seeds {ctx.seeds}\n\n{shown}\n"

    module.run = run
    monkeypatch.setitem(sys.modules, "pygeo.cli.experiments.fake", module)
    monkeypatch.setitem(experiments.EXPERIMENTS, "fake", "fake")
    return module


def test_run_experiment_writes_report_atomically(tmp_path, fake_experiment):
    out = tmp_path / "out"
    report = common.run_experiment("fake", out, quick=True, progress=False, command="cmd")
    text = report.read_text()
    assert "# Fake" in text and "Command: `cmd`" in text and "Machine:" in text and "seeds [0, 1]" in text
    assert (out / "line.png").is_file()
    # a failing or interrupted run leaves the earlier report alone and no staging folder behind
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        fake_experiment.fail = error
        with pytest.raises(type(error)):
            common.run_experiment("fake", out, quick=True, progress=False)
        assert report.read_text() == text
        assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_run_experiment_refuses_bad_options(tmp_path, fake_experiment):
    with pytest.raises(ValueError, match="unknown experiment"):
        common.run_experiment("nope", tmp_path / "out")
    with pytest.raises(ValueError, match="seeds"):
        common.run_experiment("fake", tmp_path / "out", seeds=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        common.run_experiment("fake", tmp_path / "file")
    with pytest.raises(ValueError, match="data-dir"):
        common.run_experiment("fake", tmp_path / "out", data_dir=tmp_path / "missing")
