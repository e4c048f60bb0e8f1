"""
Statistics on the latent manifold
=================================

The mean of a set of codes under the decoder's geometry is the Frechet mean: the point that minimises the sum of
squared geodesic distances. ``pygeo.statistics.frechet_mean`` finds it by the Karcher flow (batched log maps),
``pygeo.statistics.tangent_pca`` gives the principal geodesic directions at that mean, ``pygeo.log_map`` is the
inverse of ``pygeo.exp_map``, and ``pygeo.parallel_transport`` carries a tangent vector (an "edit direction") from
one code to another along the geodesic.
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
# The Frechet mean and the first principal geodesic direction of 12 codes of the digit 3, beside their Euclidean mean.
codes = z[labels == 3][:12]
mean = pygeo.statistics.frechet_mean(metric, codes, progress=False)
pca = pygeo.statistics.tangent_pca(metric, codes, n_components=1, mean=mean.mean)
print("Frechet mean", mean.mean.tolist(), "converged:", bool(mean.converged), "iterations:", mean.n_iter)
print("Euclidean mean", codes.mean(0).tolist())
print("explained variance of the first principal geodesic:", pca.explained_variance.tolist())

# The principal geodesic: exp_map of multiples of the first component at the Frechet mean.
steps = torch.linspace(-2, 2, 21).unsqueeze(-1) * pca.explained_variance.sqrt()
principal = pygeo.exp_map(metric, mean.mean.expand(21, 2), steps * pca.components[0])

# %%
# The log map inverts the exponential map: ``exp_map(z0, log_map(z0, z1)) = z1``, and the length of ``v`` in the metric
# at ``z0`` (``sqrt(v^T G v)``) is the geodesic distance.
v = pygeo.log_map(metric, codes[:4], codes[4:8])
print("round trip error:", (pygeo.exp_map(metric, codes[:4], v) - codes[4:8]).norm(dim=-1).tolist())

# An edit direction at one code, parallel-transported to another: its G-norm is kept.
edit = torch.tensor([[0.3, 0.0]])
moved = pygeo.parallel_transport(metric, codes[:1], codes[5:6], edit)
print("G-norm before / after transport:", metric.norm(codes[:1], edit).item(), metric.norm(codes[5:6], moved).item())

volume = pygeo.geometry.volume_map(metric, (z.min(0).values - 1).tolist(), (z.max(0).values + 1).tolist(),
                                   resolution=100, progress=False)
fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
mesh = axes[0].pcolormesh(*volume.axes, volume.log_volume.T, cmap="Greys", shading="auto")
fig.colorbar(mesh, ax=axes[0], label="log volume element, 1/2 log det G")
axes[0].scatter(*codes.T, color="tab:blue", s=12, label="codes of the digit 3")
axes[0].plot(*principal.detach().T, color="crimson", lw=2, label="first principal geodesic")
axes[0].scatter(*mean.mean, marker="*", s=200, color="crimson", label="Frechet mean")
axes[0].scatter(*codes.mean(0), marker="x", s=100, color="k", label="Euclidean mean")
axes[0].arrow(*codes[0].tolist(), *edit[0].tolist(), color="tab:green", width=0.02, label="edit direction")
axes[0].arrow(*codes[5].tolist(), *moved[0].detach().tolist(), color="tab:orange", width=0.02,
              label="edit, transported")
axes[0].set(title="Frechet mean, principal geodesic, transported edit", xlabel="$z_1$", ylabel="$z_2$")
axes[0].legend(loc="lower right", fontsize=8)
decoded = torch.sigmoid(vae.decoder(torch.stack([mean.mean, codes.mean(0)]))).detach().reshape(2, 28, 28)
axes[1].imshow(torch.cat(list(decoded), dim=1), cmap="gray")
axes[1].set(title="decoded: Frechet mean (left), Euclidean mean (right)", xticks=[], yticks=[])
fig.tight_layout()
plt.show()
