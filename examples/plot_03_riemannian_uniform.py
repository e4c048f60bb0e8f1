"""
Riemannian-uniform sampling of the latent metric
================================================

Chadebec & Allassonniere (NeurIPS 2022) build a metric from the encoder's posteriors (``pygeo.LatentMetric``: small
near the training codes, ``lam I`` far away) and sample the latent space with density proportional to
``sqrt(det G(z))``, which concentrates on the data. ``pygeo.sample.riemannian_uniform`` runs batched HMC chains.
"""
import matplotlib.pyplot as plt
import torch

import pygeo
from pygeo.data import load_digits
from pygeo.models import VAE, train_vae

torch.manual_seed(0)
images, labels = load_digits(limit=2000)
vae = VAE(data_dim=784, latent_dim=2, hidden=(256, 64))
train_vae(vae, images, epochs=15, lr=2e-3, seed=0, progress=False)

# %%
# The latent metric: 100 centroids chosen among the encoded means by k-medoids, each with its posterior precision.
# ``tau > 0`` keeps the density proper (with ``tau = 0`` it does not integrate, docs/MATH.md section 4).
metric = pygeo.LatentMetric.from_encoder(vae.encoder, images, n_centroids=100, lam=1e-3, tau=1e-4, progress=False)

result = pygeo.sample.riemannian_uniform(metric, n_samples=400, n_chains=100, n_steps=60, seed=0, progress=False)
print(f"acceptance {result.acceptance.mean():.2f}, step size {result.step_size:.3g}")
samples = result.samples                                      # [400, 2]
prior = torch.randn(400, 2, generator=torch.Generator().manual_seed(0))

# %%
# Codes drawn from the metric stay on the data; N(0, I) draws fall between the clusters too.
with torch.no_grad():
    decoded = torch.sigmoid(vae.decoder(samples[:32])).reshape(-1, 28, 28)
z = vae.encode_means(images)
fig, axes = plt.subplots(1, 2, figsize=(12, 5))
axes[0].scatter(z[:, 0], z[:, 1], c="lightgrey", s=3, label="encoded digits")
axes[0].scatter(prior[:, 0], prior[:, 1], s=4, c="tab:blue", label="N(0, I) prior")
axes[0].scatter(samples[:, 0], samples[:, 1], s=4, c="crimson", label="Riemannian uniform (HMC)")
axes[0].set(title="Samples in the latent space", xlabel="$z_1$", ylabel="$z_2$")
axes[0].legend(loc="upper right", markerscale=3)
grid = decoded.reshape(4, 8, 28, 28).permute(0, 2, 1, 3).reshape(4 * 28, 8 * 28)
axes[1].imshow(grid, cmap="gray_r")
axes[1].set(title="Decoded Riemannian-uniform samples")
axes[1].axis("off")
fig.tight_layout()
plt.show()
