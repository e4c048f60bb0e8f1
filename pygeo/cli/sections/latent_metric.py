"""Demo section: the Chadebec-Allassonniere latent metric built from the encoder, Riemannian-uniform samples against
prior samples, and the paper's conformal interpolations against straight lines."""
from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure  # object-oriented matplotlib: renders with Agg, no pyplot global state

import pygeo
from pygeo.geometry import conformal_interpolation
from pygeo.sample import riemannian_uniform

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
    prior = torch.randn(n_samples, metric.dim, generator=torch.Generator().manual_seed(ctx.seed)).to(ctx.latents)

    # Pairs of encoded digits of different classes, joined by the conformal-metric curve and by the straight line.
    generator = torch.Generator().manual_seed(ctx.seed + 1)
    n_pairs = 2 if quick else 4
    first = torch.randperm(len(ctx.latents), generator=generator)[: 4 * n_pairs]
    second = torch.randperm(len(ctx.latents), generator=generator)[: 4 * n_pairs]
    different = (ctx.labels[first].cpu() != ctx.labels[second].cpu()).nonzero().squeeze(-1)[:n_pairs]
    z0, z1 = ctx.latents[first[different]], ctx.latents[second[different]]
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
    _image_grids(decoded_prior, decoded_hmc, ctx.out_dir / samples_figure)
    _scatter(ctx, metric, hmc.samples.cpu(), prior.cpu(), curves.points.cpu(), straight.cpu(), ctx.out_dir / scatter_figure)
    _strips(decoded_curves, decoded_straight, len(z0), ctx.out_dir / strips_figure)

    length_rows = [f"| {i} | {int(ctx.labels[first[different]][i])} -> {int(ctx.labels[second[different]][i])} | "
                   f"{float(curves.straight_length[i]):.4g} | {float(curves.length[i]):.4g} |" for i in range(len(z0))]
    return "\n".join([
        f"From the encoder's posteriors N(mu, diag(exp(logvar))) of the {len(ctx.images)} digits, k-medoids picks "
        f"{metric.n_centroids} centroids; with their precisions M_i the metric is G(z) = sum_i M_i "
        f"exp(-(z - c_i)^T M_i (z - c_i) / rho^2) + lam exp(-tau |z|^2) I ({metric}).",
        "",
        f"![prior samples and Riemannian-uniform samples]({samples_figure})",
        "",
        f"Left: decoded samples of the prior N(0, I). Right: decoded samples of the Riemannian uniform distribution "
        f"(density sqrt(det G)) by HMC: {n_samples} chains, step size adapted to {hmc.step_size:.3g}, mean acceptance "
        f"{float(hmc.acceptance.mean()):.2f}, {int(hmc.n_divergent.sum())} divergent proposals.",
        "",
        f"![samples over the latent codes]({scatter_figure})",
        "",
        "Encoded digits (coloured by class) over log sqrt(det G); red: HMC samples, grey: prior samples, crosses: "
        "centroids; lines: conformal interpolations (solid) and straight lines (dashed).",
        "",
        f"![interpolations]({strips_figure})",
        "",
        "Each pair of rows: the conformal-metric interpolation (top) and the straight line (bottom). Length in the "
        "conformal metric det(G)^-1 I (lower is better; the curve avoids regions without data):",
        "",
        "| pair | classes | straight line | conformal curve |",
        "|---|---|---|---|",
        *length_rows,
    ])


def _image_grid(images: torch.Tensor) -> np.ndarray:
    side = int(np.ceil(np.sqrt(len(images))))
    canvas = np.ones((side * 28, side * 28))
    for index, image in enumerate(images.reshape(-1, 28, 28).numpy()):
        row, col = divmod(index, side)
        canvas[row * 28:(row + 1) * 28, col * 28:(col + 1) * 28] = image
    return canvas


def _image_grids(prior: torch.Tensor, hmc: torch.Tensor, path) -> None:
    figure = Figure(figsize=(10, 5))
    for index, (images, title) in enumerate([(prior, "prior N(0, I)"), (hmc, "Riemannian uniform (HMC)")]):
        axes = figure.add_subplot(1, 2, index + 1)
        axes.imshow(_image_grid(images), cmap="gray_r", vmin=0, vmax=1)
        axes.set_title(title)
        axes.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _scatter(ctx, metric, hmc_samples, prior, curves, straight, path) -> None:
    latents = ctx.latents.cpu()
    low, high = latents.min(0).values - 1.0, latents.max(0).values + 1.0
    resolution = 40 if ctx.quick else 120
    xs, ys = torch.linspace(float(low[0]), float(high[0]), resolution), torch.linspace(float(low[1]), float(high[1]), resolution)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        log_volume = metric.log_volume(grid.to(ctx.latents)).cpu().reshape(resolution, resolution)
    figure = Figure(figsize=(7, 6))
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(log_volume.numpy(), origin="lower", extent=(float(low[0]), float(high[0]), float(low[1]),
                                                                    float(high[1])), cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axes, label="log sqrt(det G)")
    axes.scatter(latents[:, 0], latents[:, 1], c=ctx.labels.cpu(), cmap="tab10", s=2, alpha=0.4)
    centroids = metric.centroids.cpu()
    axes.scatter(centroids[:, 0], centroids[:, 1], marker="x", c="white", s=15, linewidths=0.8)
    axes.scatter(prior[:, 0], prior[:, 1], c="lightgrey", s=12, edgecolors="k", linewidths=0.3, label="prior")
    axes.scatter(hmc_samples[:, 0], hmc_samples[:, 1], c="red", s=12, edgecolors="k", linewidths=0.3, label="HMC")
    for curve, line in zip(curves, straight):
        axes.plot(curve[:, 0], curve[:, 1], c="white", lw=1.5)
        axes.plot(line[:, 0], line[:, 1], c="white", lw=1.0, ls="--")
    axes.set_xlim(float(low[0]), float(high[0]))
    axes.set_ylim(float(low[1]), float(high[1]))
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _strips(curves: torch.Tensor, straight: torch.Tensor, n_pairs: int, path) -> None:
    rows = []
    for pair in range(n_pairs):
        for decoded in (curves, straight):
            rows.append(np.concatenate(list(decoded.reshape(n_pairs, -1, 28, 28)[pair].numpy()), 1))
    figure = Figure(figsize=(10, 1.0 * len(rows)))
    axes = figure.add_subplot(1, 1, 1)
    axes.imshow(np.concatenate(rows, 0), cmap="gray_r", vmin=0, vmax=1)
    axes.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
