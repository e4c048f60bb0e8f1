"""
Kahler metric of a complex VAE
==============================

A VAE with a complex latent ``z in C`` (``pygeo.models.ComplexVAE``) and the Kahler metric of a log-sum-exp potential
built from its posteriors (``pygeo.LSEKahlerMetric``, docs/MATH.md section 5): ``G(z)`` is Hermitian, its volume
form is ``det G``, and ``riemannian_uniform`` samples it through its real form, returning complex samples.
"""
import matplotlib.pyplot as plt
import torch

import pygeo
from pygeo.data import load_digits
from pygeo.models import ComplexVAE, train_complex_vae

torch.manual_seed(0)
images, labels = load_digits(limit=2000)
model = ComplexVAE(data_dim=784, latent_dim=1, hidden=128)
train_complex_vae(model, images, epochs=8, lr=2e-3, seed=0, progress=False)
with torch.no_grad():
    mu, logvar = model.encoder(images)          # mu [2000, 1] complex, logvar [2000, 1] real
mu, logvar = mu.to(torch.complex128), logvar.double()

# %%
# Centers at 50 encoded means, precisions 1 / s^2 (real diagonal), temperature of the order of the precisions.
chosen = torch.randperm(len(mu), generator=torch.Generator().manual_seed(0))[:50]
precisions = (-logvar[chosen]).exp()
metric = pygeo.LSEKahlerMetric(mu[chosen], precisions, temperature=float(precisions.median()))
G = metric.metric(mu[:3])
print("G at three codes (Hermitian 1 x 1):", G.squeeze(-1).squeeze(-1))

# %%
# ``log det G`` on the complex plane and samples of the prior weighted by ``det G`` (chains start at the centers).
extent = float(mu.abs().max()) * 1.2 + 0.5
axis = torch.linspace(-extent, extent, 120, dtype=torch.float64)
grid = torch.complex(*torch.meshgrid(axis, axis, indexing="xy"))          # [120, 120] complex
log_volume = metric.log_volume(grid.reshape(-1, 1)).reshape(grid.shape).detach()


def complex_normal(z):             # z [C, 1] complex -> log CN(z; 0, 1) [C], up to a constant
    return -(z.abs() ** 2).sum(-1)


# G does not decay far from the data (det G alone does not integrate): weight it by the prior, target CN(0, 1) det G.
result = pygeo.sample.riemannian_uniform(metric, n_samples=300, n_chains=100, n_steps=40, n_leapfrog=5, seed=0,
                                         init=mu[chosen], base_log_prob=complex_normal, progress=False)
samples = result.samples                       # [300, 1] complex
print(f"acceptance {result.acceptance.mean():.2f}")

fig, ax = plt.subplots(figsize=(6.4, 5.2))
image = ax.pcolormesh(axis, axis, log_volume, cmap="viridis", shading="auto")
fig.colorbar(image, ax=ax, label=r"$\log\det G(z)$")
ax.scatter(mu.real[:, 0], mu.imag[:, 0], s=2, c="lightgrey", label="encoded digits")
ax.scatter(samples.real[:, 0], samples.imag[:, 0], s=6, c="crimson", label="samples of prior x det G")
ax.set(title="Kahler metric of a complex VAE", xlabel="Re z", ylabel="Im z")
ax.legend(loc="upper right", markerscale=2)
fig.tight_layout()
plt.show()
