"""
Geodesics and a distance matrix
===============================

A geodesic is the shortest curve between two latent points under the decoder's metric: it bends around the regions
where the decoded image changes fast. ``pygeo.geodesic`` solves a batch of pairs at once (minimum discrete energy), and
``pygeo.geodesic_distances`` gives the matrix of Riemannian distances between sets of points.
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
metric = vae.pullback_metric()            # PullbackMetric(vae.decoder, likelihood="bernoulli")
z = vae.encode_means(images)              # [2000, 2]

# %%
# Geodesics between four pairs of encoded digits, each a curve of 24 points ``[B, T, d]``.
z0, z1 = z[[0, 1, 2, 3]], z[[10, 11, 12, 13]]
curves = pygeo.geodesic(metric, z0, z1, n_points=24)
straight = pygeo.geodesic(metric, z0, z1, n_points=24, max_iter=0)   # max_iter=0: the straight line, measured
print("geodesic lengths:     ", curves.length)
print("straight-line lengths:", straight.length)
print("converged:", curves.converged.tolist())

# %%
# Distances between 40 digits (four of each class), sorted by class, beside the Euclidean distances between their
# codes: the geodesic distance stretches the gaps where the decoded image changes fast.
order = torch.cat([torch.nonzero(labels == c)[:4, 0] for c in range(10)])
points = z[order]
distances = pygeo.geodesic_distances(metric, points, progress=False)      # [40, 40]
euclidean = torch.cdist(points, points)

volume = pygeo.geometry.volume_map(metric, (z.min(0).values - 1).tolist(), (z.max(0).values + 1).tolist(),
                                   resolution=100, progress=False)
fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
axes[0].pcolormesh(*volume.axes, volume.log_volume.T, cmap="Greys", shading="auto")
axes[0].scatter(z[:, 0], z[:, 1], c=labels, cmap="tab10", s=2)
for curve, line in zip(curves.points, straight.points):
    axes[0].plot(*curve.detach().T, color="crimson", lw=2)
    axes[0].plot(*line.T, color="k", lw=1, ls="--")
axes[0].set(title="Geodesics (red) and straight lines (dashed)", xlabel="$z_1$", ylabel="$z_2$")
for ax, matrix, title in ((axes[1], distances, "Geodesic distance"), (axes[2], euclidean, "Euclidean distance")):
    image = ax.imshow(matrix, cmap="magma")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set(title=f"{title} (digits sorted by class)", xlabel="digit index", ylabel="digit index")
fig.tight_layout()
plt.show()
