"""Demo section: geodesics and geodesic distances with and without the uncertainty term.

The decoder's mean (sigmoid of the VAE's logits) becomes the mean of a Gaussian decoder whose std is an RBF network
over k-means centres of the encoded digits (pygeo.models.fit_uncertainty_decoder; Arvanitidis, Hansen & Hauberg,
ICLR 2018), fitted with the mean frozen. Two metrics on the same latent plane: without the term, G = J_mu^T J_mu;
with it, the expected metric G = J_mu^T J_mu + J_sigma^T J_sigma (pygeo.PullbackMetric(..., form="expected")).
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure  # object-oriented matplotlib: renders with Agg, no pyplot global state
from torch import nn

import pygeo
from pygeo.geometry import curve_energy
from pygeo.models import fit_uncertainty_decoder

from .. import context

TITLE = "Geodesics and geodesic distances, with and without the uncertainty term"

# The blog's examples of classes that geodesic distances bring closer.
_CLAIMED_PAIRS = ((4, 9), (3, 8))
_CHUNK = 4096


def run(ctx) -> str:
    quick = ctx.quick
    latents = ctx.latents.detach()
    labels = ctx.labels.detach().cpu()
    images = ctx.images.detach().to(latents.dtype)
    n_centers = min(16 if quick else 64, len(latents))
    fit_steps = 30 if quick else 60

    # The Gaussian mean is the Bernoulli mean sigmoid(logits): an MLP still (the fused paths apply).
    mean = nn.Sequential(*ctx.vae.decoder, nn.Sigmoid())
    with ctx.timed("geodesics: fit the RBF std (mean frozen)"):
        decoder, nll = fit_uncertainty_decoder(mean, latents, images, n_centers=n_centers, steps=fit_steps, lr=0.2,
                                               seed=ctx.seed, progress=ctx.show_progress)
    metrics = {"without": pygeo.PullbackMetric(mean, likelihood="euclidean"),
               "with": pygeo.PullbackMetric(decoder, likelihood="gaussian", form="expected")}
    names = {"without": "without the term: J_mu^T J_mu", "with": "with the term: J_mu^T J_mu + J_sigma^T J_sigma"}

    # Pairs of typical digits (nearest their class median) whose straight line crosses a region of high std.
    n_pairs = 2 if quick else 4
    pairs, pair_indices, crossing = _pairs_across_gaps(latents, labels, decoder, n_pairs)
    z0 = latents[[a for a, _ in pair_indices]]
    z1 = latents[[b for _, b in pair_indices]]
    n_points = 16 if quick else 32
    max_iter = 40 if quick else 300
    weights = torch.linspace(0, 1, n_points, dtype=z0.dtype, device=z0.device)[:, None]
    straight = z0[:, None] * (1 - weights) + z1[:, None] * weights
    paths: Dict[str, torch.Tensor] = {}
    rows = []
    for key, metric in metrics.items():
        with ctx.timed(f"geodesics: {len(pairs)} pairs {key} the term (energy solver)"):
            result = pygeo.geodesic(metric, z0, z1, n_points=n_points, method="energy", max_iter=max_iter)
        with torch.no_grad():
            _, straight_length = curve_energy(metric, straight)
        paths[key] = result.points.detach().cpu()
        rows.append((key, straight_length.tolist(), result.length.tolist(), result.converged.tolist()))

    low, high = _latent_box(latents)
    resolution = 24 if quick else 80
    grid = _grid(low, high, resolution, latents)
    log_volume = {}
    with ctx.timed("geodesics: volume heat maps"), torch.no_grad():
        for key, metric in metrics.items():
            log_volume[key] = torch.cat([metric.log_volume(chunk) for chunk in grid.split(_CHUNK)]).reshape(
                resolution, resolution).cpu()
    paths_markdown = ctx.save_figure(
        _plot_paths(latents.cpu(), labels, log_volume, low, high, straight.cpu(), paths, names),
        "geodesics_paths.png", "geodesics with and without the uncertainty term")

    # Class-by-class distances between a few digits of every class, under both metrics and in the latent plane.
    per_class = 2 if quick else 3
    chosen = _sample_per_class(labels, per_class, torch.Generator().manual_seed(ctx.seed))
    points = latents[chosen.to(latents.device)]
    chosen_labels = labels[chosen]
    classes = sorted(set(chosen_labels.tolist()))
    n_solves = len(chosen) * (len(chosen) - 1) // 2
    unconverged: Dict[str, str] = {}
    matrices = {"Euclidean": _class_means(torch.cdist(points, points).cpu(), chosen_labels, classes)}
    for key, metric in metrics.items():
        with ctx.timed(f"geodesics: distance matrix {key} the term ({n_solves} pairs)"), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            distances = pygeo.geodesic_distances(metric, points, n_points=7 if quick else 9,
                                                 max_iter=20 if quick else 100, progress=ctx.show_progress)
        if any("interrupted" in str(warning.message) for warning in caught):
            raise KeyboardInterrupt  # Ctrl-C left unsolved (NaN) pairs: the demo stops here
        unconverged[key] = " ".join(str(warning.message) for warning in caught if "did not converge" in
                                    str(warning.message))
        matrices[f"geodesic {key} the term"] = _class_means(distances.cpu(), chosen_labels, classes)
    matrix_markdown = ctx.save_figure(_plot_matrices(matrices, classes), "geodesics_distance_matrices.png",
                                      "class-by-class distance matrices")

    lines = [
        "The demo VAE's decoder has no observation noise of its own. Here its mean mu(z) = sigmoid(logits(z)) becomes "
        "the mean of a Gaussian decoder whose std sigma(z) = beta(z)^-1/2 comes from an RBF network: "
        f"beta(z) = W^T v(z) + zeta over {n_centers} k-means centres of the encoded digits, positive weights W fitted "
        f"with the mean frozen ({len(nll)} full-batch Adam steps on the Gaussian negative log-likelihood, "
        f"{nll[0]:.0f} -> {nll[-1]:.0f} nats per image; zeta = {decoder.variance.zeta:g}, so sigma -> "
        f"{decoder.variance.zeta ** -0.5:.0f} far from the data). This is the uncertainty-aware decoder of Arvanitidis, "
        "Hansen & Hauberg (ICLR 2018, pygeo.models.fit_uncertainty_decoder). Two metrics on the same latent plane "
        "(docs/MATH.md section 1):",
        "",
        "- without the uncertainty term: G = J_mu^T J_mu (pygeo.PullbackMetric(mean, likelihood=\"euclidean\"));",
        "- with it: the expected metric G = J_mu^T J_mu + J_sigma^T J_sigma "
        "(pygeo.PullbackMetric(decoder, likelihood=\"gaussian\", form=\"expected\")), large where sigma rises, at the "
        "edges of the data and across gaps.",
        "",
        f"Pairs: for every class the encoded digit nearest the class median; of all pairs of such digits, the {n_pairs} "
        "whose straight line reaches the largest std relative to its end points (it crosses a low-density gap). "
        f"Geodesics by pygeo.geodesic (curve-energy minimisation, {n_points} points, at most {max_iter} L-BFGS "
        "iterations).",
        "",
        paths_markdown,
        "",
        "| digits | max std on the line / at the ends | metric | straight-line length | geodesic length | ratio | "
        "converged |",
        "|---|---:|---|---:|---:|---:|:---:|",
    ]
    for index, (a, b) in enumerate(pairs):
        for key, straight_lengths, geodesic_lengths, converged in rows:
            s, g = straight_lengths[index], geodesic_lengths[index]
            lines.append(f"| {a} -> {b} | {crossing[index]:.1f} | {key} the term | {s:.2f} | {g:.2f} | "
                         f"{g / max(s, 1e-12):.2f} | {'yes' if converged[index] else 'no'} |")
    separation = {name: _separation(matrix) for name, matrix in matrices.items()}
    lines += [
        "",
        f"Distances between {per_class} digits per class ({len(chosen)} digits, {n_solves} geodesic solves per metric "
        "by pygeo.geodesic_distances, initialised from shortest paths on a k-nearest-neighbour graph). Each matrix "
        "holds the mean distance between the digits of two classes, divided by its mean off-diagonal entry, so 1 is "
        "an average pair of classes and smaller is closer.",
        "",
        matrix_markdown,
        "",
        "| distances | separation (between / within class) | " +
        " | ".join(f"{a}-{b} relative to the mean" for a, b in _CLAIMED_PAIRS) + " |",
        "|---|---:|" + "---:|" * len(_CLAIMED_PAIRS),
    ]
    for name, matrix in matrices.items():
        relative = [_entry(matrix, classes, a, b) for a, b in _CLAIMED_PAIRS]
        lines.append(f"| {name} | {separation[name]:.2f} | " + " | ".join(f"{value:.2f}" for value in relative) + " |")
    for key, message in unconverged.items():
        if message:
            lines += ["", f"Distances {key} the term: {message.split(': ', 1)[-1]}."]
    lines += ["", _verdict(matrices, classes, separation, rows, quick)]
    return "\n".join(lines)


def _pairs_across_gaps(latents: torch.Tensor, labels: torch.Tensor, decoder, n_pairs: int):
    """((class a, class b) pairs, (index a, index b) pairs, max std on the straight line / mean std at its ends) for
    the n_pairs pairs of class-typical digits whose straight line crosses the highest std, no class in two pairs; the
    classes are read from `labels` at the chosen indices."""
    classes = sorted(set(labels.tolist()))
    typical = [_typical_index(latents, labels, c) for c in classes]
    candidates = [(i, j) for n, i in enumerate(typical) for j in typical[n + 1:]]
    weights = torch.linspace(0, 1, 24, dtype=latents.dtype, device=latents.device)[:, None]
    scores = []
    with torch.no_grad():
        for i, j in candidates:
            line = latents[i] * (1 - weights) + latents[j] * weights
            std = decoder.variance(line).mean(-1)  # mean std over the pixels, along the line
            scores.append(float(std.max() / (0.5 * (std[0] + std[-1]))))
    order, used = [], set()
    for k in sorted(range(len(candidates)), key=lambda k: -scores[k]):  # highest first, each class in one pair at most
        classes_of_pair = {int(labels[candidates[k][0]]), int(labels[candidates[k][1]])}
        if len(order) < n_pairs and not classes_of_pair & used:
            order.append(k)
            used |= classes_of_pair
    indices = [candidates[k] for k in order]
    pairs = [(int(labels[i]), int(labels[j])) for i, j in indices]
    return pairs, indices, [scores[k] for k in order]


def _verdict(matrices, classes, separation, rows, quick: bool) -> str:
    """The blog's three claims, each stated as holding or not by the numbers above."""
    with_term, without_term = "geodesic with the term", "geodesic without the term"
    ratios = {key: [g / max(s, 1e-12) for s, g in zip(straight, geodesic)] for key, straight, geodesic, _ in rows}
    bends = min(ratios["with"]) < 0.9 * min(ratios["without"])
    structure = separation[with_term] > separation["Euclidean"]
    closer = [_entry(matrices[with_term], classes, a, b) < _entry(matrices["Euclidean"], classes, a, b)
              for a, b in _CLAIMED_PAIRS]

    def holds(flag: bool) -> str:
        return "holds" if flag else "does not hold"

    claims = [
        f"\"geodesics bend around low-density regions\" {holds(bends)} here (shortest geodesic-to-straight ratio "
        f"{min(ratios['with']):.2f} with the term, {min(ratios['without']):.2f} without);",
        f"\"geodesic distance matrices show more structure\" {holds(structure)} (separation "
        f"{separation[with_term]:.2f} with the term, {separation[without_term]:.2f} without, "
        f"{separation['Euclidean']:.2f} Euclidean);",
    ]
    for (a, b), flag in zip(_CLAIMED_PAIRS, closer):
        claims.append(f"\"{a} and {b} are closer\" {holds(flag)} ({_entry(matrices[with_term], classes, a, b):.2f} "
                      f"of the mean geodesic distance with the term, {_entry(matrices['Euclidean'], classes, a, b):.2f} "
                      "of the mean Euclidean one);")
    caveat = (" This is a --quick smoke run: tiny data, two training epochs and few digits per class, so these "
              "verdicts say nothing about the claims." if quick else "")
    return ("The blog's claims, checked on these numbers: " + " ".join(claims)[:-1] + "." + " The term does its work "
            "only where sigma rises; without it the pullback of the mean alone changes little across gaps." + caveat)


