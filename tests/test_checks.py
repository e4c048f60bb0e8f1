"""Input validation: parameters are scanned once per version, and an in-place change brings the scan back."""
import pytest
import torch

import pygeo
from pygeo import _checks


def test_verify_once_runs_again_after_an_in_place_change():
    value = torch.ones(3)
    calls = []
    for _ in range(3):
        _checks.verify_once(value, "finite", lambda: calls.append(1))
    assert len(calls) == 1
    value.add_(1.0)  # bumps the version counter
    _checks.verify_once(value, "finite", lambda: calls.append(1))
    assert len(calls) == 2
    _checks.verify_once(value, "positive", lambda: calls.append(1))  # another property is its own check
    assert len(calls) == 3


def test_a_weight_turned_nan_in_place_is_caught_on_the_next_call():
    decoder = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
    metric = pygeo.PullbackMetric(decoder, "euclidean", backend="torch")
    z = torch.randn(4, 2)
    metric.metric(z)
    with torch.no_grad():
        decoder[2].weight[0, 0] = float("nan")  # an optimizer step gone wrong
    with pytest.raises(ValueError, match="weights\\[1\\] contains NaN"):
        metric.metric(z)


def test_latent_metric_precisions_made_negative_in_place_are_caught():
    centroids, precisions = torch.randn(5, 2), torch.rand(5, 2) + 0.5
    z = torch.randn(3, 2)
    pygeo.ops.latent_metric(z, centroids, precisions, rho=1.0, backend="torch")
    with torch.no_grad():
        precisions[1, 0] = -1.0
    with pytest.raises(ValueError, match="precisions \\(diagonal\\) must be positive"):
        pygeo.ops.latent_metric(z, centroids, precisions, rho=1.0, backend="torch")


def test_a_deep_copy_is_checked_on_its_own():
    import copy
    value = torch.ones(3)
    calls = []
    _checks.verify_once(value, "finite", lambda: calls.append(1))
    value[0] = float("nan")  # the original changes after its check (its version moves on) ...
    clone = copy.deepcopy(value)  # ... and a copy starts a new version count with the original's attributes
    _checks.verify_once(clone, "finite", lambda: calls.append(1))
    assert len(calls) == 2


def test_finite_rows_flags_exactly_the_rows_with_nan_or_inf():
    value = torch.randn(6, 3, 3, dtype=torch.float64)
    value[1, 0, 0] = float("nan")
    value[2, 1, 1] = float("inf")
    value[3] = 1.5e308  # finite entries whose row sum overflows: still a finite row
    value[4, 2, 0] = float("-inf")
    expected = torch.tensor([True, False, False, True, False, True])
    assert torch.equal(_checks.finite_rows(value), expected)
    assert torch.equal(_checks.finite_rows(value.float().nan_to_num(posinf=3e38, neginf=-3e38)),
                       torch.tensor([True, True, True, True, True, True]))
    assert torch.equal(_checks.finite_rows(torch.complex(value, torch.zeros_like(value))), expected)
    assert _checks.finite_rows(torch.empty(0, 3)).shape == (0,)
    assert bool(_checks.finite_rows(torch.empty(4, 0)).all())
