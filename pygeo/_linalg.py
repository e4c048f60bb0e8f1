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
        scale = G.diagonal(dim1=-2, dim2=-1).abs().mean(-1, keepdim=True)  # 0 for G = 0: no jitter can help
        eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
        for attempt in range(_JITTER_TRIES):
            failed = (info > 0).unsqueeze(-1).unsqueeze(-1)
            jitter = (10.0 ** (-10 + 2 * attempt)) * scale.unsqueeze(-1) * eye
            L_retry, info_retry = torch.linalg.cholesky_ex(G + jitter)
            L = torch.where(failed, L_retry, L)
            info = torch.where(info > 0, info_retry, info)
            if not bool((info > 0).any()):
                break
        else:
            bad = int((info > 0).sum())
            raise ValueError(f"{name} is not positive definite at {bad} of {info.numel()} points, even with jitter "
                             f"up to 1e-4 of its mean diagonal")
    return L


def half_log_det(G: torch.Tensor, name: str = "G") -> torch.Tensor:
    """1/2 log det G [...] for SPD G [..., d, d], through a Cholesky factor (never det)."""
    L = cholesky(G, name)
    return L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
