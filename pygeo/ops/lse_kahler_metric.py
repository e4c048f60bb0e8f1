"""pygeo.ops.lse_kahler_metric: the Hermitian metric of a log-sum-exp Kahler potential, fused over the K components.

Conventions (MATH.md section 5): z in C^n; the metric is returned as the complex matrix G of the Hermitian form
h(u, u) = u^H G u, i.e. G is the conjugate of [d_a d_bbar Psi]; for the potential (z - c)^H P (z - c), G = P.

The custom op works on real views (torch.view_as_real: a trailing axis of 2 holding real and imaginary parts), so every
kernel sees plain float arrays and autograd stays real. Forward: one pass over the K components per point with an online
softmax (running max, accumulators rescaled when it grows), O(B n^2) memory. Backward, O(B K n) memory like the
reference's forward: the gradient with respect to z in closed form (a C++ kernel on the CPU,
csrc/cpu/lse_kahler_metric_vjp.cpp; elsewhere reference.lse_kahler_metric_vjp_z, batched products); the other inputs,
and z under double backward (create_graph: curvature of the real form, gradient-penalty regularisers), by
recomputation through the closed-form reference with torch.func.vjp, which is exact and differentiable again.
"""
from __future__ import annotations

import math

from typing import Optional, Tuple, Union

import torch

from .. import _backend, _checks
from ..reference import lse_kahler_metric as reference

_IMPLEMENTED = ("torch", "cpp", "cuda", "triton")
_REAL_DTYPE = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def _run(z: torch.Tensor, centers: torch.Tensor, precisions: torch.Tensor, log_weights: torch.Tensor,
         temperature: float, backend: str) -> torch.Tensor:
    """Real views, contiguous: z [B, n, 2], centers [K, n, 2], precisions [K, n, n, 2] or [K, n], log_weights [K]
    -> G [B, n, n, 2]."""
    if backend == "torch":
        return reference.lse_kahler_metric_real(z, centers, precisions, log_weights, temperature).contiguous()
    B, n, _ = z.shape
    K = centers.shape[0]
    diagonal = precisions.dim() == 2
    out = _backend.empty((B, n, n, 2), z)
    if backend == "triton":
        from ..triton_kernels import lse_kahler_metric as triton_lse

        return triton_lse.lse_kahler_metric(z, centers, precisions, log_weights, temperature, diagonal, out)
    args = (_backend.ptr(z), _backend.ptr(centers), _backend.ptr(precisions), _backend.ptr(log_weights),
            float(temperature), diagonal, _backend.ptr(out), B, K, n, _backend.dtype_name(z))
    _backend.run_compiled("lse_kahler_metric", backend, args, z)
    return out


@torch.library.custom_op("pygeo::lse_kahler_metric", mutates_args=())
def _lse_kahler_metric_op(z: torch.Tensor, centers: torch.Tensor, precisions: torch.Tensor, log_weights: torch.Tensor,
                          temperature: float, backend: str) -> torch.Tensor:
    return _run(z, centers, precisions, log_weights, temperature, backend)


@_lse_kahler_metric_op.register_fake
def _(z, centers, precisions, log_weights, temperature, backend):
    B, n, _ = z.shape
    return z.new_empty((B, n, n, 2))


def _setup_context(ctx, inputs, output):
    z, centers, precisions, log_weights, temperature, backend = inputs
    ctx.save_for_backward(z, centers, precisions, log_weights)
    ctx.temperature = temperature
    ctx.backend = backend


