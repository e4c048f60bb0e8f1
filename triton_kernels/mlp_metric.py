"""Fused MLP pullback / Fisher metric G = J^T diag(w) J on the GPU, never writing the last layer's J [B, D, d].

Hidden layers (small: n_l x d tangents per point) run as two GEMM kernels each: the primal h = a W^T + b with a(h)
and a'(h), then the tangents T W^T scaled row-wise by a'(h) of their point. The last layer, the big one, is one kernel
per block of points: for each tile of output columns it forms the tangent tile J [points, d, tile] and the primal tile
with tl.dot, turns them into the Fisher weight w a'(h)^2, and accumulates the batched Gram J diag(c) J^T into a
[points, d, d] register accumulator.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .launch import block_for


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _activate(h, CODE: tl.constexpr, p0, p1):
    """(a(h), a'(h)); codes as in pygeo/reference/mlp_metric.py."""
    if CODE == 1:  # relu
        value = tl.where(h > 0, h, 0.0)
        slope = tl.where(h > 0, 1.0, 0.0)
    elif CODE == 2:  # leaky_relu, slope p0
        value = tl.where(h > 0, h, p0 * h)
        slope = tl.where(h > 0, 1.0, p0)
    elif CODE == 3:  # elu, alpha p0
        negative = p0 * (tl.exp(tl.minimum(h, 0.0)) - 1.0)
        value = tl.where(h > 0, h, negative)
        slope = tl.where(h > 0, 1.0, negative + p0)
    elif CODE == 4:  # silu (1 - s as sigmoid(-h): no cancellation where s -> 1, as the reference)
        s = _sigmoid(h)
        value = h * s
        slope = s * (1.0 + h * _sigmoid(-h))
    elif CODE == 5:  # softplus, beta p0, threshold p1
        scaled = p0 * h
        linear = scaled > p1
        safe = tl.where(linear, 0.0, scaled)
        value = tl.where(linear, h, tl.log(1.0 + tl.exp(safe)) / p0)
        slope = tl.where(linear, 1.0, _sigmoid(safe))
    elif CODE == 6:  # tanh; 1 - t^2 = 4 sigmoid(2h) sigmoid(-2h) without the cancellation
        t = 2.0 * _sigmoid(2.0 * h) - 1.0
        value = t
        slope = 4.0 * _sigmoid(2.0 * h) * _sigmoid(-2.0 * h)
    elif CODE == 7:  # sigmoid
        s = _sigmoid(h)
        value = s
        slope = s * _sigmoid(-h)
    else:  # identity
        value = h
        slope = h * 0.0 + 1.0
    return value, slope


@triton.jit
def _tile_product(X_ptr, W_ptr, rows, row_mask, cols, col_mask, K, dtype: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(X W^T)[rows, cols] [BLOCK_M, BLOCK_N] for X [*, K] and W [N, K] row-major, one tl.dot per K tile."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=dtype)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X_ptr + rows[:, None].to(tl.int64) * K + ks[None, :], mask=row_mask[:, None] & (ks[None, :] < K),
                    other=0.0)
        w = tl.load(W_ptr + cols[None, :] * K + ks[:, None], mask=col_mask[None, :] & (ks[:, None] < K), other=0.0)
        acc += tl.dot(x, w, input_precision=PRECISION)
    return acc


@triton.jit
def _primal_layer_kernel(
    A_ptr,  # [B, K] layer input
    W_ptr,  # [N, K] nn.Linear weight
    b_ptr,  # [N]
    out_ptr,  # [B, N] a(h)
    slope_ptr,  # [B, N] a'(h)
    params_ptr,  # [2] the activation's parameters, in the tensors' dtype
    B, K, N,
    CODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < B, cols < N
    acc = _tile_product(A_ptr, W_ptr, rows, row_mask, cols, col_mask, K, out_ptr.dtype.element_ty, PRECISION,
                        BLOCK_M, BLOCK_N, BLOCK_K)
    h = acc + tl.load(b_ptr + cols, mask=col_mask, other=0.0)[None, :]
    value, slope = _activate(h, CODE, tl.load(params_ptr), tl.load(params_ptr + 1))
    offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(out_ptr + offsets, value, mask=mask)
    tl.store(slope_ptr + offsets, slope, mask=mask)


@triton.jit
def _tangent_layer_kernel(
    T_ptr,  # [B * d, K] tangents entering the layer (unused when FIRST: they are the identity)
    W_ptr,  # [N, K]
    slope_ptr,  # [B, N] a'(h) of this layer
    out_ptr,  # [B * d, N]
    rows_total, d, K, N,
    FIRST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # row = point * d + tangent index
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < rows_total, cols < N
    if FIRST:  # T = I: the tangent row k of a point is column k of W
        acc = tl.load(W_ptr + cols[None, :] * K + (rows % d)[:, None], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    else:
        acc = _tile_product(T_ptr, W_ptr, rows, row_mask, cols, col_mask, K, out_ptr.dtype.element_ty, PRECISION,
                            BLOCK_M, BLOCK_N, BLOCK_K)
    mask = row_mask[:, None] & col_mask[None, :]
    slope = tl.load(slope_ptr + (rows // d)[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc * slope, mask=mask)


@triton.jit
def _last_layer_gram_kernel(
    A_ptr,  # [B, K] primal input of the last layer
    T_ptr,  # [B * d, K] tangents entering the last layer (unused when FIRST)
    W_ptr,  # [D, K]
    b_ptr,  # [D]
    w_ptr,  # [D] output weight (HAS_WEIGHT)
    G_ptr,  # [B, d, d]
    params_ptr,  # [3] the activation's parameters and the Bernoulli eps, in the tensors' dtype
    B, d, K, D,
    CODE: tl.constexpr, FIRST: tl.constexpr, HAS_WEIGHT: tl.constexpr, BERNOULLI: tl.constexpr,
    NEEDS_PRIMAL: tl.constexpr, UPPER: tl.constexpr, PRECISION: tl.constexpr,
    POINTS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    points = tl.program_id(0) * POINTS + tl.arange(0, POINTS)
    point_mask = points < B
    # Tangent rows of the block, laid out [POINTS, BLOCK_D] and flattened; padded tangent indices read zeros.
    flat = tl.arange(0, POINTS * BLOCK_D)
    row_point = tl.program_id(0) * POINTS + flat // BLOCK_D
    row_k = flat % BLOCK_D
    row_mask = (row_point < B) & (row_k < d)
    row_offset = (row_point.to(tl.int64) * d + row_k) * K
    acc = tl.zeros((POINTS, BLOCK_D, BLOCK_D), dtype=G_ptr.dtype.element_ty)
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < D
        J = tl.zeros((POINTS * BLOCK_D, BLOCK_N), dtype=G_ptr.dtype.element_ty)
        h = tl.zeros((POINTS, BLOCK_N), dtype=G_ptr.dtype.element_ty)
        if FIRST:  # the tangents entering are the identity: J rows are columns of W
            J = tl.load(W_ptr + cols[None, :] * K + row_k[:, None], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            k_start = 0
        elif UPPER:  # W^T rows k < n0 are zero (W upper triangular)
            k_start = (n0 // BLOCK_K) * BLOCK_K
        else:
            k_start = 0
        for k0 in range(k_start, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            w = tl.load(W_ptr + cols[None, :] * K + ks[:, None], mask=col_mask[None, :] & k_mask[:, None], other=0.0)
            if not FIRST:
                t = tl.load(T_ptr + row_offset[:, None] + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                J += tl.dot(t, w, input_precision=PRECISION)
            if NEEDS_PRIMAL:
                a = tl.load(A_ptr + points[:, None].to(tl.int64) * K + ks[None, :], mask=point_mask[:, None] & k_mask[None, :], other=0.0)
                h += tl.dot(a, w, input_precision=PRECISION)
        if NEEDS_PRIMAL:
            h += tl.load(b_ptr + cols, mask=col_mask, other=0.0)[None, :]
            value, slope = _activate(h, CODE, tl.load(params_ptr), tl.load(params_ptr + 1))
            if BERNOULLI:
                eps = tl.load(params_ptr + 2)
                prob = tl.minimum(tl.maximum(_sigmoid(value), eps), 1.0 - eps)
                weight = prob * (1.0 - prob)
            elif HAS_WEIGHT:
                weight = tl.load(w_ptr + cols, mask=col_mask, other=0.0)[None, :] + h * 0.0
            else:
                weight = h * 0.0 + 1.0
            scale = weight * slope * slope
        else:  # identity activation and a weight that does not depend on the point
            if HAS_WEIGHT:
                scale = tl.load(w_ptr + cols, mask=col_mask, other=0.0)[None, :] + h * 0.0
            else:
                scale = h * 0.0 + 1.0
        scale = tl.where(col_mask[None, :], scale, 0.0)
        J3 = tl.reshape(J, (POINTS, BLOCK_D, BLOCK_N))
        weighted = J3 * scale[:, None, :]
        acc += tl.dot(weighted, tl.trans(J3, (0, 2, 1)), input_precision=PRECISION)
    acc = 0.5 * (acc + tl.trans(acc, (0, 2, 1)))
    i = tl.arange(0, BLOCK_D)
    offsets = points[:, None, None].to(tl.int64) * d * d + i[None, :, None] * d + i[None, None, :]
    mask = point_mask[:, None, None] & (i[None, :, None] < d) & (i[None, None, :] < d)
    tl.store(G_ptr + offsets, acc, mask=mask)


def _precision(tensor: torch.Tensor) -> str:
    # float32: three tf32 passes (float32-level accuracy on tensor cores); float64: exact FMA dots.
    return "tf32x3" if tensor.dtype == torch.float32 else "ieee"


def mlp_metric(z: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor], activation_codes: List[int],
               activation_params: List[float], output_weight: Optional[torch.Tensor], bernoulli: bool, eps: float,
               upper_triangular: bool, out: torch.Tensor) -> torch.Tensor:
    """z [B, d], weights[l] [n_{l+1}, n_l], biases[l] [n_{l+1}], output_weight [D] or None, out G [B, d, d]."""
    B, d = z.shape
    if B == 0:
        return out
    precision = _precision(z)
    L = len(weights)
    # Scalars travel as a tensor so that float64 runs keep float64 parameters (Triton passes Python floats as fp32).
    params = torch.tensor(list(activation_params) + [eps], dtype=z.dtype, device=z.device)
    a, tangents = z, None  # tangents [B * d, n_l]; None means the identity (before the first layer)
    block_m, block_n, block_k = 64, 64, 32
    for layer in range(L - 1):
        W, b = weights[layer], biases[layer]
        N, K = W.shape
        value = torch.empty((B, N), dtype=z.dtype, device=z.device)
        slope = torch.empty_like(value)
        _primal_layer_kernel[(triton.cdiv(B, block_m), triton.cdiv(N, block_n))](
            a, W, b, value, slope, params[2 * layer:], B, K, N, CODE=activation_codes[layer], PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
        next_tangents = torch.empty((B * d, N), dtype=z.dtype, device=z.device)
        _tangent_layer_kernel[(triton.cdiv(B * d, block_m), triton.cdiv(N, block_n))](
            tangents if tangents is not None else z, W, slope, next_tangents, B * d, d, K, N,
            FIRST=tangents is None, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
        a, tangents = value, next_tangents
    W, b = weights[-1], biases[-1]
    D, K = W.shape
    code = activation_codes[-1]
    block_d = block_for(d)
    points = max(1, 128 // block_d)  # about 128 tangent rows per program
    needs_primal = bernoulli or code != 0
    _last_layer_gram_kernel[(triton.cdiv(B, points),)](
        a, tangents if tangents is not None else z, W, b, output_weight if output_weight is not None else b, out,
        params[2 * (L - 1):], B, d, K, D,
        CODE=code, FIRST=tangents is None, HAS_WEIGHT=output_weight is not None, BERNOULLI=bernoulli,
        NEEDS_PRIMAL=needs_primal, UPPER=upper_triangular, PRECISION=precision,
        POINTS=points, BLOCK_D=block_d, BLOCK_N=64, BLOCK_K=32, num_warps=8)
    return out
