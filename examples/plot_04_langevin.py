"""
Riemannian Langevin sampling
============================

``pygeo.sample.riemannian_langevin`` runs manifold MALA: proposals ``N(mean(z), h G(z)^-1)`` made exact by a
Metropolis test, for any target ``log_prob`` (here the N(0, I) prior weighted by the volume element of the decoder's
metric, ``base_log_prob=w``: target ``w(z) sqrt(det G(z))``). The proposals follow the metric: short steps where the
decoded image changes fast.
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
metric = vae.pullback_metric()
z = vae.encode_means(images)                  # [2000, 2]: the chains start at random encoded digits


def standard_normal(z):             # z [C, 2] -> log N(z; 0, I) [C], up to a constant
    return -0.5 * (z ** 2).sum(-1)


result = pygeo.sample.riemannian_langevin(metric, n_samples=500, base_log_prob=standard_normal, n_chains=50,
                                          init=z, warmup=100, seed=0, progress=False)
print(f"acceptance {result.acceptance.mean():.2f}, step size h = {result.step_size:.3g}, "
      f"failed proposals {result.n_failed}")

# %%
# The samples over the volume element, and the path of one chain.
every = torch.cat([z, result.samples])            # the map covers the data and the samples
volume = pygeo.geometry.volume_map(metric, (every.min(0).values - 0.5).tolist(), (every.max(0).values + 0.5).tolist(),
                                   resolution=100, progress=False)
fig, ax = plt.subplots(figsize=(6.4, 5.2))
image = ax.pcolormesh(*volume.axes, volume.log_volume.T, cmap="viridis", shading="auto")
fig.colorbar(image, ax=ax, label="1/2 log det G(z)")
ax.scatter(result.samples[:, 0], result.samples[:, 1], s=5, c="white", label="samples")
ax.plot(result.chains[:, 0, 0], result.chains[:, 0, 1], c="crimson", lw=1, label="one chain")
ax.set(title="Riemannian Langevin (MMALA) samples", xlabel="$z_1$", ylabel="$z_2$")
ax.legend(loc="upper right")
fig.tight_layout()
plt.show()