def _vjp_z(z, centers, precisions, log_weights, temperature, grad_G, backend):
    """The first-order gradient in z, real views, contiguous: z [B, n, 2], ..., grad_G [B, n, n, 2] -> [B, n, 2].
    The C++ kernel for CPU tensors the cpp backend ran; the closed form in plain PyTorch (batched products) elsewhere."""
    if backend == "cpp":
        B, n, _ = z.shape
        out = _backend.empty((B, n, 2), z)
        args = (_backend.ptr(z), _backend.ptr(centers), _backend.ptr(precisions), _backend.ptr(log_weights),
                float(temperature), precisions.dim() == 2, _backend.ptr(grad_G), _backend.ptr(out), B,
                centers.shape[0], n, _backend.dtype_name(z))
        _backend.run_compiled("lse_kahler_metric_vjp", backend, args, z)
        return out

    def as_complex(pairs):
        return torch.complex(pairs[..., 0], pairs[..., 1])

    full = precisions.dim() == 4
    grad_z = reference.lse_kahler_metric_vjp_z(as_complex(z), as_complex(centers),
                                               as_complex(precisions) if full else precisions, log_weights,
                                               temperature, as_complex(grad_G))
    return torch.stack([grad_z.real, grad_z.imag], dim=-1)


@torch.library.custom_op("pygeo::lse_kahler_metric_vjp", mutates_args=())
def _vjp_z_op(z: torch.Tensor, centers: torch.Tensor, precisions: torch.Tensor, log_weights: torch.Tensor,
              temperature: float, grad_G: torch.Tensor, backend: str) -> torch.Tensor:
    """The backward in z as its own op, so autograd tracing (torch.compile) sees no raw kernel."""
    return _vjp_z(z, centers, precisions, log_weights, temperature, grad_G, backend)


@_vjp_z_op.register_fake
def _(z, centers, precisions, log_weights, temperature, grad_G, backend):
    return torch.empty_like(z)


def _backward(ctx, grad_G):
    z, centers, precisions, log_weights = ctx.saved_tensors
    temperature = ctx.temperature
    needed = list(ctx.needs_input_grad[:4])
    closed_form_z = needed[0] and not torch.is_grad_enabled()  # a first-order backward: no graph to keep
    if closed_form_z:
        needed[0] = False
    grads = _backend.vjp_where_needed(lambda *args: reference.lse_kahler_metric_real(*args, temperature),
                                      (z, centers, precisions, log_weights), needed, grad_G)
    if closed_form_z:
        grads[0] = _vjp_z_op(z, centers, precisions, log_weights, temperature, grad_G.contiguous(), ctx.backend)
    return (*grads, None, None)


_lse_kahler_metric_op.register_autograd(_backward, setup_context=_setup_context)


def check_precisions(precisions: torch.Tensor, n: Optional[int] = None, name: str = "precisions") -> bool:
    """Validates [K, n, n] complex Hermitian positive definite or [K, n] real positive precisions; True if diagonal."""
    if precisions.is_complex():
        _checks.complex_tensor(name, precisions, min_dim=3, parameter=True)
        if precisions.dim() != 3 or precisions.shape[-1] != precisions.shape[-2] or (n is not None and precisions.shape[-1] != n):
            raise ValueError(f"{name} must have shape [K, n, n] (complex Hermitian) or [K, n] (real diagonal)"
                             f"{'' if n is None else f' with n={n}'}, got {tuple(precisions.shape)}")
        _checks.verify_once(precisions, "hermitian positive definite", lambda: _check_hermitian_pd(precisions, name))
        return False
    _checks.real_tensor(name, precisions, min_dim=2, parameter=True)
    if precisions.dim() != 2 or (n is not None and precisions.shape[-1] != n):
        raise ValueError(f"{name} must have shape [K, n, n] (complex Hermitian) or [K, n] (real diagonal)"
                         f"{'' if n is None else f' with n={n}'}, got {tuple(precisions.shape)}")
    _checks.positive_parameter(f"{name} (diagonal, [K, n])", precisions)
    return True


def _check_hermitian_pd(precisions: torch.Tensor, name: str) -> None:
    if not precisions.numel():
        return
    scale = precisions.abs().amax(dim=(-1, -2)).clamp_min(torch.finfo(precisions.real.dtype).tiny)
    asymmetry = (precisions - precisions.mH).abs().amax(dim=(-1, -2))
    tol = 100 * torch.finfo(precisions.real.dtype).eps
    if bool((asymmetry > tol * scale).any()):
        raise ValueError(f"{name} must be Hermitian (P == P^H): component(s) "
                         f"{torch.nonzero(asymmetry > tol * scale).flatten().tolist()[:5]} are not")
    info = torch.linalg.cholesky_ex(precisions)[1]
    if bool((info > 0).any()):
        raise ValueError(f"{name} must be positive definite: component(s) "
                         f"{torch.nonzero(info > 0).flatten().tolist()[:5]} are not")


