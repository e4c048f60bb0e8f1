"""Christoffel symbols and curvature of any metric of the contract (MATH.md section 3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _checks, _linalg
from ..metrics.base import forward_derivative_is_exact, gradient_or_zero
from ..ops.christoffel import christoffel as christoffel_op
from ..reference.christoffel import first_kind


def _point(name: str, metric, z: torch.Tensor) -> torch.Tensor:
    if not callable(getattr(metric, "metric_and_derivative", None)):
        raise TypeError(f"metric must follow the pygeo metric contract (metric_and_derivative(z)), got {type(metric).__name__}")
    return _checks.real_tensor(name, z, min_dim=1)


def christoffel(metric, z: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Christoffel symbols of the second kind of `metric` at z [..., d] -> Gamma [..., d, d, d], Gamma[..., k, i, j].

    Uses metric.metric_and_derivative(z) and the fused op pygeo.ops.christoffel.
    """
    z = _point("z", metric, z)
    G, dG = metric.metric_and_derivative(z)
    return christoffel_op(G, dG, backend=backend)


@dataclass
class Curvature:
    """Curvature at a batch of points.

    riemann: [..., d, d, d, d], R[l, i, j, k] = d_j Gamma[l,i,k] - d_k Gamma[l,i,j] + Gamma[l,j,m] Gamma[m,i,k]
             - Gamma[l,k,m] Gamma[m,i,j] (first index up).
    ricci:   [..., d, d], Ric[i, k] = R[j, i, j, k].
    scalar:  [...], S = Ginv[i, k] Ric[i, k] (in 2-D the Gaussian curvature is S / 2).
    metric:  [..., d, d], G at the points (to lower indices or measure planes).
    """

    riemann: torch.Tensor
    ricci: torch.Tensor
    scalar: torch.Tensor
    metric: torch.Tensor

    @property
    def riemann_lowered(self) -> torch.Tensor:
        """R_lijk = G[l, m] R[m, i, j, k], [..., d, d, d, d]."""
        return torch.einsum("...lm,...mijk->...lijk", self.metric, self.riemann)


def uses_flat_coordinates(metric) -> bool:
    return bool(getattr(metric, "has_flat_coordinates", False)) and callable(getattr(metric, "flat_coordinates", None))


def curvature(metric, z: torch.Tensor, *, method: str = "auto", backend: str = "auto") -> Curvature:
    """Riemann, Ricci and scalar curvature of `metric` at z [..., d] (float64 recommended).

    method: "gauss" - Gauss equation through metric.flat_coordinates(z) (G = J_phi^T J_phi; no third derivatives),
            "christoffel" - differentiate the Christoffel symbols (second derivatives of G by forward mode),
            "auto" - "gauss" when the metric has flat coordinates, else "christoffel".
    """
    z = _point("z", metric, z)
    if method not in ("auto", "gauss", "christoffel"):
        raise ValueError(f"method must be 'auto', 'gauss' or 'christoffel', got {method!r}")
    if method == "auto":
        method = "gauss" if uses_flat_coordinates(metric) else "christoffel"
    if method == "gauss" and not uses_flat_coordinates(metric):
        raise ValueError(f"method='gauss' needs a metric with has_flat_coordinates = True and flat_coordinates(z); "
                         f"{type(metric).__name__} has none")
    batch_shape, d = z.shape[:-1], z.shape[-1]
    flat = z.reshape(-1, d)
    if method == "gauss":
        G, riemann = _riemann_by_gauss(metric, flat)
    else:
        G, riemann = _riemann_by_christoffel(metric, flat, backend)
    Ginv = torch.cholesky_inverse(_linalg.cholesky(G, "metric(z)"))
    ricci = torch.einsum("...jijk->...ik", riemann)
    scalar = torch.einsum("...ik,...ik->...", Ginv, ricci)
    return Curvature(riemann=riemann.reshape(*batch_shape, d, d, d, d), ricci=ricci.reshape(*batch_shape, d, d),
                     scalar=scalar.reshape(batch_shape), metric=G.reshape(*batch_shape, d, d))


