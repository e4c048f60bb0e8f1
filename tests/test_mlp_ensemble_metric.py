"""pygeo.ops.mlp_ensemble_metric: the mean metric of M MLPs of one architecture in one fused call, and the
EnsembleMetric path that uses it."""
import importlib
import math

import pytest
import torch

import pygeo
from pygeo.metrics import EnsembleMetric
from pygeo.ops.mlp_metric import _ENSEMBLE_IMPLEMENTED, MLPDecoder

from conftest import assert_close, backend_params
from test_mlp_metric import explicit_metric, make_mlp

BACKENDS = backend_params(_ENSEMBLE_IMPLEMENTED)
mlp_metric_module = importlib.import_module("pygeo.ops.mlp_metric")  # the module (pygeo.ops.mlp_metric is the function)
F64 = torch.float64


def stacked(decoders, device="cpu", dtype=F64):
    plans = [MLPDecoder.recognise(decoder.to(device=device, dtype=dtype)) for decoder in decoders]
    L = len(plans[0].linears)
    weights = [torch.stack([plan.weights[l] for plan in plans]) for l in range(L)]
    biases = [torch.stack([plan.biases[l] for plan in plans]) for l in range(L)]
    return weights, biases, plans[0].activations


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M, B, widths", [(1, 1, (1, 5, 3)), (3, 7, (3, 17, 9, 40)), (4, 33, (3, 9, 40)),
                                          (2, 1000, (3, 6, 11))])
@pytest.mark.parametrize("likelihood", ["euclidean", "gaussian", "bernoulli"])
def test_matches_mean_of_float64_references(backend_device, dtype, M, B, widths, likelihood):
    """(4, 33, (3, 9, 40)) takes the compressed last layer for euclidean and gaussian; B = 1000 spreads over point
    blocks, the small batches over (block, member) items."""
    backend, device = backend_device
    decoders = [make_mlp(widths, "softplus") for _ in range(M)]
    z = torch.randn(B, widths[0], dtype=F64)
    sigma = torch.rand(widths[-1], dtype=F64) + 0.5 if likelihood == "gaussian" else None
    with torch.no_grad():
        expected = sum(explicit_metric(decoder, z, likelihood, sigma) for decoder in decoders) / M
        weights, biases, activations = stacked(decoders, device, dtype)
        G = pygeo.ops.mlp_ensemble_metric(z.to(device=device, dtype=dtype), weights, biases, activations,
                                          likelihood=likelihood,
                                          sigma=None if sigma is None else sigma.to(device=device, dtype=dtype),
                                          backend=backend)
    assert G.shape == (B, widths[0], widths[0]) and G.dtype == dtype
    assert torch.equal(G, G.transpose(-1, -2)), "G must be exactly symmetric"
    assert_close(G.cpu(), expected, dtype)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_result_does_not_depend_on_the_schedule(backend_device):
    """A point's G is the same whether the batch runs over point blocks or over (block, member) items (the members
    are summed in one order either way), so a sub-batch gives bitwise the rows of the full batch."""
    backend, device = backend_device
    decoders = [make_mlp((3, 12, 30), "tanh") for _ in range(5)]
    weights, biases, activations = stacked(decoders, device)
    z = torch.randn(1000, 3, dtype=F64, device=device)
    full = pygeo.ops.mlp_ensemble_metric(z, weights, biases, activations, likelihood="bernoulli", backend=backend)
    part = pygeo.ops.mlp_ensemble_metric(z[:40], weights, biases, activations, likelihood="bernoulli", backend=backend)
    assert torch.equal(full[:40], part)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("likelihood", ["euclidean", "gaussian", "bernoulli"])
