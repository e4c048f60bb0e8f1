"""Demo section: the Chadebec-Allassonniere latent metric built from the encoder, Riemannian-uniform samples against
prior samples, and the paper's conformal interpolations against straight lines."""
from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure  # object-oriented matplotlib: renders with Agg, no pyplot global state

import pygeo
from pygeo.geometry import conformal_interpolation
from pygeo.sample import riemannian_uniform

from .. import context

TITLE = "Latent metric: Riemannian-uniform sampling and conformal interpolation"

LAM, TAU = 0.01, 0.05  # the paper's lam for MNIST; tau > 0 keeps the uniform density proper


def run(ctx) -> str:
    quick = ctx.quick
    n_centroids = min(20 if quick else 100, len(ctx.images))
    n_samples = 16 if quick else 64
    with ctx.timed("latent metric: encode + k-medoids"):
        metric = pygeo.LatentMetric.from_encoder(ctx.vae.encoder, ctx.images, n_centroids=n_centroids, lam=LAM, tau=TAU,
                                                 seed=ctx.seed, progress=False)
    with ctx.timed("latent metric: HMC, Riemannian uniform"):
        hmc = riemannian_uniform(metric, n_samples, n_chains=n_samples, n_steps=10 if quick else 100,
                                 n_leapfrog=10, step_size=0.01, seed=ctx.seed, progress=ctx.show_progress)
        if hmc.interrupted:  # the sampler returns what is done on Ctrl-C; the demo stops there
            raise KeyboardInterrupt
    prior = torch.randn(n_samples, metric.dim, generator=torch.Generator().manual_seed(ctx.seed)).to(ctx.latents)

    # Pairs of typical digits of different classes, joined by the conformal-metric curve and by the straight line.
    n_pairs = 2 if quick else 4
    index_pairs, class_pairs = interpolation_pairs(ctx.latents, ctx.labels, n_pairs, seed=ctx.seed + 1)
    first = torch.tensor([a for a, _ in index_pairs], device=ctx.latents.device)
    second = torch.tensor([b for _, b in index_pairs], device=ctx.latents.device)
    z0, z1 = ctx.latents[first], ctx.latents[second]
    with ctx.timed("latent metric: conformal interpolation"):
        curves = conformal_interpolation(metric, z0, z1, n_points=10, n_iter=10 if quick else 150,
                                         progress=ctx.show_progress)

    samples_figure, scatter_figure, strips_figure = ("latent_metric_samples.png", "latent_metric_scatter.png",
                                                     "latent_metric_interpolation.png")
    with torch.no_grad():
        decoded_hmc = torch.sigmoid(ctx.vae.decoder(hmc.samples.to(ctx.latents))).cpu()
        decoded_prior = torch.sigmoid(ctx.vae.decoder(prior)).cpu()
        straight = z0[:, None] + torch.linspace(0, 1, 10).to(z0)[None, :, None] * (z1 - z0)[:, None]
        decoded_curves = torch.sigmoid(ctx.vae.decoder(curves.points.reshape(-1, metric.dim))).cpu()
        decoded_straight = torch.sigmoid(ctx.vae.decoder(straight.reshape(-1, metric.dim))).cpu()
    grids = context.digit_grids_side_by_side(decoded_prior, decoded_hmc, "Decoded prior N(0, I) samples",
                                             "Decoded Riemannian-uniform samples (HMC)")
    samples_markdown = ctx.save_figure(grids, samples_figure, "prior samples and Riemannian-uniform samples")
    scatter_markdown = ctx.save_figure(
        _scatter(ctx, metric, hmc.samples.cpu(), prior.cpu(), curves.points.cpu(), straight.cpu()), scatter_figure,
        "samples and interpolations over the latent codes")
    ends = (ctx.images[first].cpu(), ctx.images[second].cpu())
    strips_markdown = ctx.save_figure(_strips(decoded_curves, decoded_straight, ends, class_pairs), strips_figure,
                                      "interpolations")

    length_rows = [f"| {i + 1} | {a} -> {b} | {float(curves.straight_length[i]):.4g} | {float(curves.length[i]):.4g} |"
                   for i, (a, b) in enumerate(class_pairs)]
    return "\n".join([
        f"From the encoder's posteriors N(mu, diag(exp(logvar))) of the {len(ctx.images)} digits, k-medoids picks "
        f"{metric.n_centroids} centroids; with their precisions M_i the metric is G(z) = sum_i M_i "
        f"exp(-(z - c_i)^T M_i (z - c_i) / rho^2) + lam exp(-tau |z|^2) I ({metric}).",
        "",
        samples_markdown,
        "",
        f"Left: decoded samples of the prior N(0, I). Right: decoded samples of the Riemannian uniform distribution "
        f"(density sqrt(det G)) by HMC: {n_samples} chains, step size adapted to {hmc.step_size:.3g}, mean acceptance "
        f"{float(hmc.acceptance.mean()):.2f}, {int(hmc.n_divergent.sum())} divergent proposals.",
        "",
        scatter_markdown,
        "",
        "Encoded digits (coloured by class) over the latent metric's log volume element; blue dots: HMC samples, "
        "red crosses: prior samples, black plus signs: centroids; red lines: conformal interpolations, black dashed "
        "lines: straight lines.",
        "",
        strips_markdown,
        "",
        "Pairs: for randomly drawn pairs of different classes, the encoded digit nearest each class median (classes "
        "read from the labels of the chosen digits). Each pair of rows: the input digits at both ends, between them "
        "the decoded conformal-metric interpolation (top) and the decoded straight line (bottom). Length in the "
        "conformal metric det(G)^-1 I (lower is better; the curve avoids regions without data):",
        "",
        "| pair | classes | straight line | conformal curve |",
        "|---|---|---|---|",
        *length_rows,
    ])


