"""Christoffel symbols of the second kind: one program per point; the symmetrised G is inverted in registers by
Gauss-Jordan elimination (no pivoting: G is symmetric positive definite, so every pivot is a positive Schur-complement
pivot, and a non-positive one flags the point), then Gamma[:, i, :] = 1/2 Ginv @ T_i with one tl.dot per i."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import block_for


@triton.jit
def _christoffel_kernel(
    G_ptr,  # [B, d, d]
    dG_ptr,  # [B, d, d, d], dG[b, k, i, j] = d G[i, j] / d z_k
    Gamma_ptr,  # [B, d, d, d]
    failed_ptr,  # [B] int32
    d,
    BLOCK_DIM: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_DIM)
    cols = tl.arange(0, BLOCK_DIM)
    row_in = rows < d
    col_in = cols < d
    mask = row_in[:, None] & col_in[None, :]
    dd = d * d
    G_base = G_ptr + b * dd
    acc_type = tl.float32 if G_ptr.dtype.element_ty == tl.float32 else tl.float64
    G = tl.load(G_base + rows[:, None] * d + cols[None, :], mask=mask, other=0.0).to(acc_type)
    G_t = tl.load(G_base + cols[None, :] * d + rows[:, None], mask=mask, other=0.0).to(acc_type)
    is_diag = rows[:, None] == cols[None, :]
    # Padding with the identity keeps the padded block inert during elimination.
    inv = tl.where(mask, 0.5 * (G + G_t), tl.where(is_diag, 1.0, 0.0).to(acc_type))
    bad = tl.zeros((), dtype=tl.int32)
    for k in range(0, d):
        col_k = tl.sum(tl.where(cols[None, :] == k, inv, 0.0), axis=1)  # inv[:, k]
        row_k = tl.sum(tl.where(rows[:, None] == k, inv, 0.0), axis=0)  # inv[k, :]
        pivot = tl.sum(tl.where(rows == k, col_k, 0.0), axis=0)
        bad = tl.where(pivot > 0.0, bad, 1)
        safe_pivot = tl.where(pivot > 0.0, pivot, 1.0)
        new_row = tl.where(cols == k, 1.0, row_k) / safe_pivot
        eliminated = tl.where(cols[None, :] == k, 0.0, inv) - col_k[:, None] * new_row[None, :]
        inv = tl.where(rows[:, None] == k, new_row[None, :], eliminated)
    tl.store(failed_ptr + b, bad)
    poison = tl.where(bad != 0, float("nan"), 0.0)
    # Ginv is symmetric in exact arithmetic; averaging with its transpose keeps Gamma's rounding symmetric too.
    inv = 0.5 * (inv + tl.trans(inv)) + poison
    dG_base = dG_ptr + b * dd * d
    out_base = Gamma_ptr + b * dd * d
    l_idx = rows[:, None]  # T_i is indexed [l, j]
    j_idx = cols[None, :]
    for i in range(0, d):
        # Symmetrised dG: s(k, a, c) = (dG[k, a, c] + dG[k, c, a]) / 2; T_i[l, j] = s(i, l, j) + s(j, l, i) - s(l, i, j)
        a1 = tl.load(dG_base + i * dd + l_idx * d + j_idx, mask=mask, other=0.0)
        a2 = tl.load(dG_base + i * dd + j_idx * d + l_idx, mask=mask, other=0.0)
        b1 = tl.load(dG_base + j_idx * dd + l_idx * d + i, mask=mask, other=0.0)
        b2 = tl.load(dG_base + j_idx * dd + i * d + l_idx, mask=mask, other=0.0)
        c1 = tl.load(dG_base + l_idx * dd + i * d + j_idx, mask=mask, other=0.0)
        c2 = tl.load(dG_base + l_idx * dd + j_idx * d + i, mask=mask, other=0.0)
        # Grouped so that T_i[l, j] and T_j[l, i] round identically: Gamma stays exactly symmetric in (i, j).
        T_i = (0.5 * ((a1 + a2) + (b1 + b2) - (c1 + c2))).to(acc_type)
        gamma_i = 0.5 * tl.dot(inv, T_i, input_precision="ieee")  # [k, j]
        tl.store(out_base + rows[:, None] * dd + i * d + cols[None, :], gamma_i.to(Gamma_ptr.dtype.element_ty), mask=mask)


def christoffel(G: torch.Tensor, dG: torch.Tensor, Gamma: torch.Tensor, failed: torch.Tensor) -> torch.Tensor:
    """G [B, d, d], dG [B, d, d, d] contiguous; writes Gamma [B, d, d, d] and failed [B] (int32)."""
    B, d = G.shape[0], G.shape[-1]
    if B == 0:
        return Gamma
    block_dim = block_for(d)
    # Past 16 no software pipelining of the per-i loads: at d = 64 its buffers took 442 KB of shared memory in float64
    # (the H100 has 227 KB per block), 64 KB without.
    _christoffel_kernel[(B,)](G, dG, Gamma, failed, d, BLOCK_DIM=block_dim, num_warps=1 if block_dim <= 16 else 4,
                              num_stages=3 if block_dim <= 16 else 1)
    return Gamma
