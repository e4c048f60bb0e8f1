"""pygeo.ops.langevin_step: one fused Riemannian Langevin (MMALA) step for a batch of chains (MATH.md section 4)."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .. import _backend, _checks
from ..reference import langevin_step as reference
from ..reference.langevin_step import LangevinStepResult

_IMPLEMENTED = ("torch", "cpp", "cuda", "triton")


def _run(z, G, grad_log_prob, step_size, noise, dG, div_Ginv, target, backend):
    """All tensors contiguous, flattened to one batch dim B; returns the op's six outputs."""
    if backend == "torch":
        result = reference.langevin_step(z, G, grad_log_prob, step_size, noise, dG, div_Ginv, target)
        log_q_target = result.log_q_target if target is not None else z.new_empty((0,))
        return (result.proposal, result.mean, result.half_log_det, result.log_q_proposal, log_q_target, result.ok)
    B, d = z.shape
    proposal = _backend.empty((B, d), z)
    mean = _backend.empty((B, d), z)
    half_log_det = _backend.empty((B,), z)
    log_q_proposal = _backend.empty((B,), z)
    log_q_target = _backend.empty((B if target is not None else 0,), z)
    ok = torch.empty((B,), dtype=torch.bool, device=z.device)
    outputs = (proposal, mean, half_log_det, log_q_proposal, log_q_target, ok)
    if B == 0:
        return outputs
    if backend == "triton":
        from ..triton_kernels import langevin_step as triton_langevin_step

        triton_langevin_step.langevin_step(z, G, grad_log_prob, step_size, noise, dG, div_Ginv, target, *outputs)
        return outputs
    ptr = _backend.ptr
    args = (ptr(z), ptr(G), ptr(grad_log_prob), ptr(step_size), ptr(noise), ptr(dG), ptr(div_Ginv), ptr(target),
            ptr(proposal), ptr(mean), ptr(half_log_det), ptr(log_q_proposal), ptr(log_q_target) if target is not None else 0,
            ptr(ok), B, d, _backend.dtype_name(z))
    _backend.run_compiled("langevin_step", backend, args, z)
    return outputs