def interpolation_pairs(latents: torch.Tensor, labels: torch.Tensor, n_pairs: int, seed: int):
    """([(index a, index b)], [(class a, class b)]) for n_pairs random pairs of different classes, each end the encoded
    digit nearest its class median (so that it decodes like its class); the classes are read from `labels` at the
    chosen indices, never assumed."""
    labels = labels.detach().cpu()
    classes = sorted(set(labels.tolist()))
    typical = {}
    for label in classes:
        members = (labels == label).nonzero().squeeze(-1)
        codes = latents.detach().cpu()[members]
        typical[label] = int(members[(codes - codes.median(0).values).norm(dim=-1).argmin()])
    candidates = [(a, b) for a in classes for b in classes if a != b]
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed)).tolist()
    index_pairs = [(typical[candidates[k][0]], typical[candidates[k][1]]) for k in order[:n_pairs]]
    class_pairs = [(int(labels[i]), int(labels[j])) for i, j in index_pairs]
    return index_pairs, class_pairs


def _scatter(ctx, metric, hmc_samples, prior, curves, straight) -> Figure:
    latents = ctx.latents.cpu()
    low, high = latents.min(0).values - 1.0, latents.max(0).values + 1.0
    resolution = 40 if ctx.quick else 120
    xs, ys = torch.linspace(float(low[0]), float(high[0]), resolution), torch.linspace(float(low[1]), float(high[1]), resolution)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        log_volume = metric.log_volume(grid.to(ctx.latents)).cpu().reshape(resolution, resolution)
    figure = Figure(figsize=(9, 6.5), layout="constrained")
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(log_volume.numpy(), origin="lower", extent=(float(low[0]), float(high[0]), float(low[1]),
                                                                    float(high[1])), cmap=context.log_volume_colormap(),
                        aspect="auto")
    figure.colorbar(image, ax=axes, label=context.LOG_VOLUME_LABEL)
    context.scatter_classes(axes, latents.numpy(), ctx.labels.cpu().numpy(), size=3, alpha=0.5)
    centroids = metric.centroids.cpu()
    axes.scatter(centroids[:, 0], centroids[:, 1], marker="+", color="black", s=30, linewidths=1.0, label="centroids")
    axes.scatter(prior[:, 0], prior[:, 1], color="tab:red", marker="x", s=24, linewidths=1.2, label="prior samples")
    axes.scatter(hmc_samples[:, 0], hmc_samples[:, 1], color="tab:blue", s=16, edgecolors="white", linewidths=0.5,
                 label="HMC samples (Riemannian uniform)")
    for index, (curve, line) in enumerate(zip(curves, straight)):
        axes.plot(curve[:, 0], curve[:, 1], color="red", lw=2.0, label="conformal interpolation" if index == 0 else None)
        axes.plot(line[:, 0], line[:, 1], color="black", lw=1.2, ls="--", label="straight line" if index == 0 else None)
    axes.set_xlim(float(low[0]), float(high[0]))
    axes.set_ylim(float(low[1]), float(high[1]))
    axes.set_xlabel("z1")
    axes.set_ylabel("z2")
    axes.set_title("Latent metric: samples and interpolations over the encoded digits")
    figure.legend(*axes.get_legend_handles_labels(), loc="outside right upper", fontsize=8, markerscale=1.5)
    return figure


def _strips(curves: torch.Tensor, straight: torch.Tensor, ends, class_pairs) -> Figure:
    """Rows: for each pair, [input a | decoded curve | input b] for the conformal curve, then the straight line."""
    n_pairs = len(class_pairs)
    first, second = ends
    rows, names = [], []
    for pair, (a, b) in enumerate(class_pairs):
        for decoded, kind in ((curves, "conformal"), (straight, "straight")):
            strip = torch.cat([first[pair:pair + 1], decoded.reshape(n_pairs, -1, decoded.shape[-1])[pair],
                               second[pair:pair + 1]])
            rows.append(strip)
            names.append(f"{a} -> {b}, {kind}")
    columns = rows[0].shape[0]
    figure = Figure(figsize=(1.0 * columns + 1.5, 1.0 * len(rows) + 0.8), layout="constrained")
    axes = figure.add_subplot(1, 1, 1)
    axes.imshow(context.digit_grid(torch.cat(rows), columns), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    cell = context.DIGIT_PIXELS + 2
    axes.set_yticks([cell * (row + 0.5) for row in range(len(rows))], names)
    axes.set_xticks([cell * (column + 0.5) for column in range(columns)],
                    ["input"] + [f"{t:.2f}" for t in np.linspace(0, 1, columns - 2)] + ["input"])
    axes.set_xlabel("position t along the curve (decoded), between the two input digits")
    axes.set_ylabel("pair (classes from the labels), curve")
    axes.set_title("Interpolations between typical digits: conformal-metric curve against the straight line")
    return figure
