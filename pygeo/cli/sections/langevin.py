"""Demo section: Riemannian Langevin (exact MMALA) samples of the decoder's Riemannian uniform law, beside the prior's."""
from __future__ import annotations

import time

import numpy as np
import torch
from matplotlib.figure import Figure  # object-oriented matplotlib: renders with Agg, no pyplot global state

from ...sample.langevin import riemannian_langevin

TITLE = "Riemannian Langevin sampling (MMALA)"


def run(ctx) -> str:
    n_chains, warmup, n_steps = (16, 10, 10) if ctx.quick else (96, 50, 50)
    n_show = 16 if ctx.quick else 64
    latents = ctx.latents.detach()
    start = time.perf_counter()
    with ctx.timed("langevin: MMALA, Riemannian uniform of the decoder metric"):
        result = riemannian_langevin(ctx.metric, 4 * n_chains, None, n_chains=n_chains, n_steps=n_steps, warmup=warmup,
                                     init=latents, seed=ctx.seed, full_drift=True, progress=getattr(ctx, "show_progress", False))
    seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(ctx.seed)
    prior = torch.randn(n_show, latents.shape[-1], generator=generator).to(latents)
    samples = result.chains[-1][:n_show] if result.chains.shape[0] else result.samples[:n_show]

    scatter_figure, langevin_figure, prior_figure = "langevin_latents.png", "langevin_decoded.png", "langevin_prior_decoded.png"
    _plot_latents(ctx, result.chains.reshape(-1, latents.shape[-1]), prior, ctx.out_dir / scatter_figure)
    with torch.no_grad():
        _plot_images(torch.sigmoid(ctx.vae.decoder(samples)), ctx.out_dir / langevin_figure, "Riemannian uniform (MMALA)")
        _plot_images(torch.sigmoid(ctx.vae.decoder(prior)), ctx.out_dir / prior_figure, "prior N(0, I)")
    acceptance = result.acceptance.cpu()
    steps = warmup + n_steps
    return "\n".join([
        "Manifold MALA targets the Riemannian uniform law, density proportional to sqrt(det G(z)) for the decoder's "
        "pullback metric: proposals N(mean(z), h G(z)^-1) with the full drift mean = z + (h/2) G^-1 grad L + "
        "(h/2) div(G^-1), L = 1/2 log det G, made exact by a Metropolis test whose reverse density needs the metric at "
        "the proposal. Each step is one fused kernel call for all chains (pygeo.ops.langevin_step). The step size was "
        "adapted during warm-up by dual averaging toward 0.57 acceptance. Chains start at encoded digits: where G is "
        "tiny (far from the data) the proposal covariance h G^-1 explodes and such chains barely move (MATH.md 4).",
        "",
        f"{n_chains} chains, {warmup} warm-up + {n_steps} sampling steps ({steps * n_chains} metric evaluations with "
        f"derivatives, {seconds:.1f} s); step size {result.step_size:.3g}; acceptance per chain: mean "
        f"{float(acceptance.mean()):.2f}, min {float(acceptance.min()):.2f}, max {float(acceptance.max()):.2f}; "
        f"proposals rejected for a non-positive-definite metric or non-finite density: {result.n_failed}"
        f"{' (interrupted)' if result.interrupted else ''}.",
        "",
        f"![Langevin samples and prior samples over the latent codes]({scatter_figure})",
        "",
        f"![decoded Riemannian uniform samples]({langevin_figure}) ![decoded prior samples]({prior_figure})",
        "",
        "Left: decoded means of the chains' final states (Riemannian uniform). Right: decoded prior N(0, I) draws.",
    ])


def _plot_latents(ctx, samples: torch.Tensor, prior: torch.Tensor, path) -> None:
    figure = Figure(figsize=(5.5, 5))
    axes = figure.subplots()
    codes = ctx.latents.detach().cpu().numpy()
    axes.scatter(codes[:, 0], codes[:, 1], s=2, c="lightgray", label="encoded digits")
    drawn = samples.detach().cpu().numpy()
    axes.scatter(drawn[:, 0], drawn[:, 1], s=4, c="tab:blue", alpha=0.5, label="MMALA (Riemannian uniform)")
    prior = prior.detach().cpu().numpy()
    axes.scatter(prior[:, 0], prior[:, 1], s=8, c="tab:orange", marker="x", label="prior N(0, I)")
    low, high = np.percentile(codes, 0.5, axis=0), np.percentile(codes, 99.5, axis=0)
    pad = 0.3 * (high - low)
    axes.set_xlim(low[0] - pad[0], high[0] + pad[0])
    axes.set_ylim(low[1] - pad[1], high[1] + pad[1])
    axes.set_xlabel("z1")
    axes.set_ylabel("z2")
    axes.legend(loc="upper right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _plot_images(images: torch.Tensor, path, title: str) -> None:
    count = images.shape[0]
    side = int(np.ceil(np.sqrt(count)))
    canvas = np.ones((side * 28, side * 28))
    pixels = images.detach().cpu().reshape(count, 28, 28).numpy()
    for index in range(count):
        row, column = divmod(index, side)
        canvas[row * 28:(row + 1) * 28, column * 28:(column + 1) * 28] = pixels[index]
    figure = Figure(figsize=(3.2, 3.4))
    axes = figure.subplots()
    axes.imshow(canvas, cmap="gray_r", vmin=0, vmax=1)
    axes.set_title(title, fontsize=9)
    axes.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
