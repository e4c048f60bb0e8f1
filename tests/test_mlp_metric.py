import pytest
import torch

import pygeo
from pygeo.ops.mlp_metric import _IMPLEMENTED as MLP_METRIC_BACKENDS
from pygeo.ops.mlp_metric import MLPDecoder
from pygeo.reference import mlp_metric as reference
from pygeo.reference.mlp_metric import forward_with_tangents
from pygeo.reference.jtj import jtj as jtj_reference

from conftest import assert_close, backend_params

BACKENDS = backend_params(MLP_METRIC_BACKENDS)
F64 = torch.float64

ACTIVATION_MODULES = {
    "identity": torch.nn.Identity,
    "relu": torch.nn.ReLU,
    "leaky_relu": lambda: torch.nn.LeakyReLU(0.2),
    "elu": lambda: torch.nn.ELU(0.7),
    "silu": torch.nn.SiLU,
    "softplus": lambda: torch.nn.Softplus(beta=2.0, threshold=3.0),  # low threshold: both branches get exercised
    "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
}


def make_mlp(widths, activation, last=None, dtype=F64):
    layers = []
    for i in range(len(widths) - 1):
        layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
        is_last = i == len(widths) - 2
        if not is_last:
            layers.append(ACTIVATION_MODULES[activation]())
        elif last is not None:
            layers.append(ACTIVATION_MODULES[last]())
    return torch.nn.Sequential(*layers).to(dtype)


def layer_arguments(decoder):
    plan = MLPDecoder.recognise(decoder)
    assert plan is not None
    return plan.weights, plan.biases, plan.activations


def explicit_metric(decoder, z, likelihood, sigma=None):
    """J by torch.func.jacfwd through the nn.Module itself, then the Fisher weight of MATH.md section 1."""
    J = torch.func.vmap(torch.func.jacfwd(lambda p: decoder(p.unsqueeze(0))[0]))(z)
    if likelihood == "euclidean":
        weight = None
    elif likelihood == "gaussian":
        weight = torch.as_tensor(sigma, dtype=z.dtype).reshape(-1).expand(J.shape[1]).pow(-2)
    else:
        p = torch.sigmoid(decoder(z)).clamp(1e-6, 1 - 1e-6)
        weight = p * (1 - p)
    return jtj_reference(J, weight)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, widths", [(1, (1, 5, 3)), (7, (3, 17, 9, 40)), (33, (17, 24, 70))])
@pytest.mark.parametrize("likelihood", ["euclidean", "gaussian", "bernoulli"])
def test_matches_float64_reference(backend_device, dtype, B, widths, likelihood):
    backend, device = backend_device
    decoder = make_mlp(widths, "softplus")
    z = torch.randn(B, widths[0], dtype=F64)
    sigma = torch.rand(widths[-1], dtype=F64) + 0.5 if likelihood == "gaussian" else None
    with torch.no_grad():
        expected = explicit_metric(decoder, z, likelihood, sigma)
        weights, biases, activations = layer_arguments(decoder.to(device=device, dtype=dtype))
        G = pygeo.ops.mlp_metric(z.to(device=device, dtype=dtype), weights, biases, activations, likelihood=likelihood,
                                 sigma=None if sigma is None else sigma.to(device=device, dtype=dtype), backend=backend)
    assert G.shape == (B, widths[0], widths[0]) and G.dtype == dtype
    assert torch.equal(G, G.transpose(-1, -2)), "G must be exactly symmetric"
    assert_close(G.cpu(), expected, dtype)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("activation", list(ACTIVATION_MODULES))
@pytest.mark.parametrize("last", [None, "sigmoid"])
def test_fused_equals_generic_for_every_activation(backend_device, activation, last):
    backend, device = backend_device
    decoder = make_mlp((3, 16, 12, 20), activation, last).to(device)
    z = 1.5 * torch.randn(9, 3, dtype=F64, device=device)
    for likelihood in ("euclidean", "bernoulli"):
        fused = pygeo.PullbackMetric(decoder, likelihood, backend=backend)
        generic = pygeo.PullbackMetric(lambda x: decoder(x), likelihood, backend="torch")
        assert fused._mlp is not None and generic._mlp is None
        with torch.no_grad():
            assert_close(fused.metric(z).cpu(), generic.metric(z).cpu(), F64)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("likelihood", ["euclidean", "gaussian"])
