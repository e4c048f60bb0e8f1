"""EnsembleMetric (the mean of member metrics, Syrota et al. 2024) and VAE(n_decoders=M)."""
import math

import pytest
import torch

import pygeo
from pygeo.geometry.curvature import uses_flat_coordinates
from pygeo.metrics import EnsembleMetric
from pygeo.models import VAE, train_vae

from conftest import assert_close

F64 = torch.float64


def smooth_decoder(widths, seed, dtype=F64):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(torch.nn.Softplus() if i % 2 == 0 else torch.nn.Tanh())
    return torch.nn.Sequential(*layers).to(dtype)


def autograd_pullback(decoder, z, likelihood, sigma=None, eps=1e-6):
    """J^T F J with J by torch.func.jacfwd through the module itself (MATH.md section 1), z [B, d] -> [B, d, d]."""
    def single(point):
        return decoder(point.unsqueeze(0))[0]

    J = torch.func.vmap(torch.func.jacfwd(single))(z)
    if likelihood == "euclidean":
        weight = torch.ones(J.shape[:2], dtype=z.dtype)
    elif likelihood == "gaussian":
        weight = torch.full(J.shape[:2], sigma ** -2, dtype=z.dtype)
    else:
        p = torch.sigmoid(decoder(z)).clamp(eps, 1 - eps)
        weight = p * (1 - p)
    return torch.einsum("bri,br,brj->bij", J, weight, J)


def mean_autograd_metric(decoders, likelihood, sigma=None):
    """The ensemble's G as a plain differentiable function (the oracle): mean of autograd pullbacks."""
    def fn(z):
        flat = z.reshape(-1, z.shape[-1])
        G = sum(autograd_pullback(decoder, flat, likelihood, sigma) for decoder in decoders) / len(decoders)
        return G.reshape(*z.shape, z.shape[-1])

    return fn


def close(actual, expected, rtol, atol=0.0):
    """actual against expected within rtol relative to expected's largest magnitude (plus atol)."""
    expected = expected.to(torch.float64)
    scale = float(expected.abs().max().clamp_min(1e-300))
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rtol, atol=atol + rtol * scale)


def members(decoders, likelihood, sigma=None, **options):
    return [pygeo.PullbackMetric(decoder, likelihood=likelihood, sigma=sigma, **options) for decoder in decoders]


