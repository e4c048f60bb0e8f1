"""pygeo.ops.jtj: the weighted Gram reduction G = J^T diag(w) J at the heart of every pullback / Fisher metric."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend, _checks
from ..reference import jtj as reference

_IMPLEMENTED = ("torch", "cpp", "cuda", "triton")


def _run(J: torch.Tensor, weight: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """J [B, D, d] contiguous; weight None, [D] or [B, D] contiguous -> G [B, d, d]."""
    if backend == "torch":
        return reference.jtj(J, weight)
    B, D, d = J.shape
    w_batch_stride = 0 if weight is None or weight.dim() == 1 else D
    out = _backend.empty((B, d, d), J)
    if backend == "triton":
        from ..triton_kernels import jtj as triton_jtj

        return triton_jtj.jtj(J, weight, w_batch_stride, out)
    args = (_backend.ptr(J), _backend.ptr(weight), w_batch_stride, _backend.ptr(out), B, D, d, _backend.dtype_name(J))
    _backend.run_compiled("jtj", backend, args, J)
    return out


@torch.library.custom_op("pygeo::jtj", mutates_args=())
def _jtj_op(J: torch.Tensor, weight: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    return _run(J, weight, backend)


@_jtj_op.register_fake
def _(J, weight, backend):
    B, _, d = J.shape
    return J.new_empty((B, d, d))


def _setup_context(ctx, inputs, output):
    J, weight, _ = inputs
    ctx.save_for_backward(J, weight)


def _backward(ctx, grad_G):
    # G_ij = sum_r w_r J_ri J_rj  =>  dJ = w * J (gG + gG^T),  dw_r = (J gG J^T)_rr. Plain torch, so it is
    # differentiable again (double backward) and runs on every device.
    J, weight = ctx.saved_tensors
    grad_J = grad_weight = None
    sym = grad_G + grad_G.transpose(-1, -2)
    if ctx.needs_input_grad[0]:
        grad_J = J @ sym
        if weight is not None:
            grad_J = grad_J * weight.unsqueeze(-1)
    if weight is not None and ctx.needs_input_grad[1]:
        grad_weight = ((J @ grad_G) * J).sum(-1)
        if weight.dim() == 1:
            grad_weight = grad_weight.sum(0)
    return grad_J, grad_weight, None


_jtj_op.register_autograd(_backward, setup_context=_setup_context)


def jtj(J: torch.Tensor, weight: Optional[torch.Tensor] = None, *, backend: str = "auto") -> torch.Tensor:
    """G = J^T diag(weight) J, exactly symmetric.

    Args:
        J: [..., D, d] Jacobians (float32 or float64).
        weight: None (all ones), [D] shared by the batch, or [..., D] per batch item (broadcastable to J's batch).
        backend: "auto", "torch", "cpp", "cuda" or "triton" (see pygeo.backends()).
    Returns:
        G: [..., d, d].
    Differentiable with respect to J and weight.
    """
    # J is the big input: its finiteness is checked on the small output G instead (NaN/Inf in J or weight reach G).
    _checks.real_tensor("J", J, min_dim=2, check_finite=False)
    batch_shape, (D, d) = J.shape[:-2], J.shape[-2:]
    if d == 0:
        raise ValueError(f"J must have a non-empty last dimension d, got shape {tuple(J.shape)}")
    if weight is not None:
        _checks.real_tensor("weight", weight, min_dim=1, check_finite=False)
        _checks.same_device(J=J, weight=weight)
        _checks.same_dtype(J=J, weight=weight)
        if weight.shape[-1] != D:
            raise ValueError(f"weight must have shape [D] or [..., D] with D={D} (J is {tuple(J.shape)}), got {tuple(weight.shape)}")
        if weight.dim() > 1:
            try:
                wide = torch.broadcast_shapes(weight.shape[:-1], batch_shape)
            except RuntimeError:
                wide = None
            if wide != batch_shape:
                raise ValueError(f"weight batch shape {tuple(weight.shape[:-1])} must broadcast to J's batch shape {tuple(batch_shape)}")
            if weight.shape[:-1].numel() == 1:
                weight = weight.reshape(D)  # one weight vector for the whole batch
    chosen = _backend.resolve("jtj", J.device, backend, _IMPLEMENTED)
    J_flat = J.reshape(batch_shape.numel(), D, d).contiguous()
    if weight is not None:
        weight = weight.contiguous() if weight.dim() == 1 else weight.expand(*batch_shape, D).reshape(batch_shape.numel(), D).contiguous()
    G = _backend.call_op(_jtj_op, _run, J_flat, weight, chosen)
    _checks.finite_result(G, "G = J^T diag(weight) J", "J or weight contains NaN or Inf values")
    return G.reshape(*batch_shape, d, d)
