"""Kahler (Hermitian) metrics on complex latents z in C^n, and their real forms on R^{2n} (MATH.md section 5).

Conventions:
  * z is a complex tensor [..., n]; Wirtinger derivatives d_a = (d_x - i d_y)/2, d_abar = (d_x + i d_y)/2.
  * metric(z) returns the complex matrix G of the Hermitian form h(u, u) = u^H G u. G is the complex conjugate of the
    matrix g[a, b] = d_a d_bbar Psi of a Kahler potential Psi; for Psi = (z - c)^H P (z - c), G = P.
  * The real line element is ds^2 = 2 g[a,b] dz_a dzbar_b = 2 h(dz, dz). On x = [Re z, Im z] in R^{2n} it is the real
    metric G_real = 2 [[Re G, -Im G], [Im G, Re G]], with det G_real = 2^{2n} (det G)^2. So the Kahler volume form is
    proportional to det G (not its square root), and log_volume(z) of a HermitianMetric is log det G, while the real
    form's log_volume(x) = 1/2 log det G_real = n log 2 + log det G (the same density up to a constant).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

from .. import _backend, _checks
from ..ops.lse_kahler_metric import check_precisions, log_det, lse_kahler_metric
from ..reference import hermitian_part
from .base import Metric, check_tangents, value_and_gradient


class HermitianMetric:
    """A Hermitian metric on C^n. Subclasses implement metric(z): z [..., n] complex -> G [..., n, n] Hermitian PD."""

    def metric(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def metric_and_derivative(self, z: torch.Tensor):
        """z [..., n] complex -> (G [..., n, n], dG [..., n, n, n]) with dG[..., a, i, j] = d G_ij / d z_a, the
        holomorphic Wirtinger derivative d_a = (d/dRe z_a - i d/dIm z_a) / 2.

        For complex z, "the derivative of G" has two halves; this one is the half that Kahler geometry uses (the
        Christoffel symbols of a Kahler metric are Gamma^k_aj = G^-1 contracted with it). The other half follows
        from G = G^H: d G_ij / d zbar_a = conj(dG[..., a, j, i]). For a Kahler metric G_ij = d_ibar d_j Psi, so
        dG[..., a, i, j] = d_a d_j d_ibar Psi is symmetric in (a, j). The derivative with respect to the real
        coordinates x = [Re z, Im z] is as_real().metric_and_derivative(x)."""
        _checks.complex_tensor("z", z, min_dim=1)
        n = z.shape[-1]
        _, dG_real = self.as_real().metric_and_derivative(to_real(z))  # [..., 2n, 2n, 2n], d / dx_k
        # G_real = 2 [[Re G, -Im G], [Im G, Re G]]: its left column of blocks, halved, is (Re G, Im G) per direction.
        d_real = torch.complex(dG_real[..., :n, :n], dG_real[..., n:, :n]) / 2  # [..., 2n, n, n]: dG / dx_k
        dG = (d_real[..., :n, :, :] - 1j * d_real[..., n:, :, :]) / 2
        return self.metric(z), dG

    def log_volume(self, z: torch.Tensor) -> torch.Tensor:
        """log det G(z) [...]: the log density of the Kahler volume form (omega^n / n!) against Lebesgue measure on
        C^n = R^{2n}, up to a constant. Note: log det G, not 1/2 log det G as for real metrics (see module doc)."""
        return log_det(self.metric(z), name=f"{type(self).__name__}.metric(z)")

    def log_volume_and_grad(self, z: torch.Tensor):
        """(log det G(z) [...], its gradient [..., n]), detached; the gradient of a real function at complex z in
        PyTorch's convention, d/dRe z + i d/dIm z (= 2 d/dzbar)."""
        return value_and_gradient(self.log_volume, z, refuse_lost_gradient=True)

    def inner(self, z: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """h(u, v) = u^H G(z) v [...] (complex; real and >= 0 when u == v)."""
        G = self.metric(z)
        check_tangents(z, u=u, v=v)
        return (u.conj().unsqueeze(-2) @ G @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1)

    def norm(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.inner(z, v, v).real.clamp_min(0).sqrt()

    def det_weighted_log_prob(self, gamma: float = 1.0,
                              base_log_prob: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                              ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The log density (up to a constant) of the target w(z) det G(z)^gamma as a function of x = [Re z, Im z]:
        x [..., 2n] real -> log w + gamma log det G [...], differentiable in x. Pass it as `log_prob` to a sampler on
        R^{2n} (e.g. pygeo.sample's, with metric.as_real() where the sampler also wants the metric).

        base_log_prob: log w, a function of complex z [..., n] (default: none, w = 1); e.g. the CN(0, I) prior
        lambda z: -(z.abs() ** 2).sum(-1).
        """
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma)):
            raise ValueError(f"gamma must be a finite number, got {gamma!r}")

        def log_prob(x: torch.Tensor) -> torch.Tensor:
            _checks.real_tensor("x", x, min_dim=1)
            if x.shape[-1] % 2:
                raise ValueError(f"x must have shape [..., 2n] (x = [Re z, Im z]), got {tuple(x.shape)}")
            z = to_complex(x)
            value = gamma * self.log_volume(z)
            return value if base_log_prob is None else value + base_log_prob(z)

        return log_prob

    def as_real(self) -> "RealFormMetric":
        """The real metric of ds^2 = 2 h(dz, dz) on x = [Re z, Im z] in R^{2n}: a pygeo Metric, so geodesics, curvature
        and samplers work on complex latents."""
        return RealFormMetric(self)


def to_complex(x: torch.Tensor) -> torch.Tensor:
    """x = [Re z, Im z] [..., 2n] real -> z [..., n] complex."""
    n = x.shape[-1] // 2
    return torch.complex(x[..., :n], x[..., n:])


def to_real(z: torch.Tensor) -> torch.Tensor:
    """z [..., n] complex -> x = [Re z, Im z] [..., 2n] real."""
    return torch.cat([z.real, z.imag], dim=-1)


class RealFormMetric(Metric):
    """The real 2n x 2n form of a HermitianMetric on x = [Re z, Im z]:
    G_real(x) = 2 [[Re G, -Im G], [Im G, Re G]] with G = hermitian.metric(Re z + i Im z)."""

    def __init__(self, hermitian: HermitianMetric):
        self.hermitian = hermitian

    @property
    def dim(self) -> Optional[int]:
        """2n, when the Hermitian metric knows its n (samplers start chains from N(0, I) draws of this size)."""
        n = getattr(self.hermitian, "dim", None)
        return 2 * n if isinstance(n, int) else None

    def _complex_point(self, x: torch.Tensor) -> torch.Tensor:
        _checks.real_tensor("x", x, min_dim=1)
        if x.shape[-1] % 2:
            raise ValueError(f"x must have shape [..., 2n] (x = [Re z, Im z]), got an odd last dimension: {tuple(x.shape)}")
        return to_complex(x)

    def metric(self, x: torch.Tensor) -> torch.Tensor:
        G = self.hermitian.metric(self._complex_point(x))
        top = torch.cat([G.real, -G.imag], dim=-1)
        bottom = torch.cat([G.imag, G.real], dim=-1)
        return 2 * torch.cat([top, bottom], dim=-2)

    def metric_and_derivative(self, x: torch.Tensor):
        """(G_real [..., 2n, 2n], dG [..., 2n, 2n, 2n]) with dG[..., k, i, j] = d G_real[i, j] / d x_k.

        Reverse mode over the n^2 real numbers that determine G (Re G_ab for a <= b, Im G_ab for a < b), one backward
        pass each, summed over the batch (points are independent): the fused op has no forward-mode formula (and
        jacfwd through a custom op without one returns zeros instead of failing). Keeps the graph when x requires grad.
        """
        batch_shape, d = x.shape[:-1], x.shape[-1]
        n = d // 2
        flat = x.reshape(-1, d)
        keep_graph = flat.requires_grad
        with torch.enable_grad():
            point = flat if keep_graph else flat.detach().requires_grad_(True)
            G = self.hermitian.metric(self._complex_point(point))  # [B, n, n] complex

            def grad_of(entry):
                return torch.autograd.grad(entry.sum(), point, retain_graph=True, create_graph=keep_graph)[0]  # [B, d]

            zero = torch.zeros_like(flat)
            d_re = [[None] * n for _ in range(n)]
            d_im = [[zero] * n for _ in range(n)]
            for a in range(n):
                for b in range(a, n):
                    d_re[a][b] = d_re[b][a] = grad_of(G[:, a, b].real)
                    if b > a:
                        d_im[a][b] = grad_of(G[:, a, b].imag)
                        d_im[b][a] = -d_im[a][b]
        dR = torch.stack([torch.stack(row, -1) for row in d_re], -2)  # [B, k, a, b]
        dI = torch.stack([torch.stack(row, -1) for row in d_im], -2)
        dG = 2 * torch.cat([torch.cat([dR, -dI], -1), torch.cat([dI, dR], -1)], -2)
        G_real = self.metric(point if keep_graph else flat)
        return G_real.reshape(*batch_shape, d, d), dG.reshape(*batch_shape, d, d, d)

    def log_volume(self, x: torch.Tensor) -> torch.Tensor:
        """1/2 log det G_real = n log 2 + log det G (through the n x n complex Cholesky factor)."""
        n = x.shape[-1] // 2
        return n * math.log(2.0) + self.hermitian.log_volume(self._complex_point(x))


class LSEKahlerMetric(HermitianMetric):
    """Kahler metric of the log-sum-exp potential Psi(z) = T log sum_i pi_i exp((z - c_i)^H P_i (z - c_i) / T).

    G(z) = sum_i p_i P_i + (1/T) (sum_i p_i y_i y_i^H - ybar ybar^H) >= sum_i p_i P_i > 0 (plurisubharmonic potential),
    p = softmax(log pi + u / T), y_i = P_i (z - c_i); computed by the fused op pygeo.ops.lse_kahler_metric.

    Args:
        centers: [K, n] complex.
        precisions: [K, n, n] complex Hermitian positive definite, or [K, n] real positive (diagonal).
        log_weights: [K] real log pi_i, or None for equal weights.
        temperature: T > 0 (small T: close to the max of the quadratics; large T: close to their weighted mean).
        backend: backend of the op ("auto" by default).
    """

    def __init__(self, centers: torch.Tensor, precisions: torch.Tensor, log_weights: Optional[torch.Tensor] = None,
                 temperature: float = 1.0, backend: str = "auto"):
        _backend.check_name(backend)
        _checks.complex_tensor("centers", centers, min_dim=2)
        if centers.dim() != 2 or centers.shape[0] == 0:
            raise ValueError(f"centers must have shape [K, n] with K >= 1, got {tuple(centers.shape)}")
        K, n = centers.shape
        check_precisions(precisions, n)
        if precisions.shape[0] != K:
            raise ValueError(f"precisions must have K={K} components like centers, got shape {tuple(precisions.shape)}")
        if log_weights is not None:
            _checks.real_tensor("log_weights", log_weights, min_dim=1)
            if log_weights.shape != (K,):
                raise ValueError(f"log_weights must have shape [K] with K={K}, got {tuple(log_weights.shape)}")
        temperature = _checks.number("temperature", temperature)
        if not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.centers, self.precisions, self.log_weights = centers, precisions, log_weights
        self.temperature, self.backend = float(temperature), backend

    @property
    def dim(self) -> int:
        return self.centers.shape[-1]

    def metric(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., n] complex (same dtype as centers) -> G [..., n, n] complex Hermitian positive definite."""
        return lse_kahler_metric(z, self.centers, self.precisions, self.log_weights, self.temperature, backend=self.backend)

    def potential(self, z: torch.Tensor) -> torch.Tensor:
        """Psi(z) [...] (real), for checks and plots."""
        _checks.complex_tensor("z", z, min_dim=1)
        diff = z.unsqueeze(-2) - self.centers  # [..., K, n]
        if self.precisions.is_complex():
            y = torch.einsum("kij,...kj->...ki", self.precisions, diff)
        else:
            y = self.precisions * diff
        u = (diff.conj() * y).real.sum(-1)
        log_pi = torch.zeros_like(u) if self.log_weights is None else self.log_weights
        return self.temperature * torch.logsumexp(log_pi + u / self.temperature, dim=-1)


class ComplexGaussianFisherMetric(HermitianMetric):
    """Fisher metric of a complex Gaussian decoder p(x | z) = CN(m(z), sigma^2 I, 0), for any decoder m: C^n -> C^D
    (holomorphic or not), from both Wirtinger Jacobians d_a m = (d_x m - i d_y m)/2 and d_abar m = (d_x m + i d_y m)/2:

        G[a, b] = sum_r (conj(d_a m_r) d_b m_r + conj(d_bbar m_r) d_abar m_r) / sigma_r^2,

    the matrix of h(u, u) = u^H G u, i.e. the conjugate of MATH.md's g[a, b] = (d_b m)^H (d_a m) + (d_abar m)^H (d_bbar m)
    (over sigma^2), which is d_a d_bbar KL(p_z0 || p_z) at z = z0. For holomorphic m, G = J^H J / sigma^2 and
    h(u, u) = |J u|^2 / sigma^2.

    Args:
        decoder: callable z [B, n] complex -> m [B, D] complex (a real output is taken as complex with zero imaginary part).
        sigma: the noise scale, a float > 0 or a real tensor [D] of positive per-output scales.
    The Jacobians come from forward-mode autograd (2n jvps, vmapped when the decoder allows it).
    """

    def __init__(self, decoder: Callable[[torch.Tensor], torch.Tensor], sigma: Union[float, torch.Tensor] = 1.0):
        if not callable(decoder):
            raise TypeError(f"decoder must be callable z -> m, got {type(decoder).__name__}")
        if isinstance(sigma, torch.Tensor):
            _checks.real_tensor("sigma", sigma, min_dim=0)
            if bool((sigma <= 0).any()):
                raise ValueError("sigma must be positive")
        elif not isinstance(sigma, (int, float)) or not (0 < sigma < float("inf")):
            raise ValueError(f"sigma must be a finite number > 0 or a positive tensor [D], got {sigma!r}")
        self.decoder, self.sigma = decoder, sigma

    def wirtinger_jacobians(self, z: torch.Tensor):
        """z [..., n] complex -> (d_z m, d_zbar m), each [..., D, n] complex: [..., r, a] = d_a m_r, d_abar m_r."""
        _checks.complex_tensor("z", z, min_dim=1)
        batch_shape, n = z.shape[:-1], z.shape[-1]
        flat = z.reshape(-1, n)
        real_dtype = flat.real.dtype

        def decode(x_re, x_im):
            m = self.decoder(torch.complex(x_re, x_im))
            return m if m.is_complex() else torch.complex(m, torch.zeros_like(m))

        eye = torch.eye(n, dtype=real_dtype, device=z.device)
        zeros = torch.zeros(n, n, dtype=real_dtype, device=z.device)
        tangents_re = torch.cat([eye, zeros]).unsqueeze(1).expand(2 * n, flat.shape[0], n)  # d_x directions, then d_y
        tangents_im = torch.cat([zeros, eye]).unsqueeze(1).expand(2 * n, flat.shape[0], n)

        def directional(t_re, t_im):
            return torch.func.jvp(decode, (flat.real, flat.imag), (t_re, t_im))[1]

        try:
            columns = torch.func.vmap(directional)(tangents_re, tangents_im)  # [2n, B, D]
        except Exception:  # decoders that vmap cannot batch (data-dependent control flow, custom ops)
            columns = torch.stack([directional(a, b) for a, b in zip(tangents_re, tangents_im)])
        d_x, d_y = columns[:n].permute(1, 2, 0), columns[n:].permute(1, 2, 0)  # [B, D, n]
        d_z, d_zbar = (d_x - 1j * d_y) / 2, (d_x + 1j * d_y) / 2
        D = d_z.shape[1]
        return d_z.reshape(*batch_shape, D, n), d_zbar.reshape(*batch_shape, D, n)

    def metric(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., n] complex -> G [..., n, n] complex Hermitian (positive semi-definite; definite where m is immersive)."""
        d_z, d_zbar = self.wirtinger_jacobians(z)
        inv_var = 1.0 / self.sigma ** 2
        if isinstance(inv_var, torch.Tensor) and inv_var.dim():
            D = d_z.shape[-2]
            if inv_var.shape != (D,) and inv_var.numel() != 1:
                raise ValueError(f"sigma must be a float or a tensor [D] with D={D} (the decoder's output size), got "
                                 f"shape {tuple(self.sigma.shape)}")
            inv_var = inv_var.reshape(-1, 1)  # [D, 1] over the rows of the Jacobians
        G = d_z.mH @ (inv_var * d_z) + d_zbar.transpose(-1, -2) @ (inv_var * d_zbar.conj())
        # z was checked finite: NaN/Inf here means the decoder's Jacobians or J^H J / sigma^2 overflow the dtype.
        _checks.finite_points(G.reshape(-1, *G.shape[-2:]), "ComplexGaussianFisherMetric: G",
                              f"the decoder's Jacobians or J^H J / sigma^2 overflow {z.dtype} (z or the decoder's "
                              "outputs too large, or sigma too small; complex128 extends the range)")
        return hermitian_part(G)
