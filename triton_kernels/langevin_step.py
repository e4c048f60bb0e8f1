"""One Riemannian Langevin (MMALA) step: one program per block of chains, each chain's d x d matrices held in registers
as a [BLOCK_CHAINS, BLOCK_DIM, BLOCK_DIM] tile. The Cholesky factor is never stored: the same loop over columns that
factorises G = C C^T builds C^-1 row by row (column-oriented forward substitution), so every solve is a
matrix-vector product with C^-1 (C itself serves the quadratic form of the reverse move), and G^-1 = C^-T C^-1 accumulates as a sum of outer products. MATH.md section 4; the
PyTorch reference is pygeo/reference/langevin_step.py (same jitter retries, same outputs for failed chains)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

LOG_2PI = math.log(2.0 * math.pi)


@triton.jit
def _factor(Gm, jitter, d, BLOCK_CHAINS: tl.constexpr, BLOCK_DIM: tl.constexpr, WITH_INVERSE: tl.constexpr):
    """Gm [BC, BD, BD] (padded with the identity), jitter [BC] -> C, C^-1 [BC, BD, BD], G^-1 (when WITH_INVERSE, else
    a zero tile), 1/2 log det [BC], ok [BC] for G + jitter I = C C^T."""
    rows = tl.arange(0, BLOCK_DIM)[None, :, None]
    cols = tl.arange(0, BLOCK_DIM)[None, None, :]
    index = tl.arange(0, BLOCK_DIM)[None, :]
    eye = tl.where(rows == cols, 1.0, 0.0).to(Gm.dtype)
    A = Gm + jitter[:, None, None] * eye
    C = tl.zeros_like(Gm)
    Cinv = eye + tl.zeros_like(Gm)
    Ginv = tl.zeros_like(Gm)
    half_log_det = tl.zeros((BLOCK_CHAINS,), dtype=Gm.dtype)
    ok = tl.full((BLOCK_CHAINS,), 1, dtype=tl.int1)
    for k in range(0, d):
        column = tl.sum(tl.where(cols == k, A, 0.0), axis=2)  # A[:, :, k]  [BC, BD]
        pivot = tl.sum(tl.where(index == k, column, 0.0), axis=1)  # [BC]
        positive = pivot > 0.0
        ok = ok & positive
        root = tl.sqrt(tl.where(positive, pivot, 1.0))
        below = tl.where(index > k, column / root[:, None], 0.0)  # C[:, i, k] for i > k
        A = A - below[:, :, None] * below[:, None, :]
        C = tl.where(cols == k, (below + tl.where(index == k, root[:, None], 0.0))[:, :, None], C)
        half_log_det += tl.log(root)
        # Row k of C^-1 is final now; remove its multiples from the rows below.
        row_k = tl.sum(tl.where(rows == k, Cinv, 0.0), axis=1) / root[:, None]  # [BC, BD]
        Cinv = tl.where(rows == k, row_k[:, None, :], Cinv - below[:, :, None] * row_k[:, None, :])
        if WITH_INVERSE:
            Ginv += row_k[:, :, None] * row_k[:, None, :]
    return C, Cinv, Ginv, half_log_det, ok


@triton.jit
def _langevin_step_kernel(
    z_ptr,  # [B, d]
    G_ptr,  # [B, d, d]
    grad_ptr,  # [B, d]
    h_ptr,  # [B]
    noise_ptr,  # [B, d]
    dG_ptr,  # [B, d, d, d], dG[b, k, i, j] = dG_ij / dz_k (read when HAS_DG)
    div_ptr,  # [B, d] (read when HAS_DIV)
    target_ptr,  # [B, d] (read when HAS_TARGET)
    proposal_ptr,  # [B, d]
    mean_ptr,  # [B, d]
    half_log_det_ptr,  # [B]
    log_q_proposal_ptr,  # [B]
    log_q_target_ptr,  # [B] (written when HAS_TARGET)
    ok_ptr,  # [B] bool
    B,
    d,
    LOG_2PI_: tl.constexpr,
    HAS_DG: tl.constexpr,
    HAS_DIV: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    BLOCK_CHAINS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    chains = tl.program_id(0).to(tl.int64) * BLOCK_CHAINS + tl.arange(0, BLOCK_CHAINS)
    chain_mask = chains < B
    index = tl.arange(0, BLOCK_DIM)
    dim_mask = index < d
    vec_offsets = chains[:, None] * d + index[None, :]  # [BC, BD]
    vec_mask = chain_mask[:, None] & dim_mask[None, :]
    rows = index[None, :, None]
    cols = index[None, None, :]
    mat_offsets = chains[:, None, None] * d * d + rows * d + cols  # [BC, BD, BD]
    mat_mask = chain_mask[:, None, None] & (rows < d) & (cols < d)

    G = tl.load(G_ptr + mat_offsets, mask=mat_mask, other=0.0)
    # Padding (dims >= d, chains >= B) is the identity: pivots of 1, nothing couples to the real block.
    Gm = tl.where(mat_mask, G, tl.where(rows == cols, 1.0, 0.0).to(G.dtype))
    zero = tl.zeros((BLOCK_CHAINS,), dtype=G.dtype)
    C, Cinv, Ginv, half_log_det, ok = _factor(Gm, zero, d, BLOCK_CHAINS, BLOCK_DIM, HAS_DG)
    # Jitter retries (relative 1e-10, 1e-8, 1e-6, 1e-4 of the mean |diagonal|), only while some chain of the block
    # still fails; a runtime loop, so the factorisation is compiled once more, not four times.
    scale = tl.sum(tl.sum(tl.where(mat_mask & (rows == cols), tl.abs(G), 0.0), axis=2), axis=1) / d
    relative = scale * 0.0 + 1e-10
    attempt = 0
    while (attempt < 4) & (tl.sum((ok == 0).to(tl.int32)) > 0):
        retry = ok == 0
        C2, Cinv2, Ginv2, half_log_det2, ok2 = _factor(Gm, relative * scale, d, BLOCK_CHAINS, BLOCK_DIM, HAS_DG)
        C = tl.where(retry[:, None, None], C2, C)
        Cinv = tl.where(retry[:, None, None], Cinv2, Cinv)
        Ginv = tl.where(retry[:, None, None], Ginv2, Ginv)
        half_log_det = tl.where(retry, half_log_det2, half_log_det)
        ok = ok | ok2
        relative = relative * 100.0
        attempt += 1

    force = tl.load(grad_ptr + vec_offsets, mask=vec_mask, other=0.0)
    if HAS_DG:
        # force = grad - v, v_a = sum_{k, c} dG[k, a, c] Ginv[c, k]: G^-1 force = G^-1 grad + div(G^-1)
        dG_offsets = chains[:, None, None] * d * d * d + rows * d + cols
        for k in range(0, d):
            tile = tl.load(dG_ptr + dG_offsets + k * d * d, mask=mat_mask, other=0.0)  # dG[:, k, a, c]
            Ginv_k = tl.sum(tl.where(rows == k, Ginv, 0.0), axis=1)  # Ginv[:, k, c]
            force -= tl.sum(tile * Ginv_k[:, None, :], axis=2)
    whitened = tl.sum(Cinv * force[:, None, :], axis=2)  # C^-1 force
    drift = tl.sum(Cinv * whitened[:, :, None], axis=1)  # C^-T C^-1 force
    if HAS_DIV:
        drift += tl.load(div_ptr + vec_offsets, mask=vec_mask, other=0.0)
    noise = tl.load(noise_ptr + vec_offsets, mask=vec_mask, other=0.0)
    spread = tl.sum(Cinv * noise[:, :, None], axis=1)  # C^-T noise
    h = tl.load(h_ptr + chains, mask=chain_mask, other=1.0)
    z = tl.load(z_ptr + vec_offsets, mask=vec_mask, other=0.0)
    good = ok[:, None]
    mean = tl.where(good, z + 0.5 * h[:, None] * drift, z)
    proposal = tl.where(good, mean + tl.sqrt(h)[:, None] * spread, z)
    tl.store(mean_ptr + vec_offsets, mean, mask=vec_mask)
    tl.store(proposal_ptr + vec_offsets, proposal, mask=vec_mask)
    log_norm = -0.5 * d * (LOG_2PI_ + tl.log(h)) + half_log_det
    log_q_proposal = log_norm - 0.5 * tl.sum(noise * noise, axis=1)
    tl.store(half_log_det_ptr + chains, tl.where(ok, half_log_det, 0.0), mask=chain_mask)
    tl.store(log_q_proposal_ptr + chains, tl.where(ok, log_q_proposal, 0.0), mask=chain_mask)
    if HAS_TARGET:
        # (target - z) - (h/2) drift, not target - mean: mean carries an ulp of z, far more than a residual ~ sqrt(h)
        # can take (the MALA reverse move at a small step).
        residual = (tl.load(target_ptr + vec_offsets, mask=vec_mask, other=0.0) - z) - 0.5 * h[:, None] * drift
        whitened_residual = tl.sum(C * residual[:, :, None], axis=1)  # C^T r: |C^T r|^2 = r^T (G + jitter I) r
        quadratic = tl.sum(whitened_residual * whitened_residual, axis=1)
        log_q_target = log_norm - 0.5 * quadratic / h
        tl.store(log_q_target_ptr + chains, tl.where(ok, log_q_target, 0.0), mask=chain_mask)
    tl.store(ok_ptr + chains, ok, mask=chain_mask)


def launch_settings(d: int):
    """(BLOCK_CHAINS, BLOCK_DIM, num_warps): [chains, d, d] register tiles of about 512 elements on 4 warps (four such
    tiles live at once: the working matrix, C, C^-1, G^-1), so about 4 registers per tile and thread; larger tiles
    spilled in a compile for sm_90 (ptxas: 255 registers plus stack). d = 64 holds one chain on 16 warps."""
    block_dim = max(2, triton.next_power_of_2(d))
    block_chains = max(1, 512 // (block_dim * block_dim))
    num_warps = max(4, min(16, block_chains * block_dim * block_dim // 256))
    return block_chains, block_dim, num_warps


def langevin_step(z: torch.Tensor, G: torch.Tensor, grad: torch.Tensor, h: torch.Tensor, noise: torch.Tensor,
                  dG: Optional[torch.Tensor], div_Ginv: Optional[torch.Tensor], target: Optional[torch.Tensor],
                  proposal: torch.Tensor, mean: torch.Tensor, half_log_det: torch.Tensor, log_q_proposal: torch.Tensor,
                  log_q_target: torch.Tensor, ok: torch.Tensor) -> None:
    """Contiguous inputs flattened to one batch dim (shapes as in the kernel); writes the six outputs."""
    B, d = z.shape
    block_chains, block_dim, num_warps = launch_settings(d)
    grid = (triton.cdiv(B, block_chains),)
    _langevin_step_kernel[grid](
        z, G, grad, h, noise, dG if dG is not None else z, div_Ginv if div_Ginv is not None else z,
        target if target is not None else z, proposal, mean, half_log_det, log_q_proposal,
        log_q_target if target is not None else half_log_det, ok, B, d,
        LOG_2PI_=LOG_2PI, HAS_DG=dG is not None, HAS_DIV=div_Ginv is not None, HAS_TARGET=target is not None,
        BLOCK_CHAINS=block_chains, BLOCK_DIM=block_dim, num_warps=num_warps,
    )