@pytest.mark.parametrize("D", [4, 7])  # 7 > hidden width 5: the backward goes through the last layers' Gram matrices
def test_gradcheck(backend_device, likelihood, D):
    backend, device = backend_device
    to = dict(dtype=F64, device=device)
    z = torch.randn(3, 2, **to, requires_grad=True)
    W1 = torch.randn(3, 5, 2, **to, requires_grad=True)
    b1 = torch.randn(3, 5, **to, requires_grad=True)
    W2 = torch.randn(3, D, 5, **to, requires_grad=True)
    b2 = torch.randn(3, D, **to, requires_grad=True)
    sigma = (torch.rand(D, **to) + 0.5).requires_grad_(likelihood == "gaussian")

    def fn(z, W1, b1, W2, b2, sigma):
        return pygeo.ops.mlp_ensemble_metric(z, [W1, W2], [b1, b2], ["silu", "identity"], likelihood=likelihood,
                                             sigma=sigma if likelihood == "gaussian" else None, backend=backend)

    assert torch.autograd.gradcheck(fn, (z, W1, b1, W2, b2, sigma))
    # z alone (the samplers' case) through the first-order shortcut
    z_only = lambda z: fn(z, W1.detach(), b1.detach(), W2.detach(), b2.detach(), sigma.detach())  # noqa: E731
    assert torch.autograd.gradcheck(z_only, (z,))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_opcheck(backend_device):
    backend, device = backend_device
    to = dict(dtype=F64, device=device)
    z = torch.randn(4, 3, **to, requires_grad=True)
    weights = [torch.randn(2, 6, 3, **to, requires_grad=True), torch.randn(2, 7, 6, **to, requires_grad=True)]
    biases = [torch.randn(2, 6, **to), torch.randn(2, 7, **to, requires_grad=True)]
    output_weight = torch.rand(7, **to) + 0.5
    op = torch.ops.pygeo.mlp_ensemble_metric.default
    torch.library.opcheck(op, (z, weights, biases, [6, 0], [0.0, 0.0, 0.0, 0.0], None, True, 1e-6, backend))
    torch.library.opcheck(op, (z, weights, biases, [5, 7], [1.0, 20.0, 0.0, 0.0], output_weight, False, 1e-6, backend))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_overflow_is_refused(backend_device):
    backend, device = backend_device
    z = torch.tensor([[1e30, 1e30], [0.5, -0.5]], device=device)
    W1 = torch.stack([torch.eye(2), torch.tensor([[1e10, -1e10], [1.0, 2.0]])]).to(device)  # member 1 overflows
    W2 = torch.randn(2, 3, 2, device=device)
    with pytest.raises(ValueError, match=r"G is not finite at 1 of 2 points \(first: index 0\).*overflow"):
        pygeo.ops.mlp_ensemble_metric(z, [W1, W2], [None, None], ["tanh", "identity"], backend=backend)


def test_bad_input():
    W = [torch.randn(2, 5, 3), torch.randn(2, 4, 5)]
    z = torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"weights\[1\] must have shape \[M=2, n_2, 5\]"):
        pygeo.ops.mlp_ensemble_metric(z, [W[0], torch.randn(3, 4, 5)], [None, None], ["tanh", "identity"])
    with pytest.raises(ValueError, match=r"biases\[0\]"):
        pygeo.ops.mlp_ensemble_metric(z, W, [torch.randn(5), None], ["tanh", "identity"])
    with pytest.raises(ValueError, match=r"weights\[0\] must have shape \[M=2, n_1, 2\]"):
        pygeo.ops.mlp_ensemble_metric(torch.randn(6, 2), W, [None, None], ["tanh", "identity"])
    with pytest.raises(TypeError, match="dtype"):
        pygeo.ops.mlp_ensemble_metric(z.double(), W, [None, None], ["tanh", "identity"])
    with pytest.raises(ValueError, match="M >= 1"):
        pygeo.ops.mlp_ensemble_metric(z, [torch.randn(0, 5, 3), torch.randn(0, 4, 5)], [None, None],
                                      ["tanh", "identity"])


# --------------------------------------------------------------------------------------- through EnsembleMetric
def counting(monkeypatch):
    calls = {"single": 0, "ensemble": 0}
    single, ensemble = mlp_metric_module._run, mlp_metric_module._run_ensemble

    def count_single(*args):
        calls["single"] += 1
        return single(*args)

    def count_ensemble(*args):
        calls["ensemble"] += 1
        return ensemble(*args)

    monkeypatch.setattr(mlp_metric_module, "_run", count_single)
    monkeypatch.setattr(mlp_metric_module, "_run_ensemble", count_ensemble)
    return calls


