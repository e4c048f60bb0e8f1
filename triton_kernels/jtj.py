"""G = J^T diag(w) J: one program per batch item, J streamed in row tiles.

For d >= 16 each tile is one tl.dot. A dot needs tiles of at least 16 x 16, so for a small d (a 2-D latent) it would do
(16 / d)^2 times the work on padding; there the tile's outer products are summed directly instead
([rows, d, d] broadcast and reduced), which keeps the op at the speed of reading J."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import block_for


@triton.jit
def _jtj_kernel(
    J_ptr,  # [B, D, d]
    w_ptr,  # [B, D] or [D] (w_batch_stride = 0); unused when HAS_WEIGHT is false
    G_ptr,  # [B, d, d]
    D,
    d,
    w_batch_stride,
    HAS_WEIGHT: tl.constexpr,
    SMALL_DIM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_DIM)
    col_mask = cols < d
    acc = tl.zeros((BLOCK_DIM, BLOCK_DIM), dtype=tl.float32 if J_ptr.dtype.element_ty == tl.float32 else tl.float64)
    for r0 in range(0, D, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < D
        mask = row_mask[:, None] & col_mask[None, :]
        tile = tl.load(J_ptr + b * D * d + rows[:, None] * d + cols[None, :], mask=mask, other=0.0)
        if HAS_WEIGHT:
            weight = tl.load(w_ptr + b * w_batch_stride + rows, mask=row_mask, other=0.0)
            weighted = tile * weight[:, None]
        else:
            weighted = tile
        if SMALL_DIM:
            acc += tl.sum(weighted[:, :, None] * tile[:, None, :], axis=0)
        else:
            acc += tl.dot(tl.trans(weighted), tile, input_precision="ieee")
    # (w J)^T J is symmetric only up to rounding; averaging with its transpose makes it exactly symmetric.
    acc = 0.5 * (acc + tl.trans(acc))
    out_mask = col_mask[:, None] & col_mask[None, :]
    tl.store(G_ptr + b * d * d + cols[:, None] * d + cols[None, :], acc.to(G_ptr.dtype.element_ty), mask=out_mask)


def jtj(J: torch.Tensor, weight: Optional[torch.Tensor], w_batch_stride: int, out: torch.Tensor) -> torch.Tensor:
    """J [B, D, d] contiguous, weight [B, D] / [D] contiguous or None, out [B, d, d]."""
    B, D, d = J.shape
    if B == 0:
        return out
    small_dim = d < 16
    block_dim = block_for(d, minimum=2) if small_dim else block_for(d)
    # Tiles of about 8K elements when summed directly ([rows, d, d] in registers) and 2K for a dot ([rows, d]: the dot
    # stages its operands in shared memory, 64 KB and more per program at 8K, which left one or two programs per SM).
    budget = 8192 // (block_dim * block_dim) if small_dim else 2048 // block_dim
    block_rows = max(16, min(triton.next_power_of_2(max(D, 1)), budget))
    _jtj_kernel[(B,)](
        J, weight if weight is not None else J, out, D, d, w_batch_stride,
        HAS_WEIGHT=weight is not None, SMALL_DIM=small_dim, BLOCK_ROWS=block_rows, BLOCK_DIM=block_dim,
    )
    return out