@pytest.mark.parametrize("likelihood", ["euclidean", "gaussian", "bernoulli"])
@pytest.mark.parametrize("M, widths, B", [(1, (2, 9, 5), 4), (3, (3, 11, 7, 13), 7), (4, (1, 6, 4), 5)])
def test_metric_and_derivative_match_mean_of_autograd(likelihood, M, widths, B):
    sigma = 0.7 if likelihood == "gaussian" else None
    decoders = [smooth_decoder(widths, seed) for seed in range(M)]
    ensemble = EnsembleMetric(members(decoders, likelihood, sigma))
    z = torch.randn(B, widths[0], dtype=F64)
    oracle = mean_autograd_metric(decoders, likelihood, sigma)
    with torch.no_grad():
        expected_G = oracle(z)
    expected_dG = torch.func.vmap(torch.func.jacfwd(lambda p: oracle(p.unsqueeze(0))[0]))(z).permute(0, 3, 1, 2)
    G = ensemble.metric(z)
    G2, dG = ensemble.metric_and_derivative(z)
    assert G.shape == (B, widths[0], widths[0]) and dG.shape == (B,) + (widths[0],) * 3
    assert_close(G, expected_G, F64)
    assert_close(G2, expected_G, F64)
    assert_close(dG, expected_dG.detach(), F64)
    # log-volume and its gradient against the oracle's
    z_leaf = z.clone().requires_grad_(True)
    expected_lv = 0.5 * torch.logdet(oracle(z_leaf))
    (expected_grad,) = torch.autograd.grad(expected_lv.sum(), z_leaf)
    lv, grad = ensemble.log_volume_and_grad(z)
    assert_close(ensemble.log_volume(z), expected_lv.detach(), F64)
    assert_close(lv, expected_lv.detach(), F64)
    assert_close(grad, expected_grad, F64)
    u, v = torch.randn(2, B, widths[0], dtype=F64)
    assert_close(ensemble.inner(z, u, v), torch.einsum("bi,bij,bj->b", u, expected_G, v), F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_shapes_and_dtypes(dtype):
    decoders = [smooth_decoder((3, 8, 6), seed, dtype) for seed in range(2)]
    ensemble = EnsembleMetric(members(decoders, "bernoulli"))
    z = torch.randn(2, 5, 3, dtype=dtype)
    G = ensemble.metric(z)
    assert G.shape == (2, 5, 3, 3) and G.dtype == dtype
    expected = sum(pygeo.PullbackMetric(d, likelihood="bernoulli").metric(z) for d in decoders) / 2
    assert_close(G, expected, dtype)


def test_gradcheck_through_ensemble():
    decoders = [smooth_decoder((2, 5, 4), seed) for seed in range(3)]
    ensemble = EnsembleMetric(members(decoders, "bernoulli"))
    z = torch.randn(3, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(ensemble.metric, (z,))
    assert torch.autograd.gradcheck(ensemble.log_volume, (z,))


def test_flat_coordinates_reproduce_the_mean_metric():
    decoders = [smooth_decoder((3, 10, 8), seed) for seed in range(3)]
    ensemble = EnsembleMetric(members(decoders, "bernoulli"))
    assert uses_flat_coordinates(ensemble)
    z = torch.randn(5, 3, dtype=F64)
    phi = ensemble.flat_coordinates(z)
    assert phi.shape == (5, 24)
    J = torch.func.vmap(torch.func.jacfwd(lambda p: ensemble.flat_coordinates(p.unsqueeze(0))[0]))(z)
    assert_close(J.transpose(-1, -2) @ J, ensemble.metric(z), F64)


def test_no_flat_coordinates_when_a_member_has_none():
    decoder = smooth_decoder((2, 6, 4), 0)
    constant = pygeo.FunctionMetric(lambda z: torch.eye(2, dtype=z.dtype).expand(*z.shape, 2).clone(), dim=2)
    ensemble = EnsembleMetric([pygeo.PullbackMetric(decoder), constant])
    assert not uses_flat_coordinates(ensemble)
    with pytest.raises(NotImplementedError, match=r"metrics\[1\]"):
        ensemble.flat_coordinates(torch.zeros(1, 2, dtype=F64))
    z = torch.randn(4, 2, dtype=F64)
    expected = 0.5 * (pygeo.PullbackMetric(decoder).metric(z) + torch.eye(2, dtype=F64))
    assert_close(ensemble.metric(z), expected, F64)
    # curvature then takes the christoffel route and still works
    assert torch.isfinite(pygeo.curvature(ensemble, z).scalar).all()


@pytest.mark.parametrize("likelihood", ["euclidean", "bernoulli"])
def test_curvature_equals_curvature_of_mean_metric_by_autograd(likelihood):
    decoders = [smooth_decoder((2, 7, 9), seed) for seed in range(3)]
    ensemble = EnsembleMetric(members(decoders, likelihood))
    z = torch.randn(4, 2, dtype=F64)
    by_gauss = pygeo.curvature(ensemble, z)  # auto: Gauss equation through the concatenated flat coordinates
    oracle = pygeo.FunctionMetric(mean_autograd_metric(decoders, likelihood), dim=2)
    by_autograd = pygeo.curvature(oracle, z, method="christoffel")
    assert_close(by_gauss.metric, by_autograd.metric, F64)
    close(by_gauss.riemann, by_autograd.riemann, 1e-9)
    close(by_gauss.scalar, by_autograd.scalar, 1e-9)
    by_christoffel = pygeo.curvature(ensemble, z, method="christoffel")
    close(by_christoffel.scalar, by_autograd.scalar, 1e-9)


def test_distances_and_geodesics_run_and_agree_with_the_mean_metric():
    decoders = [smooth_decoder((2, 8, 6), seed) for seed in range(3)]
    ensemble = EnsembleMetric(members(decoders, "bernoulli"))
    oracle = pygeo.FunctionMetric(mean_autograd_metric(decoders, "bernoulli"), dim=2)
    x = torch.randn(3, 2, dtype=F64)
    y = torch.randn(2, 2, dtype=F64)
    distances = pygeo.geodesic_distances(ensemble, x, y)
    expected = pygeo.geodesic_distances(oracle, x, y)
    assert distances.shape == (3, 2) and torch.isfinite(distances).all()
    close(distances, expected, 2e-3)
    path = pygeo.geodesic(ensemble, x[:2], y, n_points=8)
    assert path.points.shape == (2, 8, 2) and torch.isfinite(path.length).all()
    v = 0.1 * torch.randn(2, 2, dtype=F64)
    end = pygeo.exp_map(ensemble, x[:2], v)
    close(end, pygeo.exp_map(oracle, x[:2], v), 1e-8)


def test_fused_flat_jet_of_the_ensemble_matches_forward_mode():
    from pygeo.geometry import distances

    decoders = [smooth_decoder((3, 9, 7), seed) for seed in range(2)]
    ensemble = EnsembleMetric(members(decoders, "bernoulli"))
    points = torch.randn(2, 4, 3, dtype=F64)
    flat = points.reshape(-1, 3)
    assert distances._ensemble_flat_jet(ensemble, flat) is not None  # the members' fused jets, not forward mode
    phi, Jt = distances._flat_jet(ensemble, points)
    expected_J = torch.func.vmap(torch.func.jacfwd(lambda p: ensemble.flat_coordinates(p.unsqueeze(0))[0]))(flat)
    assert_close(phi.reshape(8, -1), ensemble.flat_coordinates(flat), F64)
    assert_close(Jt.reshape(8, 3, -1), expected_J.transpose(-1, -2), F64)


def test_bad_members_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        EnsembleMetric([])
    with pytest.raises(TypeError, match="list or tuple"):
        EnsembleMetric(pygeo.PullbackMetric(smooth_decoder((2, 4, 3), 0)))
    with pytest.raises(TypeError, match=r"metrics\[1\]"):
        EnsembleMetric([pygeo.PullbackMetric(smooth_decoder((2, 4, 3), 0)), "not a metric"])
    with pytest.raises(ValueError, match=r"metrics\[0\]: d=2, metrics\[1\]: d=3"):
        EnsembleMetric([pygeo.PullbackMetric(smooth_decoder((2, 4, 3), 0)),
                        pygeo.PullbackMetric(smooth_decoder((3, 4, 3), 1))])
    ensemble = EnsembleMetric([pygeo.PullbackMetric(smooth_decoder((2, 4, 3), 0))])
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        ensemble.metric(torch.zeros(3, 4, dtype=F64))
    # a member whose dimension is only known at call time
    wrong = pygeo.FunctionMetric(lambda z: torch.eye(3, dtype=z.dtype).expand(*z.shape[:-1], 3, 3).clone())
    with pytest.raises(ValueError, match="FunctionMetric|metrics\\[1\\]"):
        EnsembleMetric([pygeo.PullbackMetric(smooth_decoder((2, 4, 3), 0)), wrong]).metric(torch.zeros(1, 2, dtype=F64))


# ------------------------------------------------------------------------------------------------ VAE(n_decoders)
def test_vae_with_one_decoder_is_unchanged():
    torch.manual_seed(3)
    plain = VAE(data_dim=20, latent_dim=2, hidden=(8,))
    torch.manual_seed(3)
    single = VAE(data_dim=20, latent_dim=2, hidden=(8,), n_decoders=1)
    assert list(plain.state_dict()) == list(single.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), single.state_dict().values()))
    assert not any(key.startswith("other_decoders") for key in single.state_dict())
    assert len(single.decoders) == 1 and single.decoders[0] is single.decoder
    metric = single.metric()
    assert type(metric) is pygeo.PullbackMetric and metric.likelihood == "bernoulli"
    z = torch.randn(4, 2)
    assert_close(metric.metric(z), single.pullback_metric().metric(z), torch.float32)


