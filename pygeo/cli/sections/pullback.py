"""Demo section: the decoder's pullback (Fisher) metric over the latent plane, and what it costs on each backend."""
from __future__ import annotations

from typing import Callable, List, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure  # object-oriented matplotlib: renders with Agg, no pyplot global state

import pygeo

from .. import context

TITLE = "Pullback metric of the decoder"

_CHUNK = 4096  # grid points per metric call: bounded memory on any grid


def run(ctx: "context.DemoContext") -> str:
    low, high = _latent_box(ctx.latents)
    resolution = 24 if ctx.quick else 90
    grid = _grid(low, high, resolution, ctx.device)  # [resolution^2, 2], row-major with y varying slowest
    with ctx.timed("pullback: log volume on the grid"), torch.no_grad():
        log_volume = torch.cat([ctx.metric.log_volume(chunk)
                                for chunk in ctx.progress(grid.split(_CHUNK), desc="log volume")])
    with torch.no_grad():
        log_volume_at_data = torch.cat([ctx.metric.log_volume(chunk) for chunk in ctx.latents[:2000].split(_CHUNK)])
    log_volume = log_volume.reshape(resolution, resolution).cpu()

    volume_markdown = ctx.save_figure(_plot_volume(ctx, log_volume, low, high), "pullback_volume.png",
                                      "latent codes over the volume element")
    side = 6 if ctx.quick else 15
    with ctx.timed("pullback: decode an image grid"):
        decoded_markdown = ctx.save_figure(_plot_decoded(ctx, low, high, side), "pullback_decoded.png",
                                           "decoded images across the latent plane")

    with ctx.timed("pullback: backend timings"):
        repeats = 1 if ctx.quick else 5
        spread = torch.linspace(0, len(grid) - 1, 256 if ctx.quick else 2048).round().long().unique()
        rows = _time_providers(ctx, grid[spread.to(grid.device)], repeats)

    lines = [
        f"The decoder maps a latent point z to Bernoulli logits l(z) over the {ctx.images.shape[1]} pixels. Its Fisher "
        "metric pulled back to the latent plane is G(z) = J^T diag(p(1-p)) J with J = dl/dz and p = sigmoid(l): a "
        "small step dz changes the decoded image distribution by KL = 1/2 dz^T G dz. The volume element sqrt(det G) "
        "says how much change of the decoded images one unit of latent area holds.",
        "",
        volume_markdown,
        "",
        f"Latent codes of {len(ctx.latents)} digits (encoder means, coloured by class) over log sqrt(det G) on a "
        f"{resolution}x{resolution} grid. Median log sqrt(det G): {float(log_volume_at_data.median()):.2f} at the "
        f"encoded digits, {float(log_volume.median()):.2f} over the grid "
        f"(range {float(log_volume.min()):.2f} to {float(log_volume.max()):.2f}).",
        "",
        decoded_markdown,
        "",
        f"Decoded means sigmoid(l(z)) on a {side}x{side} grid over the same box.",
        "",
        f"Computing G at {rows[0][1]} grid points ({ctx.device}, best of {repeats} round-robin runs after a warm-up; "
        "max deviation from the plain-PyTorch baseline relative to its largest entry):",
        "",
        "| provider | points | time (ms) | speed-up vs baseline | max rel. deviation |",
        "|---|---:|---:|---:|---:|",
    ]
    baseline_seconds = rows[0][2]
    for name, points, seconds, deviation in rows:
        lines.append(f"| {name} | {points} | {1e3 * seconds:.1f} | {baseline_seconds / seconds:.1f}x | {deviation:.1e} |")
    return "\n".join(lines)


def _latent_box(latents: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """A box holding all but the most extreme 0.5% of codes per axis, padded by 10% of its size: low, high [2]."""
    codes = latents.detach().cpu().double().numpy()
    low, high = np.percentile(codes, 0.5, axis=0), np.percentile(codes, 99.5, axis=0)
    pad = 0.1 * np.maximum(high - low, 1e-3)
    return low - pad, high + pad


def _grid(low: np.ndarray, high: np.ndarray, resolution: int, device) -> torch.Tensor:
    """[resolution^2, 2] points; entry (row, column) of the image is point row * resolution + column, y by row."""
    xs = torch.linspace(float(low[0]), float(high[0]), resolution)
    ys = torch.linspace(float(low[1]), float(high[1]), resolution)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], -1).to(device)


