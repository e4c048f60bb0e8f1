"""Demo section: a complex VAE (one complex latent = two real dimensions), the det G heat map of a log-sum-exp Kahler
metric fitted to its encoded means, and det-weighted samples against the prior's."""
from __future__ import annotations

import math

import torch

TITLE = "Kahler geometry of a complex latent space"


def run(ctx) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import pygeo
    from pygeo.models import ComplexVAE, train_complex_vae
    from pygeo.sample import riemannian_uniform

    generator = torch.Generator().manual_seed(ctx.seed)
    torch.manual_seed(ctx.seed)
    images = ctx.images.float().cpu()
    if ctx.quick:
        images = images[:256]
    model = ComplexVAE(data_dim=images.shape[1], latent_dim=1, hidden=64 if ctx.quick else 128)
    with ctx.timed("kahler: train complex VAE"):
        losses = train_complex_vae(model, images, epochs=1 if ctx.quick else 30, batch_size=128, lr=2e-3,
                                   max_seconds=1.0 if ctx.quick else 7.0, seed=ctx.seed, progress=ctx.show_progress)
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
        weighted = hmc.samples
        prior_shown = prior

    figure, axes = plt.subplots(1, 2, figsize=(10, 4.6), constrained_layout=True)
    for ax, samples, name in ((axes[0], prior_shown, "prior CN(0, 1)"), (axes[1], weighted, "prior x det G")):
        image = ax.imshow(log_det.numpy(), origin="lower", extent=(-extent, extent, -extent, extent), cmap="viridis")
        ax.scatter(samples.real.squeeze(-1), samples.imag.squeeze(-1), s=3, c="white", alpha=0.6)
        ax.set_title(f"log det G with samples of {name}")
        ax.set_xlabel("Re z")
        ax.set_ylabel("Im z")
    figure.colorbar(image, ax=axes, shrink=0.8, label="log det G")
    figure.savefig(ctx.out_dir / "kahler_det_heatmap.png", dpi=90)
    plt.close(figure)

    with torch.no_grad():
        digits = torch.sigmoid(model.decoder(torch.cat([prior_shown[:8], weighted[:8]]).to(torch.complex64)))
    figure, axes = plt.subplots(2, 8, figsize=(8, 2.2))
    for index, ax in enumerate(axes.flat):
        ax.imshow(digits[index].reshape(28, 28).numpy(), cmap="gray")
        ax.axis("off")
    axes[0, 0].set_title("prior", fontsize=8, loc="left")
    axes[1, 0].set_title("det-weighted", fontsize=8, loc="left")
    figure.savefig(ctx.out_dir / "kahler_samples.png", dpi=90)
    plt.close(figure)

    radius_prior = float((prior.abs() ** 2).mean())
    radius_weighted = float((weighted.abs() ** 2).mean())
    return "\n".join([
        f"A VAE with one complex latent (C^1 = R^2) trained for {len(losses)} epoch(s) "
        f"(negative ELBO {losses[0]:.1f} -> {losses[-1]:.1f}).",
        f"The log-sum-exp Kahler potential Psi = T log sum_i exp((z - c_i)^H P_i (z - c_i) / T) over {K} encoded means "
        f"(P_i = 1/s_i^2 from the encoder, T = {temperature:.3g}) gives a Hermitian metric G >= sum_i p_i P_i; its "
        f"volume form is det G (the real 2 x 2 form has det 4 (det G)^2). log det G ranges over "
        f"[{float(log_det.min()):.2f}, {float(log_det.max()):.2f}] on the plotted square.",
        "",
        "![log det G with prior and det-weighted samples](kahler_det_heatmap.png)",
        "",
        f"Det-weighted samples (target: prior x det G) by HMC on the Hermitian metric (pygeo.sample.riemannian_uniform "
        f"with base_log_prob = the prior; {n_chains} chains, step size adapted to {hmc.step_size:.3g}, mean acceptance "
        f"{float(hmc.acceptance.mean()):.2f}): E|z|^2 = {radius_weighted:.3f} against {radius_prior:.3f} under the prior.",
        "",
        "![decoded prior and det-weighted samples](kahler_samples.png)",
    ])
