"""PullbackMetric with the decoders people train: outputs read through output_key (pythae's ModelOutput), conv /
transposed-conv / upsampling / normalisation layers through the tangent-rows path, training-mode BatchNorm and Dropout
refused, and the max_memory chunking of the generic path."""
import importlib.util
import pathlib
import types
from collections import OrderedDict

import pytest
import torch

from pygeo.metrics.pullback import PullbackMetric

from conftest import assert_close

F64 = torch.float64
L = torch.nn


class StandInModelOutput(OrderedDict):
    """As pythae.models.base.base_utils.ModelOutput: an OrderedDict whose entries are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


def pythae_model_output():
    """pythae's own ModelOutput class, loaded from its file (pythae's package import needs pydantic, which its decoders'
    output class does not), or None when pythae is not installed."""
    spec = importlib.util.find_spec("pythae")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "models" / "base" / "base_utils.py"
    if not path.exists():
        return None
    module_spec = importlib.util.spec_from_file_location("_pythae_base_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ModelOutput


def mlp(d=3, D=6):
    return L.Sequential(L.Linear(d, 8), L.Tanh(), L.Linear(8, D)).to(F64)


def reference_metric(decoder, z, likelihood="euclidean"):
    """J^T W J with J by reverse mode, point by point; decoder returns a tensor."""
    B, d = z.shape
    J = torch.func.vmap(torch.func.jacrev(lambda x: decoder(x[None])[0]))(z).reshape(B, -1, d)
    out = decoder(z).reshape(B, -1)
    weight = torch.ones_like(out) if likelihood == "euclidean" else torch.sigmoid(out) * (1 - torch.sigmoid(out))
    return torch.einsum("bri,br,brj->bij", J, weight, J)


def central_difference(fn, z, h=1e-5):
    columns = []
    for k in range(z.shape[-1]):
        step = torch.zeros_like(z)
        step[:, k] = h
        columns.append((fn(z + step) - fn(z - step)) / (2 * h))
    return torch.stack(columns, 1)


# ------------------------------------------------------------------------------------------------------ output_key
class Wrapped(L.Module):
    def __init__(self, inner, wrap):
        super().__init__()
        self.inner, self.wrap = inner, wrap

    def forward(self, z):
        return self.wrap(self.inner(z))


WRAPPERS = {
    "stand-in ModelOutput": lambda x: StandInModelOutput(reconstruction=x, z=None),
    "dict": lambda x: {"reconstruction": x, "other": x * 0},
    "object": lambda x: types.SimpleNamespace(reconstruction=x),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS) + ["pythae ModelOutput"])
@pytest.mark.parametrize("likelihood", ["euclidean", "bernoulli", "categorical"])
def test_output_key_reads_the_reconstruction(wrapper, likelihood):
    if wrapper == "pythae ModelOutput":
        model_output = pythae_model_output()
        if model_output is None:
            pytest.skip("pythae is not installed (an optional peer, not a dependency: pip install pythae): this case "
                        "checks pythae's own ModelOutput class; the stand-in ModelOutput, dict and object cases above "
                        "cover output_key without it")
        wrap = lambda x: model_output(reconstruction=x)  # noqa: E731
    else:
        wrap = WRAPPERS[wrapper]
    inner = mlp()
    decoder = Wrapped(inner, wrap)
    z = torch.randn(5, 3, dtype=F64)
    metric = PullbackMetric(decoder, likelihood, output_key="reconstruction")
    plain = PullbackMetric(inner, likelihood)
    assert_close(metric.metric(z).detach(), plain.metric(z).detach(), F64)
    G, dG = metric.metric_and_derivative(z)
    G0, dG0 = plain.metric_and_derivative(z)
    assert_close(dG.detach(), dG0.detach(), F64)
    assert_close(metric.flat_coordinates(z).detach(), plain.flat_coordinates(z).detach(), F64)
    assert_close(metric.log_volume(z).detach(), plain.log_volume(z).detach(), F64)


def test_output_key_with_a_learned_std():
    inner = mlp(3, 8)

    def decoder(z):
        out = inner(z)
        return {"params": (out[:, :4], out[:, 4:].exp())}

    z = torch.randn(4, 3, dtype=F64)
    G = PullbackMetric(decoder, "gaussian", output_key="params").metric(z)
    expected = PullbackMetric(lambda x: (inner(x)[:, :4], inner(x)[:, 4:].exp()), "gaussian").metric(z)
    assert_close(G.detach(), expected.detach(), F64)


def test_output_key_errors():
    z = torch.randn(2, 3, dtype=F64)
    inner = mlp()
    with pytest.raises(ValueError, match="output_key"):
        PullbackMetric(Wrapped(inner, WRAPPERS["stand-in ModelOutput"])).metric(z)  # no output_key given
    with pytest.raises(ValueError, match="not a key"):
        PullbackMetric(Wrapped(inner, WRAPPERS["dict"]), output_key="recon").metric(z)
    with pytest.raises(ValueError, match="no key or attribute 'recon'"):
        PullbackMetric(Wrapped(inner, WRAPPERS["object"]), output_key="recon").metric(z)
    with pytest.raises(ValueError, match="no key or attribute"):
        PullbackMetric(inner, output_key="reconstruction").metric(z)  # a tensor has no entries
    with pytest.raises(TypeError, match="output_key must be None or a str"):
        PullbackMetric(inner, output_key=3)


# -------------------------------------------------------------------------------------------- the tangent-rows path
def conv_decoder():
    return L.Sequential(L.Linear(3, 4 * 3 * 3), L.Unflatten(1, (4, 3, 3)), L.ConvTranspose2d(4, 3, 4, 2, 1),
                        L.ELU(), L.Conv2d(3, 2, 3, padding=1))


def batch_norm_decoder():
    decoder = L.Sequential(L.Linear(3, 2 * 4 * 4), L.BatchNorm1d(32), L.SiLU(), L.Unflatten(1, (2, 4, 4)),
                           L.Conv2d(2, 3, 3, padding=1), L.BatchNorm2d(3), L.Softplus(), L.Flatten(), L.Linear(48, 5))
    with torch.no_grad():  # running statistics and affine parameters away from their identity defaults
        for module in (decoder[1], decoder[5]):
            module.running_mean.normal_()
            module.running_var.uniform_(0.3, 3.0)
            module.weight.normal_()
            module.bias.normal_()
    return decoder


DECODERS = {
    "conv": conv_decoder,
    "upsample-nearest": lambda: L.Sequential(L.Linear(3, 2 * 3 * 3), L.Unflatten(1, (2, 3, 3)), L.Tanh(),
                                             L.Upsample(scale_factor=2), L.Conv2d(2, 2, 3, padding=1)),
    "upsample-bilinear": lambda: L.Sequential(L.Linear(3, 2 * 3 * 3), L.Unflatten(1, (2, 3, 3)), L.Softplus(),
                                              L.Upsample(scale_factor=2, mode="bilinear"), L.Conv2d(2, 1, 3)),
    "batch-norm (eval)": batch_norm_decoder,
    "layer-norm": lambda: L.Sequential(L.Linear(3, 2 * 3 * 4), L.Unflatten(1, (2, 3, 4)), L.LayerNorm((3, 4)),
                                       L.GELU(), L.Flatten(), L.Linear(24, 6), L.LayerNorm(6)),
    "nested + dropout (eval)": lambda: L.Sequential(L.Sequential(L.Linear(3, 7), L.Dropout(0.3), L.Tanh()),
                                                    L.Sequential(L.Sequential(L.Linear(7, 7), L.Sigmoid()),
                                                                 L.Identity()), L.Linear(7, 4)),
    "conv1d reflect + convT1d": lambda: L.Sequential(L.Linear(3, 2 * 6), L.Unflatten(1, (2, 6)),
                                                     L.Conv1d(2, 3, 3, padding=1, padding_mode="reflect"), L.Mish(),
                                                     L.ConvTranspose1d(3, 2, 3, stride=2, output_padding=1)),
    "linear only": lambda: L.Sequential(L.Linear(3, 5), L.Unflatten(1, (5, 1)), L.Conv1d(5, 2, 1)),
}


def no_vmap(*args, **kwargs):
    raise AssertionError("the vmap(jvp) path was taken")


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("likelihood", ["euclidean", "bernoulli"])
def test_tangent_rows_path_matches_reverse_mode(name, dtype, likelihood, monkeypatch):
    decoder = DECODERS[name]().to(F64).eval()
    z = torch.randn(7, 3, dtype=F64)
    expected = reference_metric(decoder, z, likelihood)
    metric = PullbackMetric(decoder.to(dtype), likelihood)
    assert metric._layers is not None, "the decoder should be recognised"
    monkeypatch.setattr(PullbackMetric, "_rows_and_jacobian", no_vmap)
    G = metric.metric(z.to(dtype))
    assert_close(G.detach(), expected.detach(), dtype)
    assert torch.equal(G, G.transpose(-1, -2))


@pytest.mark.parametrize("name", ["conv", "batch-norm (eval)", "layer-norm", "upsample-bilinear"])
def test_derivative_against_central_differences(name):
    """dG by forward over forward mode; LayerNorm runs composed there (PyTorch's second-order forward-mode formula
    of native_layer_norm is wrong: pygeo.metrics._forward_tangents.ComposedNorms)."""
    decoder = DECODERS[name]().to(F64).eval()
    z = torch.randn(4, 3, dtype=F64)
    metric = PullbackMetric(decoder, "bernoulli")
    G, dG = metric.metric_and_derivative(z)
    with torch.no_grad():
        expected = central_difference(lambda x: reference_metric(decoder, x, "bernoulli"), z)
    assert_close(G.detach(), reference_metric(decoder, z, "bernoulli").detach(), F64)
    torch.testing.assert_close(dG.detach(), expected, rtol=1e-6, atol=1e-7 * float(expected.abs().max()))


def test_gradients_through_the_tangent_rows_path():
    decoder = DECODERS["layer-norm"]().to(F64)
    metric = PullbackMetric(decoder, "bernoulli")
    z = torch.randn(3, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(metric.metric, (z,))
    # parameter gradients equal those through the vmap(jvp) path
    metric.metric(z.detach()).sum().backward()
    fast = [p.grad.clone() for p in decoder.parameters()]
    decoder.zero_grad()
    PullbackMetric(lambda x: decoder(x), "bernoulli").metric(z.detach()).sum().backward()
    for a, b in zip(fast, (p.grad for p in decoder.parameters())):
        assert_close(a, b, F64)


def test_unrecognised_and_hooked_decoders_fall_back_to_vmap():
    z = torch.randn(5, 3, dtype=F64)
    group_norm = L.Sequential(L.Linear(3, 4 * 2), L.Unflatten(1, (4, 2)), L.GroupNorm(2, 4), L.Flatten()).to(F64)
    metric = PullbackMetric(group_norm)
    assert metric._layers is None
    assert_close(metric.metric(z).detach(), reference_metric(group_norm, z).detach(), F64)
    decoder = conv_decoder().to(F64)
    metric = PullbackMetric(decoder)
    handle = decoder[3].register_forward_hook(lambda module, inputs, output: 2 * output)
    try:
        assert metric._tangent_layers(z) is None
        assert_close(metric.metric(z).detach(), reference_metric(decoder, z).detach(), F64)
    finally:
        handle.remove()
    assert metric._tangent_layers(z) is not None


# ----------------------------------------------------------------------------------------------- training mode
@pytest.mark.parametrize("module", [L.BatchNorm1d(8), L.Dropout(0.2), L.AlphaDropout(0.1)])
def test_training_mode_modules_are_refused(module):
    decoder = L.Sequential(L.Linear(3, 8), module, L.Tanh(), L.Linear(8, 4)).to(F64)
    outer = Wrapped(decoder, lambda x: x)  # nested inside a custom module too
    z = torch.randn(5, 3, dtype=F64)
    for candidate in (decoder, outer):
        metric = PullbackMetric(candidate, "bernoulli")
        for call in (metric.metric, metric.metric_and_derivative, metric.flat_coordinates, metric.log_volume):
            with pytest.raises(ValueError, match=r"training mode: call decoder\.eval\(\)"):
                call(z)
    decoder.eval()
    G = PullbackMetric(outer, "bernoulli").metric(z)
    assert_close(G.detach(), reference_metric(decoder, z, "bernoulli").detach(), F64)


def test_batch_norm_without_running_statistics_is_refused():
    decoder = L.Sequential(L.Linear(3, 8), L.BatchNorm1d(8, track_running_stats=False), L.Linear(8, 4)).to(F64).eval()
    with pytest.raises(ValueError, match="batch statistics"):
        PullbackMetric(decoder).metric(torch.randn(5, 3, dtype=F64))


# ------------------------------------------------------------------------------------------------------ max_memory
@pytest.mark.parametrize("bad", [0, -5, True, "1GB", float("nan"), float("inf")])
def test_max_memory_is_validated(bad):
    with pytest.raises(ValueError, match="max_memory"):
        PullbackMetric(mlp(), max_memory=bad)


@pytest.mark.parametrize("route", ["tangent rows", "vmap"])
def test_chunks_under_max_memory_equal_one_call(route, monkeypatch):
    """Results equal one call up to rounding, not bitwise: a convolution may pick another kernel (blocking) for
    another batch size."""
    decoder = DECODERS["conv"]().to(F64).eval()
    if route == "vmap":
        decoder = Wrapped(decoder, lambda x: x)
    z = torch.randn(37, 3, dtype=F64)
    whole = PullbackMetric(decoder, "bernoulli", max_memory=None)
    G0 = whole.metric(z)
    G0_, dG0 = whole.metric_and_derivative(z)
    calls = []
    original = PullbackMetric._rows_and_tangents

    def counted(self, part):
        calls.append(part.shape[0])
        return original(self, part)

    monkeypatch.setattr(PullbackMetric, "_rows_and_tangents", counted)
    widest = 3 * 6 * 6  # the transposed convolution's output per point (3 channels of 6 x 6)
    budget = 3 * (3 + 1) * widest * 8 * 5  # five points per chunk
    chunked = PullbackMetric(decoder, "bernoulli", max_memory=budget)
    G = chunked.metric(z)
    assert calls == [5] * 7 + [2], calls
    G_, dG = chunked.metric_and_derivative(z)
    assert_close(G.detach(), G0.detach(), F64)
    assert_close(G_.detach(), G0_.detach(), F64)
    assert_close(dG.detach(), dG0.detach(), F64)
    assert chunked._widest_row(z) == widest


def test_default_budget_is_256_mib():
    assert PullbackMetric(mlp()).max_memory == 256 * 2 ** 20
    assert PullbackMetric(mlp(), max_memory=None).max_memory is None