def test_vae_ensemble_trains_and_its_metric_is_an_ensemble():
    torch.manual_seed(0)
    images = torch.rand(64, 20)
    vae = VAE(data_dim=20, latent_dim=2, hidden=(8,), n_decoders=3)
    assert isinstance(vae.decoders, torch.nn.ModuleList) and len(vae.decoders) == 3
    assert vae.decoders[0] is vae.decoder
    assert not torch.equal(vae.decoders[0][0].weight, vae.decoders[1][0].weight)  # independent initialisations
    before = [d[0].weight.detach().clone() for d in vae.decoders]
    losses = train_vae(vae, images, epochs=3, batch_size=8, progress=False, seed=1)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    # 24 mini-batches, one member drawn per batch: every member was trained
    assert all(not torch.equal(b, d[0].weight) for b, d in zip(before, vae.decoders))
    metric = vae.metric()
    assert isinstance(metric, EnsembleMetric) and len(metric.metrics) == 3
    assert all(member.decoder is decoder for member, decoder in zip(metric.metrics, vae.decoders))
    z = torch.randn(5, 2)
    expected = sum(pygeo.PullbackMetric(d, likelihood="bernoulli").metric(z) for d in vae.decoders) / 3
    assert_close(metric.metric(z), expected, torch.float32)
    euclidean = vae.metric("euclidean")
    assert all(member.likelihood == "euclidean" for member in euclidean.metrics)
    # eval-mode ELBO: the mean over the members; a given member: that decoder alone
    with torch.no_grad():
        assert vae.elbo(images[:4]).shape == (4,)
        assert vae.elbo(images[:4], member=2).shape == (4,)
    with pytest.raises(ValueError, match="member"):
        vae.elbo(images[:4], member=3)


def test_vae_ensemble_training_is_deterministic_and_natural_gradient_refused():
    images = torch.rand(32, 12, generator=torch.Generator().manual_seed(0))
    results = []
    for _ in range(2):
        torch.manual_seed(5)
        vae = VAE(data_dim=12, latent_dim=2, hidden=(6,), n_decoders=2)
        results.append(train_vae(vae, images, epochs=2, batch_size=8, progress=False, seed=2))
    assert results[0] == results[1]
    with pytest.raises(ValueError, match="n_decoders"):
        train_vae(VAE(data_dim=12, latent_dim=2, hidden=(6,), n_decoders=2), images, epochs=1, optimizer="natural",
                  progress=False)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_decoders"):
            VAE(data_dim=12, latent_dim=2, hidden=(6,), n_decoders=bad)
