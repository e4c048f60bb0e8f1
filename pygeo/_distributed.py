"""torch.distributed helpers shared by the sharded long jobs (geodesic distances, volume maps, the samplers).

pygeo never starts processes or process groups itself: the user launches with torchrun (or any other launcher) and
calls torch.distributed.init_process_group(...) first; these helpers only check for that group, split work between
its ranks and gather the results. CPU tensors travel over gloo, CUDA tensors over NCCL on the rank's local device.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

_gloo_group = (None, None)  # (default group it was made for, a gloo group over all ranks) for CPU traffic when the
# default group cannot carry CPU tensors (NCCL only); remade when the default group is destroyed and made again


def require_process_group(what: str = "distributed=True") -> Tuple[int, int]:
    """(rank, world size) of the initialised default process group; a RuntimeError saying how to start one otherwise."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(f"{what} needs torch.distributed, which this PyTorch build does not include")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{what} needs an initialised default process group: launch with torchrun (e.g. `torchrun "
            f"--nproc-per-node 2 script.py`) and call torch.distributed.init_process_group('gloo') for CPU tensors "
            f"or ('nccl') for CUDA tensors before this call; or pass distributed=False")
    return dist.get_rank(), dist.get_world_size()


def rank_share(n_items: int, rank: int, world: int) -> range:
    """The contiguous share of items 0 .. n_items - 1 that `rank` of `world` takes: sizes differ by at most one, lower
    ranks take the larger shares, and the shares of ranks 0 .. world - 1 in order cover every item once."""
    for name, value in (("n_items", n_items), ("world", world), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world) = [0, {world}), got {rank}")
    base, extra = divmod(n_items, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def all_gather_rows(tensor: torch.Tensor, group: Optional[object] = None) -> torch.Tensor:
    """Concatenation in rank order of every rank's `tensor` [n_rank, ...] (row counts may differ between ranks; the
    trailing shape and dtype must not) -> [sum of n_rank, ...], on every rank, on tensor's device.

    CUDA tensors are gathered on the rank's local device (torch.cuda.current_device(), as NCCL requires) when the
    default group has an NCCL backend; CPU tensors over gloo (the default group when it has gloo, else a gloo group
    made once over all ranks). A CUDA tensor in a gloo-only group travels through the CPU."""
    import torch.distributed as dist

    require_process_group("all_gather_rows")
    if not isinstance(tensor, torch.Tensor) or tensor.dim() < 1:
        raise ValueError(f"tensor must be a torch.Tensor with at least one dimension [n, ...], got "
                         f"{getattr(tensor, 'shape', type(tensor).__name__)}")
    world = dist.get_world_size(group)
    backend = str(dist.get_backend(group)).lower()
    if tensor.is_cuda and "nccl" in backend:
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        if group is None and "gloo" not in backend:
            group = _gloo()
    local = tensor.detach().to(device).contiguous()

    # Row counts first (NCCL and gloo all_gather need equal shapes), then the rows padded to the largest count.
    count = torch.tensor([local.shape[0]], dtype=torch.long, device=device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    largest = max(counts)
    padded = local.new_zeros((largest, *local.shape[1:]))
    padded[:local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([piece[:n] for piece, n in zip(pieces, counts)]).to(tensor.device)


def barrier() -> None:
    """Wait for every rank of the default group (over gloo when the default group has it: no device needed)."""
    import torch.distributed as dist

    backend = str(dist.get_backend()).lower()
    dist.barrier(group=None if "gloo" in backend else _gloo())


def _gloo():
    """One gloo group over all ranks for CPU traffic when the default group is NCCL-only (made on first use: every
    rank must reach that first use, which holds since the callers are collective)."""
    global _gloo_group
    import torch.distributed as dist

    made_for, group = _gloo_group
    if group is None or made_for is not dist.group.WORLD:
        group = dist.new_group(backend="gloo")
        _gloo_group = (dist.group.WORLD, group)
    return group
