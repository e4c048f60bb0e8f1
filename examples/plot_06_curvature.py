"""
Curvature of the latent space
=============================

``pygeo.curvature(metric, z)`` returns the Riemann, Ricci and scalar curvature at a batch of points. For a pullback
metric with flat coordinates (here ``phi = 2 arcsin sqrt(p)`` of a Bernoulli decoder) it uses the Gauss equation, with
no third derivatives of the decoder; float64 is recommended (curvature differentiates the metric twice). In 2-D the
Gaussian curvature is half the scalar curvature: ``pygeo.sectional_curvature`` gives it for any tangent plane.
"""
import copy

import matplotlib.pyplot as plt
import torch

import pygeo
from pygeo.data import load_digits
from pygeo.models import VAE, train_vae

torch.manual_seed(0)
images, labels = load_digits(limit=2000)
vae = VAE(data_dim=784, latent_dim=2, hidden=(256, 64))
train_vae(vae, images, epochs=15, lr=2e-3, seed=0, progress=False)
z = vae.encode_means(images)

# %%
# A float64 copy of the decoder, and the curvature on a 60 x 60 grid.
metric = pygeo.PullbackMetric(copy.deepcopy(vae.decoder).double(), likelihood="bernoulli")
lo, hi = z.min(0).values - 0.5, z.max(0).values + 0.5
x_axis = torch.linspace(float(lo[0]), float(hi[0]), 60, dtype=torch.float64)
y_axis = torch.linspace(float(lo[1]), float(hi[1]), 60, dtype=torch.float64)
grid = torch.stack(torch.meshgrid(x_axis, y_axis, indexing="xy"), -1).reshape(-1, 2)     # [3600, 2]
with torch.no_grad():
    result = pygeo.curvature(metric, grid)
gaussian = (result.scalar / 2).reshape(60, 60)              # [60, 60]

# The sectional curvature of the coordinate plane agrees with it (a check, and the call for any plane in d > 2).
e1, e2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
sectional = pygeo.sectional_curvature(metric, grid[:5], e1.expand(5, 2), e2.expand(5, 2))
print("K from the scalar curvature:", gaussian.reshape(-1)[:5])
print("K from sectional_curvature:  ", sectional)

# %%
# The curvature is signed (red positive, blue negative); the colour scale is clipped at the 98th percentile of abs(K).
fig, ax = plt.subplots(figsize=(6.4, 5.2))
limit = float(gaussian.abs().quantile(0.98))
image = ax.pcolormesh(x_axis, y_axis, gaussian, cmap="RdBu_r", shading="auto", vmin=-limit, vmax=limit)
fig.colorbar(image, ax=ax, label="Gaussian curvature K(z)", extend="both")
ax.scatter(z[:, 0], z[:, 1], s=1, c="k", alpha=0.3)
ax.set(title="Gaussian curvature of the decoder's Fisher metric", xlabel="$z_1$", ylabel="$z_2$")
fig.tight_layout()
plt.show()