def test_triangular_last_layer_path(backend_device, likelihood):
    """Large batches with a constant weight take the Cholesky-compressed last layer: same G."""
    backend, device = backend_device
    if backend == "triton" and device == "cpu":
        B = 40  # the interpreter: few programs
    else:
        B = 300
    decoder = make_mlp((4, 24, 48), "tanh")
    z = torch.randn(B, 4, dtype=F64)
    sigma = torch.rand(48, dtype=F64) + 0.5 if likelihood == "gaussian" else None
    with torch.no_grad():
        expected = explicit_metric(decoder, z, likelihood, sigma)
        for dtype in (torch.float32, torch.float64):
            weights, biases, activations = layer_arguments(decoder.to(device=device, dtype=dtype))
            G = pygeo.ops.mlp_metric(z.to(device=device, dtype=dtype), weights, biases, activations,
                                     likelihood=likelihood, backend=backend,
                                     sigma=None if sigma is None else sigma.to(device=device, dtype=dtype))
            assert_close(G.cpu(), expected, dtype)


def test_batch_dims_and_none_bias():
    W1, W2 = torch.randn(6, 2, dtype=F64), torch.randn(5, 6, dtype=F64)
    b2 = torch.randn(5, dtype=F64)
    z = torch.randn(3, 4, 2, dtype=F64)
    G = pygeo.ops.mlp_metric(z, [W1, W2], [None, b2], ["elu", "identity"])
    assert G.shape == (3, 4, 2, 2)
    _, J = forward_with_tangents(z.reshape(-1, 2), [W1, W2], [torch.zeros(6, dtype=F64), b2], [3, 0], [1.0, 0, 0, 0])
    assert_close(G.reshape(-1, 2, 2), jtj_reference(J), F64)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("likelihood", ["euclidean", "gaussian", "bernoulli"])
@pytest.mark.parametrize("D", [4, 7])  # 7 > hidden width 5: the backward goes through the last layer's Gram matrix
def test_gradcheck(backend_device, likelihood, D):
    backend, device = backend_device
    to = dict(dtype=F64, device=device)
    z = torch.randn(3, 2, **to, requires_grad=True)
    W1 = torch.randn(5, 2, **to, requires_grad=True)
    b1 = torch.randn(5, **to, requires_grad=True)
    W2 = torch.randn(D, 5, **to, requires_grad=True)
    b2 = torch.randn(D, **to, requires_grad=True)
    sigma = (torch.rand(D, **to) + 0.5).requires_grad_(likelihood == "gaussian")

    def fn(z, W1, b1, W2, b2, sigma):
        return pygeo.ops.mlp_metric(z, [W1, W2], [b1, b2], ["silu", "identity"], likelihood=likelihood,
                                    sigma=sigma if likelihood == "gaussian" else None, backend=backend)

    inputs = (z, W1, b1, W2, b2, sigma)
    assert torch.autograd.gradcheck(fn, inputs)
    if backend == "torch":  # the backward is the same plain-torch code whichever backend ran the forward
        assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("frozen", ["decoder", "first layer", "nothing"])
