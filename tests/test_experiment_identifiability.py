"""`python -m pygeo experiment identifiability`: the measures against direct computations, the verdicts on chosen
measurements, and tiny end-to-end runs (report, figures, resuming from the checkpoint folder after Ctrl-C)."""
import dataclasses
import os
import signal

import numpy as np
import pytest
import torch
from scipy import stats

from pygeo.cli.experiments import common, identifiability as ident


def random_stack(generator, R, P, noise):
    """R retrainings' distances [R, P, P] between P points: one base configuration, each retraining rescaled (an
    arbitrary coordinate scale) and perturbed by `noise`."""
    base = generator.normal(size=(P, 3))
    stack = []
    for _ in range(R):
        points = base + noise * generator.normal(size=base.shape)
        distances = np.linalg.norm(points[:, None] - points[None], axis=-1) * generator.uniform(0.5, 3.0)
        stack.append(distances)
    return np.stack(stack)


def test_pair_cv_matches_the_definition():
    generator = np.random.default_rng(0)
    stack = random_stack(generator, R=3, P=7, noise=0.3)
    normalised = np.stack([ident._normalised(s) for s in stack])
    for s, n in zip(stack, normalised):
        iu = np.triu_indices(7, 1)
        assert np.median(n[iu]) == pytest.approx(1.0)
        np.testing.assert_allclose(n * np.median(s[iu]), s, rtol=1e-12)
    cv = ident.pair_cv(normalised)
    for i in range(7):
        for j in range(7):
            values = normalised[:, i, j]
            expected = 0.0 if i == j else np.std(values, ddof=1) / np.mean(values)
            assert cv[i, j] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # two retrainings: CV = |a - b| / sqrt(2) / ((a + b) / 2)
    a, b = normalised[0, 1, 4], normalised[1, 1, 4]
    assert ident.pair_cv(normalised[:2])[1, 4] == pytest.approx(abs(a - b) / np.sqrt(2) / ((a + b) / 2), rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 retrainings"):
        ident.pair_cv(normalised[:1])
    with pytest.raises(ValueError, match="median pair distance must be positive"):
        ident._normalised(np.zeros((4, 4)))


def test_rescaled_retrainings_have_zero_cv_and_unit_spearman():
    generator = np.random.default_rng(1)
    stack = random_stack(generator, R=4, P=9, noise=0.0)  # the same geometry in four coordinate scales
    normalised = np.stack([ident._normalised(s) for s in stack])
    assert np.abs(ident.pair_cv(normalised)).max() < 1e-12


def test_spearman_rows_matches_scipy_with_ties():
    generator = np.random.default_rng(2)
    values = generator.integers(0, 6, size=(4, 31)).astype(float)  # many ties
    ranked = ident._ranks(values)
    ours = ident._spearman_rows(ranked)
    for i in range(4):
        for j in range(4):
            assert ours[i, j] == pytest.approx(stats.spearmanr(values[i], values[j]).statistic, rel=1e-10)


def retraining(seed, distances):
    return ident.Retraining(seed=seed, distances=distances, unconverged={k: 0 for k in ident.KINDS},
                            elbo={"single": -100.0 - seed, "ensemble": -101.0 - seed})


def test_summary_ranks_stable_kinds_above_unstable_ones():
    generator = np.random.default_rng(3)
    P, R = 24, 4
    stable = random_stack(generator, R, P, noise=0.02)
    unstable = random_stack(generator, R, P, noise=0.6)
    reference = np.linalg.norm(generator.normal(size=(P, 5))[:, None] - generator.normal(size=(P, 5))[None], axis=-1)
    reference = (reference + reference.T) / 2
    np.fill_diagonal(reference, 0)
    retrainings = [retraining(r, {"euclidean": unstable[r], "fisher": stable[r], "expected": unstable[r],
                                  "ensemble": stable[r]}) for r in range(R)]
    summary = ident._summarise(2, retrainings, {"features": reference, "pixels": reference}, n_bootstrap=200, seed=0)
    assert summary.n_pairs == P * (P - 1) // 2 and summary.n_digits == P
    for kind in ident.KINDS:
        estimate, low, high = summary.median_cv[kind]
        assert low <= estimate <= high
        assert summary.retrain_spearman_min[kind] <= summary.retrain_spearman[kind][0] <= 1
    assert summary.median_cv["fisher"][2] < summary.median_cv["euclidean"][1]  # intervals apart
    assert summary.retrain_spearman["fisher"][0] > 0.95 > summary.retrain_spearman["euclidean"][0]
    difference = summary.cv_difference[("euclidean", "fisher")]
    assert difference[1] > 0 and difference[0] == pytest.approx(
        summary.median_cv["euclidean"][0] - summary.median_cv["fisher"][0])
    # the estimate on all pairs, computed directly
    normalised = np.stack([ident._normalised(s) for s in stable])
    iu = np.triu_indices(P, 1)
    assert summary.median_cv["fisher"][0] == pytest.approx(np.median(ident.pair_cv(normalised)[iu]), rel=1e-12)
    rhos = [stats.spearmanr(stable[r][iu], reference[iu]).statistic for r in range(R)]
    assert summary.reference_spearman[("fisher", "features")][0] == pytest.approx(np.mean(rhos), rel=1e-10)
    pairs = [stats.spearmanr(stable[r][iu], stable[s][iu]).statistic for r in range(R) for s in range(r + 1, R)]
    assert summary.retrain_spearman["fisher"][0] == pytest.approx(np.mean(pairs), rel=1e-10)
    assert summary.retrain_spearman_min["fisher"] == pytest.approx(min(pairs), rel=1e-10)
    assert summary.elbo["single"] == [-100.0, -101.0, -102.0, -103.0]

    text = "\n".join(ident._verdicts([summary]))
    assert "The data support it (d = 2" in text  # the blog's claim: geodesic (fisher) below Euclidean
    assert "ensemble geodesic distances" in text and "not distinguishable from the single decoder's" in text \
        or "higher than the single decoder's" in text or "lower than the single decoder's" in text
    # swap the roles: the single decoder unstable, the ensemble stable -> Syrota et al. supported, the blog not
    swapped = [retraining(r, {"euclidean": stable[r], "fisher": unstable[r], "expected": unstable[r],
                              "ensemble": stable[r]}) for r in range(R)]
    summary = ident._summarise(8, swapped, {"features": reference, "pixels": reference}, n_bootstrap=200, seed=0)
    paragraphs = ident._verdicts([summary])
    assert "The data do not support it" in paragraphs[0] and "is higher than the Euclidean one" in paragraphs[0]
    assert "The data support it" in paragraphs[2] and "is lower than the single decoder's" in paragraphs[2]


def test_test_digits_take_the_first_of_each_class():
    labels = torch.tensor([3, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 4, 5, 6, 7, 8, 9, 9])
    chosen = ident._test_digits(labels, 2)
    assert chosen.tolist()[:4] == [1, 11, 2, 12] and labels[chosen].tolist() == sorted(list(range(10)) * 2)
    with pytest.raises(ValueError, match="only 1 digits of class 3"):
        ident._test_digits(labels[1:], 2)


def test_unconverged_count_is_read_from_the_warning():
    class Caught:
        def __init__(self, text):
            self.message = UserWarning(text)

    assert ident._count_unconverged([Caught("geodesic_distances: 17 of 45 geodesic solves did not converge "
                                            "(their best lengths are returned); raise max_iter or n_points")]) == 17
    assert ident._count_unconverged([Caught("something else")]) == 0


def test_interrupts_flag_records_ctrl_c_and_still_raises():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with ident._interrupts() as flag:
            os.kill(os.getpid(), signal.SIGINT)
    assert flag[0]
    with ident._interrupts() as flag:
        pass
    assert not flag[0]
    assert signal.getsignal(signal.SIGINT) is before


TINY = dataclasses.replace(ident.QUICK, n_train=300, epochs=1, ensemble_epochs=1, hidden=(16,), n_decoders=2,
                           per_class=(1, 1), n_points=5, resolution=16, n_centers=4, fit_steps=3, n_bootstrap=20,
                           classifier_epochs=1, classifier_limit=300)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.setenv("PYGEO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ident, "QUICK", TINY)
    return tmp_path


def test_tiny_run_writes_report_and_resumes_after_ctrl_c(tiny, monkeypatch):
    real = ident.geodesic_distances
    calls = []

    def interrupted_once(metric, z, **options):
        calls.append(options["method"])
        if len(calls) == 8:  # d = 2's six graph solves, then d = 8 seed 0: fisher solved, Ctrl-C in the next
            raise KeyboardInterrupt
        return real(metric, z, **options)

    monkeypatch.setattr(ident, "geodesic_distances", interrupted_once)
    out = tiny / "out"
    with pytest.raises(KeyboardInterrupt):
        common.run_experiment("identifiability", out, quick=True, seeds=2, progress=False, command="cmd")
    assert not out.exists() and not list(tiny.glob(".out.partial-*"))
    store = next((tiny / ident.CHECKPOINT_FOLDER).iterdir())
    assert (store / "d2-seed1-distances.pt").is_file() and (store / "d8-seed0-single.pt").is_file()
    assert (store / "d8-seed0-fisher").is_dir() and not (store / "d8-seed0-distances.pt").exists()

    calls.clear()
    monkeypatch.setattr(ident, "geodesic_distances", lambda metric, z, **options: (calls.append(options["method"]),
                                                                                  real(metric, z, **options))[1])
    report = common.run_experiment("identifiability", out, quick=True, seeds=2, progress=False, command="cmd")
    assert calls == ["energy"] * 6  # d = 2 was kept whole; d = 8 seed 0's fisher blocks come from its checkpoint
    text = report.read_text()
    for figure in ("identifiability_scatter.png", "identifiability_cv.png"):
        assert (out / figure).stat().st_size > 0 and f"]({figure})" in text
    assert "**The blog's claim**" in text and "**Syrota et al.'s claim**" in text
    rows = [line for line in text.splitlines() if line.startswith("| 2 |") or line.startswith("| 8 |")]
    assert len(rows) == 2 * len(ident.KINDS) + 2 * 4  # the results table and the paired differences
    assert "nan" not in text.lower()

    # a rerun with everything cached solves nothing and reports the same numbers
    calls.clear()
    again = common.run_experiment("identifiability", tiny / "again", quick=True, seeds=2, progress=False,
                                  command="cmd").read_text()
    assert calls == []
    assert again.split("## Claims")[1] == text.split("## Claims")[1]
