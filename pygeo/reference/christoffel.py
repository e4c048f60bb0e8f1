from __future__ import annotations

import torch

from .. import _linalg
from . import symmetric_part


def symmetrize(G: torch.Tensor, dG: torch.Tensor):
    """(G + G^T)/2 and dG symmetrised in its last two indices: every backend reads its inputs this way, so the op is a
    well-defined function of all input entries (and its gradient is the symmetric one)."""
    return symmetric_part(G), symmetric_part(dG)


def first_kind(dG: torch.Tensor) -> torch.Tensor:
    """T[..., l, i, j] = dG[i, l, j] + dG[j, l, i] - dG[l, i, j] (twice the Christoffel symbols of the first kind),
    dG [..., d, d, d] symmetric in its last two indices."""
    return torch.einsum("...ilj->...lij", dG) + torch.einsum("...jli->...lij", dG) - dG


def christoffel(G: torch.Tensor, dG: torch.Tensor) -> torch.Tensor:
    """Gamma[..., k, i, j] = 1/2 sum_l Ginv[k, l] (dG[i, l, j] + dG[j, l, i] - dG[l, i, j]).

    G [..., d, d] symmetric positive definite, dG [..., d, d, d] with dG[..., k, i, j] = d G[i, j] / d z_k
    -> Gamma [..., d, d, d]. Non-positive-definite G: jitter retry, then ValueError (pygeo._linalg.cholesky).
    """
    G, dG = symmetrize(G, dG)
    d = G.shape[-1]
    L = _linalg.cholesky(G, "G")
    rhs = first_kind(dG).reshape(*dG.shape[:-3], d, d * d)
    return 0.5 * torch.cholesky_solve(rhs, L).reshape(dG.shape)
