"""Demo section: the posteriors as Gaussian balls (2-sigma ellipses) over the volume element, their overlap and how
much of the prior they cover (pygeo.diagnostics.posterior_balls)."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from matplotlib.figure import Figure  # object-oriented matplotlib: renders with Agg, no pyplot global state
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, Ellipse, Patch

from ... import diagnostics
from .. import context

TITLE = "Gaussian balls: posteriors, their overlap and the prior they cover"

_CHUNK = 4096  # grid points per metric call: bounded memory on any grid
_NEIGHBOURS = 5


def run(ctx: "context.DemoContext") -> str:
    with torch.no_grad():
        mu, logvar = ctx.vae.encode(ctx.images)
    with ctx.timed("balls: overlap and prior coverage"):
        balls = diagnostics.posterior_balls(mu, logvar, k=min(_NEIGHBOURS, len(mu) - 1),
                                            n_prior=500 if ctx.quick else 3000, seed=ctx.seed)
    shown = _spread_over_classes(ctx.labels, 60 if ctx.quick else 300, ctx.seed)
    shown_mu, shown_std = mu[shown].cpu().double().numpy(), (0.5 * logvar[shown]).exp().cpu().double().numpy()
    low, high = _box(shown_mu, shown_std)
    resolution = 24 if ctx.quick else 80
    xs, ys = np.linspace(low[0], high[0], resolution), np.linspace(low[1], high[1], resolution)
    grid = torch.tensor(np.stack(np.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2), dtype=mu.dtype,
                        device=mu.device)  # row-major, y varying slowest: image row = y index
    with ctx.timed("balls: log volume on the grid"), torch.no_grad():
        log_volume = torch.cat([ctx.metric.log_volume(chunk)
                                for chunk in ctx.progress(grid.split(_CHUNK), desc="log volume")])
    log_volume = log_volume.reshape(resolution, resolution).cpu().numpy()

    ellipses_figure = ctx.save_figure(_plot_ellipses(shown_mu, shown_std, ctx.labels[shown].cpu().numpy(), log_volume,
                                                     low, high), "balls_ellipses.png",
                                      "2-sigma posterior ellipses over the volume element")
    overlap_figure = ctx.save_figure(_plot_overlap_and_coverage(balls, mu.cpu().double().numpy()),
                                     "balls_overlap_coverage.png",
                                     "overlap with the nearest balls and coverage of the prior")

    radius, overlap = balls.radius.cpu(), balls.overlap.cpu()
    median_overlap = float(overlap.median())
    return "\n".join([
        "The KL term of the ELBO turns every code into a ball: the encoder's posterior N(mu(x), diag sigma(x)^2). "
        "Below, each of "
        f"{len(shown)} digits is drawn as its 2-sigma posterior ellipse (the region within Mahalanobis distance 2 of "
        "its mean), coloured by class, over the decoder's log volume element.",
        "",
        ellipses_figure,
        "",
        overlap_figure,
        "",
        f"Over all {len(mu)} digits: median ball radius (geometric-mean sigma) {float(radius.median()):.3f}, median "
        f"overlap (Bhattacharyya coefficient, averaged over the {balls.neighbours.shape[1]} nearest balls) "
        f"{median_overlap:.2f}, and {100 * balls.prior_coverage:.0f} % of {len(balls.covered)} draws from the prior "
        "N(0, I) lie within 2 standard deviations of some ball.",
        "",
        "Read as balls, the figure shows what the KL term buys: codes are not points but regions that "
        f"{'overlap their neighbours' if median_overlap > 0.5 else 'only touch their neighbours'} "
        f"(median overlap {median_overlap:.2f}) and together cover {100 * balls.prior_coverage:.0f} % of the prior, so "
        + ("a prior sample usually decodes from inside some digit's ball" if balls.prior_coverage >= 0.5 else
           "most prior samples still fall outside every ball (holes the decoder was not trained on)")
        + "; in the zero-radius limit (a deterministic "
        "autoencoder, or a VQ-VAE's codebook points) the balls neither overlap nor cover anything, and prior samples "
        "fall between codes where the decoder was never trained.",
    ])


def _spread_over_classes(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """About `count` indices, the same number from each class present (fewer where a class is short), fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    classes = labels.unique().tolist()
    per_class = max(1, count // max(len(classes), 1))
    chosen = []
    cpu_labels = labels.cpu()
    for label in classes:
        members = (cpu_labels == label).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).to(labels.device)


