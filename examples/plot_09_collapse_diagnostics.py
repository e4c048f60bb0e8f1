"""
Posterior-collapse diagnostics
==============================

A VAE whose likelihood is weak (a Gaussian decoder with a large fixed ``sigma``) lets some latent units collapse:
their posterior equals the prior and the decoder ignores them. ``pygeo.diagnostics.collapse_report`` measures the KL
per unit, the active units, the mutual information and the curvature of the decoder's Fisher metric at the encoder
means (the experiment ``python -m pygeo experiment collapse`` tests a curvature criterion with it).
"""
import matplotlib.pyplot as plt
import torch

from pygeo import diagnostics
from pygeo.data import load_digits
from pygeo.models import VAE, train_vae

torch.manual_seed(0)
images, labels = load_digits(limit=2000)
reports = {}
for sigma in (0.3, 1.0):
    vae = VAE(data_dim=784, latent_dim=6, hidden=(256, 64), likelihood="gaussian", sigma=sigma)
    train_vae(vae, images, epochs=10, seed=0, progress=False)
    reports[sigma] = diagnostics.collapse_report(vae, images, n_curvature_points=32)
    report = reports[sigma]
    print(f"sigma {sigma}: {report.active_units} active units of 6, mutual information "
          f"{report.mutual_information:.2f} nats (at most log N = {report.log_n:.2f}), kappa_c = {report.kappa_c:.2f}, "
          f"median sectional curvature {report.sectional_quantiles['all'][0.5]:.3g}")

# %%
# KL per unit: collapsed units have KL near 0. "Active" is the variance of the posterior means across the digits
# (>= 0.01), the usual criterion: with sigma = 1 even the active units carry little information.
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))      # separate y scales: the KLs differ 100-fold
for ax, (sigma, report) in zip(axes, reports.items()):
    colours = ["tab:green" if active else "tab:grey" for active in report.active.tolist()]
    ax.bar(range(1, 7), report.kl_per_dimension, color=colours)
    ax.set(title=f"sigma = {sigma}: {report.active_units} active units (green)", xlabel="latent unit",
           ylabel="KL(q(z_i | x) || p(z_i)) (nats)")
fig.tight_layout()
plt.show()
