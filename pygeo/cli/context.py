"""What a demo report section gets to work with."""
from __future__ import annotations

import contextlib
import math
import pathlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

Item = TypeVar("Item")

# One look for every figure of the report. Log volume always gets the same light-grey map (dark = large volume), so
# that class colours, red geodesics and black straight lines drawn on top stay visible everywhere.
LOG_VOLUME_LABEL = "log volume element, 1/2 log det G"
FIGURE_DPI = 110
DIGIT_PIXELS = 28


def log_volume_colormap():
    """The light greys of matplotlib's Greys map (0 to 0.6 of its range), for every log-volume heat map."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    return ListedColormap(matplotlib.colormaps["Greys"](np.linspace(0.0, 0.6, 256)), name="log_volume_greys")


def class_palette() -> List:
    """tab10 with its grey (digit 7) replaced by black, which a grey heat map would swallow."""
    import matplotlib

    palette = list(matplotlib.colormaps["tab10"].colors)
    palette[7] = (0.0, 0.0, 0.0)
    return palette


def scatter_classes(axes, codes: np.ndarray, labels: np.ndarray, size: float = 4, alpha: float = 0.6) -> None:
    """Encoded digits coloured by class, one legend entry per digit."""
    palette = class_palette()
    for digit in sorted(set(labels.tolist())):
        chosen = labels == digit
        axes.scatter(codes[chosen, 0], codes[chosen, 1], s=size, color=palette[digit % 10], alpha=alpha,
                     edgecolors="none", label=f"digit {digit}")


def digit_grid(images: torch.Tensor, columns: int) -> np.ndarray:
    """images [n, 784] in [0, 1] -> one canvas of `columns` digits a row, dark digits on white (gray_r, vmin 0,
    vmax 1), a white gap between digits."""
    pixels = images.detach().float().cpu().reshape(-1, DIGIT_PIXELS, DIGIT_PIXELS).numpy()
    rows = -(-len(pixels) // columns)
    cell = DIGIT_PIXELS + 2
    canvas = np.zeros((rows * cell, columns * cell))
    for index, image in enumerate(pixels):
        row, column = divmod(index, columns)
        canvas[row * cell + 1:row * cell + 1 + DIGIT_PIXELS, column * cell + 1:column * cell + 1 + DIGIT_PIXELS] = image
    return canvas


def show_digits(axes, images: torch.Tensor, columns: int, title: str) -> None:
    """A digit grid on `axes`, black on white, framed, without axis ticks."""
    axes.imshow(digit_grid(images, columns), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])


def digit_grids_side_by_side(left: torch.Tensor, right: torch.Tensor, left_title: str, right_title: str):
    """A matplotlib Figure with two digit grids ([N, 784] in [0, 1] each) side by side, square-ish grids."""
    from matplotlib.figure import Figure

    columns = int(np.ceil(np.sqrt(max(len(left), len(right)))))
    figure = Figure(figsize=(10, 5.4), layout="constrained")
    panels = figure.subplots(1, 2)
    show_digits(panels[0], left, columns, left_title)
    show_digits(panels[1], right, columns, right_title)
    return figure


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
    figures: file name -> the matplotlib Figure saved by `save_figure`, kept so that tests can inspect titles,
        labels and legends (matplotlib's objects, not pixels).
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
    figures: Dict[str, Any] = field(default_factory=dict)

    def save_figure(self, figure, name: str, description: str) -> str:
        """Saves the matplotlib Figure as out_dir/name (a .png; the bounding box is fitted to everything drawn, so no
        title or legend is clipped), records it in `figures`, and returns the markdown that shows it."""
        if not name.endswith(".png"):
            raise ValueError(f"figure name must end with .png, got {name!r}")
        figure.savefig(self.out_dir / name, dpi=FIGURE_DPI, bbox_inches="tight")
        self.figures[name] = figure
        return f"![{description}]({name})"

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
