import copy
import math

import pytest
import torch

import pygeo
from pygeo.metrics.base import metric_and_derivative_by_autograd

from conftest import assert_close, available_backends

F64 = torch.float64


def mlp(d=3, hidden=9, D=6, activation=torch.nn.Tanh):
    return torch.nn.Sequential(torch.nn.Linear(d, hidden), activation(), torch.nn.Linear(hidden, D)).to(F64)


def as_generic(decoder):
    """The same function, hidden from the fused-MLP recogniser."""
    return lambda z: decoder(z)


class MeanStdDecoder(torch.nn.Module):
    """A gaussian decoder with a learned std: z -> (mean [B, 2, 3], std [B, 2, 3])."""

    def __init__(self, d=3):
        super().__init__()
        self.mean = mlp(d, 8, 6)
        self.log_std = mlp(d, 5, 6)

    def forward(self, z):
        return self.mean(z).reshape(-1, 2, 3), (0.3 * self.log_std(z)).exp().reshape(-1, 2, 3)


def sphere_chart(radius):
    def decoder(z):
        theta, phi = z[..., 0], z[..., 1]
        return radius * torch.stack([theta.sin() * phi.cos(), theta.sin() * phi.sin(), theta.cos()], -1)
    return decoder


CASES = {
    "euclidean": lambda: pygeo.PullbackMetric(mlp(), "euclidean"),
    "gaussian-scalar": lambda: pygeo.PullbackMetric(mlp(), "gaussian", sigma=0.7),
    "gaussian-vector": lambda: pygeo.PullbackMetric(mlp(), "gaussian", sigma=torch.linspace(0.5, 2.0, 6, dtype=F64)),
    "bernoulli": lambda: pygeo.PullbackMetric(mlp(), "bernoulli"),
    "gaussian-learned": lambda: pygeo.PullbackMetric(MeanStdDecoder(), "gaussian"),
}


def generic_twin(metric):
    return pygeo.PullbackMetric(as_generic(metric.decoder), metric.likelihood, sigma=metric.sigma, eps=metric.eps)


def explicit_metric(metric, z):
    """G from a plain-torch forward-mode Jacobian (torch.func.jacfwd) and the formulas of MATH.md section 1."""
    def outputs(point):
        out = metric.decoder(point.unsqueeze(0))
        return torch.cat([o.reshape(-1) for o in out]) if isinstance(out, tuple) else out.reshape(-1)
    J = torch.func.vmap(torch.func.jacfwd(outputs))(z)  # [B, R, d]
    rows = torch.func.vmap(outputs)(z)  # [B, R]
    if metric.likelihood == "euclidean":
        return J.transpose(-1, -2) @ J
    if metric.likelihood == "bernoulli":
        p = torch.sigmoid(rows)
        return J.transpose(-1, -2) @ ((p * (1 - p)).unsqueeze(-1) * J)
    if metric.sigma is not None:
        precision = metric.sigma.reshape(-1).expand(rows.shape[-1]).pow(-2)
        return J.transpose(-1, -2) @ (precision.unsqueeze(-1) * J)
    D = rows.shape[-1] // 2
    J_mean, J_std, std = J[:, :D], J[:, D:], rows[:, D:]
    J_log_std = J_std / std.unsqueeze(-1)
    return (J_mean.transpose(-1, -2) @ (std.pow(-2).unsqueeze(-1) * J_mean)
            + 2 * J_log_std.transpose(-1, -2) @ J_log_std)


@pytest.mark.parametrize("case", list(CASES))
def test_metric_matches_explicit_formula(case):
    metric = CASES[case]()
    z = torch.randn(5, 3, dtype=F64)
    expected = explicit_metric(metric, z)
    assert_close(metric.metric(z), expected, F64)
    if case != "gaussian-learned":
        assert metric._mlp is not None, "an nn.Sequential MLP must take the fused path"
        assert_close(generic_twin(metric).metric(z), expected, F64)