@torch.library.custom_op("pygeo::langevin_step", mutates_args=())
def _langevin_step_op(z: torch.Tensor, G: torch.Tensor, grad_log_prob: torch.Tensor, step_size: torch.Tensor,
                      noise: torch.Tensor, dG: Optional[torch.Tensor], div_Ginv: Optional[torch.Tensor],
                      target: Optional[torch.Tensor], backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run(z, G, grad_log_prob, step_size, noise, dG, div_Ginv, target, backend)


@_langevin_step_op.register_fake
def _(z, G, grad_log_prob, step_size, noise, dG, div_Ginv, target, backend):
    B, d = z.shape
    return (z.new_empty((B, d)), z.new_empty((B, d)), z.new_empty((B,)), z.new_empty((B,)),
            z.new_empty((B if target is not None else 0,)), z.new_empty((B,), dtype=torch.bool))


def langevin_step(z: torch.Tensor, G: torch.Tensor, grad_log_prob: torch.Tensor,
                  step_size: Union[float, torch.Tensor], noise: torch.Tensor, *,
                  dG: Optional[torch.Tensor] = None, div_Ginv: Optional[torch.Tensor] = None,
                  target: Optional[torch.Tensor] = None, backend: str = "auto") -> LangevinStepResult:
    """One Riemannian Langevin step for B independent chains, fused per chain (MATH.md section 4).

    With G = C C^T (Cholesky) and h the step size of the chain:
      mean     = z + (h/2) G^-1 grad_log_prob + (h/2) div(G^-1)
      proposal = mean + sqrt(h) C^-T noise                      (a draw of N(mean, h G^-1) when noise ~ N(0, I))
    div(G^-1)_i = -sum_j (G^-1 dG[j] G^-1)[i, j] is computed from dG, or taken as given (div_Ginv), or dropped when
    neither is given (simplified manifold MALA, still exact with a Metropolis test).

    Args:
        z: [..., d] current states (float32 or float64).
        G: [..., d, d] metric at z, symmetric positive definite.
        grad_log_prob: [..., d] gradient of the log target density at z.
        step_size: h > 0, a float or a tensor of shape [...] (one per chain).
        noise: [..., d] standard normal draws.
        dG: optional [..., d, d, d], dG[..., k, i, j] = dG_ij / dz_k (full drift).
        div_Ginv: optional [..., d], the divergence of G^-1 when already known (exclusive with dG).
        target: optional [..., d], a point whose proposal log-density log q(target | z) is returned (the reverse move
            of a Metropolis test: call the step at the proposal with target = the current state).
        backend: "auto", "torch", "cpp", "cuda" or "triton" (see pygeo.backends()). "auto" on a GPU is Triton up to
            d = 16 and the plain-PyTorch step above (faster there, bench/RESULTS.md).
    Returns:
        LangevinStepResult with proposal [..., d], mean [..., d], half_log_det [...] (1/2 log det G),
        log_q_proposal [...] = log q(proposal | z), log_q_target [...] (None without target) and ok [...] (bool).
        log q(a | z) = -(d/2) log(2 pi h) + 1/2 log det G - (1/(2h)) (a - mean)^T G (a - mean), normalised.
    Only the lower triangle of G is read. Non-positive-definite G: retried with jitter 1e-10 ... 1e-4 times its mean
    |diagonal| (the jittered G is then used throughout); a chain that still fails, or whose step is not finite (NaN/Inf
    in G or dG, which are not scanned up front, or an overflow), has ok = False, proposal = mean = z and zero log
    terms: reject it. NaN/Inf in the other inputs raise ValueError.
    Not differentiable (a sampler step): inputs that require grad are refused; detach them.
    """
    # NaN/Inf are not scanned for up front (at small d that costs as much as the step): a non-finite input shows in
    # the outputs, checked below in one pass; then the small inputs are scanned to name the culprit.
    _checks.real_tensor("z", z, min_dim=1, check_finite=False)
    batch_shape, d = z.shape[:-1], z.shape[-1]
    if d == 0:
        raise ValueError(f"z must have a non-empty last dimension d, got shape {tuple(z.shape)}")
    tensors = {"z": z, "G": G, "grad_log_prob": grad_log_prob, "noise": noise, "dG": dG, "div_Ginv": div_Ginv,
               "target": target}
    expected = {"G": (d, d), "grad_log_prob": (d,), "noise": (d,), "dG": (d, d, d), "div_Ginv": (d,), "target": (d,)}
    for name, value in tensors.items():
        if name == "z" or value is None:
            continue
        what = "[..., " + ", ".join(["d"] * len(expected[name])) + "]"
        _checks.real_tensor(name, value, min_dim=len(expected[name]), check_finite=False)
        _checks.last_dims(name, value, expected[name], f"{what} with d={d}")
        if value.shape[: value.dim() - len(expected[name])] != batch_shape:
            raise ValueError(f"{name} must have shape {what} with batch shape {tuple(batch_shape)} like z "
                             f"{tuple(z.shape)}, got {tuple(value.shape)}")
    if dG is not None and div_Ginv is not None:
        raise ValueError("give dG or div_Ginv (or neither, for the simplified drift), not both")
    _checks.same_device(**tensors)
    _checks.same_dtype(**tensors)
    if isinstance(step_size, torch.Tensor):
        _checks.real_tensor("step_size", step_size)
        _checks.same_device(z=z, step_size=step_size)
        if step_size.dim() > 0 and step_size.shape != batch_shape:
            raise ValueError(f"step_size must be a scalar or have the batch shape {tuple(batch_shape)} of z, "
                             f"got {tuple(step_size.shape)}")
        step = step_size.to(z.dtype).expand(batch_shape)
        if step.numel() and not _checks._is_fake(step) and not bool(((step > 0) & (step < math.inf)).all()):
            raise ValueError(f"step_size must be positive and finite, got a tensor with minimum {float(step.min())}")
    else:
        if not 0 < float(step_size) < math.inf:
            raise ValueError(f"step_size must be positive and finite, got {step_size}")
        step = torch.full(batch_shape, float(step_size), dtype=z.dtype, device=z.device)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors.values()) or (
            isinstance(step_size, torch.Tensor) and step_size.requires_grad and torch.is_grad_enabled()):
        raise ValueError("langevin_step is not differentiable (a sampler step): detach its inputs or use torch.no_grad()")
    # On a GPU "auto" depends on d (the fused kernels lose to batched cuSOLVER above d = 16): _backend.GPU_RULES.
    chosen = _backend.resolve("langevin_step", z.device, backend, _IMPLEMENTED,
                              sizes={"d": d, "derivative": dG is not None})

    def flat(value, tail):
        return None if value is None else value.reshape(-1, *tail).contiguous()

    outputs = _backend.call_op(_langevin_step_op, _run, flat(z, (d,)), flat(G, (d, d)), flat(grad_log_prob, (d,)),
                               step.reshape(-1).contiguous(), flat(noise, (d,)), flat(dG, (d, d, d)), flat(div_Ginv, (d,)),
                               flat(target, (d,)), chosen)
    proposal, mean, half_log_det, log_q_proposal, log_q_target, ok = outputs
    # One pass over the outputs: a sum is finite iff its terms are (or it overflows, which flags the chain too).
    total = proposal.sum(-1) + mean.sum(-1) + half_log_det + log_q_proposal
    finite = torch.isfinite(total + log_q_target if target is not None else total)
    if not _checks._is_fake(finite) and finite.numel() and not bool(finite.all()):
        for name in ("z", "grad_log_prob", "noise", "div_Ginv", "target"):
            if tensors[name] is not None:
                _checks.real_tensor(name, tensors[name])  # raises, naming the argument, on NaN/Inf
        # Otherwise the step is not finite because of NaN/Inf in G or dG, or an overflowing drift: flag the chain.
        z_flat, zero = z.reshape(-1, d), torch.zeros_like(half_log_det)
        ok = ok & finite
        proposal = torch.where(ok[:, None], proposal, z_flat)
        mean = torch.where(ok[:, None], mean, z_flat)
        half_log_det, log_q_proposal = torch.where(ok, half_log_det, zero), torch.where(ok, log_q_proposal, zero)
        if target is not None:
            log_q_target = torch.where(ok, log_q_target, zero)
    return LangevinStepResult(
        proposal=proposal.reshape(*batch_shape, d), mean=mean.reshape(*batch_shape, d),
        half_log_det=half_log_det.reshape(batch_shape), log_q_proposal=log_q_proposal.reshape(batch_shape),
        log_q_target=None if target is None else log_q_target.reshape(batch_shape), ok=ok.reshape(batch_shape))