def _box(means: np.ndarray, stds: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The box holding every shown ellipse (mean +- 2 sigma per axis), padded by 5 % of its size: low, high [2]."""
    low, high = (means - 2 * stds).min(0), (means + 2 * stds).max(0)
    pad = 0.05 * np.maximum(high - low, 1e-3)
    return low - pad, high + pad


def _plot_ellipses(means, stds, labels, log_volume, low, high) -> Figure:
    figure = Figure(figsize=(7.8, 6.4), dpi=110)
    axes = figure.add_subplot()
    heat = axes.imshow(log_volume, origin="lower", extent=(low[0], high[0], low[1], high[1]), aspect="auto",
                       cmap=context.log_volume_colormap())
    figure.colorbar(heat, ax=axes, label=context.LOG_VOLUME_LABEL)
    palette = context.class_palette()
    for (x, y), (sx, sy), label in zip(means, stds, labels):
        colour = palette[int(label) % 10]
        axes.add_patch(Ellipse((x, y), 4 * sx, 4 * sy, facecolor=(*colour[:3], 0.12), edgecolor=colour,
                               linewidth=0.6))
    axes.add_patch(Circle((0, 0), 2.0, fill=False, edgecolor="black", linestyle="--", linewidth=1.2))
    handles = [Patch(facecolor=(*palette[digit][:3], 0.3), edgecolor=palette[digit], label=f"digit {digit}")
               for digit in sorted(set(int(label) for label in labels))]
    handles.append(Line2D([], [], color="black", linestyle="--", label="prior N(0, I), 2 sigma"))
    axes.set_xlim(low[0], high[0])
    axes.set_ylim(low[1], high[1])
    axes.set_xlabel("z1")
    axes.set_ylabel("z2")
    axes.set_title(f"2-sigma posterior ellipses of {len(means)} digits over the volume element")
    axes.legend(handles=handles, title="posterior balls", loc="upper left", bbox_to_anchor=(1.28, 1.0), fontsize=8)
    return figure


def _plot_overlap_and_coverage(balls: "diagnostics.PosteriorBalls", means: np.ndarray) -> Figure:
    figure = Figure(figsize=(11.5, 4.8), dpi=110)
    histogram_axes, coverage_axes = figure.subplots(1, 2)
    k = balls.neighbours.shape[1]
    histogram_axes.hist(balls.overlap.cpu().numpy(), bins=30, range=(0.0, 1.0), color="tab:blue",
                        label=f"{len(means)} digits")
    histogram_axes.set_xlabel(f"overlap: mean Bhattacharyya coefficient with the {k} nearest balls")
    histogram_axes.set_ylabel("digits")
    histogram_axes.set_title("How much each ball overlaps its neighbours")
    histogram_axes.legend()

    draws = balls.prior_draws.cpu().numpy()
    covered = balls.covered.cpu().numpy()
    coverage_axes.scatter(means[:, 0], means[:, 1], s=2, color="0.75", label="posterior means", edgecolors="none")
    coverage_axes.scatter(draws[covered, 0], draws[covered, 1], s=5, color="tab:green", edgecolors="none",
                          label=f"prior draw within 2 std of a ball ({covered.sum()})")
    coverage_axes.scatter(draws[~covered, 0], draws[~covered, 1], s=8, color="tab:red", marker="x",
                          linewidths=0.8, label=f"prior draw outside every ball ({(~covered).sum()})")
    coverage_axes.set_aspect("equal", adjustable="datalim")
    coverage_axes.set_xlabel("z1")
    coverage_axes.set_ylabel("z2")
    coverage_axes.set_title(f"Prior coverage: {100 * balls.prior_coverage:.0f} % of N(0, I) draws")
    coverage_axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return figure
