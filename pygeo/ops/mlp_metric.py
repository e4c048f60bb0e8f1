"""pygeo.ops.mlp_metric: the pullback / Fisher metric of an MLP decoder, fused, without materialising J [B, D, d].

The d tangent columns ride along with the forward pass (J_l = S_l W_l J_{l-1}); the last layer, the big one (D
outputs), is reduced into G = J^T diag(w) J tile by tile over its output rows.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import _backend, _checks
from ..reference import mlp_metric as reference

_IMPLEMENTED = ("torch", "cpp", "cuda", "triton")

ACTIVATIONS = {
    "identity": (reference.IDENTITY, ()),
    "relu": (reference.RELU, ()),
    "leaky_relu": (reference.LEAKY_RELU, (0.01,)),  # (negative slope,)
    "elu": (reference.ELU, (1.0,)),  # (alpha,)
    "silu": (reference.SILU, ()),
    "softplus": (reference.SOFTPLUS, (1.0, 20.0)),  # (beta, threshold)
    "tanh": (reference.TANH, ()),
    "sigmoid": (reference.SIGMOID, ()),
}
LIKELIHOODS = ("euclidean", "gaussian", "bernoulli")

Activation = Union[str, Tuple]


def _encode_activation(layer: int, spec: Activation) -> Tuple[int, float, float]:
    """'name' or ('name', *params) -> (code, param0, param1)."""
    if not (isinstance(spec, str) or (isinstance(spec, (tuple, list)) and spec and isinstance(spec[0], str))):
        raise TypeError(f"activations[{layer}] must be a name such as 'tanh' or 'identity', or a tuple (name, *params), "
                        f"got {spec!r}")
    name, params = (spec, ()) if isinstance(spec, str) else (spec[0], tuple(spec[1:]))
    if name not in ACTIVATIONS:
        raise ValueError(f"activations[{layer}] must be one of {tuple(ACTIVATIONS)} (optionally as (name, *params)), got {spec!r}")
    code, defaults = ACTIVATIONS[name]
    if len(params) > len(defaults):
        raise ValueError(f"activations[{layer}]: {name} takes at most {len(defaults)} parameters, got {params}")
    values = tuple(float(p) for p in params) + defaults[len(params):]
    if name == "softplus" and values[0] <= 0:
        raise ValueError(f"activations[{layer}]: softplus beta must be positive, got {values[0]}")
    values = values + (0.0,) * (2 - len(values))
    return code, values[0], values[1]


# --------------------------------------------------------------------------------------------------- the custom op

def _output_weight_and_activation_codes(z, weights, biases, activations, likelihood, sigma, D: int):
    """The checks and encodings shared by mlp_metric and mlp_ensemble_metric: the Fisher weight 1/sigma^2 [D] of the
    gaussian likelihood (None otherwise), the activation codes and their parameters, and one device and dtype for all
    tensors."""
    output_weight = None
    if likelihood == "gaussian":
        sigma = torch.as_tensor(sigma, dtype=z.dtype, device=z.device) if not isinstance(sigma, torch.Tensor) else sigma
        _checks.real_tensor("sigma", sigma, parameter=True)
        if sigma.numel() not in (1, D):
            raise ValueError(f"sigma must be a float or have D={D} elements, got shape {tuple(sigma.shape)}")
        _checks.positive_parameter("sigma", sigma)
        output_weight = sigma.reshape(-1).expand(D).pow(-2).contiguous()
    encoded = [_encode_activation(layer, spec) for layer, spec in enumerate(activations)]
    codes = [code for code, _, _ in encoded]
    params = [p for _, p0, p1 in encoded for p in (p0, p1)]
    tensors = dict(z=z, **{f"weights[{l}]": W for l, W in enumerate(weights)},
                   **{f"biases[{l}]": b for l, b in enumerate(biases)}, sigma=output_weight)
    _checks.same_device(**tensors)
    _checks.same_dtype(**tensors)
    return output_weight, codes, params

def _run(z, weights, biases, activation_codes, activation_params, output_weight, bernoulli, eps, backend):
    """z [B, d]; weights[l] [n_l, n_{l-1}] (n_0 = d); biases[l] [n_l]; output_weight [D] or None -> G [B, d, d]."""
    if backend == "torch":
        return reference.mlp_metric(z, weights, biases, activation_codes, activation_params, output_weight, bernoulli, eps)
    B, d = z.shape
    out = _backend.empty((B, d, d), z)
    # The C++ kernel flags overflowed pre-activations itself; the GPU kernels do not: the same rule by a primal pass.
    refused = None if backend == "cpp" else reference.overflow_of_values(z, weights, biases, activation_codes,
                                                                         activation_params, bernoulli)
    weights, biases, output_weight, upper_triangular = _compress_last_layer(
        B, d, list(weights), list(biases), activation_codes, output_weight, bernoulli)
    if backend == "triton":
        from ..triton_kernels import mlp_metric as triton_mlp_metric

        out = triton_mlp_metric.mlp_metric(z, weights, biases, activation_codes, activation_params, output_weight,
                                           bernoulli, eps, upper_triangular, out)
        return out.masked_fill_(refused[:, None, None], float("nan"))
    widths = [d] + [W.shape[0] for W in weights]
    args = (_backend.ptr(z), [_backend.ptr(W) for W in weights], [_backend.ptr(b) for b in biases], widths,
            list(activation_codes), list(activation_params), _backend.ptr(output_weight), bool(bernoulli), float(eps),
            upper_triangular, _backend.ptr(out), B, _backend.dtype_name(z))
    _backend.run_compiled("mlp_metric", backend, args, z)
    return out if refused is None else out.masked_fill_(refused[:, None, None], float("nan"))


# The Cholesky-compressed last layer of recent calls, (shape, dtype, device, no weight?) -> (W, weight, R): repeated
# calls with an unchanged decoder (geodesics, samplers, plots) skip the Gram + Cholesky. A hit requires W (and the
# weight) to equal the stored copy exactly (a comparison of D n numbers), so an updated or replaced W is never stale.
_COMPRESSED: "collections.OrderedDict" = collections.OrderedDict()
_COMPRESSED_ENTRIES = 24  # an ensemble of 8 decoders and a few single ones


def _compress_last_layer(B, d, weights, biases, activation_codes, output_weight, bernoulli):
    """With a constant Fisher weight w and an identity last activation, G = T^T (W_L^T diag(w) W_L) T (T: the tangents
    entering the last layer) equals (R T)^T (R T) for R = C^T, C the Cholesky factor of W_L^T diag(w) W_L [n, n]. R is
    upper triangular, so the kernels skip half of it: a third of the last layer's work when D = 784 and n = 512.
    Done when the B (d + 1) rows that go through the last layer repay the Gram + Cholesky (in float64, so that squaring
    the condition number costs no accuracy) several times over, and only when that Gram is numerically positive
    definite. R is cached for repeated calls, but whether a call compresses depends on its sizes alone, never on what
    the cache holds: the two forms round differently (~1e-7 in float32), and a result must not depend on the calls
    made before it.

    Returns (weights, biases, output_weight, last layer upper triangular?).
    """
    W = weights[-1]
    D, n = W.shape
    if bernoulli or activation_codes[-1] != reference.IDENTITY or D < n or _checks._is_fake(W):
        return weights, biases, output_weight, False
    saved = B * (d + 1) * (D * n - n * n / 2)
    if saved <= 8 * (D * n * n + n ** 3 / 3):
        return weights, biases, output_weight, False
    key = (tuple(W.shape), W.dtype, W.device, output_weight is None)
    cached = _COMPRESSED.get(key)
    R = None
    if cached is not None and torch.equal(cached[0], W) and (output_weight is None or torch.equal(cached[1], output_weight)):
        R = cached[2]
    if R is None:
        W64 = W.detach().double()
        scaled = W64 if output_weight is None else output_weight.detach().double().sqrt().unsqueeze(-1) * W64
        C, info = torch.linalg.cholesky_ex(scaled.transpose(0, 1) @ scaled)
        if bool(info != 0):
            return weights, biases, output_weight, False
        R = C.transpose(0, 1).to(W.dtype).contiguous()  # [n, n], upper triangular
        _COMPRESSED[key] = (W.detach().clone(), None if output_weight is None else output_weight.detach().clone(), R)
        while len(_COMPRESSED) > _COMPRESSED_ENTRIES:
            _COMPRESSED.popitem(last=False)
    return weights[:-1] + [R], biases[:-1] + [R.new_zeros(n)], None, True


@torch.library.custom_op("pygeo::mlp_metric", mutates_args=())
def _mlp_metric_op(z: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor], activation_codes: List[int],
                   activation_params: List[float], output_weight: Optional[torch.Tensor], bernoulli: bool, eps: float,
                   backend: str) -> torch.Tensor:
    return _run(z, weights, biases, activation_codes, activation_params, output_weight, bernoulli, eps, backend)


@_mlp_metric_op.register_fake
def _(z, weights, biases, activation_codes, activation_params, output_weight, bernoulli, eps, backend):
    B, d = z.shape
    return z.new_empty((B, d, d))


def _setup_context(ctx, inputs, output):
    z, weights, biases, codes, params, output_weight, bernoulli, eps, _ = inputs
    ctx.layers = len(weights)
    ctx.has_output_weight = output_weight is not None
    ctx.settings = (list(codes), list(params), bool(bernoulli), float(eps))
    saved = [z, *weights, *biases] + ([output_weight] if output_weight is not None else [])
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_G):
    # Recompute through a differentiable plain-torch form of G and take its vector-Jacobian product with respect to
    # the inputs that need a gradient (only z for a frozen decoder or a sampler): it runs on every device and can be
    # differentiated again. With an identity last layer and a constant Fisher weight, the form that goes through the
    # last layer's Gram matrix W_L^T diag(w) W_L [n, n] never builds J [B, D, d]: for a 784-output decoder the
    # backward of log_volume is then several times cheaper (bench/RESULTS.md, session 6).
    saved = ctx.saved_tensors
    L = ctx.layers
    codes, params, bernoulli, eps = ctx.settings
    z, weights, biases = saved[0], list(saved[1:1 + L]), list(saved[1 + L:1 + 2 * L])
    output_weight = saved[1 + 2 * L] if ctx.has_output_weight else None
    D, n = weights[-1].shape
    by_last_gram = not bernoulli and codes[-1] == reference.IDENTITY and D > n

    def metric(z, weights, biases, output_weight):
        if by_last_gram:
            return reference.mlp_metric_by_last_gram(z, weights, biases, codes, params, output_weight)
        return reference.mlp_metric(z, weights, biases, codes, params, output_weight, bernoulli, eps)

    needs = ctx.needs_input_grad
    if by_last_gram and needs[0] and not (any(needs[1]) or any(needs[2]) or needs[5]) and not torch.is_grad_enabled():
        # z alone, first order (samplers, frozen decoders): back-propagate through the hidden layers only.
        grad_z = reference.mlp_metric_grad_z_by_last_gram(z, weights, biases, codes, params, output_weight, grad_G)
        return grad_z, [None] * L, [None] * L, None, None, None, None, None, None
    grad_z, grad_weights, grad_biases, grad_output_weight = _backend.vjp_where_needed(
        metric, (z, weights, biases, output_weight), (needs[0], any(needs[1]), any(needs[2]), needs[5]), grad_G)
    as_list = lambda grads: [None] * L if grads is None else list(grads)
    return grad_z, as_list(grad_weights), as_list(grad_biases), None, None, grad_output_weight, None, None, None


_mlp_metric_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- the public wrapper
def mlp_metric(z: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
               activations: Sequence[Activation], *, likelihood: str = "euclidean",
               sigma: Optional[Union[float, torch.Tensor]] = None, eps: float = 1e-6,
               backend: str = "auto") -> torch.Tensor:
    """Metric G = J^T diag(w) J of the MLP decoder f(z) = a_L(W_L ... a_1(W_1 z + b_1) ... + b_L), fused.

    Args:
        z: [..., d] latent points.
        weights: L matrices W_l [n_l, n_{l-1}] (nn.Linear layout, n_0 = d, n_L = D).
        biases: L vectors b_l [n_l] or None.
        activations: L activations, one after each linear layer: a name among "identity", "relu", "leaky_relu",
            "elu", "silu", "softplus", "tanh", "sigmoid", or a tuple (name, *params): ("leaky_relu", slope),
            ("elu", alpha), ("softplus", beta, threshold) with torch.nn's defaults.
        likelihood: "euclidean" (w = 1), "gaussian" (w = 1/sigma^2, sigma a float or [D]) or "bernoulli" (the MLP
            outputs logits l, w = p (1 - p), p = sigmoid(l) clamped into [eps, 1 - eps]).
        backend: "auto", "torch", "cpp", "cuda" or "triton".
    Returns:
        G: [..., d, d], exactly symmetric; differentiable in z, the weights, the biases and sigma.
    """
    _checks.real_tensor("z", z, min_dim=1)
    batch_shape, d = z.shape[:-1], z.shape[-1]
    if d == 0:
        raise ValueError(f"z must have shape [..., d] with d >= 1, got {tuple(z.shape)}")
    weights, biases, activations = list(weights), list(biases), list(activations)
    L = len(weights)
    if L == 0:
        raise ValueError("weights must hold at least one layer matrix W_l [n_l, n_{l-1}]")
    if len(biases) != L or len(activations) != L:
        raise ValueError(f"weights, biases and activations must have one entry per layer, got {L}, {len(biases)} and "
                         f"{len(activations)}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if (sigma is None) != (likelihood != "gaussian"):
        raise ValueError("sigma is required by likelihood='gaussian' and only used there")
    if not (0.0 < eps < 0.5):
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    width = d
    for layer, W in enumerate(weights):
        _checks.real_tensor(f"weights[{layer}]", W, min_dim=2, parameter=True)
        if W.dim() != 2 or W.shape[1] != width or W.shape[0] == 0:
            raise ValueError(f"weights[{layer}] must have shape [n_{layer + 1}, {width}] (layer input width {width}), "
                             f"got {tuple(W.shape)}")
        width = W.shape[0]
        if biases[layer] is None:
            biases[layer] = W.new_zeros(W.shape[0])
        _checks.real_tensor(f"biases[{layer}]", biases[layer], min_dim=1, parameter=True)
        if tuple(biases[layer].shape) != (W.shape[0],):
            raise ValueError(f"biases[{layer}] must have shape [{W.shape[0]}], got {tuple(biases[layer].shape)}")
    output_weight, codes, params = _output_weight_and_activation_codes(z, weights, biases, activations, likelihood,
                                                                       sigma, D=width)
    chosen = _backend.resolve("mlp_metric", z.device, backend, _IMPLEMENTED)
    G = _backend.call_op(_mlp_metric_op, _run, z.reshape(-1, d).contiguous(), [W.contiguous() for W in weights],
                         [b.contiguous() for b in biases], codes, params, output_weight, likelihood == "bernoulli",
                         float(eps), chosen)
    # z, weights and biases were checked finite: a NaN/Inf here is an overflow of the activations or the Jacobian.
    _checks.finite_points(G, "mlp_metric: G", f"the decoder's activations or Jacobian overflow {z.dtype} (weights or "
                          "inputs too large; float64 extends the range)")
    return G.reshape(*batch_shape, d, d)


# ------------------------------------------------------------------------------------- the ensemble of M members
_ENSEMBLE_IMPLEMENTED = ("torch", "cpp")


def _run_ensemble(z, weights, biases, activation_codes, activation_params, output_weight, bernoulli, eps, backend):
    """z [B, d]; weights[l] [M, n_l, n_{l-1}]; biases[l] [M, n_l]; output_weight [D] or None -> G [B, d, d]."""
    if backend == "torch":
        return reference.mlp_ensemble_metric(z, weights, biases, activation_codes, activation_params, output_weight,
                                             bernoulli, eps)
    B, d = z.shape
    M = weights[0].shape[0]
    out = _backend.empty((B, d, d), z)
    # Each member's last layer compressed as in mlp_metric (cached per member), all members or none: the kernel
    # takes one flag.
    compressed = [_compress_last_layer(B, d, [W[m] for W in weights], [b[m] for b in biases], activation_codes,
                                       output_weight, bernoulli) for m in range(M)]
    if all(flag for *_, flag in compressed):
        weights = list(weights[:-1]) + [torch.stack([member[0][-1] for member in compressed])]
        biases = list(biases[:-1]) + [z.new_zeros(M, weights[-1].shape[1])]
        output_weight, upper_triangular = None, True
    else:
        upper_triangular = False
    widths = [d] + [W.shape[1] for W in weights]
    args = (_backend.ptr(z), [_backend.ptr(W) for W in weights], [_backend.ptr(b) for b in biases], widths,
            list(activation_codes), list(activation_params), _backend.ptr(output_weight), bool(bernoulli), float(eps),
            upper_triangular, _backend.ptr(out), B, M, _backend.dtype_name(z))
    _backend.run_compiled("mlp_ensemble_metric", backend, args, z)
    return out


@torch.library.custom_op("pygeo::mlp_ensemble_metric", mutates_args=())
def _mlp_ensemble_metric_op(z: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
                            activation_codes: List[int], activation_params: List[float],
                            output_weight: Optional[torch.Tensor], bernoulli: bool, eps: float,
                            backend: str) -> torch.Tensor:
    return _run_ensemble(z, weights, biases, activation_codes, activation_params, output_weight, bernoulli, eps,
                         backend)


@_mlp_ensemble_metric_op.register_fake
def _(z, weights, biases, activation_codes, activation_params, output_weight, bernoulli, eps, backend):
    B, d = z.shape
    return z.new_empty((B, d, d))


def _ensemble_backward(ctx, grad_G):
    # As _backward, member by member: G = (1/M) sum_m G_m, so each member's form gets grad_G / M.
    saved = ctx.saved_tensors
    L = ctx.layers
    codes, params, bernoulli, eps = ctx.settings
    z, weights, biases = saved[0], list(saved[1:1 + L]), list(saved[1 + L:1 + 2 * L])
    output_weight = saved[1 + 2 * L] if ctx.has_output_weight else None
    M, D, n = weights[-1].shape
    by_last_gram = not bernoulli and codes[-1] == reference.IDENTITY and D > n

    def metric(z, weights, biases, output_weight):
        if not by_last_gram:
            return reference.mlp_ensemble_metric(z, weights, biases, codes, params, output_weight, bernoulli, eps)
        total = None
        for m in range(M):
            G = reference.mlp_metric_by_last_gram(z, [W[m] for W in weights], [b[m] for b in biases], codes, params,
                                                  output_weight)
            total = G / M if total is None else total + G / M  # as the forward: a mean in range stays in range
        return total

    needs = ctx.needs_input_grad
    if by_last_gram and needs[0] and not (any(needs[1]) or any(needs[2]) or needs[5]) and not torch.is_grad_enabled():
        grad_z = None
        for m in range(M):
            part = reference.mlp_metric_grad_z_by_last_gram(z, [W[m] for W in weights], [b[m] for b in biases], codes,
                                                            params, output_weight, grad_G / M)
            grad_z = part if grad_z is None else grad_z + part
        return grad_z, [None] * L, [None] * L, None, None, None, None, None, None
    grad_z, grad_weights, grad_biases, grad_output_weight = _backend.vjp_where_needed(
        metric, (z, weights, biases, output_weight), (needs[0], any(needs[1]), any(needs[2]), needs[5]), grad_G)
    as_list = lambda grads: [None] * L if grads is None else list(grads)
    return grad_z, as_list(grad_weights), as_list(grad_biases), None, None, grad_output_weight, None, None, None


_mlp_ensemble_metric_op.register_autograd(_ensemble_backward, setup_context=_setup_context)


def mlp_ensemble_metric(z: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                        activations: Sequence[Activation], *, likelihood: str = "euclidean",
                        sigma: Optional[Union[float, torch.Tensor]] = None, eps: float = 1e-6,
                        backend: str = "auto") -> torch.Tensor:
    """The mean metric G = (1/M) sum_m J_m^T diag(w_m) J_m of M MLP decoders of one architecture, fused: one kernel
    launch for all members (the C++ kernel runs over points and members in parallel and accumulates the mean), J_m
    never materialised. The expected metric of a decoder ensemble (Syrota et al. 2024; pygeo.metrics.EnsembleMetric).

    Args:
        z: [..., d] latent points.
        weights: L tensors W_l [M, n_l, n_{l-1}], the members' nn.Linear weights stacked (n_0 = d, n_L = D).
        biases: L tensors b_l [M, n_l] or None.
        activations, likelihood, sigma, eps: as pygeo.ops.mlp_metric, shared by the members (sigma a float or [D]).
        backend: "auto" (cpp for CPU tensors when built, else torch), "torch" or "cpp". The GPU has no fused
            ensemble kernel: on CUDA tensors "auto" runs the torch form (EnsembleMetric then calls
            pygeo.ops.mlp_metric once per member instead).
    Returns:
        G: [..., d, d], exactly symmetric; differentiable in z, the weights, the biases and sigma.
    Raises:
        ValueError / TypeError for shapes, dtypes or devices that disagree (naming the argument), and ValueError where
        the activations overflow (as pygeo.ops.mlp_metric).
    """
    _checks.real_tensor("z", z, min_dim=1)
    batch_shape, d = z.shape[:-1], z.shape[-1]
    if d == 0:
        raise ValueError(f"z must have shape [..., d] with d >= 1, got {tuple(z.shape)}")
    weights, biases, activations = list(weights), list(biases), list(activations)
    L = len(weights)
    if L == 0:
        raise ValueError("weights must hold at least one layer tensor W_l [M, n_l, n_{l-1}]")
    if len(biases) != L or len(activations) != L:
        raise ValueError(f"weights, biases and activations must have one entry per layer, got {L}, {len(biases)} and "
                         f"{len(activations)}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if (sigma is None) != (likelihood != "gaussian"):
        raise ValueError("sigma is required by likelihood='gaussian' and only used there")
    if not (0.0 < eps < 0.5):
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    width, M = d, None
    for layer, W in enumerate(weights):
        _checks.real_tensor(f"weights[{layer}]", W, min_dim=3, parameter=True)
        if M is None:
            M = W.shape[0]
            if M == 0:
                raise ValueError(f"weights[0] must have shape [M, n_1, {d}] with M >= 1 members, got {tuple(W.shape)}")
        if W.dim() != 3 or W.shape[0] != M or W.shape[2] != width or W.shape[1] == 0:
            raise ValueError(f"weights[{layer}] must have shape [M={M}, n_{layer + 1}, {width}] (M members, layer input "
                             f"width {width}), got {tuple(W.shape)}")
        width = W.shape[1]
        if biases[layer] is None:
            biases[layer] = W.new_zeros(M, W.shape[1])
        _checks.real_tensor(f"biases[{layer}]", biases[layer], min_dim=2, parameter=True)
        if tuple(biases[layer].shape) != (M, W.shape[1]):
            raise ValueError(f"biases[{layer}] must have shape [{M}, {W.shape[1]}], got {tuple(biases[layer].shape)}")
    output_weight, codes, params = _output_weight_and_activation_codes(z, weights, biases, activations, likelihood,
                                                                       sigma, D=width)
    chosen = _backend.resolve("mlp_ensemble_metric", z.device, backend, _ENSEMBLE_IMPLEMENTED)
    G = _backend.call_op(_mlp_ensemble_metric_op, _run_ensemble, z.reshape(-1, d).contiguous(),
                         [W.contiguous() for W in weights], [b.contiguous() for b in biases], codes, params,
                         output_weight, likelihood == "bernoulli", float(eps), chosen)
    _checks.finite_points(G, "mlp_ensemble_metric: G", f"the decoders' activations or Jacobians overflow {z.dtype} "
                          "(weights or inputs too large; float64 extends the range)")
    return G.reshape(*batch_shape, d, d)


# ------------------------------------------------------------------------------------------ recognising a decoder
_MODULE_ACTIVATIONS = {
    torch.nn.ReLU: lambda m: "relu",
    torch.nn.LeakyReLU: lambda m: ("leaky_relu", m.negative_slope),
    torch.nn.ELU: lambda m: ("elu", m.alpha),
    torch.nn.SiLU: lambda m: "silu",
    torch.nn.Softplus: lambda m: ("softplus", m.beta, m.threshold),
    torch.nn.Tanh: lambda m: "tanh",
    torch.nn.Sigmoid: lambda m: "sigmoid",
}


@dataclass(frozen=True)
class MLPDecoder:
    """An nn.Sequential of nn.Linear layers, each followed by at most one supported elementwise activation.

    Holds the modules, not their tensors, so that a decoder trained, moved or cast later is read as it is at call time.
    """

    linears: Tuple[torch.nn.Linear, ...]
    activations: Tuple[Activation, ...]
    activation_modules: Tuple[Optional[torch.nn.Module], ...]  # the module after each linear layer, None for none
    sequential: torch.nn.Sequential  # the decoder itself

    @staticmethod
    def recognise(decoder) -> Optional["MLPDecoder"]:
        """The MLP structure of `decoder`, or None when it is anything else (then the generic path is used)."""
        if not isinstance(decoder, torch.nn.Sequential):
            return None
        linears: List[torch.nn.Linear] = []
        activations: List[Activation] = []
        modules: List[Optional[torch.nn.Module]] = []
        for module in decoder:
            if isinstance(module, torch.nn.Identity):
                continue
            if type(module) is torch.nn.Linear:
                linears.append(module)
                activations.append("identity")
                modules.append(None)
                continue
            describe = _MODULE_ACTIVATIONS.get(type(module))
            # An activation must follow a linear layer directly (no two in a row, none before the first layer).
            if describe is None or not linears or activations[-1] != "identity":
                return None
            activations[-1] = describe(module)
            modules[-1] = module
        if not linears:
            return None
        return MLPDecoder(tuple(linears), tuple(activations), tuple(modules), decoder)

    def hooked(self) -> bool:
        """True when forward (pre-)hooks are registered on the decoder or its layers, or globally: they may change what
        the layers compute (spectral_norm, the old weight_norm, user hooks), and the fused path, which reads the
        weights directly, would bypass them. Checked at every call: hooks can be added after the metric is built."""
        from torch.nn.modules import module as nn_module

        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.sequential.modules())

    @property
    def weights(self) -> List[torch.Tensor]:
        return [linear.weight for linear in self.linears]

    @property
    def biases(self) -> List[Optional[torch.Tensor]]:
        return [linear.bias for linear in self.linears]

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features

    @property
    def out_features(self) -> int:
        return self.linears[-1].out_features