def test_backward_differentiates_only_what_needs_it(frozen):
    """Gradients of the inputs that require one match the plain-torch reference whichever others are frozen."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 3, generator=g, dtype=F64)
    params = [torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, generator=g, dtype=F64),
              torch.randn(11, 8, generator=g, dtype=F64), torch.randn(11, generator=g, dtype=F64)]
    trainable = {"decoder": [], "first layer": [2, 3], "nothing": [0, 1, 2, 3]}[frozen]
    upstream = torch.randn(6, 3, 3, generator=g, dtype=F64)

    def gradients(metric_fn):
        point = z.clone().requires_grad_(True)
        tensors = [p.clone().requires_grad_(i in trainable) for i, p in enumerate(params)]
        G = metric_fn(point, [tensors[0], tensors[2]], [tensors[1], tensors[3]])
        wanted = [point] + [tensors[i] for i in trainable]
        return torch.autograd.grad(G, wanted, upstream, allow_unused=True, materialize_grads=True)

    fused = gradients(lambda x, W, b: pygeo.ops.mlp_metric(x, W, b, ["tanh", "identity"], likelihood="gaussian",
                                                           sigma=0.7))
    plain = gradients(lambda x, W, b: reference.mlp_metric(x, W, b, [reference.TANH, reference.IDENTITY],
                                                           [0.0] * 4, torch.full((11,), 0.7 ** -2, dtype=F64),
                                                           False, 1e-6))
    for actual, expected in zip(fused, plain):
        assert_close(actual, expected, F64)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_opcheck(backend_device):
    backend, device = backend_device
    to = dict(dtype=F64, device=device)
    z = torch.randn(4, 3, **to, requires_grad=True)
    weights = [torch.randn(6, 3, **to, requires_grad=True), torch.randn(7, 6, **to, requires_grad=True)]
    biases = [torch.randn(6, **to), torch.randn(7, **to, requires_grad=True)]
    output_weight = torch.rand(7, **to) + 0.5
    op = torch.ops.pygeo.mlp_metric.default
    torch.library.opcheck(op, (z, weights, biases, [6, 0], [0.0, 0.0, 0.0, 0.0], None, True, 1e-6, backend))
    torch.library.opcheck(op, (z, weights, biases, [5, 7], [1.0, 20.0, 0.0, 0.0], output_weight, False, 1e-6, backend))


def test_compiles():
    decoder = make_mlp((2, 8, 5), "tanh", dtype=torch.float32)
    z = torch.randn(6, 2)
    compiled = torch.compile(lambda z: pygeo.ops.mlp_metric(z, *layer_arguments(decoder), likelihood="bernoulli"),
                             fullgraph=True)
    with torch.no_grad():
        G = compiled(z)
        assert_close(G, explicit_metric(decoder.double(), z.double(), "bernoulli"), torch.float32)


def test_recognise():
    assert MLPDecoder.recognise(torch.nn.Sequential(torch.nn.Linear(2, 3))) is not None
    assert MLPDecoder.recognise(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Identity(), torch.nn.ReLU())) is not None
    assert MLPDecoder.recognise(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(2, 3))) is None
    assert MLPDecoder.recognise(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Tanh())) is None
    assert MLPDecoder.recognise(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.GELU())) is None
    assert MLPDecoder.recognise(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Dropout())) is None
    assert MLPDecoder.recognise(torch.nn.Linear(2, 3)) is None
    assert MLPDecoder.recognise(lambda z: z) is None


def test_decoder_changed_after_construction_is_read_at_call_time():
    decoder = make_mlp((2, 6, 4), "tanh")
    metric = pygeo.PullbackMetric(decoder)
    z = torch.randn(3, 2, dtype=F64)
    with torch.no_grad():
        decoder[2].weight.mul_(3.0)
        assert_close(metric.metric(z), explicit_metric(decoder, z, "euclidean"), F64)
    decoder.float()
    assert metric.metric(z.float()).dtype == torch.float32


def _layers():
    return [torch.randn(4, 2), torch.randn(3, 4)], [torch.randn(4), torch.randn(3)]


@pytest.mark.parametrize("bad, message", [
    (lambda W, b: pygeo.ops.mlp_metric(torch.randn(5, 3), W, b, ["tanh", "identity"]), r"weights\[0\] must have shape \[n_1, 3\]"),
    (lambda W, b: pygeo.ops.mlp_metric(torch.randn(5, 2), W, b[:1], ["tanh", "identity"]), "one entry per layer"),
    (lambda W, b: pygeo.ops.mlp_metric(torch.randn(5, 2), W, b, ["gelu", "identity"]), r"activations\[0\] must be one of"),
    (lambda W, b: pygeo.ops.mlp_metric(torch.randn(5, 2), W, b, [("elu", 1.0, 2.0), "identity"]), "at most 1 parameters"),
    (lambda W, b: pygeo.ops.mlp_metric(torch.randn(5, 2), W, [b[0], torch.randn(4)], ["tanh", "identity"]), r"biases\[1\] must have shape \[3\]"),
    (lambda W, b: pygeo.ops.mlp_metric(torch.randn(5, 2), W, b, ["tanh", "identity"], likelihood="poisson"), "likelihood must be one of"),
    (lambda W, b: pygeo.ops.mlp_metric(torch.randn(5, 2), W, b, ["tanh", "identity"], likelihood="gaussian"), "sigma is required"),
    (lambda W, b: pygeo.ops.mlp_metric(torch.randn(5, 2), W, b, ["tanh", "identity"], likelihood="gaussian", sigma=torch.ones(2)), "sigma must be a float or have D=3"),
    (lambda W, b: pygeo.ops.mlp_metric(torch.randn(5, 2), W, b, ["tanh", "identity"], likelihood="gaussian", sigma=-1.0), "sigma must be positive"),
    (lambda W, b: pygeo.ops.mlp_metric(torch.randn(5, 2, dtype=F64), W, b, ["tanh", "identity"]), "same dtype"),
    (lambda W, b: pygeo.ops.mlp_metric(torch.randint(0, 3, (5, 2)), W, b, ["tanh", "identity"]), "z must be a real floating tensor"),
    (lambda W, b: pygeo.ops.mlp_metric(torch.full((5, 2), float("nan")), W, b, ["tanh", "identity"]), "z contains NaN"),
    (lambda W, b: pygeo.ops.mlp_metric(torch.randn(5, 2), [W[0], W[1] * float("inf")], b, ["tanh", "identity"]), r"weights\[1\] contains NaN or Inf"),
    (lambda W, b: pygeo.ops.mlp_metric(torch.randn(5, 2), [], [], []), "at least one layer"),
    (lambda W, b: pygeo.ops.mlp_metric(torch.randn(5, 2), W, b, ["tanh", "identity"], backend="nope"), "backend must be"),
])
def test_bad_input(bad, message):
    W, b = _layers()
    with pytest.raises((ValueError, TypeError), match=message):
        bad(W, b)


def test_kernel_rechecks_sizes():
    C = pygeo._backend.compiled_module()
    if C is None:
        pytest.skip("pygeo._C is not built in this install (pure-PyTorch fallback): there is no compiled kernel to check")
    z = torch.randn(2, 2)
    with pytest.raises(ValueError, match="disagree"):
        C.mlp_metric_cpu(z.data_ptr(), [z.data_ptr()], [], [2, 2], [0], [0.0, 0.0], 0, False, 1e-6, False, 0, 2, "float32")
    with pytest.raises(ValueError, match="unknown activation code"):
        C.mlp_metric_cpu(z.data_ptr(), [z.data_ptr()], [z.data_ptr()], [2, 2], [99], [0.0, 0.0], 0, False, 1e-6, False,
                         z.data_ptr(), 1, "float32")


def test_compressed_last_layer_cache_follows_weight_updates():
    decoder = make_mlp((4, 24, 48), "tanh")
    metric = pygeo.PullbackMetric(decoder, backend="cpp" if pygeo.backends()["cpp"].available else "torch")
    z = torch.randn(300, 4, dtype=F64)
    with torch.no_grad():
        for _ in range(2):
            assert_close(metric.metric(z), explicit_metric(decoder, z, "euclidean"), F64)
            decoder[2].weight.add_(0.5)  # an optimiser step: in place
        decoder[2].weight = torch.nn.Parameter(torch.randn(48, 24, dtype=F64))  # a new tensor
        assert_close(metric.metric(z), explicit_metric(decoder, z, "euclidean"), F64)
        assert_close(metric.metric(z[:3]), explicit_metric(decoder, z[:3], "euclidean"), F64)


_SMOOTH = {  # activation -> (value, slope) in float64
    "tanh": (torch.tanh, lambda x: 1 - torch.tanh(x) ** 2),
    "softplus": (torch.nn.functional.softplus, torch.sigmoid),
    "silu": (torch.nn.functional.silu, lambda x: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x)))),
    "sigmoid": (torch.sigmoid, lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x))),
}


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("activation", sorted(_SMOOTH))
def test_smooth_activation_values_and_slopes_to_float32_accuracy(backend_device, activation):
    """z -> a -> (x 3) -> tanh -> (x 1): G = (3 a'(z) tanh'(3 a(z)))^2, so the values and the slopes of a (the C++
    kernel's vectorised float versions) both enter G, the values amplified by up to ~40. Checked on a dense grid
    against float64 to a few float32 roundings of max |G| (relative accuracy is lost where a' is tiny, by any float32
    implementation: 1 - tanh^2 cancels)."""
    backend, device = backend_device
    value, slope = _SMOOTH[activation]
    tanh_slope = _SMOOTH["tanh"][1]
    z = torch.cat([torch.linspace(-30.0, 30.0, 6001, dtype=torch.float64),
                   torch.tensor([0.0, 1e-30, -1e-8, 0.3999, 0.4001, 19.99, 20.01])]).float().double()  # exact in float32
    expected = (3 * slope(z) * tanh_slope(3 * value(z))) ** 2
    one = torch.ones(1, 1, dtype=torch.float32, device=device)
    G = pygeo.ops.mlp_metric(z.float().to(device)[:, None], [one, 3 * one, one], [None, None, None],
                             [activation, "tanh", "identity"], backend=backend)
    scale = float(expected.abs().max())
    # silu'(x) = s (1 + x (1 - s)): 1 - s is float32-rounded to a multiple of 6e-8 near s = 1, times x (every backend)
    tolerance = 4e-6 if activation == "silu" else 2e-6
    torch.testing.assert_close(G.cpu().double()[:, 0, 0] / scale, expected / scale, rtol=0.0, atol=tolerance)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid", "softplus", "silu", "elu", "leaky_relu", "identity"])
@pytest.mark.parametrize("overflow", ["nan", "inf"])
def test_overflowing_pre_activations_are_refused_on_every_backend(backend_device, activation, overflow):
    """Issue 30: float32 pre-activations that overflow (h = 1e20 z_0 -/+ 1e20 z_1 with z ~ 1e20: Inf - Inf = NaN, or
    Inf) were refused by the torch backend but came out of the C++ kernel as G = 0 (its activations map NaN to finite
    values: ReLU(NaN) = 0, a saturated tanh gives slope 0). Every backend now refuses such a point the same way
    (reference.overflowed_points), even where the activation would have hidden it."""
    backend, device = backend_device
    sign = -1.0 if overflow == "nan" else 1.0
    z = torch.tensor([[1e30, 1e30], [0.5, -0.5]], device=device)
    W1 = torch.tensor([[1e10, sign * 1e10], [1.0, 2.0]], device=device)  # h_0 = 1e40 -/+ 1e40 at the first point
    W2 = torch.randn(3, 2, device=device)
    with pytest.raises(ValueError, match=r"G is not finite at 1 of 2 points \(first: index 0\).*overflow"):
        pygeo.ops.mlp_metric(z, [W1, W2], [None, None], [activation, "identity"], backend=backend)
    G = pygeo.ops.mlp_metric(z[1:], [W1, W2], [None, None], [activation, "identity"], backend=backend)
    assert torch.isfinite(G).all()


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu", "silu", "softplus", "identity"])
def test_overflowing_bernoulli_logits_are_refused_on_every_backend(backend_device, activation):
    """The Bernoulli weight p (1 - p) of a NaN logit (f = 1e10 a_0 - 1e10 a_1 with a ~ 1e30: Inf - Inf) was clamped to
    a finite number by the C++ kernel (min/max of NaN), so G came out finite; the logit enters G, so every backend
    refuses it. The tangents (~1e10) do not overflow: only the logit does."""
    backend, device = backend_device
    z = torch.tensor([[1e30, 1e30], [0.5, -0.5]], device=device)
    W1 = torch.eye(2, device=device)
    W2 = torch.tensor([[1e10, -1e10], [0.5, 1.0]], device=device)
    with pytest.raises(ValueError, match=r"G is not finite at 1 of 2 points \(first: index 0\).*overflow"):
        pygeo.ops.mlp_metric(z, [W1, W2], [None, None], [activation, "identity"], likelihood="bernoulli",
                             backend=backend)
    # with a Euclidean likelihood the identity output does not enter G: not refused, and equal to the reference
    G = pygeo.ops.mlp_metric(z, [W1, W2], [None, None], [activation, "identity"], backend=backend)
    expected = pygeo.ops.mlp_metric(z.double().cpu(), [W1.double().cpu(), W2.double().cpu()], [None, None],
                                    [activation, "identity"], backend="torch")
    assert_close(G.cpu(), expected, torch.float32)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "softplus", "sigmoid", "tanh"])
def test_saturated_float32_activations_have_exactly_zero_slope(backend_device, activation):
    """Issue 30: at h = -1e14 these activations' slopes are 0 in float32 (and float64). The C++ kernel's vectorised
    exp clamped its argument to -87 instead of flushing to 0, so sigmoid(-1e14) came out as 1.6e-38, SiLU's slope
    s (1 + h (1 - s)) as -1.6e-24, and with first-layer weights of 1e30, G ~ 1e12 where it is 0."""
    backend, device = backend_device
    z = -torch.tensor([[1e-16, 2e-16], [3e-16, 1e-16], [5e-16, 4e-16]], device=device)
    W1 = 1e30 * torch.eye(2, device=device)
    W2 = torch.randn(4, 2, device=device)
    G = pygeo.ops.mlp_metric(z, [W1, W2], [None, None], [activation, "identity"], backend=backend)
    assert float(G.abs().max()) <= torch.finfo(torch.float32).tiny, f"G = {G}"
    reference_G = pygeo.ops.mlp_metric(z.double().cpu(), [W1.double().cpu(), W2.double().cpu()], [None, None],
                                       [activation, "identity"], backend="torch")
    assert float(reference_G.abs().max()) == 0.0


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saturating_slopes_keep_their_relative_accuracy(backend_device, activation, dtype):
    """Issue 30 (b): float64 fuzz inputs had cpp and torch differ by 2.8e-8 against a tolerance of 5.5e-11. The kernels
    were wrong, not the tolerance: both formed tanh' = 1 - t^2 (and sigmoid' = s (1 - s), silu's 1 - s), which cancel
    where the activation saturates, so a 1-ulp difference between libm's tanh and torch's became 3e-7 relative at
    h = 10.9. Every backend now forms the slopes without the cancellation; checked against independent closed forms
    (sech^2, 1 / (4 cosh^2(h / 2))) to a few roundings, relative to each value."""
    backend, device = backend_device
    h = torch.linspace(0.25, 17.0 if dtype == torch.float64 else 8.0, 2001, dtype=F64)
    h = torch.cat([h, -h]) if activation != "silu" else h  # silu' crosses 0 at h = -1.28: no relative accuracy there
    h = h.to(dtype).double()  # exactly representable in dtype
    if activation == "tanh":
        slope = torch.cosh(h).pow(-2)
    elif activation == "sigmoid":
        slope = 0.25 * torch.cosh(0.5 * h).pow(-2)
    else:
        slope = torch.sigmoid(h) + h * 0.25 * torch.cosh(0.5 * h).pow(-2)
    one = torch.ones(1, 1, dtype=dtype, device=device)
    G = pygeo.ops.mlp_metric(h.to(device=device, dtype=dtype)[:, None], [one, one], [None, None],
                             [activation, "identity"], backend=backend)[:, 0, 0].cpu().double()
    # the float32 kernels' vectorised exp carries a few ulps; float64 uses libm
    tolerance = 64 * torch.finfo(dtype).eps if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(G, slope * slope, rtol=tolerance, atol=0.0)
