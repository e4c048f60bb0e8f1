"""
Pullback metric and volume element of your own decoder
======================================================

A decoder ``z [B, 2] -> logits [B, 784]`` pulls back the Fisher information of its Bernoulli outputs to the latent
space: ``G(z) = J^T diag(p (1 - p)) J`` (docs/MATH.md section 1). Its volume element ``sqrt(det G)`` is large where a
small latent step changes the decoded image a lot, typically between the clusters of the data.

Here a small VAE is trained for a few seconds on 2,000 shipped digits; any ``nn.Module`` decoder works the same way
(an ``nn.Sequential`` MLP takes the fused kernel, which never forms ``J``).
"""
import matplotlib.pyplot as plt
import torch

import pygeo
from pygeo.data import load_digits
from pygeo.models import VAE, train_vae

torch.manual_seed(0)
images, labels = load_digits(limit=2000)                 # [2000, 784] in [0, 1], no download
vae = VAE(data_dim=784, latent_dim=2, hidden=(256, 64))
train_vae(vae, images, epochs=15, lr=2e-3, seed=0, progress=False)

# %%
# The metric of the decoder. ``likelihood="bernoulli"``: the decoder returns logits.
metric = pygeo.PullbackMetric(vae.decoder, likelihood="bernoulli")
z = vae.encode_means(images)                              # [2000, 2]
G = metric.metric(z[:5])                                  # [5, 2, 2], symmetric positive definite
print("G at the first encoded digit:\n", G[0])

# %%
# The log volume element ``1/2 log det G`` on a grid (``pygeo.geometry.volume_map`` evaluates it in chunks).
lo, hi = (z.min(0).values - 1).tolist(), (z.max(0).values + 1).tolist()
volume = pygeo.geometry.volume_map(metric, lo, hi, resolution=120, progress=False)
x_axis, y_axis = volume.axes

fig, ax = plt.subplots(figsize=(6.4, 5.2))
image = ax.pcolormesh(x_axis, y_axis, volume.log_volume.T, cmap="viridis", shading="auto")
fig.colorbar(image, ax=ax, label="1/2 log det G(z)")
ax.scatter(z[:, 0], z[:, 1], c=labels, cmap="tab10", s=3)
ax.set(title="Volume element of the decoder's Fisher metric", xlabel="$z_1$", ylabel="$z_2$")
fig.tight_layout()
plt.show()
