"""The metric contract that geometry and samplers are written against."""
from __future__ import annotations

from typing import Callable, Tuple, Union

import torch

from .. import _checks, _linalg


class Metric:
    """A Riemannian metric on R^d given in coordinates.

    Subclasses implement `metric(z)`; the others have generic (autograd) defaults that subclasses may replace by
    fused kernels or closed forms.
      metric(z)                 z [..., d] -> G [..., d, d], symmetric positive definite
      metric_and_derivative(z)  -> (G [..., d, d], dG [..., d, d, d]) with dG[..., k, i, j] = d G[i, j] / d z_k
      log_volume(z)             -> 1/2 log det G [...], differentiable in z
      log_volume_and_grad(z)    -> (1/2 log det G [...], its gradient in z [..., d]), detached: what samplers need,
                                   without the gradients of a decoder's or a metric's own parameters
      inner(z, u, v)            -> u^T G(z) v [...]
    """

    def metric(self, z: torch.Tensor) -> torch.Tensor:
        """G(z) [..., d, d], symmetric positive definite, at z [..., d]."""
        raise NotImplementedError

    def metric_and_derivative(self, z: torch.Tensor):
        """(G [..., d, d], dG [..., d, d, d]) at z [..., d], dG[..., k, i, j] = d G[i, j] / d z_k (by autograd unless
        a subclass has a closed form or a fused kernel)."""
        return metric_and_derivative_by_autograd(self.metric, z)

    def log_volume(self, z: torch.Tensor) -> torch.Tensor:
        """1/2 log det G(z) [...] at z [..., d], differentiable in z (log det G for a Hermitian metric)."""
        return _linalg.half_log_det(self.metric(z), name=f"{type(self).__name__}.metric(z)")

    def log_volume_and_grad(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(1/2 log det G [...], its gradient in z [..., d]), detached: what the samplers need, without the gradients
        of a decoder's or a metric's own parameters."""
        return value_and_gradient(self.log_volume, z, refuse_lost_gradient=True)

    def inner(self, z: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """u^T G(z) v [...]: z, u, v [..., d], batch shapes broadcast."""
        G = self.metric(z)
        check_tangents(z, u=u, v=v)
        product = (u.unsqueeze(-2) @ G @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1)
        # G, u and v are finite here: an Inf is the product's own overflow, not a value to pass on.
        _checks.finite_points(product.reshape(-1), "inner(z, u, v)", f"u^T G v overflows {product.dtype}")
        return product

    def norm(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.inner(z, v, v).clamp_min(0).sqrt()


def where_defined(fn, rows: Tuple[torch.Tensor, ...], nan_result: Callable[[int], Union[torch.Tensor, tuple]]):
    """fn(*rows) for batches of points rows [B, ...] -> a tensor or a tuple of tensors [B, ...], with NaN rows where
    fn raises ValueError (a metric that is not positive definite there, a non-finite point) instead of one error for
    the whole batch; nan_result(n) gives the all-NaN output for n rows. The failing rows are found by bisection (a few
    bad points cost O(log B) more calls); rows that hold NaN/Inf on entry come out NaN without a call. For solvers and
    samplers whose trial points may leave the metric's domain: such a trial is then rejected, not fatal."""
    def parts(out):
        return (out,) if isinstance(out, torch.Tensor) else tuple(out)

    def pack(like, outs):
        return outs[0] if isinstance(like, torch.Tensor) else tuple(outs)

    finite = torch.stack([_checks.finite_rows(r) for r in rows]).all(0)
    if bool(finite.all()):
        try:
            return fn(*rows)
        except ValueError:
            if rows[0].shape[0] == 1:
                return nan_result(1)
            half = rows[0].shape[0] // 2
            first = where_defined(fn, tuple(r[:half] for r in rows), nan_result)
            second = where_defined(fn, tuple(r[half:] for r in rows), nan_result)
            return pack(first, [torch.cat(pair) for pair in zip(parts(first), parts(second))])
    result = nan_result(rows[0].shape[0])
    if bool(finite.any()):
        inner = where_defined(fn, tuple(r[finite] for r in rows), nan_result)
        for out, part in zip(parts(result), parts(inner)):
            out[finite] = part.to(out.dtype)
    return result


def check_tangents(z: torch.Tensor, **tangents: torch.Tensor) -> None:
    """Tangent vectors [..., d] at z [..., d]: z's dtype (real or complex alike), last size d, broadcastable batch."""
    for name, value in tangents.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype != z.dtype:
            raise TypeError(f"{name} must have z's dtype {z.dtype}, got {value.dtype}")
        if value.dim() < 1 or value.shape[-1] != z.shape[-1]:
            raise ValueError(f"{name} must have shape [..., {z.shape[-1]}] (a tangent vector at z {tuple(z.shape)}), "
                             f"got {tuple(value.shape)}")
        try:
            torch.broadcast_shapes(value.shape[:-1], z.shape[:-1])
        except RuntimeError:
            raise ValueError(f"{name} batch shape {tuple(value.shape[:-1])} does not broadcast with z's "
                             f"{tuple(z.shape[:-1])}") from None
        if not _checks._is_fake(value) and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contains NaN or Inf values")
    _checks.same_device(z=z, **tangents)


def metric_and_derivative_by_autograd(metric_fn, z: torch.Tensor):
    """(G, dG) for any metric function, dG[..., k, i, j] = d G[i, j] / d z_k.

    Forward mode (d jvps, vmapped) when the function supports it; otherwise reverse mode over the d(d+1)/2 distinct
    entries of G, summed over the batch (points are independent, so one backward pass serves every point).
    """
    _checks.real_tensor("z", z, min_dim=1, check_finite=False)  # the metric function scans the values
    batch_shape, d = z.shape[:-1], z.shape[-1]
    flat = z.reshape(-1, d)
    def single(point):
        G = metric_fn(point.unsqueeze(0)).squeeze(0)
        return G, G

    try:
        dG_last, G = torch.func.vmap(torch.func.jacfwd(single, has_aux=True))(flat)
        dG = dG_last.permute(0, 3, 1, 2)
        forward_ok = forward_derivative_is_exact(metric_fn, flat[:1], dG[:1])
    except Exception:  # not vmap / forward-mode friendly
        forward_ok = False
    if not forward_ok:
        G, dG = _derivative_by_reverse_mode(metric_fn, flat)
    return G.reshape(*batch_shape, d, d), dG.reshape(*batch_shape, d, d, d)


def forward_derivative_is_exact(fn, point: torch.Tensor, derivative: torch.Tensor) -> bool:
    """Dot-product test of a forward-mode derivative against one reverse-mode pass, at one point.

    fn: point [1, d] -> value [1, *S]; derivative [1, d, *S] its claimed derivative (direction index first).
    Forward mode silently yields zeros through operations that have no forward-AD formula (custom ops such as
    pygeo's own kernels), so a forward-mode answer is only trusted when <U, D[v]> equals <grad <U, fn>, v> for random
    U and v.
    """
    generator = torch.Generator().manual_seed(0)
    d = point.shape[-1]
    U = torch.randn(derivative.shape[2:], generator=generator, dtype=point.dtype).to(point.device)
    v = torch.randn(d, generator=generator, dtype=point.dtype).to(point.device)
    with torch.enable_grad():
        probe = point.detach().requires_grad_(True)
        grad = gradient_or_zero((fn(probe)[0] * U).sum(), probe, create_graph=False)
    reverse = (grad[0] * v).sum()
    forward = (derivative[0] * v.reshape(d, *([1] * U.dim())) * U).sum()
    scale = (derivative[0].abs().sum() * U.abs().max() + grad.abs().sum()) * v.abs().max()
    tolerance = 1e-3 if point.dtype == torch.float32 else 1e-8
    return bool((forward - reverse).abs() <= tolerance * scale.clamp_min(torch.finfo(point.dtype).tiny))


def _derivative_by_reverse_mode(metric_fn, flat: torch.Tensor):
    keep_graph = flat.requires_grad  # callers differentiating dG again (curvature) need the graph
    with torch.enable_grad():
        point = flat if keep_graph else flat.detach().requires_grad_(True)
        G = metric_fn(point)
        d = flat.shape[-1]
        rows = []
        for i in range(d):
            for j in range(i, d):
                rows.append(gradient_or_zero(G[:, i, j].sum(), point, create_graph=keep_graph))
    pairs = {}
    index = 0
    for i in range(d):
        for j in range(i, d):
            pairs[i, j] = pairs[j, i] = rows[index]
            index += 1
    dG = torch.stack([torch.stack([pairs[i, j] for j in range(d)], -1) for i in range(d)], -2)  # [B, k, i, j]
    return (G if keep_graph else G.detach()), dG


def log_volume_and_grad(metric, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(metric.log_volume(z) [C], its gradient in z [C, d]), detached, for any metric of the contract: the metric's own
    log_volume_and_grad where it has one (fused kernels, no parameter gradients), else autograd through log_volume."""
    own = getattr(metric, "log_volume_and_grad", None)
    if own is None:
        return value_and_gradient(metric.log_volume, z, refuse_lost_gradient=True)
    value, grad = own(z)
    return value.detach(), grad.detach()


def value_and_gradient(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, refuse_lost_gradient: bool = False):
    """(fn(z) [C], d fn / dz [C, d]) for a scalar function of each row of z [C, d], both detached; the gradient is
    zero where fn does not depend on z (a constant target has no graph at all).

    refuse_lost_gradient (the metrics' log_volume_and_grad): raise ValueError where the value is finite but its
    gradient is not, instead of returning it (samplers reject such points): reverse mode through a metric carries
    G^-1, which overflows where G is tiny (entries near the dtype's smallest normal) or near singular, although the
    gradient itself may be representable (fuzz campaign 2026-12-04: G = exp(-|z|^2) I at |z|^2 = 721 in float64 gave
    NaN). Rescale such a metric."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if not (z.is_floating_point() or z.is_complex()):
        raise TypeError(f"z must be a floating tensor (float32 or float64; complex for Hermitian metrics), got dtype "
                        f"{z.dtype} (convert with .float() or .double())")
    with torch.enable_grad():
        point = z.detach().requires_grad_(True)
        value = fn(point)
        grad = gradient_or_zero(value.sum(), point, create_graph=False)
    value, grad = value.detach(), grad.detach()
    if refuse_lost_gradient and value.dim() == z.dim() - 1 and grad.numel():
        lost = torch.isfinite(value) & ~torch.isfinite(grad).all(-1)
        if bool(lost.any()):
            raise ValueError(f"the gradient in z of {getattr(fn, '__qualname__', 'the function')} is not finite at "
                             f"{int(lost.sum())} point(s) where its value is finite: the metric there is so small or "
                             f"so ill-conditioned that G^-1 overflows {grad.dtype} in the backward pass; rescale the "
                             f"metric (or its coordinates)")
    return value, grad


def gradient_or_zero(value: torch.Tensor, point: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """d value / d point, zero where value does not depend on point (a constant metric has no graph at all)."""
    if not value.requires_grad:
        return torch.zeros_like(point)
    (grad,) = torch.autograd.grad(value, point, retain_graph=True, create_graph=create_graph, allow_unused=True,
                                  materialize_grads=True)
    return grad
