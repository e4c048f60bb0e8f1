"""Ctrl-C in both samplers: a metric or log-density that raises KeyboardInterrupt after a chosen number of calls. The
samplers return what the completed steps kept (interrupted=True), and those states are exactly the first states of an
uninterrupted run with the same seed: nothing from the step that was cut short."""
import pytest
import torch

import pygeo
from pygeo.sample import riemannian_langevin, riemannian_uniform


class InterruptAfter:
    """log-density -|z|^2 / 2 that raises KeyboardInterrupt on call number `limit` + 1 (never with limit=None)."""

    def __init__(self, limit):
        self.limit, self.calls = limit, 0

    def __call__(self, z):
        self.calls += 1
        if self.limit is not None and self.calls > self.limit:
            raise KeyboardInterrupt
        return -0.5 * (z * z).sum(-1)


def flat_metric():
    return pygeo.FunctionMetric(lambda z: torch.ones_like(z)[..., None] * torch.eye(z.shape[-1], dtype=z.dtype), dim=2)


HMC = dict(n_chains=6, n_steps=8, n_leapfrog=3, step_size=0.4, warmup=2, adapt_step_size=False, seed=11,
           init=torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(6, 2), progress=False)


def test_hmc_interrupted_in_sampling_returns_the_completed_steps():
    full = riemannian_uniform(flat_metric(), 48, base_log_prob=InterruptAfter(None), **HMC)
    assert not full.interrupted and full.chains.shape == (8, 6, 2)
    # The log-density is evaluated once at the starts, then once per leapfrog step: call 1 + 3 * 5 + 1 falls inside
    # the sixth step (warm-up 2, then sampling steps 0 .. 2 complete, the fourth is cut short).
    stopped = riemannian_uniform(flat_metric(), 48, base_log_prob=InterruptAfter(1 + 3 * 5), **HMC)
    assert stopped.interrupted
    assert stopped.chains.shape == (3, 6, 2) and stopped.samples.shape == (18, 2)
    assert torch.equal(stopped.chains, full.chains[:3]), "the kept states are those of the completed steps"
    assert torch.equal(stopped.samples, full.samples[:18])
    assert stopped.log_volume.shape == (18,) and stopped.acceptance.shape == (6,)
    assert torch.isfinite(stopped.samples).all()


def test_hmc_interrupted_by_the_metric_in_warm_up_returns_no_samples():
    calls = []

    def metric_fn(z):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return (1 + (z * z).sum(-1))[..., None, None] * torch.eye(2, dtype=z.dtype)

    stopped = riemannian_uniform(pygeo.FunctionMetric(metric_fn, dim=2), 48, **HMC)
    assert stopped.interrupted and stopped.chains.shape == (0, 6, 2) and stopped.samples.shape == (0, 2)
    assert stopped.log_volume.shape == (0,) and stopped.escaped.shape == (6,)


LANGEVIN = dict(n_chains=5, n_steps=8, warmup=2, step_size=0.5, seed=3, full_drift=False,
                init=torch.linspace(-1, 1, 10, dtype=torch.float64).reshape(5, 2), progress=False)


def test_langevin_interrupted_in_sampling_returns_the_completed_steps():
    full = riemannian_langevin(flat_metric(), 40, InterruptAfter(None), **LANGEVIN)
    assert not full.interrupted and full.chains.shape == (8, 5, 2)
    # log_prob runs at the starts and then once per step (at the proposals): call 1 + 6 + 1 is in sampling step 4.
    stopped = riemannian_langevin(flat_metric(), 40, InterruptAfter(1 + 6), **LANGEVIN)
    assert stopped.interrupted and stopped.chains.shape == (4, 5, 2) and stopped.samples.shape == (20, 2)
    assert torch.equal(stopped.chains, full.chains[:4])
    assert torch.equal(stopped.samples, full.samples[:20])


@pytest.mark.parametrize("sampler", ["hmc", "langevin"])
def test_interrupt_before_any_step_is_marked_and_empty(sampler):
    if sampler == "hmc":
        result = riemannian_uniform(flat_metric(), 48, base_log_prob=InterruptAfter(1), **HMC)
    else:
        result = riemannian_langevin(flat_metric(), 40, InterruptAfter(1), **LANGEVIN)
    assert result.interrupted and result.samples.shape == (0, 2) and result.chains.shape[0] == 0
