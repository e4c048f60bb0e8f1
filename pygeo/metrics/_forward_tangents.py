"""Forward-mode Jacobians of nn.Sequential decoders by pushing the d basis tangents through the layers as extra rows.

For a decoder z [B, d] -> output [B, ...] built of affine layers (Linear, Conv*d, ConvTranspose*d, eval-mode
BatchNorm), shape and resampling layers (Flatten, Unflatten, Upsample, Identity, eval-mode Dropout), elementwise
activations and LayerNorm, the Jacobian columns d output / d z_i are the images of the basis vectors e_i under the
layers' derivatives: an affine layer maps a tangent by its linear part (the layer without its bias), an elementwise
activation multiplies it by s'(h) computed once from the value pass, and LayerNorm by its exact Jacobian-vector
product. The tangents are held as one tensor of B x d rows, point-major (row b d + i = d x_b / d z_i), so that every
layer is one batched call for all of them (no vmap, no per-tangent dispatch) and the Jacobian comes out as
Jt [B, d, D] without a copy. Anything else (other modules, hooks) is not recognised and goes through vmap(jvp).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

_AFFINE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
           torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
# Linear maps that act on each row of the batch alone (dim 0 untouched); Flatten / Unflatten are checked for that.
_LINEAR_SHAPE = (torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Upsample, torch.nn.UpsamplingNearest2d,
                 torch.nn.UpsamplingBilinear2d, _DropoutNd)
_ELEMENTWISE = (torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.SELU, torch.nn.CELU, torch.nn.SiLU,
                torch.nn.GELU, torch.nn.Softplus, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Mish, torch.nn.Hardtanh,
                torch.nn.ReLU6, torch.nn.LogSigmoid, torch.nn.Softsign, torch.nn.Tanhshrink)


def sequential_layers(decoder) -> Optional[List[torch.nn.Module]]:
    """The layers of an nn.Sequential decoder (nested Sequentials flattened) when every one is of a kind whose tangent
    map is known (module docstring), else None. Whether BatchNorm / Dropout are in eval mode is checked at call time."""
    if not isinstance(decoder, torch.nn.Sequential):
        return None
    layers: List[torch.nn.Module] = []
    for module in decoder:
        if isinstance(module, torch.nn.Sequential):
            inner = sequential_layers(module)
            if inner is None:
                return None
            layers.extend(inner)
        elif type(module) in _AFFINE or isinstance(module, _BatchNorm) or isinstance(module, _LINEAR_SHAPE) \
                or type(module) in _ELEMENTWISE or type(module) is torch.nn.LayerNorm:
            if isinstance(module, torch.nn.Flatten) and module.start_dim == 0:
                return None  # would mix the batch rows
            if isinstance(module, torch.nn.Unflatten) and module.dim == 0:
                return None
            layers.append(module)
        else:
            return None
    return layers or None


def hooked(decoder: torch.nn.Module) -> bool:
    """True when forward (pre-)hooks may change what the layers compute (the tangent pass would bypass them)."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in decoder.modules())


def value_and_tangents(layers: List[torch.nn.Module], z: torch.Tensor):
    """(output [B, ...], tangents [B, d, ...]) of the layers at z [B, d]: tangents[b, i] = d output_b / d z_i.
    Differentiable (plain autograd operations throughout).

    Up to the first layer whose derivative depends on the point (an activation, LayerNorm) the tangents are the same
    for every point: they go through those layers as d rows, not B d (for a Linear -> ConvTranspose decoder, the
    first transposed convolution runs on d rows), and are broadcast over the batch at that layer."""
    B, d = z.shape
    x = z
    tangents = torch.eye(d, dtype=z.dtype, device=z.device)  # [n d, d] with n = 1 (shared) or B; row b d + i
    n = 1
    for layer in layers:
        x, tangents = _push(layer, x, tangents, n, d)
        n = tangents.shape[0] // d
    tangents = tangents.reshape(n, d, *x.shape[1:])
    return x, (tangents if n == B else tangents.expand(B, *tangents.shape[1:]))


def widest_row(layers: List[torch.nn.Module], point: torch.Tensor) -> int:
    """The largest number of elements per point of any layer's output (the widest tangent row), from one point."""
    x, widest = point, point[0].numel()
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
            widest = max(widest, x[0].numel())
    return widest


