"""Per-chain random streams and the sharding of chains over torch.distributed ranks, shared by both samplers.

A sampler's result must not depend on how its chains are split between processes: the union of what the ranks of a
distributed run return is what one process returns for the same seed and n_chains. So the randomness of a chain is a
function of (seed, chain index) only: chains are grouped in fixed blocks of CHAIN_BLOCK consecutive chains, each block
draws from its own generator seeded from (seed, block index), and ranks own whole blocks (a block never straddles two
ranks). One generator per block rather than per chain keeps the draws of thousands of chains to a few dozen calls per
step, with no Python loop over chains.

Shared statistics (the mean acceptance probability that drives step-size adaptation) are summed in fixed point
(int64 multiples of 2^-40), which is exact and so independent of summation order and of the world size; in a
distributed run the integer sums are gathered over ranks.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import List

import torch

from .. import _distributed

CHAIN_BLOCK = 64  # chains per random stream; ranks own whole blocks
_FIXED_POINT = 2.0 ** 40  # resolution of the exact sums of probabilities (n_chains * 2^40 stays far below 2^63)
_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """The SplitMix64 finaliser (Steele, Lea and Flood 2014): a bijective mix of 64 bits, so distinct (seed, block)
    pairs give unrelated generator seeds."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def block_seed(seed: int, block: int) -> int:
    """Seed of the generator of chain block `block` for the sampler seed `seed` (a 63-bit int)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ block) >> 1


@dataclass
class ChainShard:
    """The chains [start, stop) of n_chains that this process runs, and how to combine results with the others."""

    n_chains: int
    start: int
    stop: int
    distributed: bool
    rank: int = 0

    @classmethod
    def create(cls, n_chains: int, distributed: bool, caller: str) -> "ChainShard":
        """All chains without distribution; with it, this rank's share of whole chain blocks (balanced to within one
        block). With fewer blocks than ranks, the ranks past the last block run no chain: they take part in the
        collectives (contributing nothing) and return the gathered result like the others."""
        if not isinstance(distributed, bool):
            raise TypeError(f"distributed must be a bool, got {type(distributed).__name__}")
        if not distributed:
            return cls(n_chains, 0, n_chains, False)
        rank, world = _distributed.require_process_group(f"{caller}(distributed=True)")
        n_blocks = -(-n_chains // CHAIN_BLOCK)
        blocks = _distributed.rank_share(n_blocks, rank, world)
        if not blocks:  # no block left for this rank: an empty shard at the end (ranks own chains in rank order)
            return cls(n_chains, n_chains, n_chains, True, rank)
        return cls(n_chains, blocks.start * CHAIN_BLOCK, min(blocks.stop * CHAIN_BLOCK, n_chains), True, rank)

    @property
    def shows_progress(self) -> bool:
        """Only rank 0 draws a progress bar (one bar per job, not one per process)."""
        return self.rank == 0

    @property
    def n_local(self) -> int:
        return self.stop - self.start

    def common_seed(self, seed) -> int:
        """The sampler seed: `seed`, or a fresh random one (rank 0's, shared with every rank when distributed)."""
        if seed is not None:
            if isinstance(seed, bool) or not hasattr(type(seed), "__index__"):
                raise TypeError(f"seed must be an int or None, got {seed!r}")
            return operator.index(seed)
        drawn = int(torch.randint(2**62, ()).item())  # from torch's global generator: torch.manual_seed still rules
        if self.distributed:
            drawn = int(_distributed.all_gather_rows(torch.tensor([drawn], dtype=torch.long))[0])
        return drawn

    def streams(self, seed: int, device: torch.device) -> "ChainStreams":
        return ChainStreams(seed, self.start, self.stop, device)

    def exact_mean(self, values: torch.Tensor) -> float:
        """Mean over all n_chains chains of values [n_local] in [0, 1] (e.g. acceptance probabilities), summed exactly
        in fixed point: bit-identical whatever the world size and the order of the terms."""
        # Clamped into [0, 1] (a NaN counts as 0) so the int64 sum can neither overflow nor turn into garbage.
        fixed = (values.detach().double().nan_to_num(0.0).clamp(0.0, 1.0) * _FIXED_POINT).round().to(torch.long)
        total = fixed.sum().reshape(1)
        if self.distributed:
            total = _distributed.all_gather_rows(total).sum()
        return int(total) / _FIXED_POINT / self.n_chains

    def total(self, count: int) -> int:
        """An integer count summed over ranks."""
        if not self.distributed:
            return count
        return int(_distributed.all_gather_rows(torch.tensor([count], dtype=torch.long)).sum())

    def gather(self, local: torch.Tensor, chain_dim: int = 0) -> torch.Tensor:
        """This rank's slice of a per-chain tensor (chains along chain_dim) -> the tensor of all chains, on every
        rank, in chain order (ranks own consecutive chains in rank order)."""
        if not self.distributed:
            return local
        moved = local.movedim(chain_dim, 0)
        return _distributed.all_gather_rows(moved).movedim(0, chain_dim)


class ChainStreams:
    """The random streams of chains [start, stop): one generator per block of CHAIN_BLOCK chains, on `device`.

    Every draw takes a full block of values from each block's generator whatever the other blocks do, so the draws
    of a chain depend only on (seed, chain index) and on the sequence of calls."""

    def __init__(self, seed: int, start: int, stop: int, device: torch.device):
        if start % CHAIN_BLOCK and start != stop:
            raise ValueError(f"a shard must start at a block boundary, got chain {start}")  # internal invariant
        self.sizes: List[int] = []
        self.generators: List[torch.Generator] = []
        for first in range(start, stop, CHAIN_BLOCK):
            generator = torch.Generator(device=device)
            generator.manual_seed(block_seed(seed, first // CHAIN_BLOCK))
            self.generators.append(generator)
            self.sizes.append(min(CHAIN_BLOCK, stop - first))
        self.device = torch.device(device)

    def normal(self, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """[n_local, dim] standard normal draws."""
        if not self.generators:  # a rank without chains
            return torch.empty(0, dim, device=self.device, dtype=dtype)
        # Every block draws a full block of rows, even the last, partial one: torch's samplers order their output by
        # the request size, so a partial draw would give chain c different numbers for another n_chains.
        return torch.cat([torch.randn(CHAIN_BLOCK, dim, generator=generator, device=self.device, dtype=dtype)[:size]
                          for size, generator in zip(self.sizes, self.generators)])

    def uniform(self, dtype: torch.dtype) -> torch.Tensor:
        """[n_local] uniform draws on [0, 1)."""
        if not self.generators:
            return torch.empty(0, device=self.device, dtype=dtype)
        return torch.cat([torch.rand(CHAIN_BLOCK, generator=generator, device=self.device, dtype=dtype)[:size]
                          for size, generator in zip(self.sizes, self.generators)])
