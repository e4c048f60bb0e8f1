"""pygeo.ops.christoffel: Christoffel symbols of the second kind from a metric and its first derivatives, fused
(symmetric small-matrix factorisation + solve + contraction per point)."""
from __future__ import annotations

from typing import Tuple

import torch

from .. import _backend, _checks
from ..reference import christoffel as reference

_IMPLEMENTED = ("torch", "cpp", "cuda", "triton")


def _run(G: torch.Tensor, dG: torch.Tensor, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """G [B, d, d], dG [B, d, d, d] contiguous -> (Gamma [B, d, d, d], failed [B] int32: 1 where G is not positive
    definite; the kernels write NaN into Gamma at those points)."""
    B, d = G.shape[0], G.shape[-1]
    if backend == "torch":
        return reference.christoffel(G, dG).contiguous(), torch.zeros(B, dtype=torch.int32, device=G.device)
    Gamma = _backend.empty((B, d, d, d), G)
    failed = torch.zeros(B, dtype=torch.int32, device=G.device)
    if backend == "triton":
        from ..triton_kernels import christoffel as triton_christoffel

        return triton_christoffel.christoffel(G, dG, Gamma, failed), failed
    args = (_backend.ptr(G), _backend.ptr(dG), _backend.ptr(Gamma), _backend.ptr(failed), B, d, _backend.dtype_name(G))
    _backend.run_compiled("christoffel", backend, args, G)
    return Gamma, failed


@torch.library.custom_op("pygeo::christoffel", mutates_args=())
def _christoffel_op(G: torch.Tensor, dG: torch.Tensor, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _run(G, dG, backend)


@_christoffel_op.register_fake
def _(G, dG, backend):
    return dG.new_empty(dG.shape), G.new_empty((G.shape[0],), dtype=torch.int32)


def _setup_context(ctx, inputs, output):
    G, dG, _ = inputs
    ctx.save_for_backward(G, dG)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_Gamma, _grad_failed):
    # With Gamma = 1/2 Ginv T(dG) (reference.first_kind, on the symmetrised inputs):
    #   d Gamma = -Ginv dG_sym Gamma (for G)  and  1/2 Ginv T(d dG) (for dG).
    # Plain torch on recomputed values, so it is differentiable again and runs on every device.
    G, dG = ctx.saved_tensors
    G_sym, dG_sym = reference.symmetrize(G, dG)
    batch, d = G.shape[0], G.shape[-1]
    Ginv = torch.cholesky_inverse(torch.linalg.cholesky(G_sym))
    flat_grad = grad_Gamma.reshape(batch, d, d * d)
    pulled = Ginv @ flat_grad  # [B, l, i*j]: Ginv^T grad_Gamma (Ginv is symmetric)
    grad_G = grad_dG = None
    if ctx.needs_input_grad[0]:
        Gamma = 0.5 * (Ginv @ reference.first_kind(dG_sym).reshape(batch, d, d * d))
        grad_G_sym = -pulled @ Gamma.transpose(-1, -2)
        grad_G = 0.5 * (grad_G_sym + grad_G_sym.transpose(-1, -2))
    if ctx.needs_input_grad[1]:
        grad_T = 0.5 * pulled.reshape(batch, d, d, d)  # [B, l, i, j]
        # T[l,i,j] = dG[i,l,j] + dG[j,l,i] - dG[l,i,j]  =>  grad_dG[a,b,c] = gT[b,a,c] + gT[b,c,a] - gT[a,b,c]
        grad_dG_sym = (torch.einsum("...bac->...abc", grad_T) + torch.einsum("...bca->...abc", grad_T) - grad_T)
        grad_dG = 0.5 * (grad_dG_sym + grad_dG_sym.transpose(-1, -2))
    return grad_G, grad_dG, None


_christoffel_op.register_autograd(_backward, setup_context=_setup_context)


# Points whose largest diagonal entry of G lies outside [2^-_SAFE_EXPONENT, 2^_SAFE_EXPONENT] are rescaled first: a
# Cholesky factor of a tiny G has a huge inverse (G = 1e-39 I in float32: G^-1 = 1e39 = inf) although Gamma is finite.
_SAFE_EXPONENT = 32


def _rescaled(G: torch.Tensor, dG: torch.Tensor):
    """(c G, c dG) for G [B, d, d], dG [B, d, d, d], with c [B] a power of two that brings the largest diagonal entry
    of each tiny or huge G near 1. Gamma = 1/2 G^-1 T(dG) is invariant under scaling G and dG alike, and a power of two
    scales exactly, so points that need no rescaling give the same bits either way (they are left as they are)."""
    if not G.numel() or _checks._is_fake(G):
        return G, dG
    largest = G.diagonal(dim1=-2, dim2=-1).abs().amax(-1)  # [B]
    exponent = torch.frexp(largest).exponent  # largest = m 2^e, m in [0.5, 1)
    outside = (exponent.abs() > _SAFE_EXPONENT) & (largest > 0) & torch.isfinite(largest)
    if not bool(outside.any()):
        return G, dG
    factor = torch.where(outside, torch.ldexp(torch.ones_like(largest), -exponent), torch.ones_like(largest))
    return G * factor[:, None, None], dG * factor[:, None, None, None]


def christoffel(G: torch.Tensor, dG: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Christoffel symbols of the second kind, Gamma[..., k, i, j] = 1/2 sum_l Ginv[k, l] (dG[i, l, j] + dG[j, l, i]
    - dG[l, i, j]).

    Args:
        G: [..., d, d] symmetric positive definite metric (float32 or float64). Read as (G + G^T) / 2.
        dG: [..., d, d, d] its derivatives, dG[..., k, i, j] = d G[i, j] / d z_k. Read symmetrised in (i, j).
        backend: "auto", "torch", "cpp", "cuda" or "triton" (see pygeo.backends()).
    Returns:
        Gamma: [..., d, d, d], exactly symmetric in its last two indices.
    Points where G is not positive definite are retried with a small jitter and otherwise raise ValueError (under
    torch.compile the compiled kernels leave NaN there instead). Differentiable with respect to G and dG.
    """
    _checks.real_tensor("G", G, min_dim=2)
    _checks.real_tensor("dG", dG, min_dim=3)
    _checks.same_device(G=G, dG=dG)
    _checks.same_dtype(G=G, dG=dG)
    d = G.shape[-1]
    if d == 0:
        raise ValueError(f"G must have a non-empty last dimension d, got shape {tuple(G.shape)}")
    _checks.last_dims("G", G, (d, d), "[..., d, d]")
    _checks.last_dims("dG", dG, (d, d, d), "[..., d, d, d]")
    if G.shape[:-2] != dG.shape[:-3]:
        raise ValueError(f"G [..., d, d] and dG [..., d, d, d] must have the same batch shape, got "
                         f"{tuple(G.shape)} and {tuple(dG.shape)}")
    batch_shape = G.shape[:-2]
    chosen = _backend.resolve("christoffel", G.device, backend, _IMPLEMENTED)
    G_flat, dG_flat = _rescaled(G.reshape(-1, d, d), dG.reshape(-1, d, d, d))
    G_flat, dG_flat = G_flat.contiguous(), dG_flat.contiguous()
    Gamma, failed = _backend.call_op(_christoffel_op, _run, G_flat, dG_flat, chosen)
    if not torch.compiler.is_compiling() and G_flat.device.type != "meta" and bool(failed.any()):
        # Rare: recompute those points through the jittered Cholesky, which raises ValueError if jitter is not enough.
        bad = failed.nonzero().squeeze(-1)
        Gamma = Gamma.index_put((bad,), reference.christoffel(G_flat[bad], dG_flat[bad]))
    return Gamma.reshape(*batch_shape, d, d, d)
