"""distributed=True on both samplers: 2 gloo processes on the CPU (spawned by the test, bounded in time) return the
same chains as one process with the same seed and n_chains, step-size adaptation included; per-chain random streams
make a chain's path independent of n_chains; a rank left without a block of chains (n_chains = 8 on 2 ranks) runs
nothing and returns the same result; without a process group distributed=True is refused."""
import pytest
import torch
import torch.distributed as dist

import pygeo
from pygeo.sample import riemannian_langevin, riemannian_uniform
from pygeo.sample._chains import CHAIN_BLOCK
from test_distributed_distances import run_on_ranks
from test_sampler_interrupt import InterruptAfter

N_CHAINS = 2 * CHAIN_BLOCK + 22  # three blocks: rank 0 runs two (128 chains), rank 1 one (22 chains)


def _metric():
    generator = torch.Generator().manual_seed(0)
    centroids = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    precisions = 1 + 3 * torch.rand(5, 2, generator=generator, dtype=torch.float64)
    return pygeo.LatentMetric(centroids, precisions, lam=0.05, tau=0.1)


def _hmc(distributed, seed=4):
    # Adapted step size (dual averaging over all chains) and starts drawn from the centroids: both must not depend
    # on the world size.
    return riemannian_uniform(_metric(), 2 * N_CHAINS, n_chains=N_CHAINS, n_steps=6, n_leapfrog=3, warmup=6,
                              seed=seed, progress=False, distributed=distributed)


def _langevin(distributed):
    return riemannian_langevin(_metric(), 2 * N_CHAINS, n_chains=N_CHAINS, n_steps=6, warmup=6, seed=5,
                               progress=False, distributed=distributed)


def _few_chains(distributed):
    """8 chains: one block, so rank 1 of 2 has none (issue 24: this used to be refused)."""
    settings = dict(n_chains=8, n_steps=4, warmup=4, seed=3, progress=False, distributed=distributed)
    return (riemannian_uniform(_metric(), 16, n_leapfrog=2, **settings),
            riemannian_langevin(_metric(), 16, **settings))


def _sampling_job(rank, world):
    hmc, langevin, unseeded = _hmc(True), _langevin(True), _hmc(True, seed=None)
    few = _few_chains(True)
    # Ctrl-C in a distributed run is re-raised on the rank (no partial gather across ranks that may be mid-collective).
    try:
        riemannian_uniform(_metric(), N_CHAINS, n_chains=N_CHAINS, n_steps=4, n_leapfrog=2, warmup=2, seed=0,
                           base_log_prob=InterruptAfter(1 + 2 * 3), progress=False, distributed=True)
        reraised = False
    except KeyboardInterrupt:
        reraised = True
    return hmc, langevin, unseeded.chains, few, reraised


def test_two_processes_return_the_single_process_result():
    results = run_on_ranks(_sampling_job)
    hmc, langevin = _hmc(False), _langevin(False)
    few_hmc, few_langevin = _few_chains(False)
    for rank_hmc, rank_langevin, unseeded, (rank_few_hmc, rank_few_langevin), reraised in results:
        assert rank_hmc.chains.shape == (2, N_CHAINS, 2)
        assert torch.equal(rank_hmc.chains, hmc.chains) and torch.equal(rank_hmc.samples, hmc.samples)
        assert rank_hmc.step_size == hmc.step_size  # the adaptation statistic is world-size independent
        for field in ("acceptance", "n_divergent", "log_volume", "escaped"):
            assert torch.equal(getattr(rank_hmc, field), getattr(hmc, field)), field
        assert torch.equal(rank_langevin.chains, langevin.chains) and rank_langevin.step_size == langevin.step_size
        assert torch.equal(rank_langevin.acceptance, langevin.acceptance)
        assert rank_langevin.n_failed == langevin.n_failed
        # seed=None: rank 0's random seed is shared, so the ranks still agree with each other.
        assert torch.equal(unseeded, results[0][2])
        assert rank_few_hmc.chains.shape == few_hmc.chains.shape == (2, 8, 2)
        assert torch.equal(rank_few_hmc.chains, few_hmc.chains) and rank_few_hmc.step_size == few_hmc.step_size
        assert torch.equal(rank_few_hmc.acceptance, few_hmc.acceptance)
        assert torch.equal(rank_few_langevin.chains, few_langevin.chains)
        assert rank_few_langevin.step_size == few_langevin.step_size
        assert rank_few_langevin.n_failed == few_langevin.n_failed
        assert reraised
    assert not torch.equal(results[0][2], hmc.chains)


def test_a_chain_path_does_not_depend_on_n_chains():
    # Fixed step (no shared adaptation) and one start per chain: chain c follows the same path whether 70 or 150
    # chains run beside it, since its noise comes from the stream of its block, seeded from (seed, c // 64).
    starts = torch.randn(150, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    settings = dict(n_steps=4, n_leapfrog=3, step_size=0.2, adapt_step_size=False, seed=9, progress=False)
    small = riemannian_uniform(_metric(), 70, n_chains=70, init=starts[:70], **settings)
    large = riemannian_uniform(_metric(), 150, n_chains=150, init=starts, **settings)
    assert torch.equal(small.chains, large.chains[:, :70])
    langevin = dict(n_steps=4, warmup=0, step_size=0.3, seed=9, progress=False)
    small = riemannian_langevin(_metric(), 70, n_chains=70, init=starts[:70], **langevin)
    large = riemannian_langevin(_metric(), 150, n_chains=150, init=starts, **langevin)
    assert torch.equal(small.chains, large.chains[:, :70])


@pytest.mark.parametrize("sampler", [riemannian_uniform, riemannian_langevin])
def test_distributed_without_a_process_group_is_refused(sampler):
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="initialised default process group"):
        sampler(_metric(), 10, n_chains=10, progress=False, distributed=True)
    with pytest.raises(TypeError, match="distributed must be a bool"):
        sampler(_metric(), 10, n_chains=10, progress=False, distributed="yes")
