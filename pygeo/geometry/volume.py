"""The log-volume 1/2 log det G(z) of a metric over a regular grid of the latent box (what the demo draws as its heat
map), in chunks with a progress bar, optionally shared out between the ranks of a torch.distributed group."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import List, Sequence, Union

import torch
from tqdm.auto import tqdm

from .. import _checks, _distributed


@dataclass
class VolumeMap:
    """axes: d tensors [R_k], the grid coordinates along each latent axis; log_volume [R_0, ..., R_{d-1}]: 1/2 log det
    G at the grid point (axes[0][i_0], ..., axes[d-1][i_{d-1}]) ("ij" indexing: dimension k runs along latent axis k;
    for imshow of a 2-D map with x across and y up, draw log_volume.T with origin="lower")."""

    axes: List[torch.Tensor]
    log_volume: torch.Tensor


def volume_map(metric, lo: Sequence[float], hi: Sequence[float], resolution: Union[int, Sequence[int]], *,
               batch_size: int = 4096, dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device, None] = None, progress: bool = True,
               distributed: bool = False) -> VolumeMap:
    """metric.log_volume on the regular grid of resolution[k] points from lo[k] to hi[k] along each latent axis k.

    lo, hi: the box corners, d numbers each (d = the metric's latent dimension); resolution: points per axis, one int
    for every axis or d ints (each >= 2). The grid is evaluated batch_size points at a time (memory O(batch_size)),
    with a tqdm bar; Ctrl-C stops it (KeyboardInterrupt propagates: nothing partial is returned).
    distributed=True: the chunks are shared out between the ranks of the initialised default torch.distributed group
    (contiguous, balanced) and every rank returns the whole map, bit-identical to one process (the chunks do not
    depend on the number of ranks). CPU tensors travel over gloo, CUDA tensors over NCCL on the current device.
    """
    lo = _corner("lo", lo)
    hi = _corner("hi", hi)
    if lo.numel() != hi.numel():
        raise ValueError(f"lo and hi must have the same number of coordinates, got {lo.numel()} and {hi.numel()}")
    if not bool((hi > lo).all()):
        raise ValueError(f"hi must exceed lo along every axis, got lo={lo.tolist()} and hi={hi.tolist()}")
    d = lo.numel()
    if isinstance(resolution, numbers.Integral) and not isinstance(resolution, bool):
        resolution = [int(resolution)] * d
    resolution = list(resolution) if isinstance(resolution, (list, tuple)) else resolution
    if not isinstance(resolution, list) or len(resolution) != d or any(
            isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 2 for r in resolution):
        raise ValueError(f"resolution must be an int >= 2 or {d} ints >= 2 (one per axis), got {resolution!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True or False, got {distributed!r}")
    if not callable(getattr(metric, "log_volume", None)):
        raise TypeError(f"metric must follow the pygeo metric contract (log_volume(z)), got {type(metric).__name__}")
    rank, world = _distributed.require_process_group() if distributed else (0, 1)
    device = torch.device("cpu") if device is None else torch.device(device)

    axes = [torch.linspace(float(lo[k]), float(hi[k]), int(resolution[k]), dtype=dtype, device=device)
            for k in range(d)]
    shape = [int(r) for r in resolution]
    total = math.prod(shape)
    n_chunks = math.ceil(total / batch_size)
    mine = _distributed.rank_share(n_chunks, rank, world)
    values = []
    with torch.no_grad():
        for chunk in tqdm(mine, desc="volume map" + (f" (rank {rank})" if distributed else ""), unit="chunk",
                          disable=not progress):
            flat_index = torch.arange(chunk * batch_size, min((chunk + 1) * batch_size, total), device=device)
            points = torch.stack([axes[k][index] for k, index in enumerate(_unravel(flat_index, shape))], -1)
            values.append(metric.log_volume(points).to(dtype))
    local = torch.cat(values) if values else torch.zeros(0, dtype=dtype, device=device)
    if distributed:  # the shares are contiguous runs of chunks in rank order: concatenation restores the grid order
        local = _distributed.all_gather_rows(local)
    return VolumeMap(axes=axes, log_volume=local.reshape(shape))


def _corner(name: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        corner = value.detach().to("cpu", torch.float64).reshape(-1)
    else:
        try:
            corner = torch.tensor([_checks.number(f"{name}[{k}]", v) for k, v in enumerate(value)], dtype=torch.float64)
        except TypeError as error:
            if "not iterable" in str(error):
                raise TypeError(f"{name} must be a sequence of d numbers (a corner of the box), got "
                                f"{type(value).__name__}") from None
            raise
    if corner.numel() == 0 or not bool(torch.isfinite(corner).all()):
        raise ValueError(f"{name} must hold d >= 1 finite numbers, got {corner.tolist()}")
    return corner


def _unravel(flat_index: torch.Tensor, shape: List[int]):
    """Row-major ("ij") grid indices [n] per axis of flat indices [n]."""
    indices = []
    for size in reversed(shape):
        indices.append(flat_index % size)
        flat_index = torch.div(flat_index, size, rounding_mode="floor")
    return indices[::-1]
