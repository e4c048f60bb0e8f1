"""One Riemannian Langevin (MMALA) step for a batch of chains in plain PyTorch: the fallback, the test oracle and the
benchmark baseline of pygeo.ops.langevin_step. MATH.md section 4.

Per chain b (h = step_size[b], G = C C^T):
  mean     = z + (h/2) G^-1 grad + (h/2) div(G^-1),   div(G^-1)_i = -sum_j (G^-1 dG[j] G^-1)[i, j]
  proposal = mean + sqrt(h) C^-T noise
  log q(a | z) = -(d/2) log(2 pi h) + 1/2 log det G - (1/(2h)) (a - mean)^T G (a - mean)
A G that is not positive definite is retried with jitter (1e-10, 1e-8, 1e-6, 1e-4 times its mean |diagonal|); a chain
that still fails gets ok = False, proposal = mean = z and zero log terms (never a NaN).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

JITTERS = (1e-10, 1e-8, 1e-6, 1e-4)  # relative to the mean |diagonal| of G; every backend retries in this order


class LangevinStepResult(NamedTuple):
    proposal: torch.Tensor  # [B, d]
    mean: torch.Tensor  # [B, d]
    half_log_det: torch.Tensor  # [B]   1/2 log det G
    log_q_proposal: torch.Tensor  # [B]   log q(proposal | z)
    log_q_target: Optional[torch.Tensor]  # [B]   log q(target | z), None without target
    ok: torch.Tensor  # [B] bool


def cholesky_with_jitter(G: torch.Tensor):
    """G [B, d, d] -> (C [B, d, d] lower, jitter [B] (absolute, added to the diagonal), ok [B] bool).

    Failed chains get C = I so that downstream arithmetic stays finite; callers mask them with ok.
    """
    C, info = torch.linalg.cholesky_ex(G)
    jitter = torch.zeros(G.shape[0], dtype=G.dtype, device=G.device)
    scale = G.diagonal(dim1=-2, dim2=-1).abs().mean(-1)
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    for relative in JITTERS:
        failed = (info > 0).nonzero().squeeze(-1)  # retry only the failed chains
        if failed.numel() == 0:
            break
        trial = relative * scale[failed]
        C_retry, info_retry = torch.linalg.cholesky_ex(G[failed] + trial[:, None, None] * eye)
        C = C.index_copy(0, failed, C_retry)
        jitter = jitter.index_copy(0, failed, trial)
        info = info.index_copy(0, failed, info_retry)
    ok = info == 0
    C = torch.where(ok[:, None, None], C, eye)
    return C, jitter, ok


def langevin_step(z: torch.Tensor, G: torch.Tensor, grad_log_prob: torch.Tensor, step_size: torch.Tensor,
                  noise: torch.Tensor, dG: Optional[torch.Tensor] = None, div_Ginv: Optional[torch.Tensor] = None,
                  target: Optional[torch.Tensor] = None) -> LangevinStepResult:
    """z [B, d], G [B, d, d], grad_log_prob [B, d], step_size [B], noise [B, d], dG [B, d, d, d] (dG[b, k, i, j] =
    dG_ij / dz_k) or div_Ginv [B, d] or neither (simplified drift), target [B, d] or None."""
    d = z.shape[-1]
    C, jitter, ok = cholesky_with_jitter(G)
    h = step_size.unsqueeze(-1)
    drift_force = grad_log_prob  # G^-1 (grad - v) with v_a = sum_{k,b} dG[k, a, b] Ginv[b, k]: div(G^-1) = -G^-1 v
    if dG is not None:
        Ginv = torch.cholesky_inverse(C)
        drift_force = grad_log_prob - torch.einsum("bkac,bck->ba", dG, Ginv)
    drift = torch.cholesky_solve(drift_force.unsqueeze(-1), C).squeeze(-1)
    if div_Ginv is not None:
        drift = drift + div_Ginv
    mean = z + 0.5 * h * drift
    spread = torch.linalg.solve_triangular(C.transpose(-1, -2), noise.unsqueeze(-1), upper=True).squeeze(-1)
    proposal = mean + h.sqrt() * spread
    half_log_det = C.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    log_norm = -0.5 * d * torch.log(2 * math.pi * step_size) + half_log_det
    log_q_proposal = log_norm - 0.5 * (noise * noise).sum(-1)
    log_q_target = None
    if target is not None:
        # (target - z) - (h/2) drift, not target - mean: mean ~ |z| carries an ulp of z, a large error in a residual
        # ~ sqrt(h) (the MALA reverse move at a small step); target - z is exact where the points are close.
        residual = ((target - z) - 0.5 * h * drift).unsqueeze(-1)
        whitened = C.transpose(-1, -2) @ residual  # C^T r, |C^T r|^2 = r^T (G + jitter I) r
        log_q_target = log_norm - 0.5 * (whitened * whitened).sum((-1, -2)) / step_size
    zero = torch.zeros_like(half_log_det)
    keep = ok.unsqueeze(-1)
    return LangevinStepResult(
        proposal=torch.where(keep, proposal, z),
        mean=torch.where(keep, mean, z),
        half_log_det=torch.where(ok, half_log_det, zero),
        log_q_proposal=torch.where(ok, log_q_proposal, zero),
        log_q_target=None if log_q_target is None else torch.where(ok, log_q_target, zero),
        ok=ok,
    )
