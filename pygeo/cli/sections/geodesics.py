"""Demo section: geodesics of the decoder's metric against straight lines over the volume heat map, and a class-by-class
geodesic distance matrix beside the Euclidean one."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure  # object-oriented matplotlib: renders with Agg, no pyplot global state

import pygeo
from pygeo.geometry import curve_energy

TITLE = "Geodesics and geodesic distances"

_CLASS_PAIRS = [(0, 1), (2, 7), (3, 8), (4, 9), (5, 6), (1, 7)]


def run(ctx) -> str:
    generator = torch.Generator().manual_seed(ctx.seed)
    latents = ctx.latents.detach()
    labels = ctx.labels.detach().cpu()
    n_points = 12 if ctx.quick else 32
    max_iter = 30 if ctx.quick else 300

    # A few pairs of typical digits: for each class the encoded digit nearest the class median.
    pairs = [(a, b) for a, b in _CLASS_PAIRS if (labels == a).any() and (labels == b).any()][: 2 if ctx.quick else 6]
    typical = {c: _typical_index(latents, labels, c) for c in {c for pair in pairs for c in pair}}
    z0 = torch.stack([latents[typical[a]] for a, _ in pairs])
    z1 = torch.stack([latents[typical[b]] for _, b in pairs])
    with ctx.timed("geodesics: pairs (energy solver)"):
        result = pygeo.geodesic(ctx.metric, z0, z1, n_points=n_points, method="energy", max_iter=max_iter)
    with torch.no_grad():
        weights = torch.linspace(0, 1, n_points, dtype=z0.dtype, device=z0.device)[:, None]
        straight = z0[:, None] * (1 - weights) + z1[:, None] * weights
        _, straight_length = curve_energy(ctx.metric, straight)

    low, high = _latent_box(latents)
    resolution = 12 if ctx.quick else 60
    with ctx.timed("geodesics: volume heat map"), torch.no_grad():
        xs, ys = np.linspace(low[0], high[0], resolution), np.linspace(low[1], high[1], resolution)
        grid = torch.tensor(np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2), dtype=latents.dtype, device=latents.device)
        log_volume = torch.cat([ctx.metric.log_volume(chunk) for chunk in grid.split(2048)]).reshape(resolution, resolution)
    paths_figure = "geodesics_paths.png"
    _plot_paths(latents, labels, log_volume.cpu(), low, high, straight.cpu(), result.points.detach().cpu(),
                ctx.out_dir / paths_figure)

    # Class-by-class distances between a few digits of every class.
    per_class = 2 if ctx.quick else 4
    chosen = _sample_per_class(labels, per_class, generator)
    points = latents[chosen]
    with ctx.timed("geodesics: distance matrix"):
        geodesic_matrix = pygeo.geodesic_distances(ctx.metric, points, n_points=6 if ctx.quick else 12,
                                                   max_iter=20 if ctx.quick else 150, progress=ctx.show_progress)
    euclidean_matrix = torch.cdist(points, points)
    classes = sorted(set(labels[chosen].tolist()))
    chosen_labels = labels[chosen]
    geodesic_classes = _class_means(geodesic_matrix.cpu(), chosen_labels, classes)
    euclidean_classes = _class_means(euclidean_matrix.cpu(), chosen_labels, classes)
    matrix_figure = "geodesics_distance_matrices.png"
    _plot_matrices(geodesic_classes, euclidean_classes, classes, ctx.out_dir / matrix_figure)

    lines = [
        "Shortest paths under the decoder's Fisher metric (pygeo.geodesic, curve-energy minimisation with a batched "
        "L-BFGS; every pair converges on its own) bend around the regions where the decoded image changes fast "
        "(bright in the heat map of log sqrt(det G)), where a straight line in the latent plane cuts across them.",
        "",
        f"![geodesics against straight lines]({paths_figure})",
        "",
        "| digits | straight-line length | geodesic length | ratio | converged | iterations |",
        "|---|---:|---:|---:|:---:|---:|",
    ]
    for (a, b), s, g, ok, it in zip(pairs, straight_length.tolist(), result.length.tolist(),
                                    result.converged.tolist(), result.iterations.tolist()):
        lines.append(f"| {a} -> {b} | {s:.2f} | {g:.2f} | {g / max(s, 1e-12):.2f} | {'yes' if ok else 'no'} | {it} |")
    lines += [
        "",
        f"Lengths are Riemannian (curves of {n_points} points). Below, {per_class} digits per class: the mean geodesic "
        f"distance (pygeo.geodesic_distances, {len(chosen) * (len(chosen) - 1) // 2} pairs initialised from shortest "
        "paths on a k-nearest-neighbour graph) and the mean Euclidean latent distance between classes, each divided "
        "by its mean off-diagonal entry.",
        "",
        f"![class-by-class distances]({matrix_figure})",
        "",
        f"Separation (mean between-class over mean within-class distance): geodesic "
        f"{_separation(geodesic_classes):.2f}, Euclidean {_separation(euclidean_classes):.2f}.",
    ]
    return "\n".join(lines)


def _typical_index(latents: torch.Tensor, labels: torch.Tensor, label: int) -> int:
    members = (labels == label).nonzero().squeeze(-1)
    median = latents[members].median(0).values
    return int(members[(latents[members] - median).norm(dim=-1).argmin()])


def _sample_per_class(labels: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    chosen = []
    for label in sorted(set(labels.tolist())):
        members = (labels == label).nonzero().squeeze(-1)
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
    return torch.cat(chosen)


def _class_means(matrix: torch.Tensor, labels: torch.Tensor, classes: List[int]) -> np.ndarray:
    """Mean distance between the points of class a and class b (own pairs only, no zero diagonal), scaled by the mean
    off-diagonal class entry."""
    means = np.zeros((len(classes), len(classes)))
    for row, a in enumerate(classes):
        for col, b in enumerate(classes):
            block = matrix[labels == a][:, labels == b]
            if a == b:
                n = block.shape[0]
                means[row, col] = float(block.sum() / max(n * (n - 1), 1))
            else:
                means[row, col] = float(block.mean())
    off_diagonal = means[~np.eye(len(classes), dtype=bool)]
    return means / max(off_diagonal.mean(), 1e-12) if off_diagonal.size else means


def _separation(class_means: np.ndarray) -> float:
    off = ~np.eye(len(class_means), dtype=bool)
    within = float(np.diag(class_means).mean())
    return float(class_means[off].mean()) / within if within > 0 and off.any() else float("nan")


def _latent_box(latents: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    codes = latents.detach().cpu().double().numpy()
    low, high = np.percentile(codes, 0.5, axis=0), np.percentile(codes, 99.5, axis=0)
    pad = 0.1 * np.maximum(high - low, 1e-3)
    return low - pad, high + pad


def _plot_paths(latents, labels, log_volume, low, high, straight, geodesics, path) -> None:
    figure = Figure(figsize=(6.5, 5.5))
    axes = figure.add_subplot()
    image = axes.imshow(log_volume.numpy(), origin="lower", extent=(low[0], high[0], low[1], high[1]), cmap="magma",
                        aspect="auto")
    figure.colorbar(image, ax=axes, label="log sqrt(det G)")
    codes = latents.detach().cpu().numpy()
    axes.scatter(codes[:, 0], codes[:, 1], c=labels.numpy(), cmap="tab10", s=2, alpha=0.25)
    for index in range(straight.shape[0]):
        axes.plot(straight[index, :, 0], straight[index, :, 1], "--", color="white", linewidth=1)
        axes.plot(geodesics[index, :, 0], geodesics[index, :, 1], "-", color="cyan", linewidth=1.8)
    axes.set_xlim(low[0], high[0])
    axes.set_ylim(low[1], high[1])
    axes.set_title("geodesics (cyan) and straight lines (dashed)")
    figure.savefig(path, dpi=110, bbox_inches="tight")


def _plot_matrices(geodesic_classes, euclidean_classes, classes, path) -> None:
    figure = Figure(figsize=(10, 4.3))
    for position, (matrix, name) in enumerate([(geodesic_classes, "geodesic"), (euclidean_classes, "Euclidean")]):
        axes = figure.add_subplot(1, 2, position + 1)
        image = axes.imshow(matrix, cmap="viridis")
        axes.set_xticks(range(len(classes)), [str(c) for c in classes])
        axes.set_yticks(range(len(classes)), [str(c) for c in classes])
        axes.set_title(f"{name} distance between classes (scaled)")
        figure.colorbar(image, ax=axes)
    figure.savefig(path, dpi=110, bbox_inches="tight")
