"""
Natural-gradient training
=========================

``train_vae(..., optimizer="natural")`` trains a VAE with ``pygeo.optim.NaturalGradient`` (K-FAC: the Fisher of the
decoder's likelihood and of the encoder's Gaussian posterior, as Kronecker factors per layer). Its learning rate is
on another scale than Adam's. The experiment ``python -m pygeo experiment natural-gradient`` measures the claim that
this converges faster (experiments/natural_gradient.md: fewer steps, not less time, on a CPU).
"""
import time

import matplotlib.pyplot as plt
import torch

from pygeo.data import load_digits
from pygeo.models import VAE, train_vae

images, labels = load_digits(limit=2000)
losses, seconds = {}, {}
for name, options in {"Adam (lr 1e-3)": dict(optimizer="adam", lr=1e-3),
                      "K-FAC natural gradient (lr 0.1)": dict(optimizer="natural", lr=0.1)}.items():
    torch.manual_seed(0)
    vae = VAE(data_dim=784, latent_dim=2, hidden=(256, 64))
    start = time.perf_counter()
    losses[name] = train_vae(vae, images, epochs=8, seed=0, progress=False, **options)   # nats per image, per epoch
    seconds[name] = time.perf_counter() - start
    print(f"{name}: final loss {losses[name][-1]:.1f} nats in {seconds[name]:.1f} s")

# %%
# The loss after each epoch (the same data, model and seed for both).
fig, ax = plt.subplots(figsize=(6.4, 4.4))
for name, curve in losses.items():
    ax.plot(range(1, len(curve) + 1), curve, marker="o", label=f"{name}, {seconds[name]:.1f} s")
ax.set(title="Negative ELBO per epoch", xlabel="epoch", ylabel="loss (nats per image)")
ax.legend()
fig.tight_layout()
plt.show()
