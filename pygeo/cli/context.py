"""What a demo report section gets to work with."""
from __future__ import annotations

import contextlib
import math
import pathlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Iterator, List, Optional, Tuple, TypeVar

import torch
from tqdm.auto import tqdm

Item = TypeVar("Item")


@dataclass
class DemoContext:
    """Shared state of one demo run, handed to every section's `run(ctx) -> markdown`.

    out_dir: where the report and the figures go (sections save PNGs here and link them by file name).
    vae: the trained pygeo.models.VAE; `.encoder(x) -> (mu, logvar)`, `.decoder(z) -> logits [.., 784]`.
    images: float32 [N, 784] in [0, 1]; labels: int64 [N]; latents: [N, 2] encoder means of the images.
    metric: pygeo.PullbackMetric(vae.decoder, likelihood="bernoulli").
    seed: the run's seed; quick: CI smoke mode (sections keep everything tiny); device: where the tensors live.
    timings: (name, seconds) recorded by `timed`, in order; the report prints them as a table.
    show_progress: whether `progress` draws bars.
    """

    out_dir: pathlib.Path
    vae: torch.nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    latents: torch.Tensor
    metric: Any
    seed: int = 0
    quick: bool = False
    device: torch.device = torch.device("cpu")
    timings: List[Tuple[str, float]] = field(default_factory=list)
    show_progress: bool = True

    def timed(self, name: str) -> ContextManager[None]:
        """Records the wall time of the block under `name` (also when it raises; CUDA work is synchronised)."""
        return record_time(self.timings, name, self.device)

    def progress(self, iterable: Iterable[Item], desc: Optional[str] = None, **tqdm_options) -> Iterable[Item]:
        """`iterable` with a tqdm bar (none when show_progress is False)."""
        return tqdm(iterable, desc=desc, disable=not self.show_progress, leave=False, **tqdm_options)


@contextlib.contextmanager
def record_time(timings: List[Tuple[str, float]], name: str, device: torch.device) -> Iterator[None]:
    """Appends (name, wall seconds of the block) to `timings`, also when the block raises; waits for CUDA work."""
    synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        synchronize(device)
        timings.append((name, time.perf_counter() - start))


def synchronize(device: torch.device) -> None:
    """Waits for queued CUDA work on `device` (no-op on the CPU), so wall-clock timings mean something."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def compare_providers(providers: List[Tuple[str, Callable[[], torch.Tensor]]], repeats: int, device: torch.device,
                      progress: Callable[[Iterable[Item]], Iterable[Item]] = lambda iterable: iterable
                      ) -> List[Tuple[str, float, float]]:
    """(name, best seconds, max deviation from the first provider (the baseline) relative to its largest entry) for
    each provider that can run here: each is called once to warm up (and give the values compared), then timed round
    robin, best of `repeats`, so that a slow spell of a shared machine hits every provider alike. A provider that
    raises pygeo.BackendUnavailableError is left out."""
    from .. import BackendUnavailableError

    results = {}
    with torch.no_grad():
        for name, compute in list(providers):
            try:
                results[name] = compute()
            except BackendUnavailableError:
                providers = [entry for entry in providers if entry[0] != name]
        seconds = {name: math.inf for name, _ in providers}
        for _ in progress(range(repeats)):
            for name, compute in providers:
                synchronize(device)
                start = time.perf_counter()
                compute()
                synchronize(device)
                seconds[name] = min(seconds[name], time.perf_counter() - start)
    reference = results[providers[0][0]]
    scale = reference.abs().max()
    return [(name, seconds[name], float((results[name] - reference).abs().max() / scale)) for name, _ in providers]
