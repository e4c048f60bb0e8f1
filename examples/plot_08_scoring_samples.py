"""
Scoring generated digits offline
================================

``pygeo.evaluate`` computes FID, precision / recall and an outlier rate in the feature space of any local classifier:
no weights are downloaded. ``pygeo.evaluate.MNISTFeatures(data_dir)`` trains and caches a LeNet on the MNIST IDX
files (about 4 minutes the first time, 99.2 % test accuracy); this example, which must run in seconds without MNIST,
trains a small classifier on half of the shipped digits instead. Anything with ``.features(images)`` and
``.predict_proba(images)`` can score samples:

.. code-block:: python

    features = pygeo.evaluate.MNISTFeatures("mnist/")          # the standard MNIST files
    scores = pygeo.evaluate.evaluate_samples(decoded, test_images, features)

Here the decoded N(0, I) prior is compared with Riemannian-uniform samples of the latent metric and with held-out
real digits. The scores of a classifier trained for seconds only rank the sets; they are not comparable to papers'.
"""
import matplotlib.pyplot as plt
import torch
from torch import nn

import pygeo
from pygeo.data import load_digits
from pygeo.models import VAE, train_vae

torch.manual_seed(0)
images, labels = load_digits(limit=4000)
train, held_out = images[:2000], images[2000:3000]
vae = VAE(data_dim=784, latent_dim=2, hidden=(256, 64))
train_vae(vae, train, epochs=15, lr=2e-3, seed=0, progress=False)


class SmallClassifier(nn.Module):
    """784 -> 64 features -> 10 classes; .features and .predict_proba are what evaluate_samples needs."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    @torch.no_grad()
    def features(self, x):
        return self.body(x)

    @torch.no_grad()
    def predict_proba(self, x):
        return torch.softmax(self.head(self.body(x)), -1)


classifier = SmallClassifier()
optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
for epoch in range(5):
    for batch in torch.randperm(2000).split(100):
        loss = nn.functional.cross_entropy(classifier.head(classifier.body(train[batch])), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
accuracy = (classifier.predict_proba(held_out).argmax(-1) == labels[2000:3000]).float().mean()
print(f"classifier accuracy on held-out digits: {accuracy:.3f}")

# %%
# Three sets of 1,000 images, scored against the 1,000 held-out digits.
metric = pygeo.LatentMetric.from_encoder(vae.encoder, train, n_centroids=100, lam=1e-3, tau=1e-4, progress=False)
hmc = pygeo.sample.riemannian_uniform(metric, n_samples=1000, n_chains=200, n_steps=50, seed=0, progress=False)
with torch.no_grad():
    sets = {"N(0, I) prior": torch.sigmoid(vae.decoder(torch.randn(1000, 2))),
            "Riemannian uniform": torch.sigmoid(vae.decoder(hmc.samples)),
            "real digits": images[3000:4000]}
reference = pygeo.evaluate.reference_statistics(held_out, classifier)
scores = {name: pygeo.evaluate.evaluate_samples(x, reference, classifier) for name, x in sets.items()}
for name, score in scores.items():
    print(f"{name:>20}: " + ", ".join(f"{key} {value:.3f}" for key, value in score.items()))

fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
for ax, key in zip(axes, ("fid", "precision", "recall", "outlier_rate")):
    ax.bar(range(3), [scores[name][key] for name in sets], color=["tab:blue", "crimson", "tab:grey"])
    ax.set_xticks(range(3), list(sets), rotation=15)
    ax.set(title=key, ylabel=key)
fig.suptitle("Generated digits scored in a small classifier's feature space")
fig.tight_layout()
plt.show()