def lse_kahler_metric(z: torch.Tensor, centers: torch.Tensor, precisions: torch.Tensor,
                      log_weights: Optional[torch.Tensor] = None, temperature: float = 1.0, *,
                      with_log_det: bool = False, backend: str = "auto"
                      ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Metric of Psi(z) = T log sum_i pi_i exp((z - c_i)^H P_i (z - c_i) / T), in one fused pass over the components.

        G = sum_i p_i P_i + (1/T) (sum_i p_i y_i y_i^H - ybar ybar^H),  p = softmax(log pi + u / T), y_i = P_i (z - c_i)

    Args:
        z: [..., n] complex64 or complex128 latent points.
        centers: [K, n] complex, same dtype as z.
        precisions: [K, n, n] complex Hermitian positive definite, or [K, n] real positive (diagonal P_i).
        log_weights: [K] real log pi_i (need not be normalised); None for equal weights.
        temperature: T > 0.
        with_log_det: also return log det G [...] = 2 sum log Re diag chol(G) (the Kahler volume form's log density).
        backend: "auto", "torch", "cpp", "cuda" or "triton" (see pygeo.backends()).
    Returns:
        G [..., n, n] complex Hermitian positive definite, and log det G [...] when with_log_det.
    Differentiable with respect to z, centers, precisions and log_weights (not temperature).
    """
    _checks.complex_tensor("z", z, min_dim=1)
    n = z.shape[-1]
    if n == 0:
        raise ValueError(f"z must have a non-empty last dimension n, got shape {tuple(z.shape)}")
    _checks.complex_tensor("centers", centers, min_dim=2, parameter=True)
    if centers.dim() != 2 or centers.shape[-1] != n or centers.shape[0] == 0:
        raise ValueError(f"centers must have shape [K, n] with K >= 1 and n={n} (z is {tuple(z.shape)}), got {tuple(centers.shape)}")
    K = centers.shape[0]
    diagonal = check_precisions(precisions, n)
    if precisions.shape[0] != K:
        raise ValueError(f"precisions must have K={K} components like centers, got shape {tuple(precisions.shape)}")
    real_dtype = _REAL_DTYPE[z.dtype]
    if log_weights is None:
        log_weights = torch.zeros(K, dtype=real_dtype, device=z.device)
    _checks.real_tensor("log_weights", log_weights, min_dim=1, parameter=True)
    if log_weights.shape != (K,):
        raise ValueError(f"log_weights must have shape [K] with K={K}, got {tuple(log_weights.shape)}")
    _checks.same_device(z=z, centers=centers, precisions=precisions, log_weights=log_weights)
    _checks.same_dtype(z=z, centers=centers, **({} if diagonal else {"precisions": precisions}))
    _checks.same_dtype(**{"log_weights": log_weights, "z (real part)": z.real},
                       **({"precisions": precisions} if diagonal else {}))
    temperature = _checks.number("temperature", temperature)
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")

    chosen = _backend.resolve("lse_kahler_metric", z.device, backend, _IMPLEMENTED, sizes={"n": n, "K": K})
    _refuse_unresolved_weights(z.reshape(-1, n), centers, precisions, log_weights, temperature, diagonal)
    batch_shape = z.shape[:-1]
    z_real = torch.view_as_real(z.reshape(-1, n).resolve_conj()).contiguous()
    centers_real = torch.view_as_real(centers.resolve_conj()).contiguous()
    precisions_real = precisions.contiguous() if diagonal else torch.view_as_real(precisions.resolve_conj()).contiguous()
    G_real = _backend.call_op(_lse_kahler_metric_op, _run, z_real, centers_real, precisions_real,
                              log_weights.contiguous(), float(temperature), chosen)
    # z and the parameters are finite and the weights resolved: NaN/Inf here is an overflow of u / T or of y y^H / T.
    _checks.finite_points(G_real, "lse_kahler_metric: G", f"the scores (z - c)^H P (z - c) / T or the outer products "
                          f"y y^H / T overflow {z.dtype} (|z| too large for temperature {temperature:g})")
    G = torch.view_as_complex(G_real).reshape(*batch_shape, n, n)
    if not with_log_det:
        return G
    return G, log_det(G)


def _refuse_unresolved_weights(z: torch.Tensor, centers: torch.Tensor, precisions: torch.Tensor,
                               log_weights: torch.Tensor, temperature: float, diagonal: bool) -> None:
    """ValueError naming z where the softmax weights p = softmax(log pi + u / T) are not determined in z's precision.

    Far from the centres (|z| large against sqrt(T / eps)) the scores u_i / T ~ |P| |z - c_i|^2 / T are rounded by more
    than the gaps between components, and every backend returns a different, wrong mixture (each covariance term is
    then ~|z|^2 / T). A cheap bound first (O(B n)): err = 8 n eps |P|_max (|z| + |c|_max)^2 / T on the scores'
    rounding. Only points where err > 1 get their scores computed here, and they are refused unless the top component
    wins by more than 2 err + log(1/eps) (its weight is then 1 to working precision, whatever the rounding)."""
    if not z.numel() or _checks._is_fake(z):
        return
    real = z.real.dtype
    eps = torch.finfo(real).eps
    n = z.shape[-1]
    P_size = precisions.abs().amax() if diagonal else torch.linalg.matrix_norm(precisions).amax()
    reach = torch.linalg.vector_norm(z, dim=-1) + torch.linalg.vector_norm(centers, dim=-1).amax()
    error = (8 * n * eps / temperature) * P_size.to(real) * reach * reach  # [B]; inf where |z|^2 overflows
    suspect = ~(error <= 1)
    if not bool(suspect.any()):
        return
    index = suspect.nonzero().flatten()
    diff = z[index].unsqueeze(1) - centers  # [S, K, n]
    y = precisions * diff if diagonal else torch.einsum("kij,skj->ski", precisions, diff)
    scores = log_weights + (diff.conj() * y).real.sum(-1) / temperature  # [S, K]
    if scores.shape[-1] > 1:
        top = scores.topk(2, dim=-1).values
        gap = top[:, 0] - top[:, 1]
    else:  # one component: its weight is 1 whatever the rounding, unless its score is not finite
        gap = torch.where(torch.isfinite(scores[:, 0]), math.inf, math.nan).to(real)
    unresolved = ~(gap > 2 * error[index] + math.log(1 / eps))  # NaN gaps (overflowed scores) count as unresolved
    if bool(unresolved.any()):
        first = int(index[unresolved.nonzero()[0, 0]])
        raise ValueError(
            f"z: the weights of the log-sum-exp potential are not determined at {int(unresolved.sum())} of "
            f"{z.shape[0]} points (first: index {first}, |z| = {float(torch.linalg.vector_norm(z[first])):.3g}): "
            f"the scores (z - c_i)^H P_i (z - c_i) / T at temperature {temperature:g} carry a rounding error of up to "
            f"{float(error[first]):.3g} in {z.dtype}, more than the gap between the leading components; move z closer "
            f"to the centres, raise the temperature, or use complex128")


def log_det(G: torch.Tensor, name: str = "G") -> torch.Tensor:
    """log det G [...] of Hermitian positive definite G [..., n, n]: 2 sum log Re diag chol(G) (never det)."""
    L, info = torch.linalg.cholesky_ex(G)
    if not _checks._is_fake(G) and bool((info > 0).any()):
        raise ValueError(f"{name} is not positive definite at {int((info > 0).sum())} of {info.numel()} points")
    return 2 * L.diagonal(dim1=-2, dim2=-1).real.log().sum(-1)
