"""EnsembleMetric: the expected metric of an ensemble, G(z) = (1/M) sum_m G_m(z) (docs/MATH.md, "Decoder ensembles").

Syrota, Moreno-Munoz & Hauberg (2024), "Decoder ensembling for learned latent geometries": M decoders of one latent
space give the expected pullback metric E_m[J_m^T F J_m], which is large where the members disagree (away from the
data) and makes geodesics stable across retrainings.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from .. import _checks, _linalg
from .base import Metric, value_and_gradient


def _uses_flat_coordinates(metric) -> bool:
    # pygeo.geometry.curvature.uses_flat_coordinates, without importing the geometry layer into the metrics layer
    return bool(getattr(metric, "has_flat_coordinates", False)) and callable(getattr(metric, "flat_coordinates", None))


def _known_dimension(metric) -> Optional[int]:
    """The latent dimension d a member declares (a `dim` attribute, or an MLP decoder's input width), else None."""
    dim = getattr(metric, "dim", None)
    if isinstance(dim, int) and not isinstance(dim, bool):
        return dim
    for attribute in ("_mlp", "_mean_mlp"):
        mlp = getattr(metric, attribute, None)
        if mlp is not None and isinstance(getattr(mlp, "in_features", None), int):
            return mlp.in_features
    return None


class EnsembleMetric(Metric):
    """G(z) = (1/M) sum_m G_m(z), the mean of M member metrics of one latent space (the expected metric of a decoder
    ensemble, Syrota et al. 2024); dG likewise, dG = (1/M) sum_m dG_m.

    Args:
        metrics: a non-empty sequence of metrics of the contract (metric(z), metric_and_derivative(z)), all of one
            latent dimension d: typically the PullbackMetrics of M decoders (pygeo.models.VAE(n_decoders=M).metric()).
    Contract (z [..., d]):
        metric(z) -> G [..., d, d]; metric_and_derivative(z) -> (G, dG [..., d, d, d]); log_volume(z) -> [...];
        log_volume_and_grad(z) -> ([...], [..., d]) detached; inner(z, u, v) -> [...].
    Flat coordinates: when every member has them (has_flat_coordinates), so does the ensemble, with
        phi(z) = concat_m(phi_m(z)) / sqrt(M) [..., sum_m D_m], since J_phi^T J_phi = (1/M) sum_m J_m^T J_m = G:
        curvature (Gauss equation), geodesics and the Gauss-Newton distance solver then take their fast paths.
    Raises:
        TypeError if metrics is not a sequence of metric objects; ValueError if it is empty or the members declare
        different latent dimensions (checked again at call time: every member's G must be [..., d, d]).
    """

    def __init__(self, metrics: Sequence[Metric]):
        if isinstance(metrics, Metric) or not isinstance(metrics, (list, tuple)):
            raise TypeError(f"metrics must be a list or tuple of metrics (at least one), got {type(metrics).__name__}")
        metrics = list(metrics)
        if not metrics:
            raise ValueError("metrics must hold at least one member metric, got an empty sequence")
        for index, member in enumerate(metrics):
            if not (callable(getattr(member, "metric", None)) and callable(getattr(member, "metric_and_derivative", None))):
                raise TypeError(f"metrics[{index}] must follow the pygeo metric contract (metric(z), "
                                f"metric_and_derivative(z)), got {type(member).__name__}")
        dimensions = {index: _known_dimension(member) for index, member in enumerate(metrics)}
        declared = {index: dim for index, dim in dimensions.items() if dim is not None}
        if len(set(declared.values())) > 1:
            listing = ", ".join(f"metrics[{index}]: d={dim}" for index, dim in declared.items())
            raise ValueError(f"metrics must all have one latent dimension d, got {listing}")
        self.metrics: List[Metric] = metrics
        self.dim: Optional[int] = next(iter(declared.values()), None)

    def __len__(self) -> int:
        return len(self.metrics)

    def __repr__(self) -> str:
        kinds = sorted({type(member).__name__ for member in self.metrics})
        return f"EnsembleMetric(M={len(self.metrics)}, d={self.dim}, members={'/'.join(kinds)})"

    @property
    def has_flat_coordinates(self) -> bool:
        """True when every member has flat coordinates (then flat_coordinates(z) exists)."""
        return all(_uses_flat_coordinates(member) for member in self.metrics)

    # ----------------------------------------------------------------------------------------------- the contract
    def metric(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., d] -> G [..., d, d] = (1/M) sum_m G_m(z), differentiable in z (and the members' parameters).
        Members that are PullbackMetrics of MLP decoders of one architecture and likelihood, on CPU tensors, go
        through one call of the fused op pygeo.ops.mlp_ensemble_metric (weights stacked [M, out, in]), not M calls."""
        self._check_point(z)
        fused = self._fused_metric(z, detach_parameters=False)
        if fused is not None:
            return fused
        return self._mean([self._member_metric(index, member, z) for index, member in enumerate(self.metrics)])

    def metric_and_derivative(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(G [..., d, d], dG [..., d, d, d]), dG[..., k, i, j] = d G[i, j] / d z_k: the means of the members'."""
        self._check_point(z)
        Gs, dGs = [], []
        d = z.shape[-1]
        for index, member in enumerate(self.metrics):
            G, dG = member.metric_and_derivative(z)
            self._check_member_output(index, "metric_and_derivative(z)[0]", G, z, (d, d))
            self._check_member_output(index, "metric_and_derivative(z)[1]", dG, z, (d, d, d))
            Gs.append(G)
            dGs.append(dG)
        return self._mean(Gs), self._mean(dGs)

    def log_volume_and_grad(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """z [..., d] -> (1/2 log det G [...], its gradient in z [..., d]), detached (for samplers). Members that can
        form G with detached parameters (PullbackMetric) do, so that the backward differentiates z alone."""
        self._check_point(z)

        def log_volume(point):
            fused = self._fused_metric(point, detach_parameters=True)
            if fused is not None:
                return _linalg.half_log_det(fused, name="EnsembleMetric.metric(z)")
            Gs = []
            for index, member in enumerate(self.metrics):
                detached = getattr(member, "_metric", None)
                G = detached(point, detach_parameters=True) if callable(detached) else member.metric(point)
                d = point.shape[-1]
                self._check_member_output(index, "metric(z)", G, point, (d, d))
                Gs.append(G)
            return _linalg.half_log_det(self._mean(Gs), name="EnsembleMetric.metric(z)")

        return value_and_gradient(log_volume, z, refuse_lost_gradient=True)  # as Metric.log_volume_and_grad

    def flat_coordinates(self, z: torch.Tensor) -> torch.Tensor:
        """phi(z) = concat_m(phi_m(z)) / sqrt(M) [..., sum_m D_m], so that G = J_phi^T J_phi exactly. Raises
        NotImplementedError when some member has no flat coordinates."""
        missing = [index for index, member in enumerate(self.metrics) if not _uses_flat_coordinates(member)]
        if missing:
            raise NotImplementedError(f"EnsembleMetric.flat_coordinates needs every member to have flat coordinates; "
                                      f"metrics{missing} have none")
        self._check_point(z)
        parts = [member.flat_coordinates(z) for member in self.metrics]
        return torch.cat(parts, dim=-1) / math.sqrt(len(parts))

    # ------------------------------------------------------------------------------------------- the fused path
    def _fused_members(self, flat: torch.Tensor):
        """The members' MLPDecoders where one fused ensemble call serves them all, else None: every member a
        PullbackMetric whose own fused MLP path applies (see PullbackMetric._fused_mlp), with one architecture
        (layer shapes, activations, which biases exist), likelihood, eps, sigma and backend, on a CPU tensor (the GPU
        has no fused ensemble kernel; there each member calls its own fused op)."""
        from .pullback import PullbackMetric

        if len(self.metrics) < 2 or flat.device.type != "cpu":
            return None
        first = self.metrics[0]
        if first.__class__ is not PullbackMetric or first.backend not in ("auto", "cpp", "torch"):
            return None
        mlps = []
        for member in self.metrics:
            if (member.__class__ is not PullbackMetric or member.learned_std or member._mean_mlp is not None
                    or (member.likelihood, member.eps, member.backend) != (first.likelihood, first.eps, first.backend)):
                return None
            mlp = member._fused_mlp(flat)
            if mlp is None:
                return None
            mlps.append(mlp)
        shape = [(linear.weight.shape, linear.bias is None) for linear in mlps[0].linears]
        for mlp in mlps[1:]:
            if mlp.activations != mlps[0].activations or \
                    [(linear.weight.shape, linear.bias is None) for linear in mlp.linears] != shape:
                return None
        if first.likelihood == "gaussian":
            D = mlps[0].out_features
            sigmas = [member._sigma_for(flat, D) for member in self.metrics]
            if any(not torch.equal(sigma, sigmas[0]) for sigma in sigmas[1:]):
                return None
        return mlps

    def _fused_metric(self, z: torch.Tensor, detach_parameters: bool) -> Optional[torch.Tensor]:
        """G [..., d, d] by one call of pygeo.ops.mlp_ensemble_metric, or None where that path does not apply."""
        from ..ops.mlp_metric import mlp_ensemble_metric

        flat = z.reshape(-1, z.shape[-1]) if z.dim() >= 1 else z
        mlps = self._fused_members(flat)
        if mlps is None:
            return None
        for member in self.metrics:
            member._flatten(z)  # each member's checks of z (dtype against its parameters, width)

        def parameter(tensor):
            return tensor.detach() if detach_parameters else tensor

        weights, biases = [], []
        for layer in range(len(mlps[0].linears)):
            linears = [mlp.linears[layer] for mlp in mlps]
            weights.append(torch.stack([parameter(linear.weight) for linear in linears]))
            biases.append(None if linears[0].bias is None else torch.stack([parameter(linear.bias) for linear in linears]))
        first = self.metrics[0]
        sigma = first._sigma_for(flat, mlps[0].out_features)
        G = mlp_ensemble_metric(flat, weights, biases, mlps[0].activations, likelihood=first.likelihood,
                                sigma=None if sigma is None else parameter(sigma), eps=first.eps, backend=first.backend)
        return G.reshape(*z.shape[:-1], *G.shape[-2:])

    # --------------------------------------------------------------------------------------------------- helpers
    def _check_point(self, z: torch.Tensor) -> None:
        _checks.real_tensor("z", z, min_dim=1, check_finite=False)  # the members scan the values
        if self.dim is not None and z.shape[-1] != self.dim:
            raise ValueError(f"z must have shape [..., {self.dim}] (the ensemble's latent dimension), got {tuple(z.shape)}")

    def _member_metric(self, index: int, member, z: torch.Tensor) -> torch.Tensor:
        G = member.metric(z)
        d = z.shape[-1]
        self._check_member_output(index, "metric(z)", G, z, (d, d))
        return G

    @staticmethod
    def _check_member_output(index: int, what: str, value, z: torch.Tensor, trailing: Tuple[int, ...]) -> None:
        expected = tuple(z.shape[:-1]) + trailing
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"metrics[{index}].{what} must have shape {expected} for z of shape {tuple(z.shape)} "
                             f"(all members of one latent dimension d={z.shape[-1]}), got {got}")

    @staticmethod
    def _mean(values: List[torch.Tensor]) -> torch.Tensor:
        """sum_m (value_m / M) in member order, as pygeo.ops.mlp_ensemble_metric: divided before the sum, so that a
        mean in range is not turned into inf by an overflowing sum of finite members (issue 30)."""
        M = len(values)
        total = values[0] / M
        for value in values[1:]:
            total = total + value / M
        return total
