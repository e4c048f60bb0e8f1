"""Small batched linear algebra shared by metrics, geometry and samplers."""
from __future__ import annotations

import torch

from . import _backend

_JITTER_TRIES = 4


def cholesky(G: torch.Tensor, name: str = "G") -> torch.Tensor:
    """Lower Cholesky factor of SPD matrices G [..., d, d].

    Points whose G is not numerically positive definite are retried with a jitter of 1e-10, 1e-8, ... times their mean
    diagonal; if that is not enough, ValueError says how many points failed (never a NaN that spreads).
    """
    if _backend.under_function_transform(G):
        # Inside torch.func transforms (vmap, grad, jacrev) the jitter retry's data-dependent branch cannot run.
        return torch.linalg.cholesky(G)
    L, info = torch.linalg.cholesky_ex(G)
    if G.device.type != "meta" and bool((info > 0).any()):
        scale = G.diagonal(dim1=-2, dim2=-1).abs().mean(-1)  # 0 for G = 0: no jitter can help
        eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
        # Every point is factored again, with the jitter only where it is needed (level l: 10^(-10 + 2 l) times the
        # mean diagonal; -1: none, the same factor as before). Mixing the failed factor into the result with
        # torch.where instead would send its NaN into the gradient of every point (0 * NaN in where's backward).
        level = torch.where(info > 0, 0, -1)
        for _ in range(_JITTER_TRIES):
            relative = torch.where(level >= 0, 10.0 ** (-10.0 + 2.0 * level.clamp_min(0).to(G.dtype)), 0.0)
            L, info = torch.linalg.cholesky_ex(G + (relative * scale)[..., None, None] * eye)
            if not bool((info > 0).any()):
                break
            level = torch.where(info > 0, level + 1, level)
        else:
            bad = int((info > 0).sum())
            raise ValueError(f"{name} is not positive definite at {bad} of {info.numel()} points, even with jitter "
                             f"up to 1e-4 of its mean diagonal")
    return L


def half_log_det(G: torch.Tensor, name: str = "G") -> torch.Tensor:
    """1/2 log det G [...] for SPD G [..., d, d], through a Cholesky factor (never det)."""
    L = cholesky(G, name)
    return L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
