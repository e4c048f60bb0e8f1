"""Demo section: a complex VAE (one complex latent = two real dimensions), the det G heat map of a log-sum-exp Kahler
metric fitted to its encoded means, and det-weighted samples against the prior's."""
from __future__ import annotations

import math

import torch
from matplotlib.figure import Figure  # object-oriented matplotlib: renders with Agg, no pyplot global state

from .. import context

TITLE = "Kahler geometry of a complex latent space"

EPOCHS, QUICK_EPOCHS = 10, 1  # a fixed number of epochs (no wall-clock cap: results must not depend on the machine)


def run(ctx) -> str:
    import pygeo
    from pygeo.models import ComplexVAE, train_complex_vae
    from pygeo.sample import riemannian_uniform

    generator = torch.Generator().manual_seed(ctx.seed)
    torch.manual_seed(ctx.seed)
    images = ctx.images.float().cpu()
    if ctx.quick:
        images = images[:256]
    model = ComplexVAE(data_dim=images.shape[1], latent_dim=1, hidden=64 if ctx.quick else 128)
    epochs = QUICK_EPOCHS if ctx.quick else EPOCHS
    with ctx.timed("kahler: train complex VAE"):
        losses = train_complex_vae(model, images, epochs=epochs, batch_size=128, lr=2e-3, seed=ctx.seed,
                                   progress=ctx.show_progress)
    with torch.no_grad():
        mu, logvar = model.encoder(images)
    mu, logvar = mu.to(torch.complex128), logvar.double()

    # The LSE Kahler metric of the encoder posteriors: centers at K encoded means, precisions 1 / s^2 (real diagonal).
    K = min(64, mu.shape[0])
    chosen = torch.randperm(mu.shape[0], generator=generator)[:K]
    precisions = (-logvar[chosen]).exp()
    temperature = float(precisions.median())  # scores of order one within a posterior's width
    metric = pygeo.LSEKahlerMetric(mu[chosen], precisions, temperature=temperature)

    extent = float(mu.abs().max()) * 1.2 + 0.5
    resolution = 40 if ctx.quick else 160
    axis = torch.linspace(-extent, extent, resolution, dtype=torch.float64)
    grid = torch.complex(*torch.meshgrid(axis, axis, indexing="xy"))
    with ctx.timed("kahler: log det G on a grid"):
        log_det = metric.log_volume(grid.reshape(-1, 1)).reshape(resolution, resolution)

    # Det-weighted samples, target CN(0, 1) prior x det G (gamma = 1), by HMC on the Hermitian metric itself (the
    # sampler runs on its real form and returns complex samples).
    n_chains, n_samples = (50, 200) if ctx.quick else (200, 1000)
    with ctx.timed("kahler: det-weighted samples (HMC)"):
        prior = torch.complex(torch.randn(n_samples, 1, generator=generator, dtype=torch.float64),
                              torch.randn(n_samples, 1, generator=generator, dtype=torch.float64)) / math.sqrt(2)
        hmc = riemannian_uniform(metric, n_samples, n_chains=n_chains, n_steps=10 if ctx.quick else 50, n_leapfrog=5,
                                 step_size=0.3, init=prior[:n_chains], seed=ctx.seed,
                                 base_log_prob=lambda z: -(z.abs() ** 2).sum(-1), progress=ctx.show_progress)
        if hmc.interrupted:  # the sampler returns what is done on Ctrl-C; the demo stops there
            raise KeyboardInterrupt
        weighted = hmc.samples
        prior_shown = prior

    figure = Figure(figsize=(11, 4.8), layout="constrained")
    panels = figure.subplots(1, 2)
    for axes, samples, name, style in ((panels[0], prior_shown, "prior CN(0, 1)", dict(color="tab:red", marker="x")),
                                       (panels[1], weighted, "prior x det G (HMC)", dict(color="tab:blue", marker="o"))):
        image = axes.imshow(log_det.numpy(), origin="lower", extent=(-extent, extent, -extent, extent),
                            cmap=context.log_volume_colormap())
        axes.scatter(samples.real.squeeze(-1), samples.imag.squeeze(-1), s=6, alpha=0.6, linewidths=0.8,
                     label=f"samples of {name}", **style)
        axes.set_title(f"log det G with samples of {name}", fontsize=10)
        axes.set_xlabel("Re z  (z1)")
        axes.set_ylabel("Im z  (z2)")
        axes.legend(loc="upper right", fontsize=8, framealpha=0.9)
    figure.colorbar(image, ax=panels, shrink=0.8, label="Kahler log volume element, log det G")
    heatmap_markdown = ctx.save_figure(figure, "kahler_det_heatmap.png", "log det G with prior and det-weighted samples")

    n_digits = 16
    with torch.no_grad():
        prior_digits = torch.sigmoid(model.decoder(prior_shown[:n_digits].to(torch.complex64)))
        weighted_digits = torch.sigmoid(model.decoder(weighted[:n_digits].to(torch.complex64)))
    figure = Figure(figsize=(9, 4.8), layout="constrained")
    panels = figure.subplots(1, 2)
    context.show_digits(panels[0], prior_digits, 4, "Decoded prior CN(0, 1) samples")
    context.show_digits(panels[1], weighted_digits, 4, "Decoded det-weighted samples")
    samples_markdown = ctx.save_figure(figure, "kahler_samples.png", "decoded prior and det-weighted samples")

    radius_prior = float((prior.abs() ** 2).mean())
    radius_weighted = float((weighted.abs() ** 2).mean())
    return "\n".join([
        f"A VAE with one complex latent (C^1 = R^2) trained for {len(losses)} of {epochs} epoch(s) on "
        f"{len(images)} digits (negative ELBO {losses[0]:.1f} -> {losses[-1]:.1f}).",
        f"The log-sum-exp Kahler potential Psi = T log sum_i exp((z - c_i)^H P_i (z - c_i) / T) over {K} encoded means "
        f"(P_i = 1/s_i^2 from the encoder, T = {temperature:.3g}) gives a Hermitian metric G >= sum_i p_i P_i; its "
        f"volume form is det G (the real 2 x 2 form has det 4 (det G)^2). log det G ranges over "
        f"[{float(log_det.min()):.2f}, {float(log_det.max()):.2f}] on the plotted square.",
        "",
        heatmap_markdown,
        "",
        f"Det-weighted samples (target: prior x det G) by HMC on the Hermitian metric (pygeo.sample.riemannian_uniform "
        f"with base_log_prob = the prior; {n_chains} chains, step size adapted to {hmc.step_size:.3g}, mean acceptance "
        f"{float(hmc.acceptance.mean()):.2f}): E|z|^2 = {radius_weighted:.3f} against {radius_prior:.3f} under the prior.",
        "",
        samples_markdown,
    ])