def sectional_curvature(metric, z: torch.Tensor, u: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """Sectional curvature of the plane spanned by u, v [..., d] at z [..., d]:
    K = R(u, v, u, v) / (|u|^2 |v|^2 - <u, v>^2), all in the metric. Returns [...]."""
    z = _point("z", metric, z)
    for name, vector in (("u", u), ("v", v)):
        _checks.real_tensor(name, vector, min_dim=1)
        if vector.shape != z.shape:
            raise ValueError(f"{name} must have the shape of z {tuple(z.shape)}, got {tuple(vector.shape)}")
    _checks.same_device(z=z, u=u, v=v)
    _checks.same_dtype(z=z, u=u, v=v)
    curv = curvature(metric, z, **kwargs)
    G = curv.metric
    numerator = torch.einsum("...lijk,...l,...i,...j,...k->...", curv.riemann_lowered, u, v, u, v)
    uu = torch.einsum("...i,...ij,...j->...", u, G, u)
    vv = torch.einsum("...i,...ij,...j->...", v, G, v)
    uv = torch.einsum("...i,...ij,...j->...", u, G, v)
    area = uu * vv - uv * uv
    if bool((area <= 1e3 * torch.finfo(area.dtype).eps * uu * vv).any()):
        raise ValueError("u and v must span a plane at every point (they are parallel or zero somewhere)")
    return numerator / area


def _riemann_by_christoffel(metric, z: torch.Tensor, backend: str):
    """z [B, d] -> (G [B, d, d], R [B, d, d, d, d]) from G, dG, d2G (d2G[m, k, i, j] = d_m d_k G_ij)."""
    G, dG, d2G = _metric_jet(metric, z)
    Gamma = christoffel_op(G, dG, backend=backend)
    Ginv = torch.cholesky_inverse(_linalg.cholesky(0.5 * (G + G.transpose(-1, -2)), "metric(z)"))
    # d_m Gamma[k,i,j] = -(Ginv dG[m] Gamma)[k,i,j] + 1/2 Ginv[k,l] T(d_m dG)[l,i,j]
    dGamma = (-torch.einsum("bkl,bmlp,bpij->bmkij", Ginv, dG, Gamma)
              + 0.5 * torch.einsum("bkl,bmlij->bmkij", Ginv, first_kind(0.5 * (d2G + d2G.transpose(-1, -2)))))
    riemann = (torch.einsum("bjlik->blijk", dGamma) - torch.einsum("bklij->blijk", dGamma)
               + torch.einsum("bljm,bmik->blijk", Gamma, Gamma) - torch.einsum("blkm,bmij->blijk", Gamma, Gamma))
    return G, riemann


def _metric_jet(metric, z: torch.Tensor):
    """G [B, d, d], dG [B, d, d, d], d2G [B, d, d, d, d] at z [B, d]: one forward-mode pass per direction over
    metric_and_derivative, or reverse mode when the metric is not forward-mode friendly."""
    d = z.shape[-1]
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    derivative = lambda w: metric.metric_and_derivative(w)[1]  # noqa: E731
    try:
        columns = []
        for m in range(d):
            dG, column = torch.func.jvp(derivative, (z,), (eye[m].expand_as(z),))
            columns.append(column)
        d2G = torch.stack(columns, 1)
        # forward mode gives silent zeros through custom ops: trust it only when it agrees with reverse mode
        if forward_derivative_is_exact(derivative, z[:1], d2G[:1]):
            return metric.metric(z), dG, d2G
    except Exception:  # a metric whose derivative is not forward-mode differentiable
        pass
    with torch.enable_grad():
        point = z.detach().requires_grad_(True)
        G, dG = metric.metric_and_derivative(point)
        d2G = torch.zeros(z.shape[0], d, d, d, d, dtype=z.dtype, device=z.device)
        for k in range(d):
            for i in range(d):
                for j in range(i, d):
                    grad = gradient_or_zero(dG[:, k, i, j].sum(), point, create_graph=False)
                    d2G[:, :, k, i, j] = grad
                    d2G[:, :, k, j, i] = grad
    return G.detach(), dG.detach(), d2G


def flat_jet(metric, z: torch.Tensor):
    """phi's Jacobian J [B, D, d] and second derivatives H [B, D, d, d] at z [B, d], forward over forward mode.

    jacfwd of jacfwd vmapped over the points (measured faster on the CPU than vmapping the d(d+1)/2 distinct nested
    jvps, although it pushes d^2 directions); the nested jvps are the fallback for a phi that cannot run per point.
    """
    phi = metric.flat_coordinates

    def jacobian_twice(point):
        J = torch.func.jacfwd(phi)(point)
        return J, J

    try:
        H, J = torch.func.vmap(torch.func.jacfwd(jacobian_twice, has_aux=True))(z)
        return J, 0.5 * (H + H.transpose(-1, -2))
    except Exception:  # phi not vmap-friendly per point
        return _flat_jet_by_pairs(phi, z)


def _flat_jet_by_pairs(phi, z: torch.Tensor):
    """flat_jet through the d(d+1)/2 distinct second directional derivatives (jvp of jvp), vmapped over directions,
    else one pair at a time."""
    d = z.shape[-1]
    rows, cols = torch.triu_indices(d, d, device=z.device)
    eye = torch.eye(d, dtype=z.dtype, device=z.device)

    def second(u, v):
        inner = lambda w: torch.func.jvp(phi, (w,), (u.expand_as(w),))[1]  # noqa: E731
        return torch.func.jvp(inner, (z,), (v.expand_as(z),))  # (J u, H[u, v])

    try:
        first, hess = torch.func.vmap(second)(eye[rows], eye[cols])  # [P, B, D] each
    except Exception:  # phi not vmap-friendly: one pair at a time
        pairs = [second(eye[i], eye[j]) for i, j in zip(rows.tolist(), cols.tolist())]
        first = torch.stack([p[0] for p in pairs])
        hess = torch.stack([p[1] for p in pairs])
    B, D = hess.shape[1], hess.shape[2]
    diagonal = rows == cols
    J = first[diagonal].permute(1, 2, 0)  # the pairs (i, i), in order i = 0..d-1
    H = hess.new_empty(B, D, d, d)
    H[:, :, rows, cols] = hess.permute(1, 2, 0)
    H[:, :, cols, rows] = hess.permute(1, 2, 0)
    return J, H


def _riemann_by_gauss(metric, z: torch.Tensor):
    """Gauss equation: R_lijk = <II[l,j], II[i,k]> - <II[l,k], II[i,j]>, II = P H, P = I - J Ginv J^T; since P is an
    orthogonal projector, <P a, P b> = a.b - (J^T a)^T Ginv (J^T b). Returns G and R with the first index raised."""
    J, H = flat_jet(metric, z)
    B, D, d = J.shape
    G = J.transpose(-1, -2) @ J
    G = 0.5 * (G + G.transpose(-1, -2))
    L = _linalg.cholesky(G, "metric(z)")
    Hflat = H.reshape(B, D, d * d)
    tangential = J.transpose(-1, -2) @ Hflat  # [B, d, d*d]
    Q = Hflat.transpose(-1, -2) @ Hflat - tangential.transpose(-1, -2) @ torch.cholesky_solve(tangential, L)
    Q = Q.reshape(B, d, d, d, d)  # Q[l, j, i, k] = <II[l,j], II[i,k]>
    lowered = torch.einsum("bljik->blijk", Q) - torch.einsum("blkij->blijk", Q)
    raised = torch.cholesky_solve(lowered.reshape(B, d, d * d * d), L).reshape(B, d, d, d, d)
    return G, raised
