"""Hermitian metric of the log-sum-exp Kahler potential (MATH.md section 5) in Triton, on real and imaginary parts.

One program per point; the K components go through one at a time with an online softmax, every per-component quantity
a [n] vector or an [n, n] tile (y_k = P_k (z - c_k) as a row-wise reduction, w_k y_k y_k^H as an outer product), so the
registers hold O(n^2) whatever K is.

The covariance sum_k p_k y_k y_k^H - ybar ybar^H is accumulated around a shift r, the y of the component with the
largest score so far: sums of w (y - r) and w (y - r)(y - r)^H. The covariance is the same for every r, but with r near
the mean the two terms no longer cancel; for a sharp softmax (one component of weight ~1, as at a low temperature)
the plain second moment minus the squared mean loses every float32 digit. When a new component takes the maximum the
sums are moved to the new shift exactly (S' = S - m d^H - d m^H + W d d^H, m' = m - W d, d = r' - r) and rescaled.
Complex values are (real, imaginary) pairs as torch.view_as_real lays them out.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import block_for
from .scalars import as_dtype


@triton.jit
def _outer_re(a_re, a_im, b_re, b_im):
    """Re(a b^H)[i, j] = Re(a_i conj(b_j))."""
    return a_re[:, None] * b_re[None, :] + a_im[:, None] * b_im[None, :]


@triton.jit
def _outer_im(a_re, a_im, b_re, b_im):
    """Im(a b^H)[i, j] = Im(a_i conj(b_j))."""
    return a_im[:, None] * b_re[None, :] - a_re[:, None] * b_im[None, :]


@triton.jit
def _lse_kahler_metric_kernel(
    z_ptr,  # [B, n, 2]
    c_ptr,  # [K, n, 2]
    p_ptr,  # [K, n, n, 2] (Hermitian) or [K, n] (DIAGONAL, real)
    lw_ptr,  # [K]
    g_ptr,  # [B, n, n, 2]
    K,
    n,
    inv_T: tl.float64,
    DIAGONAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    acc_dtype = tl.float32 if z_ptr.dtype.element_ty == tl.float32 else tl.float64
    inv_T = as_dtype(inv_T, acc_dtype)
    idx = tl.arange(0, BLOCK_N)
    mask_n = idx < n
    mask_nn = mask_n[:, None] & mask_n[None, :]
    z_re = tl.load(z_ptr + (b * n + idx) * 2, mask=mask_n, other=0.0).to(acc_dtype)
    z_im = tl.load(z_ptr + (b * n + idx) * 2 + 1, mask=mask_n, other=0.0).to(acc_dtype)

    zero = tl.sum(tl.zeros((BLOCK_N,), acc_dtype), axis=0)
    running_max = zero - float("inf")
    total = zero  # W = sum_k w_k, weights relative to exp(running_max)
    r_re = tl.zeros((BLOCK_N,), acc_dtype)  # the shift r
    r_im = tl.zeros((BLOCK_N,), acc_dtype)
    m_re = tl.zeros((BLOCK_N,), acc_dtype)  # sum_k w_k (y_k - r)
    m_im = tl.zeros((BLOCK_N,), acc_dtype)
    S_re = tl.zeros((BLOCK_N, BLOCK_N), acc_dtype)  # sum_k w_k (y_k - r)(y_k - r)^H
    S_im = tl.zeros((BLOCK_N, BLOCK_N), acc_dtype)
    A_re = tl.zeros((BLOCK_N, BLOCK_N), acc_dtype)  # sum_k w_k P_k (real diagonal only when DIAGONAL)
    A_im = tl.zeros((BLOCK_N, BLOCK_N), acc_dtype)

    for k in range(0, K):
        k64 = k + tl.zeros((), tl.int64)  # 64-bit offsets
        d_re = z_re - tl.load(c_ptr + (k64 * n + idx) * 2, mask=mask_n, other=0.0).to(acc_dtype)
        d_im = z_im - tl.load(c_ptr + (k64 * n + idx) * 2 + 1, mask=mask_n, other=0.0).to(acc_dtype)
        if DIAGONAL:
            p = tl.load(p_ptr + k64 * n + idx, mask=mask_n, other=0.0).to(acc_dtype)
            y_re = p * d_re
            y_im = p * d_im
            P_re = tl.where(idx[:, None] == idx[None, :], p[:, None], 0.0)
            P_im = tl.zeros((BLOCK_N, BLOCK_N), acc_dtype)
        else:
            p_off = ((k64 * n + idx[:, None]) * n + idx[None, :]) * 2  # P_k[i, j]
            P_re = tl.load(p_ptr + p_off, mask=mask_nn, other=0.0).to(acc_dtype)
            P_im = tl.load(p_ptr + p_off + 1, mask=mask_nn, other=0.0).to(acc_dtype)
            y_re = tl.sum(P_re * d_re[None, :] - P_im * d_im[None, :], axis=1)
            y_im = tl.sum(P_re * d_im[None, :] + P_im * d_re[None, :], axis=1)
        u = tl.sum(d_re * y_re + d_im * y_im, axis=0)  # Re(d^H P d)
        score = tl.load(lw_ptr + k64).to(acc_dtype) + u * inv_T
        if score > running_max:
            # y_k becomes the shift: move the sums to it exactly, then rescale them to the new maximum.
            s_re = y_re - r_re
            s_im = y_im - r_im
            S_re = S_re - _outer_re(m_re, m_im, s_re, s_im) - _outer_re(s_re, s_im, m_re, m_im) \
                + total * _outer_re(s_re, s_im, s_re, s_im)
            S_im = S_im - _outer_im(m_re, m_im, s_re, s_im) - _outer_im(s_re, s_im, m_re, m_im) \
                + total * _outer_im(s_re, s_im, s_re, s_im)
            m_re = m_re - total * s_re
            m_im = m_im - total * s_im
            rescale = tl.exp(running_max - score)  # 0 for the first component (running_max = -inf)
            S_re = S_re * rescale
            S_im = S_im * rescale
            A_re = A_re * rescale
            A_im = A_im * rescale
            m_re = m_re * rescale
            m_im = m_im * rescale
            total = total * rescale
            r_re = y_re
            r_im = y_im
            running_max = score
        w = tl.exp(score - running_max)
        e_re = y_re - r_re
        e_im = y_im - r_im
        total += w
        m_re += w * e_re
        m_im += w * e_im
        S_re += w * _outer_re(e_re, e_im, e_re, e_im)
        S_im += w * _outer_im(e_re, e_im, e_re, e_im)
        A_re += w * P_re
        A_im += w * P_im

    inv_total = 1.0 / total
    mean_re = m_re * inv_total  # the mean of y - r
    mean_im = m_im * inv_total
    # G = A / W + (S / W - mean mean^H) / T
    G_re = A_re * inv_total + (S_re * inv_total - _outer_re(mean_re, mean_im, mean_re, mean_im)) * inv_T
    G_im = A_im * inv_total + (S_im * inv_total - _outer_im(mean_re, mean_im, mean_re, mean_im)) * inv_T
    # Exactly Hermitian: the upper triangle is stored as computed and, from the same registers, conjugated into the
    # lower one; the diagonal's imaginary part is exactly 0.
    upper = idx[:, None] <= idx[None, :]
    G_im = tl.where(idx[:, None] == idx[None, :], 0.0, G_im)
    out = g_ptr.dtype.element_ty
    g_off = ((b * n + idx[:, None]) * n + idx[None, :]) * 2
    g_off_mirror = ((b * n + idx[None, :]) * n + idx[:, None]) * 2
    tl.store(g_ptr + g_off, G_re.to(out), mask=mask_nn & upper)
    tl.store(g_ptr + g_off + 1, G_im.to(out), mask=mask_nn & upper)
    tl.store(g_ptr + g_off_mirror, G_re.to(out), mask=mask_nn & upper)
    tl.store(g_ptr + g_off_mirror + 1, (-G_im).to(out), mask=mask_nn & upper)


def lse_kahler_metric(z: torch.Tensor, centers: torch.Tensor, precisions: torch.Tensor, log_weights: torch.Tensor,
                      temperature: float, diagonal: bool, out: torch.Tensor) -> torch.Tensor:
    """z [B, n, 2], centers [K, n, 2], precisions [K, n, n, 2] or [K, n] (diagonal), log_weights [K], all contiguous;
    out [B, n, n, 2]."""
    B, n, _ = z.shape
    K = centers.shape[0]
    if B == 0:
        return out
    block_n = block_for(n)
    _lse_kahler_metric_kernel[(B,)](
        z, centers, precisions, log_weights, out, K, n, 1.0 / temperature,
        DIAGONAL=diagonal, BLOCK_N=block_n, num_warps=max(1, min(8, block_n * block_n // 256)),
    )
    return out
