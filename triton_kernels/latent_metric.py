"""The Chadebec-Allassonniere latent metric (MATH.md 2): a program per block of points, a loop over centroid tiles.

Per tile the quadratic forms come from tl.dot over z outer products (q = [z z^T | z] . [M | -2 M c] + c^T M c), the
weights are kept in log space with a running maximum per point (online-softmax rescaling), and the weighted sum of
precisions is one more tl.dot. The expanded quadratic cancels, so float32 dots use "tf32x3" (plain tf32 is not accurate
enough, PERF.md) and float64 dots "ieee". Scalar parameters are declared float64 (Triton passes a Python float as
float32, which costs float64 results half their digits) and cast to the data's dtype inside. Outputs are the scaled
G_s = exp(-s) G, s and dG_s (see pygeo/reference/latent_metric.py). The flattened precision columns (d diagonal,
d*d full) are split over a second grid axis and, for dG, the derivative index k over a third, so register tiles stay
small whatever d is.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import block_for
from .scalars import as_dtype


@triton.jit
def _quadratic_forms(z, z_ptr, rows, row_mask, mflat_ptr, mc_ptr, cmc_ptr, ns, n_mask, dims, dim_mask, d, dd,
                     FULL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PRECISION: tl.constexpr):
    """q [BLOCK_B, BLOCK_N] = (z - c_n)^T M_n (z - c_n) for a block of points and a tile of centroids."""
    if FULL:
        q = tl.zeros((BLOCK_B, BLOCK_N), dtype=z.dtype)
        for j0 in range(0, dd, BLOCK_K):
            js = j0 + tl.arange(0, BLOCK_K)
            j_mask = js < dd
            mask = row_mask[:, None] & j_mask[None, :]
            outer = (tl.load(z_ptr + rows[:, None] * d + (js // d)[None, :], mask=mask, other=0.0)
                     * tl.load(z_ptr + rows[:, None] * d + (js % d)[None, :], mask=mask, other=0.0))  # [B, K]
            m_t = tl.load(mflat_ptr + ns[None, :] * dd + js[:, None], mask=j_mask[:, None] & n_mask[None, :], other=0.0)
            q += tl.dot(outer, m_t, input_precision=PRECISION)
    else:
        m_t = tl.load(mflat_ptr + ns[None, :] * d + dims[:, None], mask=dim_mask[:, None] & n_mask[None, :], other=0.0)
        q = tl.dot(z * z, m_t, input_precision=PRECISION)
    mc_t = tl.load(mc_ptr + ns[None, :] * d + dims[:, None], mask=dim_mask[:, None] & n_mask[None, :], other=0.0)
    q -= 2.0 * tl.dot(z, mc_t, input_precision=PRECISION)
    q += tl.load(cmc_ptr + ns, mask=n_mask, other=0.0)[None, :]
    return q


@triton.jit
def _forward_kernel(
    z_ptr,  # [B, d]
    c_ptr,  # [N, d]
    mflat_ptr,  # [N, dd], dd = d (diagonal) or d*d (full)
    mc_ptr,  # [N, d], M_n c_n
    cmc_ptr,  # [N], c_n^T M_n c_n
    g_ptr,  # [B, dd] scaled metric G_s
    scale_ptr,  # [B]
    dg_ptr,  # [B, d, dd] scaled derivative dG_s (unused without WITH_DERIVATIVE)
    B, N, d, dd, lam: tl.float64, tau: tl.float64, inv_rho2: tl.float64,
    FULL: tl.constexpr, HAS_LAM: tl.constexpr, WITH_DERIVATIVE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    k = tl.program_id(2)  # derivative index (0 without WITH_DERIVATIVE)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < d
    z = tl.load(z_ptr + rows[:, None] * d + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    lam, tau, inv_rho2 = as_dtype(lam, z.dtype), as_dtype(tau, z.dtype), as_dtype(inv_rho2, z.dtype)
    e0 = -tau * tl.sum(z * z, 1)
    if HAS_LAM:
        running = e0
    else:
        running = tl.full((BLOCK_B,), float("-inf"), dtype=z.dtype)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < dd
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=z.dtype)
    dacc = tl.zeros((BLOCK_B, BLOCK_C), dtype=z.dtype)
    z_k = tl.load(z_ptr + rows * d + k, mask=row_mask, other=0.0)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_mask = ns < N
        q = _quadratic_forms(z, z_ptr, rows, row_mask, mflat_ptr, mc_ptr, cmc_ptr, ns, n_mask, dims, dim_mask, d, dd,
                             FULL, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION)
        e = tl.where(n_mask[None, :], -q * inv_rho2, float("-inf"))
        new_running = tl.maximum(running, tl.max(e, 1))
        alpha = tl.exp(running - new_running)  # rescales what was summed under the old maximum (0 from -inf)
        weights = tl.exp(e - new_running[:, None])
        m_cols = tl.load(mflat_ptr + ns[:, None] * dd + cols[None, :], mask=n_mask[:, None] & col_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(weights, m_cols, input_precision=PRECISION)
        if WITH_DERIVATIVE:
            # y[b, n] = (M_n (z_b - c_n))_k
            if FULL:
                m_row = tl.load(mflat_ptr + ns[None, :] * dd + k * d + dims[:, None], mask=dim_mask[:, None] & n_mask[None, :],
                                other=0.0)
                y = tl.dot(z, m_row, input_precision=PRECISION) - tl.load(mc_ptr + ns * d + k, mask=n_mask, other=0.0)[None, :]
            else:
                m_k = tl.load(mflat_ptr + ns * d + k, mask=n_mask, other=0.0)
                c_k = tl.load(c_ptr + ns * d + k, mask=n_mask, other=0.0)
                y = m_k[None, :] * (z_k[:, None] - c_k[None, :])
            dacc = dacc * alpha[:, None] + tl.dot(weights * y, m_cols, input_precision=PRECISION)
        running = new_running
    if HAS_LAM:
        prior = lam * tl.exp(e0 - running)
    else:
        prior = tl.zeros((BLOCK_B,), dtype=z.dtype)
    if FULL:
        on_diagonal = (cols // d) == (cols % d)
    else:
        on_diagonal = cols < d
    out_mask = row_mask[:, None] & col_mask[None, :]
    if k == 0:
        G = acc + tl.where(on_diagonal[None, :], prior[:, None], 0.0)
        tl.store(g_ptr + rows[:, None] * dd + cols[None, :], G.to(g_ptr.dtype.element_ty), mask=out_mask)
        if pid_c == 0:
            tl.store(scale_ptr + rows, running.to(scale_ptr.dtype.element_ty), mask=row_mask)
    if WITH_DERIVATIVE:
        prior_k = -2.0 * tau * z_k * prior
        dG = dacc * (-2.0 * inv_rho2) + tl.where(on_diagonal[None, :], prior_k[:, None], 0.0)
        tl.store(dg_ptr + rows[:, None] * (d * dd) + k * dd + cols[None, :], dG.to(dg_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _vjp_kernel(
    z_ptr,  # [B, d]
    mflat_ptr,  # [N, dd]
    mc_ptr,  # [N, d]
    cmc_ptr,  # [N]
    a_ptr,  # [B, dd]
    scale_ptr,  # [B]
    v_ptr,  # [B, d]
    B, N, d, dd, lam: tl.float64, tau: tl.float64, inv_rho2: tl.float64,
    FULL: tl.constexpr, HAS_LAM: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < d
    zmask = row_mask[:, None] & dim_mask[None, :]
    z = tl.load(z_ptr + rows[:, None] * d + dims[None, :], mask=zmask, other=0.0)
    lam, tau, inv_rho2 = as_dtype(lam, z.dtype), as_dtype(tau, z.dtype), as_dtype(inv_rho2, z.dtype)
    scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
    v = tl.zeros((BLOCK_B, BLOCK_D), dtype=z.dtype)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_mask = ns < N
        q = _quadratic_forms(z, z_ptr, rows, row_mask, mflat_ptr, mc_ptr, cmc_ptr, ns, n_mask, dims, dim_mask, d, dd,
                             FULL, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION)
        weights = tl.where(n_mask[None, :], tl.exp(-q * inv_rho2 - scale[:, None]), 0.0)
        inner = tl.zeros((BLOCK_B, BLOCK_N), dtype=z.dtype)  # <A_b, M_n>
        for j0 in range(0, dd, BLOCK_K):
            js = j0 + tl.arange(0, BLOCK_K)
            j_mask = js < dd
            a = tl.load(a_ptr + rows[:, None] * dd + js[None, :], mask=row_mask[:, None] & j_mask[None, :], other=0.0)
            m_t = tl.load(mflat_ptr + ns[None, :] * dd + js[:, None], mask=j_mask[:, None] & n_mask[None, :], other=0.0)
            inner += tl.dot(a, m_t, input_precision=PRECISION)
        coef = weights * inner
        mc = tl.load(mc_ptr + ns[:, None] * d + dims[None, :], mask=n_mask[:, None] & dim_mask[None, :], other=0.0)
        # v_k += sum_n coef_n (M_n z - M_n c_n)_k
        if FULL:
            for k in range(0, d):
                m_row = tl.load(mflat_ptr + ns[:, None] * dd + k * d + dims[None, :], mask=n_mask[:, None] & dim_mask[None, :],
                                other=0.0)  # M_n[k, :]
                v_k = tl.sum(tl.dot(coef, m_row, input_precision=PRECISION) * z, 1)
                v += tl.where(dims[None, :] == k, v_k[:, None], 0.0)
        else:
            m = tl.load(mflat_ptr + ns[:, None] * d + dims[None, :], mask=n_mask[:, None] & dim_mask[None, :], other=0.0)
            v += z * tl.dot(coef, m, input_precision=PRECISION)
        v -= tl.dot(coef, mc, input_precision=PRECISION)
    v = v * (-2.0 * inv_rho2)
    if HAS_LAM:
        if FULL:
            diagonal = dims * d + dims
        else:
            diagonal = dims
        trace = tl.sum(tl.load(a_ptr + rows[:, None] * dd + diagonal[None, :], mask=zmask, other=0.0), 1)
        prior = lam * tl.exp(-tau * tl.sum(z * z, 1) - scale)
        v += (-2.0 * tau * prior * trace)[:, None] * z
    tl.store(v_ptr + rows[:, None] * d + dims[None, :], v.to(v_ptr.dtype.element_ty), mask=zmask)


def _precompute(centroids: torch.Tensor, precisions: torch.Tensor):
    """(M flattened [N, dd], M_n c_n [N, d], c_n^T M_n c_n [N]) on the host side of the launch (O(N d^2))."""
    N = centroids.shape[0]
    if precisions.dim() == 3:
        mc = (precisions @ centroids.unsqueeze(-1)).squeeze(-1)
    else:
        mc = precisions * centroids
    return precisions.reshape(N, -1).contiguous(), mc.contiguous(), (centroids * mc).sum(-1).contiguous()


def _settings(z: torch.Tensor, d: int):
    """Deterministic launch settings: tiles of a few thousand elements (registers on the GPU, few interpreter steps)."""
    block_d = block_for(d)
    block_b = 64 if block_d <= 32 else 32
    block_n = 64 if block_d <= 16 else 32
    precision = "ieee" if z.dtype == torch.float64 else "tf32x3"
    return block_b, block_n, block_d, precision


def forward(z, centroids, precisions, lam, tau, rho, G_s, scale, dG_s):
    """z [B, d], centroids [N, d], precisions [N, d] | [N, d, d] (contiguous) -> fills G_s [B, d] | [B, d, d],
    scale [B] and, when given, dG_s [B, d, d] | [B, d, d, d]."""
    B, d = z.shape
    N = centroids.shape[0]
    if B == 0:
        return
    full = precisions.dim() == 3
    dd = d * d if full else d
    mflat, mc, cmc = _precompute(centroids, precisions)
    block_b, block_n, block_d, precision = _settings(z, d)
    block_c = min(block_for(dd), 64) if full else block_d
    grid = (triton.cdiv(B, block_b), triton.cdiv(dd, block_c), d if dG_s is not None else 1)
    _forward_kernel[grid](
        z, centroids, mflat, mc, cmc, G_s, scale, dG_s if dG_s is not None else G_s,
        B, N, d, dd, float(lam), float(tau), 1.0 / (rho * rho),
        FULL=full, HAS_LAM=lam > 0, WITH_DERIVATIVE=dG_s is not None,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_C=block_c, BLOCK_K=32, PRECISION=precision,
    )


def vjp(z, centroids, precisions, lam, tau, rho, A, scale, out):
    """v [B, d] = sum_ij A_ij dG_s[k, i, j] with weights scaled by exp(-scale); A [B, d] | [B, d, d] contiguous."""
    B, d = z.shape
    N = centroids.shape[0]
    if B == 0:
        return out
    full = precisions.dim() == 3
    mflat, mc, cmc = _precompute(centroids, precisions)
    block_b, block_n, block_d, precision = _settings(z, d)
    _vjp_kernel[(triton.cdiv(B, block_b),)](
        z, mflat, mc, cmc, A, scale, out,
        B, N, d, d * d if full else d, float(lam), float(tau), 1.0 / (rho * rho),
        FULL=full, HAS_LAM=lam > 0,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=32, PRECISION=precision,
    )
    return out