def _plot_volume(ctx, log_volume: torch.Tensor, low, high) -> Figure:
    figure = Figure(figsize=(8.2, 6.2), layout="constrained")
    axes = figure.add_subplot()
    extent = (low[0], high[0], low[1], high[1])
    heat = axes.imshow(log_volume.numpy(), origin="lower", extent=extent, aspect="auto",
                       cmap=context.log_volume_colormap())
    figure.colorbar(heat, ax=axes, label=context.LOG_VOLUME_LABEL)
    context.scatter_classes(axes, ctx.latents.detach().cpu().numpy(), ctx.labels.cpu().numpy(), size=5, alpha=0.85)
    axes.set_xlim(low[0], high[0])
    axes.set_ylim(low[1], high[1])
    axes.set_xlabel("z1")
    axes.set_ylabel("z2")
    axes.set_title("Encoded digits over the pullback volume element")
    figure.legend(*axes.get_legend_handles_labels(), loc="outside right upper", markerscale=3, fontsize=8)
    return figure


def _plot_decoded(ctx, low, high, side: int) -> Figure:
    grid = _grid(low, high, side, ctx.device)
    with torch.no_grad():
        pixels = torch.sigmoid(ctx.vae.decoder(grid)).cpu()
    height = int(round(pixels.shape[1] ** 0.5))
    if height * height != pixels.shape[1]:
        raise ValueError(f"decoded images have {pixels.shape[1]} pixels, not a square image")
    # Tile so that the top row of the picture is the largest z2, like the scatter plot.
    tiles = pixels.reshape(side, side, height, height).flip(0)
    mosaic = tiles.permute(0, 2, 1, 3).reshape(side * height, side * height).numpy()
    figure = Figure(figsize=(6.5, 6.5), layout="constrained")
    axes = figure.add_subplot()
    axes.imshow(mosaic, cmap="gray_r", vmin=0, vmax=1, extent=(low[0], high[0], low[1], high[1]), aspect="auto")
    axes.set_xlabel("z1")
    axes.set_ylabel("z2")
    axes.set_title("Decoded images across the latent plane")
    return figure


def _jacfwd_metric(decoder: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, eps: float) -> torch.Tensor:
    """The plain-PyTorch way: J [B, D, d] by vmapped forward-mode jacobians, then G = J^T diag(p(1-p)) J, with p
    clamped into [eps, 1 - eps] like PullbackMetric (saturated pixels would otherwise make the two differ by ~1e-4)."""
    J = torch.func.vmap(torch.func.jacfwd(decoder))(z)
    p = torch.sigmoid(decoder(z)).clamp(eps, 1 - eps)
    return torch.einsum("bri,br,brj->bij", J, p * (1 - p), J)


def _time_providers(ctx, points: torch.Tensor, repeats: int) -> List[Tuple[str, int, float, float]]:
    """(provider, points, best seconds, max deviation from the baseline relative to its largest entry); baseline first."""
    decoder = ctx.vae.decoder
    providers: List[Tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [
        ("plain PyTorch: vmap(jacfwd) + einsum (baseline)", lambda z: _jacfwd_metric(decoder, z, ctx.metric.eps))]
    # A plain function is not recognised as an MLP, so PullbackMetric takes its generic route (jvp + pygeo.ops.jtj).
    generic_decoder = lambda z: decoder(z)  # noqa: E731
    for backend in _backends_here(ctx.device):
        providers.append((f"pygeo generic (jvp + jtj), {backend}",
                          pygeo.PullbackMetric(generic_decoder, likelihood="bernoulli", backend=backend).metric))
    for backend in _backends_here(ctx.device):
        providers.append((f"pygeo fused MLP, {backend}",
                          pygeo.PullbackMetric(decoder, likelihood="bernoulli", backend=backend).metric))

    rows = context.compare_providers([(name, lambda compute=compute: compute(points)) for name, compute in providers],
                                     repeats, ctx.device, lambda it: ctx.progress(it, desc="metric timings"))
    return [(name, len(points), seconds, deviation) for name, seconds, deviation in rows]


def _backends_here(device: torch.device) -> List[str]:
    """Backends worth timing on `device`: not the Triton interpreter (a CPU correctness tool, not a speed one)."""
    if torch.device(device).type == "cuda":
        names = ("torch", "cuda", "triton")
    else:
        names = ("torch", "cpp")
    return [name for name in names if pygeo.backends()[name].available]