@pytest.mark.parametrize("likelihood", ["euclidean", "gaussian", "bernoulli"])
def test_ensemble_metric_makes_one_fused_call(monkeypatch, likelihood):
    sigma = 0.6 if likelihood == "gaussian" else None
    decoders = [make_mlp((3, 10, 12), "tanh") for _ in range(4)]
    ensemble = EnsembleMetric([pygeo.PullbackMetric(d, likelihood=likelihood, sigma=sigma) for d in decoders])
    z = torch.randn(9, 3, dtype=F64)
    expected = sum(explicit_metric(d, z, likelihood, sigma) for d in decoders).detach() / 4
    calls = counting(monkeypatch)
    G = ensemble.metric(z)
    assert calls == {"single": 0, "ensemble": 1}
    assert_close(G, expected, F64)
    # log-volume and its gradient through the fused call too, against autograd through the mean metric
    point = z.clone().requires_grad_(True)
    reference = 0.5 * torch.logdet(sum(explicit_metric(d, point, likelihood, sigma) for d in decoders) / 4)
    (grad,) = torch.autograd.grad(reference.sum(), point)
    value, fused_grad = ensemble.log_volume_and_grad(z)
    assert calls["single"] == 0 and calls["ensemble"] == 2
    assert_close(value, reference.detach(), F64)
    assert_close(fused_grad, grad, F64)
    # gradients reach every member's weights
    ensemble.metric(z).sum().backward()
    assert all(d[0].weight.grad is not None and d[0].weight.grad.abs().sum() > 0 for d in decoders)


def test_ensemble_metric_falls_back_when_members_differ(monkeypatch):
    decoders = [make_mlp((3, 10, 12), "tanh"), make_mlp((3, 10, 12), "softplus"), make_mlp((3, 8, 12), "tanh")]
    z = torch.randn(5, 3, dtype=F64)
    for members in ([decoders[0], decoders[1]], [decoders[0], decoders[2]]):
        ensemble = EnsembleMetric([pygeo.PullbackMetric(d, likelihood="bernoulli") for d in members])
        calls = counting(monkeypatch)
        G = ensemble.metric(z)
        assert calls == {"single": 2, "ensemble": 0}
        assert_close(G, sum(explicit_metric(d, z, "bernoulli") for d in members).detach() / 2, F64)
    mixed = EnsembleMetric([pygeo.PullbackMetric(decoders[0], likelihood="gaussian", sigma=0.5),
                            pygeo.PullbackMetric(decoders[0], likelihood="gaussian", sigma=0.7)])
    calls = counting(monkeypatch)
    expected = (explicit_metric(decoders[0], z, "gaussian", 0.5) + explicit_metric(decoders[0], z, "gaussian", 0.7)) / 2
    assert_close(mixed.metric(z), expected.detach(), F64)
    assert calls == {"single": 2, "ensemble": 0}


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_a_mean_in_range_is_not_refused_when_the_members_sum_overflows(backend_device):
    """Issue 30 (overflow detected the same way everywhere): two float32 members with G_m = 2.5e38 each (finite, and
    each alone is returned by mlp_metric) have the mean 2.5e38, but their sum overflows: the op refused it and
    EnsembleMetric's member-by-member path returned G = inf. The mean is now sum_m (G_m / M) on every path (C++,
    reference, EnsembleMetric), so all of them return it."""
    backend, device = backend_device
    w = math.sqrt(2.5e38)
    z = torch.ones(2, 1, device=device)
    W = torch.full((2, 1, 1), w, device=device)
    G = pygeo.ops.mlp_ensemble_metric(z, [W], [None], ["identity"], backend=backend)
    assert_close(G.cpu(), torch.full((2, 1, 1), 2.5e38, dtype=F64), torch.float32)
    assert_close(pygeo.ops.mlp_metric(z, [W[0]], [None], ["identity"], backend=backend).cpu(), G.cpu().double(),
                 torch.float32)
    if device != "cpu":
        return
    decoders = []
    for _ in range(2):
        linear = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            linear.weight.fill_(w)
        decoders.append(torch.nn.Sequential(linear))
    for wrap in (lambda decoder: decoder, lambda decoder: (lambda x: decoder(x))):  # fused, then member by member
        ensemble = EnsembleMetric([pygeo.PullbackMetric(wrap(decoder), backend=backend) for decoder in decoders])
        for G in (ensemble.metric(z), ensemble.metric_and_derivative(z)[0]):
            assert_close(G, torch.full((2, 1, 1), 2.5e38, dtype=F64), torch.float32)
