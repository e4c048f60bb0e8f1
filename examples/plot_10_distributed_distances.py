"""
Distances on several processes
==============================

``pygeo.geodesic_distances(..., distributed=True)`` shares the pairs out between the ranks of an initialised
``torch.distributed`` group and gives every rank the whole matrix, bit-identical to one process. pygeo never starts
processes: a script is launched with ``torchrun``. This example writes such a script, launches it on 2 CPU processes
(gloo) and compares the result with the single-process call.
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import pygeo
from pygeo.data import load_digits
from pygeo.models import VAE, train_vae

torch.manual_seed(0)
images, labels = load_digits(limit=2000)
vae = VAE(data_dim=784, latent_dim=2, hidden=(256, 64))
train_vae(vae, images, epochs=15, lr=2e-3, seed=0, progress=False)
z = vae.encode_means(images[:30])                  # [30, 2]: 435 pairs

# %%
# The script every rank runs: it loads the same decoder and points, and rank 0 saves the matrix.
SCRIPT = '''
import sys, torch, torch.distributed as dist, pygeo
from pygeo.models import VAE

dist.init_process_group("gloo")          # torchrun sets the rank, world size and rendezvous address
folder = sys.argv[1]
vae = VAE(data_dim=784, latent_dim=2, hidden=(256, 64))
vae.load_state_dict(torch.load(f"{folder}/vae.pt"))
z = torch.load(f"{folder}/points.pt")
D = pygeo.geodesic_distances(vae.pullback_metric(), z, chunk_size=64, distributed=True, progress=False)
if dist.get_rank() == 0:
    torch.save(D, f"{folder}/distances.pt")
dist.destroy_process_group()
'''
folder = Path(tempfile.mkdtemp())
(folder / "distances.py").write_text(SCRIPT)
torch.save(vae.state_dict(), folder / "vae.pt")
torch.save(z, folder / "points.pt")

# torchrun --standalone --nproc-per-node 2 distances.py FOLDER  (the same as python -m torch.distributed.run ...)
environment = dict(os.environ, OMP_NUM_THREADS="1")
subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                str(folder / "distances.py"), str(folder)], check=True, env=environment, capture_output=True)
on_two_processes = torch.load(folder / "distances.pt")

# %%
# One process, the same call without ``distributed=True``: the same bits.
on_one_process = pygeo.geodesic_distances(vae.pullback_metric(), z, chunk_size=64, progress=False)
print("bit-identical:", torch.equal(on_one_process, on_two_processes))

fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
for ax, matrix, title in ((axes[0], on_two_processes, "2 processes (gloo)"), (axes[1], on_one_process, "1 process")):
    image = ax.imshow(matrix, cmap="magma")
    fig.colorbar(image, ax=ax, shrink=0.85, label="geodesic distance")
    ax.set(title=f"Distances between 30 digits: {title}", xlabel="digit index", ylabel="digit index")
fig.tight_layout()
plt.show()