@pytest.mark.parametrize("radius", [1.0, 2.5])
def test_sphere_chart(radius):
    metric = pygeo.PullbackMetric(sphere_chart(radius))
    z = torch.stack([torch.rand(7, dtype=F64) * 2.5 + 0.3, torch.rand(7, dtype=F64) * 6], -1)
    theta = z[:, 0]
    expected = torch.zeros(7, 2, 2, dtype=F64)
    expected[:, 0, 0] = radius ** 2
    expected[:, 1, 1] = radius ** 2 * theta.sin() ** 2
    assert_close(metric.metric(z), expected, F64)
    G, dG = metric.metric_and_derivative(z)
    expected_dG = torch.zeros(7, 2, 2, 2, dtype=F64)
    expected_dG[:, 0, 1, 1] = 2 * radius ** 2 * theta.sin() * theta.cos()  # d G_phiphi / d theta
    assert_close(G, expected, F64)
    assert_close(dG, expected_dG, F64)
    expected_log_volume = math.log(radius ** 2) + theta.sin().abs().log()
    assert_close(metric.log_volume(z), expected_log_volume, F64)


def test_bernoulli_fisher_is_hessian_of_kl():
    decoder = mlp(2, 7, 5)
    metric = pygeo.PullbackMetric(decoder, "bernoulli")
    z0 = torch.tensor([0.3, -0.4], dtype=F64)
    p0 = torch.sigmoid(decoder(z0.unsqueeze(0)))[0]

    def kl(z):  # KL(p_z0 || p_z) of independent Bernoullis
        p = torch.sigmoid(decoder(z.unsqueeze(0)))[0]
        return (p0 * (p0 / p).log() + (1 - p0) * ((1 - p0) / (1 - p)).log()).sum()

    h = 1e-4
    eye = torch.eye(2, dtype=F64) * h
    hessian = torch.empty(2, 2, dtype=F64)
    with torch.no_grad():
        for i in range(2):
            for j in range(2):
                hessian[i, j] = (kl(z0 + eye[i] + eye[j]) - kl(z0 + eye[i] - eye[j]) - kl(z0 - eye[i] + eye[j])
                                 + kl(z0 - eye[i] - eye[j])) / (4 * h * h)
    G = metric.metric(z0.unsqueeze(0))[0].detach()
    torch.testing.assert_close(G, hessian, rtol=1e-5, atol=1e-7)


def test_gaussian_learned_std_is_hessian_of_kl():
    decoder = MeanStdDecoder(d=3)
    metric = pygeo.PullbackMetric(decoder, "gaussian")
    z0 = torch.randn(3, dtype=F64)
    with torch.no_grad():
        mean0, std0 = (t.reshape(-1) for t in decoder(z0.unsqueeze(0)))

    def kl(z):  # KL(N(mean0, std0^2) || N(mean(z), std(z)^2)), diagonal
        mean, std = (t.reshape(-1) for t in decoder(z.unsqueeze(0)))
        return ((std / std0).log() + (std0 ** 2 + (mean0 - mean) ** 2) / (2 * std ** 2) - 0.5).sum()

    hessian = torch.autograd.functional.hessian(kl, z0)
    assert_close(metric.metric(z0.unsqueeze(0))[0], hessian, F64)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fused", [True, False])
def test_metric_and_derivative_matches_autograd(case, fused):
    metric = CASES[case]()
    if not fused and case != "gaussian-learned":
        metric = generic_twin(metric)
    z = torch.randn(4, 3, dtype=F64)
    G, dG = metric.metric_and_derivative(z)
    G_auto, dG_auto = metric_and_derivative_by_autograd(lambda x: explicit_metric(metric, x), z)
    assert dG.shape == (4, 3, 3, 3)
    assert_close(G, G_auto, F64)
    assert_close(dG, dG_auto, F64)
    # The metric's own autograd (forward mode through metric(z)) must agree too.
    assert_close(metric_and_derivative_by_autograd(metric.metric, z)[1], dG_auto, F64)


