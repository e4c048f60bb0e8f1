"""Pure-PyTorch reference of pygeo.ops.mlp_metric: the pullback / Fisher metric of an MLP decoder by pushing the d
tangent columns through the layers with the forward pass (J_l = S_l W_l J_{l-1}), then G = J^T diag(w) J."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from . import symmetric_part
from .jtj import jtj

# Activation codes shared by every backend (C++, CUDA, Triton mirror these numbers and formulas).
IDENTITY, RELU, LEAKY_RELU, ELU, SILU, SOFTPLUS, TANH, SIGMOID = range(8)


def activation_and_slope(h: torch.Tensor, code: int, param0: float, param1: float):
    """(a(h), a'(h)) of an elementwise activation. param0/param1: leaky_relu slope; elu alpha; softplus beta and
    threshold (linear above beta h > threshold, as torch.nn.Softplus)."""
    if code == IDENTITY:
        return h, torch.ones_like(h)
    if code == RELU:
        return torch.relu(h), (h > 0).to(h.dtype)
    if code == LEAKY_RELU:
        positive = h > 0
        return torch.where(positive, h, param0 * h), torch.where(positive, torch.ones_like(h), torch.full_like(h, param0))
    if code == ELU:
        positive = h > 0
        negative_part = param0 * torch.expm1(torch.clamp_max(h, 0))
        return torch.where(positive, h, negative_part), torch.where(positive, torch.ones_like(h), negative_part + param0)
    # The slopes of silu, tanh and sigmoid are formed without 1 - s or 1 - t^2: those cancel where the activation
    # saturates and turn a 1-ulp difference between two backends' tanh into 3e-7 relative in float64 (issue 30);
    # 1 - sigmoid(h) = sigmoid(-h) and 1 - tanh(h)^2 = 4 sigmoid(2h) sigmoid(-2h) are accurate for every h.
    if code == SILU:
        sig = torch.sigmoid(h)
        return h * sig, sig * (1 + h * torch.sigmoid(-h))
    if code == SOFTPLUS:
        scaled = param0 * h
        linear = scaled > param1
        value = torch.where(linear, h, torch.nn.functional.softplus(scaled) / param0)
        return value, torch.where(linear, torch.ones_like(h), torch.sigmoid(scaled))
    if code == TANH:
        return torch.tanh(h), 4 * torch.sigmoid(2 * h) * torch.sigmoid(-2 * h)
    if code == SIGMOID:
        sig = torch.sigmoid(h)
        return sig, sig * torch.sigmoid(-h)
    raise ValueError(f"unknown activation code {code}")


def forward_with_tangents(z: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                          activation_codes: Sequence[int], activation_params: Sequence[float],
                          overflow: Optional[List[torch.Tensor]] = None):
    """z [B, d] -> (output f [B, D], J [B, D, d]). overflow: if a list is given, the mask [B] of the points whose
    pre-activations h_l are not all finite is appended to it for each layer (see overflowed_points)."""
    B, d = z.shape
    a = z
    # The d tangents travel as rows [B, d, n_l], so that each layer is one [B d, n_{l-1}] x [n_{l-1}, n_l] GEMM: a
    # matmul of W against [B, n, d] columns is a batched product of B thin matrices, several times slower.
    rows = torch.eye(d, dtype=z.dtype, device=z.device).expand(B, d, d)
    for layer, (W, b) in enumerate(zip(weights, biases)):
        h = a @ W.transpose(0, 1) + b
        if overflow is not None:
            overflow.append(~torch.isfinite(h.detach()).all(-1))
        rows = (rows.reshape(B * d, W.shape[1]) @ W.transpose(0, 1)).reshape(B, d, W.shape[0])  # explicit: B may be 0
        a, slope = activation_and_slope(h, activation_codes[layer], activation_params[2 * layer],
                                        activation_params[2 * layer + 1])
        rows = slope.unsqueeze(1) * rows
    return a, rows.transpose(1, 2)


def overflowed_points(per_layer: List[torch.Tensor], activation_codes: Sequence[int], bernoulli: bool) -> torch.Tensor:
    """The points [B] (bool) whose metric is refused as an overflow, the same rule on every backend: a hidden
    pre-activation h_l = W_l a_{l-1} + b_l that is not finite (Inf or NaN: the layer's products overflow the dtype),
    or such an output pre-activation where it enters G (a non-identity last activation, or the Bernoulli weight).
    An activation would otherwise map the overflow to a finite value (a saturated tanh to slope 0, so G = 0), which is
    a silently wrong metric; an output that does not enter G (identity output, constant weight) cannot spoil it."""
    layers = list(per_layer[:-1])
    if bernoulli or activation_codes[len(per_layer) - 1] != IDENTITY:
        layers.append(per_layer[-1])
    if not layers:
        return torch.zeros_like(per_layer[-1])
    return torch.stack(layers).any(0)


def overflow_of_values(z: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                       activation_codes: Sequence[int], activation_params: Sequence[float], bernoulli: bool) -> torch.Tensor:
    """overflowed_points by the primal pass alone (no tangents, no gradients): for the GPU kernels, whose own
    activations do not flag overflows. z [B, d] -> [B] bool."""
    per_layer = []
    with torch.no_grad():
        a = z
        for layer, (W, b) in enumerate(zip(weights, biases)):
            h = a @ W.transpose(0, 1) + b
            per_layer.append(~torch.isfinite(h).all(-1))
            a, _ = activation_and_slope(h, activation_codes[layer], activation_params[2 * layer],
                                        activation_params[2 * layer + 1])
    return overflowed_points(per_layer, activation_codes, bernoulli)


def output_weight_of(f: torch.Tensor, output_weight: Optional[torch.Tensor], bernoulli: bool, eps: float):
    """The Fisher weight per output: p(1-p) of the clamped sigmoid (bernoulli logits), else output_weight [D] or None."""
    if bernoulli:
        p = torch.sigmoid(f).clamp(eps, 1 - eps)
        return p * (1 - p)
    return output_weight


def mlp_metric(z: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor], activation_codes: List[int],
               activation_params: List[float], output_weight: Optional[torch.Tensor], bernoulli: bool,
               eps: float) -> torch.Tensor:
    """G [B, d, d] = J^T diag(w) J of the MLP z [B, d] -> f [B, D] (see pygeo.ops.mlp_metric for the arguments);
    NaN at the points whose pre-activations overflow (overflowed_points), which the op then refuses."""
    overflow: List[torch.Tensor] = []
    f, J = forward_with_tangents(z, weights, biases, activation_codes, activation_params, overflow)
    G = jtj(J, output_weight_of(f, output_weight, bernoulli, eps))
    refused = overflowed_points(overflow, activation_codes, bernoulli)  # no data-dependent branch: vmap-friendly
    return torch.where(refused[:, None, None], torch.full_like(G, float("nan")), G)


def mlp_metric_by_last_gram(z: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
                            activation_codes: List[int], activation_params: List[float],
                            output_weight: Optional[torch.Tensor]) -> torch.Tensor:
    """The same G as mlp_metric when the last activation is the identity and the Fisher weight w is constant (not
    bernoulli): G = T^T (W_L^T diag(w) W_L) T with T [B, n, d] the tangents entering the last layer. It never forms J
    [B, D, d]: n^2 instead of D n work per tangent column, which makes it the cheaper graph to differentiate when the
    last layer is wide (D > n). Differentiable in z, the weights and w (b_L does not enter G)."""
    L = len(weights)
    _, T = forward_with_tangents(z, weights[:-1], biases[:-1], activation_codes[:-1], activation_params[:2 * (L - 1)])
    W = weights[-1]
    gram = W.transpose(0, 1) @ (W if output_weight is None else output_weight.unsqueeze(-1) * W)  # [n, n]
    B, n, d = T.shape
    # One [B d, n] x [n, n] GEMM (a broadcast batched matmul against gram is a third slower on the CPU).
    TM = (T.transpose(-1, -2).reshape(B * d, n) @ gram).reshape(B, d, n)
    return symmetric_part(TM @ T)


def mlp_metric_grad_z_by_last_gram(z: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
                                   activation_codes: List[int], activation_params: List[float],
                                   output_weight: Optional[torch.Tensor], grad_G: torch.Tensor) -> torch.Tensor:
    """d <grad_G, G> / dz [B, d] for an identity last layer and a constant Fisher weight (first order, z only).

    With T [B, n, d] the tangents entering the last layer and M = W_L^T diag(w) W_L, dG = dT^T M T + T^T M dT, so the
    gradient with respect to T is M T (grad_G + grad_G^T): one [B d, n] x [n, n] product, then back-propagation
    through the hidden layers only. Half the work of differentiating mlp_metric_by_last_gram, which also
    back-propagates through the product with M."""
    L = len(weights)
    W = weights[-1].detach()
    with torch.no_grad():
        gram = W.transpose(0, 1) @ (W if output_weight is None else output_weight.detach().unsqueeze(-1) * W)
    with torch.enable_grad():
        point = z.detach().requires_grad_(True)
        _, T = forward_with_tangents(point, weights[:-1], biases[:-1], activation_codes[:-1],
                                     activation_params[:2 * (L - 1)])
        if not T.requires_grad:  # a single linear layer: G does not depend on z
            return torch.zeros_like(z)
        B, n, d = T.shape
        with torch.no_grad():
            rows = T.transpose(1, 2)  # [B, d, n]
            M_T_rows = (rows.reshape(B * d, n) @ gram).reshape(B, d, n)  # (M T)^T
            grad_rows = (grad_G + grad_G.transpose(-1, -2)) @ M_T_rows  # (d loss / dT)^T
        (grad,) = torch.autograd.grad(T, point, grad_rows.transpose(1, 2))
    return grad


def mlp_ensemble_metric(z: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
                        activation_codes: List[int], activation_params: List[float],
                        output_weight: Optional[torch.Tensor], bernoulli: bool, eps: float) -> torch.Tensor:
    """G [B, d, d] = (1/M) sum_m G_m: the mean metric of M MLPs of one architecture, weights[l] [M, n_l, n_{l-1}] and
    biases[l] [M, n_l] stacked over the members (see pygeo.ops.mlp_ensemble_metric); sum_m (G_m / M) in member order
    (divided before the sum, as the C++ kernel: a mean in range is not lost to an overflowing sum of finite G_m)."""
    M = weights[0].shape[0]
    total = None
    for m in range(M):
        G = mlp_metric(z, [W[m] for W in weights], [b[m] for b in biases], activation_codes, activation_params,
                       output_weight, bernoulli, eps)
        total = G / M if total is None else total + G / M
    return total