def _entry(matrix: np.ndarray, classes: Sequence[int], a: int, b: int) -> float:
    if a not in classes or b not in classes:
        return float("nan")
    return float(matrix[classes.index(a), classes.index(b)])


def _typical_index(latents: torch.Tensor, labels: torch.Tensor, label: int) -> int:
    members = (labels == label).nonzero().squeeze(-1).to(latents.device)
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
    pad = 0.15 * np.maximum(high - low, 1e-3)
    return low - pad, high + pad


def _grid(low, high, resolution: int, like: torch.Tensor) -> torch.Tensor:
    """[resolution^2, 2], row-major with z2 varying slowest (image row = z2)."""
    xs = torch.linspace(float(low[0]), float(high[0]), resolution)
    ys = torch.linspace(float(low[1]), float(high[1]), resolution)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], -1).to(like)


def _plot_paths(latents, labels, log_volume, low, high, straight, paths, names) -> Figure:
    figure = Figure(figsize=(13, 5.6), layout="constrained")
    panels = figure.subplots(1, 2)
    extent = (low[0], high[0], low[1], high[1])
    codes = latents.numpy()
    for axes, key in zip(panels, ("without", "with")):
        heat = axes.imshow(log_volume[key].numpy(), origin="lower", extent=extent, aspect="auto",
                           cmap=context.log_volume_colormap())
        figure.colorbar(heat, ax=axes, label=context.LOG_VOLUME_LABEL, shrink=0.9)
        context.scatter_classes(axes, codes, labels.numpy(), size=3, alpha=0.5)
        for index in range(straight.shape[0]):
            axes.plot(straight[index, :, 0], straight[index, :, 1], "--", color="black", linewidth=1.2,
                      label="straight line" if index == 0 else None)
            axes.plot(paths[key][index, :, 0], paths[key][index, :, 1], "-", color="red", linewidth=2.2,
                      label="geodesic" if index == 0 else None)
        ends = torch.cat([straight[:, 0], straight[:, -1]]).numpy()
        axes.scatter(ends[:, 0], ends[:, 1], marker="o", s=40, facecolors="white", edgecolors="black", linewidths=1.2,
                     zorder=5, label="pair end points")
        axes.set_xlim(low[0], high[0])
        axes.set_ylim(low[1], high[1])
        axes.set_xlabel("z1")
        axes.set_ylabel("z2")
        axes.set_title(f"Geodesics {names[key]}", fontsize=10)
    handles, legend_labels = panels[1].get_legend_handles_labels()
    figure.legend(handles, legend_labels, loc="outside right center", fontsize=8, markerscale=2)
    figure.suptitle("Geodesics (red) against straight lines (black, dashed) over the log volume element")
    return figure


def _plot_matrices(matrices: Dict[str, np.ndarray], classes: List[int]) -> Figure:
    figure = Figure(figsize=(4.6 * len(matrices), 4.6), layout="constrained")
    panels = figure.subplots(1, len(matrices))
    vmax = max(float(matrix.max()) for matrix in matrices.values())
    for axes, (name, matrix) in zip(panels, matrices.items()):
        image = axes.imshow(matrix, cmap="viridis", vmin=0, vmax=vmax)
        axes.set_xticks(range(len(classes)), [str(c) for c in classes])
        axes.set_yticks(range(len(classes)), [str(c) for c in classes])
        axes.set_xlabel("digit class")
        axes.set_ylabel("digit class")
        axes.set_title(f"{name}\nseparation {_separation(matrix):.2f}", fontsize=10)
        figure.colorbar(image, ax=axes, shrink=0.8, label="distance / mean off-diagonal")
    figure.suptitle("Mean distance between classes (1 = an average pair of classes)")
    return figure