@pytest.mark.parametrize("case", list(CASES))
def test_log_volume_gradient_matches_finite_differences(case):
    metric = CASES[case]()
    z = torch.randn(3, 3, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(metric.log_volume(z).sum(), z)
    h = 1e-6
    with torch.no_grad():
        finite = torch.stack([(metric.log_volume(z + h * e) - metric.log_volume(z - h * e)) / (2 * h)
                              for e in torch.eye(3, dtype=F64)], -1)
    torch.testing.assert_close(grad, finite, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fused", [True, False])
def test_log_volume_and_grad_differentiates_z_alone(case, fused):
    """The samplers' entry point: log_volume and its z-gradient as autograd gives them, detached."""
    metric = CASES[case]()
    if not fused and case != "gaussian-learned":
        metric = generic_twin(metric)
    z = torch.randn(2, 4, 3, dtype=F64)
    point = z.clone().requires_grad_(True)
    expected_value = metric.log_volume(point)
    (expected_grad,) = torch.autograd.grad(expected_value.sum(), point)
    value, grad = metric.log_volume_and_grad(z)
    assert value.shape == (2, 4) and grad.shape == (2, 4, 3)
    assert not value.requires_grad and not grad.requires_grad
    assert_close(value, expected_value, F64)
    assert_close(grad, expected_grad, F64)


@pytest.mark.parametrize("hidden, D", [(5, 8), (9, 6)])  # D > hidden: the last-layer Gram path; else the vjp path
def test_log_volume_and_grad_of_a_trainable_mlp_never_differentiates_its_weights(monkeypatch, hidden, D):
    """The fused op's backward differentiates z alone, although every decoder parameter requires grad; autograd
    through log_volume differentiates the weights too."""
    from pygeo import _backend
    from pygeo.reference import mlp_metric as reference

    calls = []
    for module, name in ((_backend, "vjp_where_needed"), (reference, "mlp_metric_grad_z_by_last_gram")):
        original = getattr(module, name)

        def spy(*args, original=original, name=name):
            calls.append(name if name != "vjp_where_needed" else (name, tuple(args[2])))
            return original(*args)
        monkeypatch.setattr(module, name, spy)
    metric = pygeo.PullbackMetric(mlp(3, hidden, D), "gaussian", sigma=torch.linspace(0.5, 2.0, D, dtype=F64))
    assert all(parameter.requires_grad for parameter in metric.decoder.parameters())
    z = torch.randn(5, 3, dtype=F64)
    metric.log_volume_and_grad(z)
    z_only = "mlp_metric_grad_z_by_last_gram" if D > hidden else ("vjp_where_needed", (True, False, False, False))
    assert calls == [z_only]
    calls.clear()
    point = z.clone().requires_grad_(True)
    torch.autograd.grad(metric.log_volume(point).sum(), point)
    assert calls == [("vjp_where_needed", (True, True, True, False))]


@pytest.mark.parametrize("case", ["euclidean", "gaussian-scalar", "gaussian-vector", "bernoulli"])
def test_flat_coordinates_pull_back_the_metric_exactly(case):
    metric = CASES[case]()
    assert metric.has_flat_coordinates
    z = torch.randn(4, 3, dtype=F64)
    J_phi = torch.func.vmap(torch.func.jacfwd(lambda p: metric.flat_coordinates(p.unsqueeze(0))[0]))(z)
    assert metric.flat_coordinates(z).shape == (4, 6)
    assert_close(J_phi.transpose(-1, -2) @ J_phi, metric.metric(z), F64)


def test_flat_coordinates_of_saturated_bernoulli_stay_exact_and_finite():
    decoder = torch.nn.Sequential(torch.nn.Linear(2, 4)).to(F64)
    with torch.no_grad():
        decoder[0].weight.mul_(40)  # logits of +-100: p clamps
    metric = pygeo.PullbackMetric(decoder, "bernoulli")
    z = torch.randn(3, 2, dtype=F64)
    phi = metric.flat_coordinates(z)
    J_phi = torch.func.vmap(torch.func.jacfwd(lambda p: metric.flat_coordinates(p.unsqueeze(0))[0]))(z)
    assert torch.isfinite(phi).all() and torch.isfinite(J_phi).all()
    G = metric.metric(z)
    assert_close(J_phi.transpose(-1, -2) @ J_phi, G, F64)
    assert torch.isfinite(metric.log_volume(z)).all()


def test_learned_std_has_no_flat_coordinates():
    metric = CASES["gaussian-learned"]()
    assert not metric.has_flat_coordinates
    with pytest.raises(NotImplementedError, match="no flat coordinates"):
        metric.flat_coordinates(torch.randn(2, 3, dtype=F64))


def test_batch_dims_and_float32():
    decoder64 = mlp()
    z = torch.randn(2, 5, 3, dtype=F64)
    expected = explicit_metric(pygeo.PullbackMetric(decoder64), z.reshape(-1, 3)).reshape(2, 5, 3, 3)
    decoder = copy.deepcopy(decoder64).float()
    for metric in (pygeo.PullbackMetric(decoder), pygeo.PullbackMetric(as_generic(decoder))):
        G = metric.metric(z.float())
        assert G.shape == (2, 5, 3, 3) and G.dtype == torch.float32
        assert_close(G, expected, torch.float32)
        G, dG = metric.metric_and_derivative(z.float())
        assert G.shape == (2, 5, 3, 3) and dG.shape == (2, 5, 3, 3, 3)
        assert metric.log_volume(z.float()).shape == (2, 5)


def test_image_shaped_outputs_are_flattened():
    decoder = torch.nn.Sequential(mlp(3, 9, 12), torch.nn.Unflatten(1, (1, 3, 4)))  # not a plain MLP: generic path
    metric = pygeo.PullbackMetric(decoder, "bernoulli")
    assert metric._mlp is None
    z = torch.randn(4, 3, dtype=F64)
    expected = pygeo.PullbackMetric(decoder[0], "bernoulli").metric(z)
    assert_close(metric.metric(z), expected, F64)


@pytest.mark.parametrize("backend, device", available_backends())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fused", [True, False])
def test_every_backend(backend, device, case, fused):
    metric = CASES[case]()
    z = torch.randn(5, 3, dtype=F64)
    expected = explicit_metric(metric, z)
    metric.decoder.to(device)
    if not fused:
        metric = generic_twin(metric)
    metric.backend = backend
    assert_close(metric.metric(z.to(device)).cpu(), expected, F64)


@pytest.mark.parametrize("make, message", [
    (lambda: pygeo.PullbackMetric(mlp(), "student-t"), "likelihood must be one of"),
    (lambda: pygeo.PullbackMetric(mlp(), "euclidean", sigma=1.0), "sigma is only used"),
    (lambda: pygeo.PullbackMetric(mlp(), "gaussian", sigma=-1.0), "sigma must be finite and positive"),
    (lambda: pygeo.PullbackMetric(mlp(), "gaussian", sigma="1"), "sigma must be a positive float"),
    (lambda: pygeo.PullbackMetric(42), "decoder must be an nn.Module or a callable"),
    (lambda: pygeo.PullbackMetric(mlp(), "bernoulli", eps=0.7), "eps must be a float"),
])
def test_bad_construction(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("z, message", [
    (torch.tensor(1.0, dtype=F64), "z must have at least 1 dimensions"),
    (torch.zeros(4, 3, dtype=torch.int64), "z must be a real floating tensor"),
    (torch.full((2, 3), float("nan"), dtype=F64), "z contains NaN"),
])
def test_bad_z(fused, z, message):
    decoder = mlp()
    metric = pygeo.PullbackMetric(decoder if fused else as_generic(decoder))
    with pytest.raises((ValueError, TypeError), match=message):
        metric.metric(z)


@pytest.mark.parametrize("method", ["metric", "metric_and_derivative", "log_volume"])
def test_wrong_latent_width_is_named(method):
    with pytest.raises(ValueError, match=r"z must have shape \[\.\.\., 3\]"):
        getattr(pygeo.PullbackMetric(mlp()), method)(torch.randn(4, 5, dtype=F64))


@pytest.mark.parametrize("u, message", [
    (torch.randn(4, 5, dtype=F64), r"u must have shape \[\.\.\., 3\]"),
    (torch.ones(4, 3, dtype=torch.int64), "u must have z's dtype"),
    (torch.randn(5, 3, dtype=F64), "u batch shape"),
    (torch.full((4, 3), float("nan"), dtype=F64), "u contains NaN"),
])
def test_inner_names_a_bad_tangent(u, message):
    z, v = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    with pytest.raises((ValueError, TypeError), match=message):
        pygeo.PullbackMetric(mlp()).inner(z, u, v)


@pytest.mark.parametrize("add_hook", [
    lambda decoder: torch.nn.utils.spectral_norm(decoder[2]),
    lambda decoder: decoder[0].register_forward_hook(lambda module, inputs, output: 2 * output),
    lambda decoder: decoder.register_forward_pre_hook(lambda module, inputs: (inputs[0] + 1,)),
])
def test_decoders_with_hooks_take_the_generic_path(add_hook):
    """Hooks change what the layers compute (spectral_norm rescales a weight in a pre-hook); the fused path reads the
    weights directly, so a hooked decoder, even one hooked after the metric was built, goes the generic way."""
    torch.manual_seed(0)
    decoder = mlp()
    metric = pygeo.PullbackMetric(decoder)
    add_hook(decoder)
    decoder.eval()
    z = torch.randn(5, 3, dtype=F64)
    J = torch.func.vmap(torch.func.jacfwd(decoder))(z)
    assert_close(metric.metric(z), J.mT @ J, F64)
    G, dG = metric.metric_and_derivative(z)
    assert_close(G, J.mT @ J, F64)


def test_bad_decoder_outputs():
    z = torch.randn(4, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"needs a decoder returning \(mean, std\)"):
        pygeo.PullbackMetric(as_generic(mlp()), "gaussian").metric(z)
    with pytest.raises(ValueError, match="likelihood='gaussian' with sigma=None"):
        pygeo.PullbackMetric(MeanStdDecoder(), "euclidean").metric(z)
    with pytest.raises(ValueError, match="std must be positive"):
        pygeo.PullbackMetric(lambda z: (z, z - 10), "gaussian").metric(z)
    with pytest.raises(ValueError, match="decoder output contains NaN"):
        pygeo.PullbackMetric(lambda z: z / 0 * 0).metric(z)
    with pytest.raises(ValueError, match="sigma must be a float or have D=6 elements"):
        pygeo.PullbackMetric(as_generic(mlp()), "gaussian", sigma=torch.ones(4, dtype=F64)).metric(z)


def test_decoder_that_vmap_cannot_batch():
    decoder = mlp()

    def stubborn(z):  # data-dependent Python control flow: vmap refuses it, forward mode alone is fine
        out = decoder(z)
        return out * 2 if float(out.detach().abs().max()) > 1e6 else out

    metric = pygeo.PullbackMetric(stubborn, "bernoulli")
    z = torch.randn(4, 3, dtype=F64)
    expected = pygeo.PullbackMetric(as_generic(decoder), "bernoulli")
    assert_close(metric.metric(z), expected.metric(z), F64)
    for actual, wanted in zip(metric.metric_and_derivative(z), expected.metric_and_derivative(z)):
        assert_close(actual, wanted, F64)


@pytest.mark.parametrize("likelihood", ["euclidean", "gaussian", "bernoulli"])
@pytest.mark.parametrize("activation", [lambda: torch.nn.Softplus(beta=1.5, threshold=2.0), torch.nn.Tanh, torch.nn.ELU,
                                        torch.nn.SiLU, lambda: torch.nn.LeakyReLU(0.2), torch.nn.Sigmoid,
                                        lambda: torch.nn.ELU(inplace=True), lambda: torch.nn.ReLU(inplace=True)],
                         ids=["softplus", "tanh", "elu", "silu", "leaky_relu", "sigmoid", "elu_inplace", "relu_inplace"])
def test_mlp_derivative_through_deep_decoders_matches_the_generic_path(activation, likelihood):
    """The structured MLP derivative (tangents through the hidden layers, a linear layer without activation in the
    middle, second tangents through every later layer) against forward mode over the whole decoder."""
    torch.manual_seed(3)
    decoder = torch.nn.Sequential(torch.nn.Linear(3, 7), activation(), torch.nn.Linear(7, 6), torch.nn.Linear(6, 5),
                                  activation(), torch.nn.Linear(5, 9)).to(F64)
    sigma = torch.linspace(0.5, 2.0, 9, dtype=F64) if likelihood == "gaussian" else None
    metric = pygeo.PullbackMetric(decoder, likelihood, sigma=sigma)
    assert metric._mlp is not None and metric._mlp.activation_modules[-1] is None  # the structured path applies
    z = torch.randn(5, 3, dtype=F64)
    G, dG = metric.metric_and_derivative(z)
    G_ref, dG_ref = generic_twin(metric).metric_and_derivative(z)
    assert_close(G, G_ref, F64)
    assert_close(dG, dG_ref, F64)


def test_mlp_derivative_in_chunks_equals_one_pass():
    """Batches whose second tangents exceed the memory cap go through in chunks, with the same result."""
    torch.manual_seed(4)
    decoder = torch.nn.Sequential(torch.nn.Linear(8, 512), torch.nn.Softplus(), torch.nn.Linear(512, 6)).to(F64)
    metric = pygeo.PullbackMetric(decoder, "bernoulli")
    z = torch.randn(1100, 8, dtype=F64)  # the cap is 2^25 / (8 * 8 * 512) = 1024 points per chunk
    G, dG = metric.metric_and_derivative(z)
    G_tail, dG_tail = metric.metric_and_derivative(z[1000:])
    assert_close(G[1000:], G_tail, F64)
    assert_close(dG[1000:], dG_tail, F64)


@pytest.mark.parametrize("fused", [True, False])
def test_empty_batch(fused):
    metric = CASES["bernoulli"]()
    if not fused:
        metric = generic_twin(metric)
    z = torch.randn(0, 3, dtype=F64)
    G, dG = metric.metric_and_derivative(z)
    assert G.shape == (0, 3, 3) and dG.shape == (0, 3, 3, 3) and metric.metric(z).shape == (0, 3, 3)


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpp") if pygeo.backends()[b].available])
@pytest.mark.parametrize("frozen", [False, True])
def test_empty_batch_gradients_and_geodesic_steps(backend, frozen):
    """Every backward path of the fused MLP metric, and exp_map's fused right-hand side, on B = 0."""
    decoder = mlp(3, 5, 8).requires_grad_(not frozen)  # D > hidden: the last-layer Gram paths
    metric = pygeo.PullbackMetric(decoder, "gaussian", sigma=0.5, backend=backend)
    z = torch.randn(0, 3, dtype=F64, requires_grad=True)
    metric.log_volume(z).sum().backward()
    assert z.grad.shape == (0, 3)
    value, grad = metric.log_volume_and_grad(z.detach())
    assert value.shape == (0,) and grad.shape == (0, 3)
    assert pygeo.exp_map(metric, z.detach(), z.detach()).shape == (0, 3)
