"""PullbackMetric: the Fisher / pullback metric of a decoder, G(z) = J^T F J (MATH.md section 1).

The Jacobian is computed in forward mode, never by reverse mode over the D outputs: for an nn.Sequential of known
layers (conv, transposed conv, upsampling, norms, activations) the d basis tangents go through the layers as extra
batch rows (pygeo.metrics._forward_tangents), for any other decoder by d Jacobian-vector products, vmapped; both in
chunks of points under max_memory. The weighted Gram reduction runs in pygeo.ops.jtj (the categorical likelihood's in
a few GEMMs, PullbackMetric._gram). MLP decoders with the euclidean, gaussian and bernoulli likelihoods go through the
fused op pygeo.ops.mlp_metric instead, which never materialises J.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Callable, Optional, Union

import torch

from .. import _backend, _checks, _linalg
from ..ops.jtj import jtj
from ..ops.mlp_metric import MLPDecoder, mlp_metric
from . import _forward_tangents
from .base import Metric, value_and_gradient

LIKELIHOODS = ("euclidean", "gaussian", "bernoulli", "categorical", "poisson")
# The likelihoods whose Fisher weight is one number per output (the fused op pygeo.ops.mlp_metric knows these three).
_FUSED_LIKELIHOODS = ("euclidean", "gaussian", "bernoulli")
DEFAULT_MAX_MEMORY = 256 * 2 ** 20
# The two metrics of a decoder returning (mean, std) (docs/MATH.md section 1): "fisher", the Fisher information of
# N(mean, diag(std^2)), and "expected", the Euclidean pullback of (mean, std), the expected metric of a decoder with
# observation noise (Arvanitidis, Hansen & Hauberg, ICLR 2018).
STD_FORMS = ("fisher", "expected")


class PullbackMetric(Metric):
    """G(z) = J(z)^T F J(z), the metric a decoder z [B, d] -> output [B, ...] pulls back from its output distribution.

    Args:
        decoder: nn.Module or callable z [B, d] -> output [B, ...] (trailing dims are flattened to D). With
            likelihood="gaussian" and sigma=None it must return a pair (mean [B, ...], std [B, ...]). A decoder that
            returns a Mapping or an object (pythae's ModelOutput) is read through `output_key`.
        likelihood:
            "euclidean":  G = J^T J (plain pullback of R^D).
            "gaussian":   with sigma (a float, or a tensor of D elements / of the output's trailing shape):
                          G = J^T diag(1/sigma^2) J; with sigma=None the decoder returns (mean, std) and `form`
                          says which metric:
                            form="fisher" (default): the Fisher information of N(mean, diag(std^2)),
                                G = J_mean^T diag(1/std^2) J_mean + 2 J_logstd^T J_logstd;
                            form="expected": the expected metric of a decoder with observation noise ("latent space
                                oddity"), G = J_mean^T J_mean + J_std^T J_std: the std term is large where the std
                                rises, away from the data (pygeo.models.UncertaintyDecoder).
            "bernoulli":  the decoder returns logits l; G = J_l^T diag(p (1 - p)) J_l, p = sigmoid(l) clamped into
                          [eps, 1 - eps] (so that saturated outputs keep G positive definite).
            "categorical": the decoder returns logits l [B, ..., C], the C >= 2 categories on the last dim, one
                          distribution per position; p = softmax(l) over the last dim and
                          G = sum over positions J_l^T (diag p - p p^T) J_l, computed as Gram reductions of J (no
                          C x C matrix is formed). p is clamped into [eps, 1 - eps] in the flat coordinates
                          2 sqrt(p) and, consistently, in G (docs/MATH.md "Categorical"): G is the exact Fisher
                          metric wherever every p lies in [eps, 1 - eps].
            "poisson":    the decoder returns log-rates l; G = J_l^T diag(exp l) J_l.
        sigma: the fixed standard deviation of the gaussian likelihood (only there).
        eps: the clamp of the Bernoulli and categorical probabilities.
        backend: "auto", "torch", "cpp", "cuda" or "triton" for the kernels (pygeo.ops.jtj / pygeo.ops.mlp_metric).
        form: "fisher" or "expected", only for likelihood="gaussian" with sigma=None (see above).
        output_key: None (the decoder returns the tensor, or the (mean, std) pair, itself) or the key / attribute of
            the decoder's output that holds it: a Mapping is indexed (output[output_key]), any other object read as an
            attribute (pythae decoders: output_key="reconstruction").
        max_memory: bytes (default 256 MiB; None = no limit) that the Jacobian and its tangents may take on the
            generic forward-mode path: the batch goes through in chunks of points whose d tangents of the widest
            layer (found once from one point) fit the budget. Results equal one call up to rounding (a layer may
            pick another kernel for another batch size). It does not bound the decoder's own value pass.

    Decoders that are an nn.Sequential of nn.Linear and elementwise activations (ReLU, LeakyReLU, ELU, SiLU, Softplus,
    Tanh, Sigmoid, Identity) use the fused op pygeo.ops.mlp_metric for `metric(z)` (and so for `log_volume(z)`) with
    the euclidean, gaussian and bernoulli likelihoods. Other nn.Sequential decoders (nested ones too) built of Linear,
    Conv*d, ConvTranspose*d, eval-mode BatchNorm, LayerNorm, Flatten, Unflatten, Upsample, Identity, eval-mode Dropout
    and elementwise activations, and MLPs with the categorical and poisson likelihoods, push the d basis tangents
    through the layers as extra batch rows (one batched call per layer, activation slopes from the value pass); any
    other decoder, and the learned-std gaussian, goes through vmap(jvp). All give the same G.
    The expected form has a fused path too, for a decoder with a `mean` attribute that is such an MLP and a method
    `std_and_jacobian(z) -> (std [B, D], d std / dz [B, D, d])` (pygeo.models.UncertaintyDecoder): J_mean^T J_mean by
    pygeo.ops.mlp_metric plus J_std^T J_std from the closed-form std Jacobian.

    Raises (at call time): ValueError when a BatchNorm or Dropout module of the decoder is in training mode (call
    decoder.eval(): a metric must not depend on the batch or on random masks), when the decoder's output does not
    match the likelihood (shape, missing output_key, NaN / Inf, a non-positive std), TypeError for a dtype mismatch.
    """

    def __init__(self, decoder: Callable[[torch.Tensor], object], likelihood: str = "euclidean",
                 sigma: Optional[Union[float, torch.Tensor]] = None, eps: float = 1e-6, backend: str = "auto",
                 form: str = "fisher", output_key: Optional[str] = None,
                 max_memory: Optional[int] = DEFAULT_MAX_MEMORY):
        if not callable(decoder):
            raise TypeError(f"decoder must be an nn.Module or a callable z -> output, got {type(decoder).__name__}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if sigma is not None and likelihood != "gaussian":
            raise ValueError(f"sigma is only used by likelihood='gaussian', got sigma with likelihood={likelihood!r}")
        if not (isinstance(eps, (int, float)) and 0.0 < eps < 0.5):
            raise ValueError(f"eps must be a float in (0, 0.5), got {eps!r}")
        _backend.check_name(backend)
        self.decoder = decoder
        self.likelihood = likelihood
        self.eps = float(eps)
        self.backend = backend
        self.sigma = _check_sigma(sigma) if sigma is not None else None
        self.learned_std = likelihood == "gaussian" and sigma is None
        if form not in STD_FORMS:
            raise ValueError(f"form must be one of {STD_FORMS}, got {form!r}")
        if form != "fisher" and not self.learned_std:
            raise ValueError(f"form={form!r} applies to likelihood='gaussian' with sigma=None (a decoder returning "
                             f"(mean, std)), got likelihood={likelihood!r}" + (" with a fixed sigma" if sigma is not None
                                                                               else ""))
        self.form = form
        if output_key is not None and not isinstance(output_key, str):
            raise TypeError(f"output_key must be None or a str (a key / attribute of the decoder's output), got "
                            f"{type(output_key).__name__}")
        self.output_key = output_key
        if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, numbers.Real)
                                       or not math.isfinite(max_memory) or max_memory <= 0):
            raise ValueError(f"max_memory must be None (no limit) or a positive number of bytes, got {max_memory!r}")
        self.max_memory = None if max_memory is None else int(max_memory)
        self._widest = {}  # (d, dtype, device) -> elements per point of the widest layer output (chunk sizing)
        self._categories = None  # C of the categorical likelihood, read from the decoder's output shape
        self._mlp = None if self.learned_std or output_key is not None else MLPDecoder.recognise(decoder)
        self._layers = None if self.learned_std or output_key is not None else \
            _forward_tangents.sequential_layers(decoder)
        # The expected form's fused path: the decoder's mean MLP and its closed-form std Jacobian.
        self._mean_mlp = None
        if form == "expected" and callable(getattr(decoder, "std_and_jacobian", None)):
            self._mean_mlp = MLPDecoder.recognise(getattr(decoder, "mean", None))

    @property
    def has_flat_coordinates(self) -> bool:
        """True when flat_coordinates(z) exists (every case but the Fisher form of the gaussian with a learned std)."""
        return not self.learned_std or self.form == "expected"

    # ----------------------------------------------------------------------------------------------- the contract
    def metric(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., d] -> G [..., d, d], differentiable in z."""
        return self._metric(z, detach_parameters=False)

    def log_volume_and_grad(self, z: torch.Tensor):
        """z [..., d] -> (1/2 log det G [...], its gradient in z [..., d]), detached (for samplers). For an MLP decoder
        the fused op sees detached weights, so its backward differentiates z alone: a backward of log_volume through
        a trainable decoder would also build the weights' gradients, which cost as much as z's and are thrown away."""
        def log_volume(point):
            G = self._metric(point, detach_parameters=True)
            return _linalg.half_log_det(G, name="PullbackMetric.metric(z)")

        return value_and_gradient(log_volume, z, refuse_lost_gradient=True)  # as Metric.log_volume_and_grad

    def _metric(self, z: torch.Tensor, detach_parameters: bool) -> torch.Tensor:
        flat, batch_shape = self._flatten(z)
        mlp = self._fused_mlp(flat) if self.likelihood in _FUSED_LIKELIHOODS else None
        mean_mlp = self._fused_mean_mlp(flat)
        if mean_mlp is not None:
            G = self._fused_expected_metric(flat, mean_mlp, detach_parameters)
        elif mlp is not None:
            def parameter(tensor):
                return tensor.detach() if detach_parameters and tensor is not None else tensor

            G = mlp_metric(flat, [parameter(W) for W in mlp.weights], [parameter(b) for b in mlp.biases],
                           mlp.activations, likelihood=self.likelihood,
                           sigma=parameter(self._sigma_for(flat, mlp.out_features)), eps=self.eps, backend=self.backend)
        else:
            G = self._in_chunks(flat, flat.shape[-1], lambda part: (self._gram(*self._rows_and_tangents(part)),))[0]
        return G.reshape(*batch_shape, *G.shape[-2:])

    def metric_and_derivative(self, z: torch.Tensor):
        """(G [..., d, d], dG [..., d, d, d]) with dG[..., k, i, j] = d G[i, j] / d z_k.

        Forward over forward mode: the d(d+1)/2 second directional derivatives f''[e_k, e_i] give
        dG[k] = H[k]^T W J + J^T W H[k] + J^T diag(dw/dz_k) J (the last term for the point-dependent Bernoulli,
        poisson and learned-std weights). The categorical likelihood, whose weight is not diagonal, differentiates its
        flat coordinates instead: dG[k] = H_phi[k]^T J_phi + J_phi^T H_phi[k]. The batch goes through in chunks
        under max_memory (the second tangents count d(d+1)/2 per point).
        """
        flat, batch_shape = self._flatten(z)
        d = flat.shape[-1]
        mlp = self._fused_mlp(flat) if self.likelihood != "categorical" else None
        if mlp is not None and mlp.activation_modules[-1] is None:  # the output layer is linear
            G, dG = self._mlp_metric_and_derivative(flat)
            return G.reshape(*batch_shape, d, d), dG.reshape(*batch_shape, d, d, d)
        G, dG = self._in_chunks(flat, d * (d + 3) // 2, self._generic_metric_and_derivative)
        return G.reshape(*batch_shape, d, d), dG.reshape(*batch_shape, d, d, d)

    def _generic_metric_and_derivative(self, flat: torch.Tensor):
        if self.likelihood == "categorical":
            _, J, H = self._rows_jacobian_hessian(flat, lambda point: self._phi_of_rows(self._decode(point)))
            G = jtj(J, None, backend=self.backend)
            half = torch.einsum("brki,brj->bkij", H, J)
            return G, half + half.transpose(-1, -2)
        rows, J, H = self._rows_jacobian_hessian(flat)  # [B, R], [B, R, d], [B, R, d(k), d(i)]
        weight = self._weight(rows)
        G = jtj(J, weight, backend=self.backend)
        WJ = J if weight is None else J * weight.unsqueeze(-1)
        half = torch.einsum("brki,brj->bkij", H, WJ)
        dG = half + half.transpose(-1, -2)
        return G, dG + self._weight_derivative_term(rows, J)

    def _fused_mean_mlp(self, flat: torch.Tensor) -> Optional[MLPDecoder]:
        """The mean MLP of a (mean, std) decoder where the expected form's fused path applies, else None (same
        conditions as _fused_mlp)."""
        mlp = self._mean_mlp
        if mlp is None or mlp.hooked() or _backend.under_function_transform(flat):
            return None
        return mlp

    def _fused_expected_metric(self, flat: torch.Tensor, mean_mlp: MLPDecoder, detach_parameters: bool) -> torch.Tensor:
        """G = J_mean^T J_mean + J_std^T J_std [B, d, d]: the mean part fused (pygeo.ops.mlp_metric, J_mean never
        materialised), the std part from the decoder's closed-form std Jacobian [B, D, d] (pygeo.ops.jtj)."""
        def parameter(tensor):
            return tensor.detach() if detach_parameters and tensor is not None else tensor

        G = mlp_metric(flat, [parameter(W) for W in mean_mlp.weights], [parameter(b) for b in mean_mlp.biases],
                       mean_mlp.activations, likelihood="euclidean", eps=self.eps, backend=self.backend)
        std, std_jacobian = self.decoder.std_and_jacobian(flat)
        if not (isinstance(std, torch.Tensor) and isinstance(std_jacobian, torch.Tensor) and std.dim() == 2
                and std.shape[0] == flat.shape[0] and std_jacobian.shape == (*std.shape, flat.shape[-1])):
            raise ValueError(f"decoder.std_and_jacobian(z) must return (std [B, D], d std / dz [B, D, d]) for z of shape "
                             f"{tuple(flat.shape)}, got {_describe_output(std)} and {_describe_output(std_jacobian)}")
        if not _checks._is_fake(std):
            if std.numel() and not (_checks.all_finite(std) and _checks.all_finite(std_jacobian)):
                raise ValueError("decoder std or its Jacobian contains NaN or Inf values")
            if not bool((std > 0).all()):
                raise ValueError("decoder std must be positive everywhere (likelihood='gaussian', sigma=None)")
        return G + jtj(std_jacobian.contiguous(), None, backend=self.backend)

    def _fused_mlp(self, flat: torch.Tensor) -> Optional[MLPDecoder]:
        """The decoder's MLP structure where the fused paths apply, else None (the generic path): not for a decoder
        with hooks (the fused paths would bypass them), nor inside a torch.func transform (they are written for
        plain tensors)."""
        mlp = self._mlp
        if mlp is None or mlp.hooked() or _backend.under_function_transform(flat):
            return None
        return mlp

    def _mlp_metric_and_derivative(self, flat: torch.Tensor):
        """G [B, d, d] and dG [B, d, d, d] of an MLP decoder whose last layer is linear (rows = W a + b).

        First and second forward-mode tangents, kept as rows T [B, d, n] and S [B, d, d, n] (S[k, i] = d^2 a / dz_k dz_i),
        go through the hidden layers only, each layer one matrix product for all of them (h = W a + b: U = T W^T,
        V = S W^T; a = s(h): T = s'(h) U, S_ki = s''(h) U_k U_i + s'(h) V_ki). With J = W_L T and H_k = W_L S_k at
        the output, J^T diag(w) H_k = Q^T S_k for Q = W_L^T diag(w) J [B, n, d]: the D-wide last layer is crossed by
        the d columns of J, not by the d^2 second derivatives that the generic path pushes through the whole decoder.
        """
        # The second tangents take d^2 n numbers per point: points go through in chunks of at most 2^25 of them.
        d = flat.shape[-1]
        width = max(linear.out_features for linear in self._mlp.linears[:-1]) if len(self._mlp.linears) > 1 else 1
        chunk = max(1, (1 << 25) // (d * d * width))
        if flat.shape[0] > chunk:
            parts = [self._mlp_metric_and_derivative(part) for part in flat.split(chunk)]
            return torch.cat([G for G, _ in parts]), torch.cat([dG for _, dG in parts])
        mlp = self._mlp
        B = flat.shape[0]
        a = flat
        T = torch.eye(d, dtype=flat.dtype, device=flat.device).expand(B, d, d)
        S = None  # second tangents; zero entering the first layer
        for linear, activation in zip(mlp.linears[:-1], mlp.activation_modules[:-1]):
            h = linear(a)
            n = h.shape[-1]
            U = (T.reshape(-1, T.shape[-1]) @ linear.weight.t()).reshape(B, d, n)
            V = None if S is None else (S.reshape(-1, S.shape[-1]) @ linear.weight.t()).reshape(B, d, d, n)
            if activation is None:
                a, T, S = h, U, V
                continue
            a, slope, curvature = _elementwise_jet(activation, h)
            T = slope.unsqueeze(1) * U
            S_new = U.unsqueeze(2) * (curvature.unsqueeze(1) * U).unsqueeze(1)  # two passes over S, not four
            S = S_new if V is None else torch.addcmul(S_new, slope[:, None, None, :], V)
        last = mlp.linears[-1]
        rows = last(a)
        self._check_rows(rows)
        J_rows = (T.reshape(-1, T.shape[-1]) @ last.weight.t()).reshape(B, d, last.out_features)  # [B, d, D]
        J = J_rows.transpose(1, 2)
        weight = self._weight(rows)
        G = jtj(J.contiguous(), weight, backend=self.backend)
        dG = flat.new_zeros(B, d, d, d)
        if S is not None:
            weighted = J_rows if weight is None else J_rows * weight.unsqueeze(-2)
            Q = torch.matmul(weighted, last.weight).transpose(1, 2)  # [B, n, d]
            half = torch.bmm(S.reshape(B, d * d, S.shape[-1]), Q).reshape(B, d, d, d)  # sum_m S[k, i, m] Q[m, j]
            dG = half + half.transpose(-1, -2)
        return G, dG + self._weight_derivative_term(rows, J)

    def _fused_geodesic_acceleration(self, z: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
        """-Gamma(z)[v, v] = -G^-1 J^T W f''[v, v] [B, d] for z, v [B, d] (MATH.md section 3), or None where this path
        does not apply: it needs an MLP decoder with a linear output layer and a constant Fisher weight W (euclidean,
        gaussian with a fixed sigma). The d basis tangents, the tangent v and the second tangent along (v, v) go
        through the hidden layers together, one GEMM per layer, instead of forward-mode AD over forward-mode AD of
        the decoder (whose per-operation overhead dominates at sampler and solver batch sizes)."""
        mlp = self._fused_mlp(z)
        if mlp is None or mlp.activation_modules[-1] is not None or self.likelihood in ("bernoulli", "categorical",
                                                                                          "poisson"):
            return None
        B, d = z.shape
        a = z
        basis = torch.eye(d, dtype=z.dtype, device=z.device).expand(B, d, d)
        rows = torch.cat([basis, v.unsqueeze(1)], 1)  # [B, d + 1, n]: the tangents e_1 .. e_d and v, as rows
        second = torch.zeros_like(v)  # d^2 a / dt^2 along z + t v; zero entering the first layer
        for linear, activation in zip(mlp.linears[:-1], mlp.activation_modules[:-1]):
            h = linear(a)
            rows = (rows.reshape(-1, rows.shape[-1]) @ linear.weight.t()).reshape(B, d + 1, linear.out_features)
            second = second @ linear.weight.t()
            if activation is None:
                a = h
                continue
            a, slope, curvature = _elementwise_jet(activation, h)
            second = curvature * rows[:, d] * rows[:, d] + slope * second
            rows = slope.unsqueeze(1) * rows
        last = mlp.linears[-1]
        output = last(a)
        self._check_rows(output)
        J_rows = (rows[:, :d].reshape(-1, rows.shape[-1]) @ last.weight.t()).reshape(B, d, last.out_features)
        f_second = second @ last.weight.t()  # [B, D]
        weight = self._weight(output)
        weighted = J_rows if weight is None else J_rows * weight.unsqueeze(-2)
        G = weighted @ J_rows.transpose(1, 2)
        rhs = weighted @ f_second.unsqueeze(-1)
        return -torch.cholesky_solve(rhs, _linalg.cholesky(G, "metric(z)")).squeeze(-1)

    def _weight_derivative_term(self, rows: torch.Tensor, J: torch.Tensor):
        """J^T diag(d weight / d z_k) J [B, d, d, d] for the point-dependent weights, else 0."""
        weight_derivative = self._weight_derivative(rows, J)  # [B, R, d] or None
        if weight_derivative is None:
            return 0
        return torch.einsum("brk,bri,brj->bkij", weight_derivative, J, J)

    def flat_coordinates(self, z: torch.Tensor) -> torch.Tensor:
        """phi(z) [..., D] with G(z) = J_phi^T J_phi exactly (MATH.md section 1 table).

        euclidean: phi = f; gaussian with fixed sigma: phi = f / sigma; gaussian with a learned std and
        form="expected": phi = (mean, std) [..., 2D]; bernoulli (logits l): phi = 2 arcsin sqrt(p),
        computed as 2 atan(exp(l / 2)), and continued linearly with slope sqrt(eps (1 - eps)) where p is clamped, so
        that d phi / d l = sqrt(p (1 - p)) with the same clamped p as metric(z); poisson (log-rates l):
        phi = 2 exp(l / 2); categorical (logits [..., C]): phi = 2 sqrt(p), the embedding of the simplex in the sphere
        of radius 2, with p = softmax(l) clamped into q = [eps, 1 - eps] and phi continued linearly in p beyond the
        clamp (phi = 2 sqrt(q) + (p - q) / sqrt(q)), so that d phi / d l = diag(1/sqrt q) (diag p - p p^T) as in
        metric(z). Raises NotImplementedError for the Fisher form of the gaussian with a learned std, which has no
        flat coordinates.
        """
        if not self.has_flat_coordinates:
            raise NotImplementedError("the Fisher form of the gaussian likelihood with a learned std (sigma=None) has no "
                                      "flat coordinates; use metric(z) / metric_and_derivative(z)")
        flat, batch_shape = self._flatten(z)
        phi = self._phi_of_rows(self._decode(flat))
        return phi.reshape(*batch_shape, phi.shape[-1])

    def _phi_of_rows(self, output: torch.Tensor) -> torch.Tensor:
        """The flat coordinates as a function of the decoder's output rows [B, R] -> phi [B, R] (flat_coordinates
        without the decoder; pygeo.geometry.distances uses it on rows it has decoded already)."""
        self._check_rows(output)
        if self.learned_std or self.likelihood == "euclidean":  # the expected form: the rows (mean, std) themselves
            return output
        if self.likelihood == "gaussian":
            return output / self._sigma_for(output, output.shape[-1])
        if self.likelihood == "poisson":
            return 2.0 * torch.exp(0.5 * output)
        if self.likelihood == "categorical":
            p, q = self._categorical_probabilities(output)
            root = q.sqrt()
            return (2.0 * root + (p - q) / root).reshape(output.shape)
        lo = math.log(self.eps) - math.log1p(-self.eps)  # logit(eps)
        inside = output.clamp(lo, -lo)
        return 2.0 * torch.atan(torch.exp(0.5 * inside)) + math.sqrt(self.eps * (1 - self.eps)) * (output - inside)

    def _phi_and_tangents_of_rows(self, output: torch.Tensor, Jt: torch.Tensor):
        """(phi [B, R], its tangents J_phi^T [B, d, R]) from the output rows [B, R] and their tangents Jt [B, d, R]
        (Jt[:, i] = d rows / d z_i), in closed form: d phi / d rows is sqrt(w) elementwise for the diagonal Fisher
        weights w, and diag(1/sqrt q) (diag p - p p^T) per position for the categorical likelihood."""
        phi = self._phi_of_rows(output)
        if self.likelihood == "categorical":
            B, d = Jt.shape[:2]
            C = self._categories
            p, q = self._categorical_probabilities(output)  # [B, P, C]
            t = Jt.reshape(B, d, Jt.shape[-1] // C, C)
            dp = p.unsqueeze(1) * (t - (p.unsqueeze(1) * t).sum(-1, keepdim=True))
            return phi, (dp / q.sqrt().unsqueeze(1)).reshape(Jt.shape)
        weight = self._weight(output)
        if weight is not None:
            Jt = Jt * weight.sqrt().unsqueeze(-2)  # [B, R] or [R] against [B, d, R]
        return phi, Jt

    def _categorical_probabilities(self, output: torch.Tensor):
        """(p, q) [B, P, C] from logit rows [B, P C]: p = softmax over the categories, q = p clamped into
        [eps, 1 - eps]."""
        # the positions P spelled out: reshape cannot infer them from 0 points (B = 0)
        C = self._categories
        logits = output.reshape(output.shape[0], output.shape[-1] // C, C)
        p = torch.softmax(logits, dim=-1)
        return p, p.clamp(self.eps, 1 - self.eps)

    def _gram(self, rows: torch.Tensor, Jt: torch.Tensor) -> torch.Tensor:
        """G [B, d, d] from the output rows [B, R] and their tangents Jt [B, d, R] (Jt[:, i] = d rows / d z_i).

        Categorical (MATH.md "Categorical"): with r = p / q (1 where the clamp is inactive), per position
        u = J^T p, v = J^T (p r), s = sum p r: G = J^T diag(p r) J - u v^T - v u^T + s u u^T, which is
        J_phi^T J_phi of the flat coordinates and J^T (diag p - p p^T) J when no clamp is active; a few GEMMs over
        [B, d, P] and [B, d, P C], never a C x C matrix."""
        if self.likelihood != "categorical":
            return jtj(Jt.transpose(1, 2), self._weight(rows), backend=self.backend)
        B, d = Jt.shape[:2]
        p, q = self._categorical_probabilities(rows)
        t = Jt.reshape(B, d, Jt.shape[-1] // self._categories, self._categories)  # [B, d, P, C]
        G = torch.bmm(Jt * p.reshape(B, 1, Jt.shape[-1]), Jt.transpose(1, 2)) if bool((p == q).all()) else None
        if G is not None:  # no clamp active: r = 1, v = u, s = 1
            u = torch.matmul(t.transpose(1, 2), p.unsqueeze(-1)).squeeze(-1).transpose(1, 2)  # [B, d, P]
            G = G - torch.bmm(u, u.transpose(1, 2))
        else:
            pr = p * p / q
            # u = J^T p and v = J^T (p r) in one pass over J: [B, P, d, C] @ [B, P, C, 2]
            uv = torch.matmul(t.transpose(1, 2), torch.stack([p, pr], -1)).permute(0, 3, 2, 1)  # [B, 2, d, P]
            u, v = uv[:, 0], uv[:, 1]
            s = pr.sum(-1)  # [B, P]
            G = torch.bmm(Jt * pr.reshape(B, 1, Jt.shape[-1]), Jt.transpose(1, 2))
            cross = torch.bmm(v, u.transpose(1, 2))
            G = G - cross - cross.transpose(1, 2) + torch.bmm(u * s.unsqueeze(1), u.transpose(1, 2))
        return 0.5 * (G + G.transpose(1, 2))  # exactly symmetric (two GEMM orders need not round alike)

    # --------------------------------------------------------------------------------------------------- helpers
    def _flatten(self, z: torch.Tensor):
        _checks.real_tensor("z", z, min_dim=1)
        if z.shape[-1] == 0:
            raise ValueError(f"z must have shape [..., d] with d >= 1, got {tuple(z.shape)}")
        parameter = next(self.decoder.parameters(), None) if isinstance(self.decoder, torch.nn.Module) else None
        if parameter is not None and parameter.is_floating_point() and parameter.dtype != z.dtype:
            raise TypeError(f"z has dtype {z.dtype} but the decoder's parameters are {parameter.dtype}: convert z "
                            f"(z.to({parameter.dtype})) or the decoder (decoder.to({z.dtype}))")
        _refuse_training_mode(self.decoder)
        mlp = self._mlp if self._mlp is not None else self._mean_mlp
        if mlp is not None and z.shape[-1] != mlp.in_features:
            raise ValueError(f"z must have shape [..., {mlp.in_features}] (the decoder's input width), "
                             f"got {tuple(z.shape)}")
        return z.reshape(-1, z.shape[-1]), z.shape[:-1]

    def _decode(self, flat: torch.Tensor) -> torch.Tensor:
        """The decoder's output(s) flattened to rows [B, R]: R = D, or 2D (mean then std) for the learned-std gaussian."""
        if _backend.under_function_transform(flat):  # second-order forward mode: exact norms (ComposedNorms)
            with _forward_tangents.ComposedNorms():
                output = self.decoder(flat)
        else:
            output = self.decoder(flat)
        return self._rows_of_output(output, flat.shape[0])

    def _select_output(self, output):
        """The decoder's output itself, or its `output_key` entry / attribute."""
        key = self.output_key
        if key is None:
            if isinstance(output, Mapping) or (not isinstance(output, (torch.Tensor, tuple, list))
                                               and hasattr(output, "__dict__")):
                raise ValueError(f"the decoder returned {_describe_output(output)}: pass output_key=... to say which "
                                 f"entry holds the output (pythae decoders: output_key='reconstruction')")
            return output
        if isinstance(output, Mapping):
            if key not in output:
                raise ValueError(f"output_key={key!r} is not a key of the decoder's output (keys: {list(output.keys())})")
            return output[key]
        if isinstance(output, torch.Tensor) or not hasattr(output, key):
            raise ValueError(f"output_key={key!r}: the decoder returned {_describe_output(output)}, which has no key or "
                             f"attribute {key!r}")
        return getattr(output, key)

    def _rows_of_output(self, output, B: int) -> torch.Tensor:
        """The (selected) decoder output checked against the likelihood and flattened to rows [B, R]."""
        output = self._select_output(output)
        if self.learned_std:
            if not (isinstance(output, (tuple, list)) and len(output) == 2):
                raise ValueError("likelihood='gaussian' with sigma=None needs a decoder returning (mean, std); got "
                                 f"{_describe_output(output)} (pass sigma=... for a fixed standard deviation)")
            mean, std = output
            for name, value in (("mean", mean), ("std", std)):
                if not isinstance(value, torch.Tensor) or value.dim() < 1 or value.shape[0] != B:
                    raise ValueError(f"decoder {name} must be a tensor [B, ...] with B={B}, got {_describe_output(value)}")
            if mean.shape != std.shape:
                raise ValueError(f"decoder mean and std must have the same shape, got {tuple(mean.shape)} and {tuple(std.shape)}")
            return torch.cat([_rows_of(mean), _rows_of(std)], dim=-1)
        if not isinstance(output, torch.Tensor):
            extra = " (a decoder returning (mean, std) needs likelihood='gaussian' with sigma=None)" \
                if isinstance(output, (tuple, list)) else ""
            raise ValueError(f"decoder must return a tensor [B, ...] for likelihood={self.likelihood!r}, got "
                             f"{_describe_output(output)}{extra}")
        if output.dim() < 1 or output.shape[0] != B:
            raise ValueError(f"decoder must return a tensor [B, ...] with B={B}, got shape {tuple(output.shape)}")
        if self.likelihood == "categorical":
            if output.dim() < 2 or output.shape[-1] < 2:
                raise ValueError(f"likelihood='categorical' needs logits [B, ..., C] with the C >= 2 categories on the "
                                 f"last dim, got shape {tuple(output.shape)}")
            self._categories = output.shape[-1]
        return _rows_of(output)

    def _rows_and_tangents(self, flat: torch.Tensor):
        """rows [B, R] and their tangents Jt [B, d, R] (Jt[:, i] = d rows / d z_i): pushed through the layers as extra
        batch rows for a recognised nn.Sequential (pygeo.metrics._forward_tangents), else by d forward-mode jvps,
        vmapped over the basis tangents."""
        layers = self._tangent_layers(flat)
        if layers is None:
            rows, J = self._rows_and_jacobian(flat)
            return rows, J.transpose(1, 2)
        output, tangents = _forward_tangents.value_and_tangents(layers, flat)
        rows = self._rows_of_output(output, flat.shape[0])
        self._check_rows(rows)
        return rows, tangents.reshape(*tangents.shape[:2], rows.shape[-1])

    def _tangent_layers(self, flat: torch.Tensor):
        """The decoder's layers where the tangent-rows path applies, else None: not with hooks (it would bypass
        them), nor inside a torch.func transform (it is written for plain tensors)."""
        if self._layers is None or _forward_tangents.hooked(self.decoder) or _backend.under_function_transform(flat):
            return None
        return self._layers

    def _in_chunks(self, flat: torch.Tensor, n_tangents: int, fn):
        """fn(part) -> tuple of tensors [b, ...] over chunks of the points flat [B, d], concatenated: each chunk's
        n_tangents tangents of the widest layer output (and the working copies of a layer step, counted as 3) fit
        max_memory. One chunk without a budget, for B <= 1, and inside torch.func transforms."""
        B = flat.shape[0]
        if self.max_memory is None or B <= 1 or _backend.under_function_transform(flat):
            return fn(flat)
        per_point = 3 * (n_tangents + 1) * self._widest_row(flat) * flat.element_size()
        chunk = max(1, self.max_memory // per_point)
        if chunk >= B:
            return fn(flat)
        parts = [fn(part) for part in flat.split(chunk)]
        return tuple(torch.cat(pieces) for pieces in zip(*parts))

    def _widest_row(self, flat: torch.Tensor) -> int:
        """Elements per point of the decoder's widest layer output (its output included), measured once per
        (d, dtype, device) from one point: forward hooks on the submodules of an nn.Module, the output alone for other
        callables."""
        key = (flat.shape[-1], flat.dtype, flat.device)
        if key not in self._widest:
            point = flat[:1].detach()
            widest = [point[0].numel()]

            def record(module, inputs, output):
                if isinstance(output, torch.Tensor) and output.dim() >= 1 and output.shape[0] == 1:
                    widest.append(output[0].numel())

            handles = []
            if isinstance(self.decoder, torch.nn.Module):
                handles = [m.register_forward_hook(record) for m in self.decoder.modules()]
            try:
                with torch.no_grad():
                    widest.append(self._decode(point).shape[-1])
            finally:
                for handle in handles:
                    handle.remove()
            self._widest[key] = max(widest)
        return self._widest[key]

    def _rows_and_jacobian(self, flat: torch.Tensor):
        """rows [B, R] and J [B, R, d] by d forward-mode jvps, vmapped over the basis tangents."""
        B, d = flat.shape
        basis = torch.eye(d, dtype=flat.dtype, device=flat.device).unsqueeze(1).expand(d, B, d)
        rows, columns = _over_tangents(lambda tangent: torch.func.jvp(self._decode, (flat,), (tangent,)), basis)
        self._check_rows(rows)
        return rows, columns.permute(1, 2, 0)

    def _rows_jacobian_hessian(self, flat: torch.Tensor, function=None):
        """rows [B, R], J [B, R, d], H [B, R, d, d] (H[..., k, i] = d^2 rows / dz_k dz_i) from the d(d+1)/2 second
        directional derivatives (jvp of jvp over the pairs k <= i); rows = function(z) (default: the decoded rows)."""
        function = self._decode if function is None else function
        B, d = flat.shape
        pairs_k, pairs_i = torch.triu_indices(d, d, device=flat.device)
        eye = torch.eye(d, dtype=flat.dtype, device=flat.device)
        outer = eye[pairs_k].unsqueeze(1).expand(-1, B, d)  # [P, B, d]
        inner = eye[pairs_i].unsqueeze(1).expand(-1, B, d)

        def second(outer_tangent, inner_tangent):
            def first(point):
                return torch.func.jvp(function, (point,), (inner_tangent,))

            (rows, column), (_, curvature) = torch.func.jvp(first, (flat,), (outer_tangent,))
            return rows, column, curvature

        rows, columns, curvatures = _over_tangents(second, outer, inner)  # [B, R], [P, B, R], [P, B, R]
        self._check_rows(rows)
        diagonal = (pairs_k == pairs_i).nonzero().squeeze(-1)  # pairs (i, i) carry the columns J e_i in order
        J = columns[diagonal].permute(1, 2, 0)
        R = rows.shape[-1]
        H = curvatures.new_zeros(d, d, B, R)
        H[pairs_k, pairs_i] = curvatures
        H[pairs_i, pairs_k] = curvatures
        return rows, J, H.permute(2, 3, 0, 1)

    def _check_rows(self, rows: torch.Tensor) -> None:
        if not _checks._is_fake(rows) and rows.numel() and not _checks.all_finite(rows):
            raise ValueError("decoder output contains NaN or Inf values")
        if self.learned_std and not _checks._is_fake(rows):
            std = rows[:, rows.shape[-1] // 2:]
            if not bool((std > 0).all()):
                raise ValueError("decoder std must be positive everywhere (likelihood='gaussian', sigma=None)")

    def _sigma_for(self, like: torch.Tensor, D: int) -> Optional[torch.Tensor]:
        """sigma as a tensor [D] (or [1]) in like's dtype/device, or None outside the fixed-sigma gaussian."""
        if self.likelihood != "gaussian" or self.sigma is None:
            return None
        sigma = self.sigma.to(dtype=like.dtype, device=like.device).reshape(-1)
        if sigma.numel() not in (1, D):
            raise ValueError(f"sigma must be a float or have D={D} elements (the decoder's flattened output), "
                             f"got {sigma.numel()} elements")
        return sigma.expand(D).contiguous()

    def _weight(self, rows: torch.Tensor) -> Optional[torch.Tensor]:
        """The diagonal Fisher weight of each row: None (ones), [D] or [B, R]."""
        if self.likelihood == "euclidean":
            return None
        if self.likelihood == "bernoulli":
            p = torch.sigmoid(rows).clamp(self.eps, 1 - self.eps)
            return p * (1 - p)
        if self.likelihood == "poisson":
            rate = torch.exp(rows)
            if not _checks._is_fake(rate) and rate.numel() and not _checks.all_finite(rate):
                raise ValueError(f"likelihood='poisson': the decoder's log-rates reach {rows.max().item():.4g}, whose "
                                 f"rate exp(l) overflows {rows.dtype}")
            return rate
        if self.likelihood == "categorical":
            raise AssertionError("the categorical Fisher weight is not diagonal: use _gram / the flat coordinates")
        if not self.learned_std:
            return self._sigma_for(rows, rows.shape[-1]).pow(-2)
        if self.form == "expected":
            return None  # the Euclidean pullback of the rows (mean, std)
        std = rows[:, rows.shape[-1] // 2:]
        precision = std.pow(-2)
        return torch.cat([precision, 2 * precision], dim=-1)  # 2 J_logstd^T J_logstd = J_std^T diag(2/std^2) J_std

    def _weight_derivative(self, rows: torch.Tensor, J: torch.Tensor) -> Optional[torch.Tensor]:
        """d weight / d z_k [B, R, d] for the point-dependent weights (the chain rule through rows), else None."""
        if self.likelihood == "euclidean" or (self.likelihood == "gaussian" and
                                              (not self.learned_std or self.form == "expected")):
            return None
        weight_of_rows = self._weight

        def along(column):  # column [B, R]: d rows / dz_k
            return torch.func.jvp(weight_of_rows, (rows,), (column,))[1]

        return torch.func.vmap(along, in_dims=2, out_dims=2)(J)


def _refuse_training_mode(decoder) -> None:
    """ValueError for a BatchNorm or Dropout module in training mode (or a BatchNorm without running statistics):
    the metric would depend on the batch or on random masks, and functorch cannot take BatchNorm's in-place update."""
    if not isinstance(decoder, torch.nn.Module):
        return
    for name, module in decoder.named_modules():
        batch_norm = isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        if module.training and (batch_norm or isinstance(module, torch.nn.modules.dropout._DropoutNd)):
            where = f"decoder.{name}" if name else "the decoder"
            raise ValueError(f"{where} ({type(module).__name__}) is in training mode: call decoder.eval() before "
                             f"computing its metric (a training-mode {type(module).__name__} makes the output depend on "
                             f"the batch or on random masks)")
        if batch_norm and module.running_var is None:
            raise ValueError(f"decoder.{name} ({type(module).__name__}) has no running statistics "
                             f"(track_running_stats=False) and normalises with batch statistics even after "
                             f"decoder.eval(): the metric would depend on the batch")


def _rows_of(output: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, D], B = 0 included (where reshape(B, -1) cannot infer D)."""
    return output.reshape(output.shape[0], math.prod(output.shape[1:]))


def _elementwise_jet(activation: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor):
    """(s(h), s'(h), s''(h)) of an elementwise activation module, by forward mode over forward mode with unit
    tangents (exact for the module as configured: softplus beta and threshold, leaky slope, ...). The module gets a
    copy of its input, so in-place activations (ReLU(inplace=True)) mutate nothing the transforms captured."""

    def fresh(x):
        return activation(x.clone())

    def first(x):
        return torch.func.jvp(fresh, (x,), (torch.ones_like(x),))

    (value, slope), (_, curvature) = torch.func.jvp(first, (h,), (torch.ones_like(h),))
    return value, slope, curvature


def _over_tangents(fn, *tangents: torch.Tensor):
    """fn(*tangent_i) -> (rows, *per-tangent outputs) for each i along dim 0 of the tangents, vmapped: returns rows
    (identical for every tangent) and the per-tangent outputs stacked. Decoders that vmap cannot batch (data-dependent
    control flow, .item()) are run one tangent at a time."""
    try:
        outputs = torch.func.vmap(fn, out_dims=0)(*tangents)
        return (outputs[0][0],) + tuple(outputs[1:])
    except Exception:  # not vmap-friendly: a plain loop over the (few) tangents; real errors re-raise inside it
        results = [fn(*(t[i] for t in tangents)) for i in range(tangents[0].shape[0])]
        return (results[0][0],) + tuple(torch.stack(parts) for parts in list(zip(*results))[1:])


def _check_sigma(sigma) -> torch.Tensor:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, torch.Tensor)):
        raise TypeError(f"sigma must be a positive float or a tensor of positive values, got {type(sigma).__name__}")
    if isinstance(sigma, torch.Tensor) and (sigma.is_complex() or not sigma.is_floating_point()):
        raise TypeError(f"sigma must be a real floating tensor, got dtype {sigma.dtype}")
    value = sigma.detach() if isinstance(sigma, torch.Tensor) else torch.tensor(float(sigma), dtype=torch.float64)
    if value.numel() == 0 or not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
        raise ValueError("sigma must be finite and positive everywhere")
    return value


def _describe_output(output) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)} items"
    return type(output).__name__