def _push(layer: torch.nn.Module, x: torch.Tensor, tangents: torch.Tensor, n: int, d: int):
    """One layer: (its output at x [B, ...], the tangents [n d, ...] mapped by its derivative at x: [n d, ...] for
    a layer whose derivative is the same at every point, else [B d, ...]; n = 1 while the tangents are shared)."""
    kind = type(layer)
    if kind in _AFFINE:
        return layer(x), _linear_part(layer, tangents)
    if isinstance(layer, _BatchNorm):
        scale = _batch_norm_scale(layer, x)
        return layer(x), tangents * scale
    if isinstance(layer, _LINEAR_SHAPE):  # linear, without offset: the layer itself maps the tangents
        return layer(x), layer(tangents)
    if kind is torch.nn.LayerNorm:
        return layer(x), _layer_norm_tangents(layer, x, tangents, n, d)
    # An elementwise activation: (s(h), s'(h)) by one forward-mode pass with a unit tangent, exact for the module as
    # configured; the module gets a copy of h so that in-place activations mutate nothing the transform captured.
    value, slope = torch.func.jvp(lambda h: layer(h.clone()), (x,), (torch.ones_like(x),))
    return value, (tangents.reshape(n, d, *x.shape[1:]) * slope.unsqueeze(1)).reshape(-1, *x.shape[1:])


def _linear_part(layer: torch.nn.Module, tangents: torch.Tensor) -> torch.Tensor:
    """An affine layer without its bias, applied to the tangent rows."""
    if isinstance(layer, torch.nn.Linear):
        return F.linear(tangents, layer.weight)
    if isinstance(layer, torch.nn.modules.conv._ConvTransposeNd):
        convolve = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(layer.kernel_size)]
        return convolve(tangents, layer.weight, None, layer.stride, layer.padding, layer.output_padding, layer.groups,
                        layer.dilation)
    return layer._conv_forward(tangents, layer.weight, None)  # non-zero padding modes pad linearly too


def _batch_norm_scale(layer: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """weight / sqrt(running_var + eps), shaped to broadcast over x's channel dim 1 (eval mode: an affine map)."""
    if layer.training or layer.running_var is None:
        raise ValueError(f"{type(layer).__name__} in training mode (or without running statistics) normalises with "
                         f"batch statistics: call decoder.eval() first")
    scale = torch.rsqrt(layer.running_var + layer.eps)
    if layer.weight is not None:
        scale = scale * layer.weight
    return scale.reshape(-1, *([1] * (x.dim() - 2))).to(x.dtype)


def _layer_norm_tangents(layer: torch.nn.LayerNorm, x: torch.Tensor, tangents: torch.Tensor, n: int, d: int):
    """The exact JVP of y = (x - mean) / sqrt(var + eps) * weight over the normalised trailing dims:
    dy = (dt - x_hat mean(x_hat dt)) / sigma * weight, dt = t - mean(t)."""
    dims = tuple(range(-len(layer.normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    sigma = torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + layer.eps)
    x_hat = ((x - mean) / sigma).unsqueeze(1)  # [B, 1, ...]
    t = tangents.reshape(n, d, *x.shape[1:])
    centred = t - t.mean(dims, keepdim=True)
    out = (centred - x_hat * (x_hat * centred).mean(dims, keepdim=True)) / sigma.unsqueeze(1)  # [B, d, ...]
    if layer.weight is not None:
        out = out * layer.weight
    return out.reshape(-1, *x.shape[1:])


class ComposedNorms(torch.overrides.TorchFunctionMode):
    """Within it, F.layer_norm and F.instance_norm (with input statistics) run as compositions of elementary ops.

    PyTorch's forward-mode formulas of native_layer_norm and instance_norm are right to first order but wrong when
    differentiated again in forward mode (jvp of jvp through nn.LayerNorm misses terms: measured against central
    differences with torch 2.13, errors of order one), which the second derivatives of the metric (dG, Christoffel
    symbols, curvature) are made of. The composition is exact at every order; it is used under torch.func transforms
    only, so plain forward passes keep the native kernels."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm:
            return _composed_layer_norm(*args, **kwargs)
        if func is F.instance_norm:
            composed = _composed_instance_norm(*args, **kwargs)
            if composed is not None:
                return composed
        return func(*args, **kwargs)


def _composed_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    centred = input - input.mean(dims, keepdim=True)
    out = centred * torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


def _composed_instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                            use_input_stats=True, momentum=0.1, eps=1e-5):
    if not use_input_stats:
        return None  # running statistics: an affine map, whose native formulas are exact
    dims = tuple(range(2, input.dim()))
    centred = input - input.mean(dims, keepdim=True)
    out = centred * torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + eps)
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if weight is not None:
        out = out * weight.reshape(shape)
    return out if bias is None else out + bias.reshape(shape)
