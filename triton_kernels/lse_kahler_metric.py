"""Hermitian metric of the log-sum-exp Kahler potential (MATH.md section 5) in Triton, on real and imaginary parts.

One program per point; the K components stream through in tiles of BLOCK_K with an online softmax (running max,
accumulators rescaled when it grows). Per tile: y_k = P_k (z - c_k) as a broadcast product, then the weighted second
moment sum_k w_k y_k y_k^H as four real tl.dot's of [n, BLOCK_K] x [BLOCK_K, n]. Complex values are (real, imaginary)
pairs as torch.view_as_real lays them out.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import block_for


@triton.jit
def _lse_kahler_metric_kernel(
    z_ptr,  # [B, n, 2]
    c_ptr,  # [K, n, 2]
    p_ptr,  # [K, n, n, 2] (Hermitian) or [K, n] (DIAGONAL, real)
    lw_ptr,  # [K]
    g_ptr,  # [B, n, n, 2]
    K,
    n,
    inv_T,
    DIAGONAL: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    acc_dtype = tl.float32 if z_ptr.dtype.element_ty == tl.float32 else tl.float64
    idx = tl.arange(0, BLOCK_N)
    mask_n = idx < n
    z_re = tl.load(z_ptr + (b * n + idx) * 2, mask=mask_n, other=0.0).to(acc_dtype)
    z_im = tl.load(z_ptr + (b * n + idx) * 2 + 1, mask=mask_n, other=0.0).to(acc_dtype)

    running_max = tl.max(tl.full((BLOCK_K,), float("-inf"), acc_dtype), axis=0)
    total = tl.sum(tl.zeros((BLOCK_K,), acc_dtype), axis=0)
    ysum_re = tl.zeros((BLOCK_N,), acc_dtype)
    ysum_im = tl.zeros((BLOCK_N,), acc_dtype)
    S_re = tl.zeros((BLOCK_N, BLOCK_N), acc_dtype)
    S_im = tl.zeros((BLOCK_N, BLOCK_N), acc_dtype)
    A_re = tl.zeros((BLOCK_N, BLOCK_N), acc_dtype)
    A_im = tl.zeros((BLOCK_N, BLOCK_N), acc_dtype)
    A_diag = tl.zeros((BLOCK_N,), acc_dtype)

    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < K
        mask_kn = mask_k[:, None] & mask_n[None, :]
        c_off = (ks[:, None].to(tl.int64) * n + idx[None, :]) * 2
        d_re = z_re[None, :] - tl.load(c_ptr + c_off, mask=mask_kn, other=0.0).to(acc_dtype)  # [BLOCK_K, BLOCK_N]
        d_im = z_im[None, :] - tl.load(c_ptr + c_off + 1, mask=mask_kn, other=0.0).to(acc_dtype)
        if DIAGONAL:
            p = tl.load(p_ptr + ks[:, None].to(tl.int64) * n + idx[None, :], mask=mask_kn, other=0.0).to(acc_dtype)
            y_re = p * d_re
            y_im = p * d_im
        else:
            # [BLOCK_K, row i, column j] of P_k; y_ki = sum_j P_kij d_kj
            p_off = ((ks[:, None, None].to(tl.int64) * n + idx[None, :, None]) * n + idx[None, None, :]) * 2
            mask3 = mask_k[:, None, None] & mask_n[None, :, None] & mask_n[None, None, :]
            P_re = tl.load(p_ptr + p_off, mask=mask3, other=0.0).to(acc_dtype)
            P_im = tl.load(p_ptr + p_off + 1, mask=mask3, other=0.0).to(acc_dtype)
            y_re = tl.sum(P_re * d_re[:, None, :] - P_im * d_im[:, None, :], axis=2)
            y_im = tl.sum(P_re * d_im[:, None, :] + P_im * d_re[:, None, :], axis=2)
        u = tl.sum(d_re * y_re + d_im * y_im, axis=1)  # Re(d^H P d) [BLOCK_K]
        log_w = tl.load(lw_ptr + ks, mask=mask_k, other=0.0).to(acc_dtype)
        score = tl.where(mask_k, log_w + u * inv_T, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(score, axis=0))
        rescale = tl.exp(running_max - new_max)  # 0 on the first tile (running_max = -inf)
        running_max = new_max
        w = tl.exp(score - new_max)  # 0 for padding components
        total = total * rescale + tl.sum(w, axis=0)
        wy_re = w[:, None] * y_re
        wy_im = w[:, None] * y_im
        ysum_re = ysum_re * rescale + tl.sum(wy_re, axis=0)
        ysum_im = ysum_im * rescale + tl.sum(wy_im, axis=0)
        # sum_k w_k y_ki conj(y_kj)
        S_re = S_re * rescale + tl.dot(tl.trans(wy_re), y_re, input_precision="ieee") \
            + tl.dot(tl.trans(wy_im), y_im, input_precision="ieee")
        S_im = S_im * rescale + tl.dot(tl.trans(wy_im), y_re, input_precision="ieee") \
            - tl.dot(tl.trans(wy_re), y_im, input_precision="ieee")
        if DIAGONAL:
            A_diag = A_diag * rescale + tl.sum(w[:, None] * p, axis=0)
        else:
            A_re = A_re * rescale + tl.sum(w[:, None, None] * P_re, axis=0)
            A_im = A_im * rescale + tl.sum(w[:, None, None] * P_im, axis=0)

    inv_total = 1.0 / total
    mean_re = ysum_re * inv_total
    mean_im = ysum_im * inv_total
    # G = A / total + (S / total - mean mean^H) / T
    G_re = (S_re * inv_total - (mean_re[:, None] * mean_re[None, :] + mean_im[:, None] * mean_im[None, :])) * inv_T
    G_im = (S_im * inv_total - (mean_im[:, None] * mean_re[None, :] - mean_re[:, None] * mean_im[None, :])) * inv_T
    if DIAGONAL:
        G_re += tl.where(idx[:, None] == idx[None, :], (A_diag * inv_total)[:, None], 0.0)
    else:
        G_re += A_re * inv_total
        G_im += A_im * inv_total
    # Exactly Hermitian: average with the conjugate transpose (the imaginary diagonal becomes exactly 0).
    G_re = 0.5 * (G_re + tl.trans(G_re))
    G_im = 0.5 * (G_im - tl.trans(G_im))
    g_off = ((b * n + idx[:, None]) * n + idx[None, :]) * 2
    out_mask = mask_n[:, None] & mask_n[None, :]
    tl.store(g_ptr + g_off, G_re.to(g_ptr.dtype.element_ty), mask=out_mask)
    tl.store(g_ptr + g_off + 1, G_im.to(g_ptr.dtype.element_ty), mask=out_mask)


def lse_kahler_metric(z: torch.Tensor, centers: torch.Tensor, precisions: torch.Tensor, log_weights: torch.Tensor,
                      temperature: float, diagonal: bool, out: torch.Tensor) -> torch.Tensor:
    """z [B, n, 2], centers [K, n, 2], precisions [K, n, n, 2] or [K, n] (diagonal), log_weights [K], all contiguous;
    out [B, n, n, 2]."""
    B, n, _ = z.shape
    K = centers.shape[0]
    if B == 0:
        return out
    block_n = block_for(n)
    # The [BLOCK_K, n, n] tile of precisions dominates the registers: keep it at about 16K elements.
    block_k = 16 if diagonal else max(16, min(64, 16384 // (block_n * block_n)))
    _lse_kahler_metric_kernel[(B,)](
        z, centers, precisions, log_weights, out, K, n, 1.0 / temperature,
        DIAGONAL=diagonal, BLOCK_K=block_k, BLOCK_N=block_n,
    )
    return out
