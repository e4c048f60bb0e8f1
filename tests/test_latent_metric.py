import math

import pytest
import torch

import pygeo
from pygeo import _backend
from pygeo.cluster import kmedoids
from pygeo.reference import latent_metric as reference

from conftest import assert_close, backend_params

BACKENDS = backend_params()


def make_problem(B, N, d, kind, seed=0, spread=1.5):
    """float64 z [B, d], centroids [N, d], precisions [N, d] or [N, d, d] (SPD, well conditioned)."""
    g = torch.Generator().manual_seed(seed)
    z = spread * torch.randn(B, d, generator=g, dtype=torch.float64)
    centroids = torch.randn(N, d, generator=g, dtype=torch.float64)
    if kind == "diagonal":
        precisions = 0.3 + 2 * torch.rand(N, d, generator=g, dtype=torch.float64)
    else:
        A = torch.randn(N, d, d, generator=g, dtype=torch.float64)
        precisions = A @ A.transpose(-1, -2) / d + 0.3 * torch.eye(d, dtype=torch.float64)
    return z, centroids, precisions


def oracle(z, centroids, precisions, lam, tau, rho):
    """G, dG, 1/2 log det G and its gradient from the paper's broadcast formula, by autograd in float64."""
    z = z.detach().requires_grad_(True)
    f = lambda x: reference.broadcast_metric(x, centroids, precisions, lam, tau, rho)
    G = f(z)
    B, d = z.shape
    jac = torch.autograd.functional.jacobian(lambda x: f(x).sum(0), z, vectorize=True)  # [d, d, B, d]
    dG = jac.permute(2, 3, 0, 1)  # [B, k, i, j]
    log_volume = 0.5 * torch.linalg.slogdet(G)[1]
    (grad,) = torch.autograd.grad(log_volume.sum(), z)
    return G.detach(), dG, log_volume.detach(), grad


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,N,d", [(1, 1, 1), (7, 5, 3), (5, 150, 17), (3, 70, 5), (1000, 3, 2), (6, 600, 4)])  # 600: several centroid blocks
@pytest.mark.parametrize("kind", ["diagonal", "full"])
def test_latent_metric_matches_broadcast_formula(backend_device, dtype, B, N, d, kind):
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and (B == 1000 or (kind == "full" and d == 17)):
        pytest.skip("Triton interpreter on CPU: B=1000 and full d=17 (a 5 x 17 grid) take minutes; (3, 70, 5) and "
                    "(6, 600, 4) cover the same tiles, and these sizes run compiled on a GPU")
    z, centroids, precisions = make_problem(B, N, d, kind)
    lam, tau, rho = 0.05, 0.2, 1.3
    G_ref, dG_ref, L_ref, grad_ref = oracle(z, centroids, precisions, lam, tau, rho)
    to = dict(device=device, dtype=dtype)
    out = pygeo.ops.latent_metric(z.to(**to), centroids.to(**to), precisions.to(**to), lam, tau, rho,
                                  derivative=True, log_volume=True, backend=backend)
    assert out.metric.shape == (B, d, d) and out.derivative.shape == (B, d, d, d)
    assert out.log_volume.shape == (B,) and out.log_volume_grad.shape == (B, d)
    assert torch.equal(out.metric, out.metric.transpose(-1, -2)), "G must be exactly symmetric"
    assert_close(out.metric.cpu(), G_ref, dtype)
    assert_close(out.derivative.cpu(), dG_ref, dtype)
    assert_close(out.log_volume.cpu(), L_ref, dtype)
    assert_close(out.log_volume_grad.cpu(), grad_ref, dtype)
    only_G = pygeo.ops.latent_metric(z.to(**to), centroids.to(**to), precisions.to(**to), lam, tau, rho, backend=backend)
    assert only_G.derivative is None and only_G.log_volume is None
    assert_close(only_G.metric.cpu(), G_ref, dtype)


@pytest.mark.skipif(not _backend.status("cpp").available, reason="needs the compiled C++ backend")
@pytest.mark.parametrize("simd_bytes", ["16", "32", "64"])
@pytest.mark.parametrize("kind", ["diagonal", "full"])
def test_latent_metric_cpp_every_vector_width(monkeypatch, simd_bytes, kind):
    """The C++ metric-only path runs on SIMD tiles compiled for 16-, 32- and 64-byte vectors (the CPU's widest picked
    at run time); PYGEO_SIMD_BYTES caps the width, so each version runs here: batches and centroid counts that are not
    multiples of a tile or a chunk, d not a multiple of a register block, points far from every centroid."""
    monkeypatch.setenv("PYGEO_SIMD_BYTES", simd_bytes)
    # the last: no lam term, every weight below float32's range (only the log-space scale keeps log det finite)
    for (B, N, d), spread, lam in [((37, 19, 6), 1.5, 0.05), ((5, 1, 3), 1.5, 0.05), ((21, 40, 17), 1.5, 0.05),
                                   ((9, 13, 2), 12.0, 0.0)]:
        z, centroids, precisions = make_problem(B, N, d, kind, spread=spread)
        tau, rho = 0.001, 1.3
        G_ref, _, L_ref, grad_ref = oracle(z, centroids, precisions, lam, tau, rho)
        for dtype in (torch.float32, torch.float64):
            to = dict(dtype=dtype)
            out = pygeo.ops.latent_metric(z.to(**to), centroids.to(**to), precisions.to(**to), lam, tau, rho,
                                          log_volume=True, backend="cpp")
            assert torch.equal(out.metric, out.metric.transpose(-1, -2))
            assert_close(out.metric, G_ref, dtype)
            assert_close(out.log_volume, L_ref, dtype)
            assert_close(out.log_volume_grad, grad_ref, dtype)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("kind", ["diagonal", "full"])
@pytest.mark.parametrize("lam,tau", [(0.0, 0.0), (0.01, 0.0), (1.0, 0.5)])
def test_latent_metric_regulariser_settings(backend_device, kind, lam, tau):
    backend, device = backend_device
    z, centroids, precisions = make_problem(6, 9, 3, kind, seed=3)
    G_ref, dG_ref, L_ref, grad_ref = oracle(z, centroids, precisions, lam, tau, 0.8)
    out = pygeo.ops.latent_metric(z.to(device), centroids.to(device), precisions.to(device), lam, tau, 0.8,
                                  derivative=True, log_volume=True, backend=backend)
    for got, want in zip(out, (G_ref, dG_ref, L_ref, grad_ref)):
        assert_close(got.cpu(), want, torch.float64)


def test_gemm_baseline_matches_broadcast_formula():
    for kind in ("diagonal", "full"):
        z, centroids, precisions = make_problem(11, 13, 4, kind)
        assert_close(reference.gemm_metric(z, centroids, precisions, 0.1, 0.3, 0.9),
                     reference.broadcast_metric(z, centroids, precisions, 0.1, 0.3, 0.9), torch.float64)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("kind", ["diagonal", "full"])
def test_derivatives_against_finite_differences(backend_device, kind):
    backend, device = backend_device
    z, centroids, precisions = make_problem(4, 6, 3, kind, seed=5)
    z, centroids, precisions = z.to(device), centroids.to(device), precisions.to(device)
    args = (centroids, precisions, 0.02, 0.1, 1.1)
    out = pygeo.ops.latent_metric(z, *args, derivative=True, log_volume=True, backend=backend)
    h = 1e-6
    for k in range(3):
        step = torch.zeros_like(z)
        step[:, k] = h
        plus = pygeo.ops.latent_metric(z + step, *args, log_volume=True, backend=backend)
        minus = pygeo.ops.latent_metric(z - step, *args, log_volume=True, backend=backend)
        fd_G = (plus.metric - minus.metric) / (2 * h)
        fd_L = (plus.log_volume - minus.log_volume) / (2 * h)
        torch.testing.assert_close(out.derivative[:, k], fd_G, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(out.log_volume_grad[:, k], fd_L, rtol=1e-6, atol=1e-7)


def test_log_volume_is_finite_far_from_the_centroids():
    # One centroid, tau > 0: at |z| = 40 every term of G_kk underflows in float32 (and the weight in float64), yet
    # log G_kk = logaddexp(log m_k - q/rho^2, log lam - tau |z|^2) is an ordinary number.
    centroids = torch.zeros(1, 2, dtype=torch.float64)
    precisions = torch.tensor([[2.0, 0.5]], dtype=torch.float64)
    lam, tau, rho = 0.01, 1.0, 1.0
    z = torch.tensor([[40.0, 3.0], [0.0, 30.0], [0.3, -0.2]], dtype=torch.float64)
    q = (precisions * z**2).sum(-1, keepdim=True)
    log_diag = torch.logaddexp(precisions.log() - q / rho**2, math.log(lam) - tau * (z**2).sum(-1, keepdim=True))
    expected = 0.5 * log_diag.sum(-1)
    for backend in ("torch", "cpp") if pygeo.backends()["cpp"].available else ("torch",):
        for dtype in (torch.float32, torch.float64):
            out = pygeo.ops.latent_metric(z.to(dtype), centroids.to(dtype), precisions.to(dtype), lam, tau, rho,
                                          log_volume=True, backend=backend)
            assert torch.isfinite(out.log_volume).all() and torch.isfinite(out.log_volume_grad).all()
            torch.testing.assert_close(out.log_volume.double(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                       atol=0)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("kind", ["diagonal", "full"])
def test_latent_metric_gradcheck(backend_device, kind):
    backend, device = backend_device
    z, centroids, precisions = make_problem(3, 4, 2, kind, seed=7)
    z = z.to(device).requires_grad_(True)
    args = (centroids.to(device), precisions.to(device), 0.05, 0.3, 1.0)
    metric = lambda x: pygeo.ops.latent_metric(x, *args, backend=backend).metric
    log_volume = lambda x: pygeo.ops.latent_metric(x, *args, log_volume=True, backend=backend).log_volume
    derivative = lambda x: pygeo.ops.latent_metric(x, *args, derivative=True, backend=backend).derivative
    assert torch.autograd.gradcheck(metric, (z,))
    assert torch.autograd.gradcheck(log_volume, (z,))
    if backend == "triton" and device == "cpu":
        return  # below: the backend-independent plain-torch slow path, too slow for the interpreter's forward calls
    assert torch.autograd.gradcheck(derivative, (z,))
    if backend == "torch":  # second derivatives always take the plain-torch slow path: check it once
        assert torch.autograd.gradgradcheck(log_volume, (z,))


@pytest.mark.parametrize("kind", ["diagonal", "full"])
def test_first_order_backward_never_takes_the_second_order_path(monkeypatch, kind):
    """Outputs the loss ignores (dG, the log-volume gradient) must not push a plain backward through the slow
    plain-torch path: their gradients arrive as None, not as materialised zeros."""
    import importlib

    op_module = importlib.import_module("pygeo.ops.latent_metric")

    z, centroids, precisions = make_problem(5, 7, 3, kind, seed=3)
    expected = torch.autograd.functional.jacobian(
        lambda x: reference.log_volume(x, centroids, precisions, 0.05, 0.3, 1.0).sum(), z)

    def refuse(*args):
        raise AssertionError("first-order backward went through the plain-torch second-order path")

    monkeypatch.setattr(op_module, "_differentiable_reference", refuse)
    point = z.clone().requires_grad_(True)
    out = pygeo.ops.latent_metric(point, centroids, precisions, 0.05, 0.3, 1.0, derivative=True, log_volume=True)
    (out.log_volume.sum() + out.metric.sum()).backward()
    G_grad = torch.autograd.functional.jacobian(
        lambda x: reference.broadcast_metric(x, centroids, precisions, 0.05, 0.3, 1.0).sum(), z)
    assert_close(point.grad, expected + G_grad, torch.float64)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_latent_metric_opcheck(backend_device):
    backend, device = backend_device
    for kind, flags in (("diagonal", (False, False)), ("full", (True, True))):
        if backend == "triton" and device == "cpu" and kind == "full":
            continue  # interpreter time; the full kernels are checked against the reference above
        z, centroids, precisions = make_problem(4, 5, 3, kind)
        z = z.to(device).requires_grad_(True)
        torch.library.opcheck(torch.ops.pygeo.latent_metric.default,
                              (z, centroids.to(device), precisions.to(device), 0.01, 0.2, 1.0, *flags, backend))


def test_latent_metric_compiles():
    z, centroids, precisions = make_problem(5, 7, 3, "diagonal")
    z, centroids, precisions = z.float(), centroids.float(), precisions.float()
    compiled = torch.compile(lambda x: pygeo.ops.latent_metric(x, centroids, precisions, 0.01, 0.0, 1.0,
                                                               log_volume=True).log_volume, fullgraph=True)
    expected = 0.5 * torch.logdet(reference.broadcast_metric(z.double(), centroids.double(), precisions.double(),
                                                             0.01, 0.0, 1.0))
    assert_close(compiled(z), expected, torch.float32)


def test_batch_dims_and_noncontiguous_z():
    z, centroids, precisions = make_problem(12, 5, 3, "full")
    z_view = z.reshape(3, 4, 3).transpose(0, 1)  # [4, 3, 3] non-contiguous
    out = pygeo.ops.latent_metric(z_view, centroids, precisions, 0.01, 0.1, 1.0, derivative=True, log_volume=True)
    assert out.metric.shape == (4, 3, 3, 3) and out.derivative.shape == (4, 3, 3, 3, 3) and out.log_volume.shape == (4, 3)
    flat = reference.broadcast_metric(z_view.reshape(-1, 3), centroids, precisions, 0.01, 0.1, 1.0)
    assert_close(out.metric.reshape(-1, 3, 3), flat, torch.float64)


# --- LatentMetric ---------------------------------------------------------------------------------------------------

def test_latent_metric_class_contract():
    z, centroids, precisions = make_problem(6, 8, 3, "diagonal")
    metric = pygeo.LatentMetric(centroids, precisions, lam=0.02, tau=0.1)
    distances = torch.cdist(centroids, centroids) + torch.diag(torch.full((8,), float("inf"), dtype=torch.float64))
    assert metric.rho == pytest.approx(float(distances.min(-1).values.max()))
    G_ref, dG_ref, L_ref, grad_ref = oracle(z, centroids, precisions, 0.02, 0.1, metric.rho)
    assert_close(metric.metric(z), G_ref, torch.float64)
    G, dG = metric.metric_and_derivative(z)
    assert_close(dG, dG_ref, torch.float64)
    assert_close(metric.log_volume(z), L_ref, torch.float64)
    L, grad = metric.log_volume_and_grad(z)
    assert_close(grad, grad_ref, torch.float64)
    zz = z.clone().requires_grad_(True)
    (auto_grad,) = torch.autograd.grad(metric.log_volume(zz).sum(), zz)
    assert_close(auto_grad, grad_ref, torch.float64)
    u, v = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    assert_close(metric.inner(z, u, v), torch.einsum("bi,bij,bj->b", u, G_ref, v), torch.float64)
    # float32 z against float64 centroids: the metric follows z's dtype
    assert metric.metric(z.float()).dtype == torch.float32


def test_latent_metric_class_bad_inputs():
    c = torch.randn(4, 2)
    with pytest.raises(ValueError, match="at least one centroid"):
        pygeo.LatentMetric(torch.zeros(0, 2), torch.ones(0, 2))
    with pytest.raises(ValueError, match="N=1 pass rho"):
        pygeo.LatentMetric(torch.zeros(1, 2), torch.ones(1, 2))
    assert pygeo.LatentMetric(torch.zeros(1, 2), torch.ones(1, 2), rho=1.0).rho == 1.0
    with pytest.raises(ValueError, match="precisions must have shape"):
        pygeo.LatentMetric(c, torch.ones(4, 3))
    with pytest.raises(ValueError, match="positive definite"):
        pygeo.LatentMetric(c, torch.tensor([[1.0, 2.0], [2.0, 1.0]]).expand(4, 2, 2).contiguous())
    with pytest.raises(ValueError, match="symmetric"):
        pygeo.LatentMetric(c, torch.tensor([[1.0, 0.5], [0.0, 1.0]]).expand(4, 2, 2).contiguous())
    with pytest.raises(ValueError, match="diagonal.*positive"):
        pygeo.LatentMetric(c, -torch.ones(4, 2))
    with pytest.raises(ValueError, match="centroids contains NaN"):
        pygeo.LatentMetric(torch.full((4, 2), float("nan")), torch.ones(4, 2))
    with pytest.raises(ValueError, match="lam must be"):
        pygeo.LatentMetric(c, torch.ones(4, 2), lam=-1.0)
    with pytest.raises(ValueError, match="rho must be"):
        pygeo.LatentMetric(c, torch.ones(4, 2), rho=0.0)
    with pytest.raises(TypeError, match="centroids must be a real floating tensor"):
        pygeo.LatentMetric(torch.zeros(4, 2, dtype=torch.int64), torch.ones(4, 2))
    metric = pygeo.LatentMetric(c, torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"z must have shape \[\.\.\., 2\]"):
        metric.metric(torch.randn(5, 3))
    with pytest.raises(ValueError, match="z contains NaN"):
        metric.log_volume(torch.full((5, 2), float("nan")))


@pytest.mark.parametrize("bad, message", [
    (lambda: pygeo.ops.latent_metric(torch.randn(3, 2), torch.randn(4, 3), torch.ones(4, 3), rho=1.0), "z must have shape"),
    (lambda: pygeo.ops.latent_metric(torch.randn(3, 2), torch.randn(4, 2), torch.ones(4, 2, dtype=torch.float64), rho=1.0), "same dtype"),
    (lambda: pygeo.ops.latent_metric(torch.randn(3, 2), torch.randn(4, 2), torch.ones(4, 2), tau=-1.0, rho=1.0), "tau must be"),
    (lambda: pygeo.ops.latent_metric(torch.randn(3, 2), torch.randn(4, 2), torch.ones(4, 2), rho=1.0, backend="nope"), "backend must be"),
    (lambda: pygeo.ops.latent_metric(torch.randn(3, 2), torch.randn(4, 2, requires_grad=True), torch.ones(4, 2), rho=1.0), "differentiable in z only"),
    (lambda: pygeo.ops.latent_metric(torch.randn(3, 2), torch.randn(2, 2), torch.tensor([[[1.0, 0.5], [0.0, 1.0]]] * 2), rho=1.0), "symmetric"),
    (lambda: pygeo.ops.latent_metric(torch.randn(3, 2), torch.randn(2, 2), torch.tensor([[[1.0, 2.0], [2.0, 1.0]]] * 2), rho=1.0), "positive definite"),
    (lambda: pygeo.ops.latent_metric(torch.full((1, 2), 1e20), torch.randn(4, 2), torch.ones(4, 2), rho=1.0), "overflows"),
    (lambda: pygeo.ops.latent_metric(torch.randn(3, 2), torch.randn(4, 2), torch.ones(4, 2), lam="0.1", rho=1.0), "lam must be a real number"),
])
def test_latent_metric_op_bad_input(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        bad()


def test_precisions_from_a_numerical_inverse_and_scalar_parameters_of_any_kind_are_accepted():
    """M_i = Sigma_i^-1 from torch.linalg.inv is symmetric only to rounding; lam, tau, rho may be NumPy or 0-d tensors."""
    import numpy as np

    A = torch.randn(6, 3, 3, dtype=torch.float64)
    covariances = A @ A.mT + torch.eye(3, dtype=torch.float64)
    precisions = torch.linalg.inv(covariances)
    centroids = torch.randn(6, 3, dtype=torch.float64)
    metric = pygeo.LatentMetric(centroids, precisions, lam=np.float64(0.05), tau=torch.tensor(0.1), rho=np.float32(1.5))
    assert (metric.lam, metric.tau, metric.rho) == (0.05, float(torch.tensor(0.1)), 1.5)
    z = torch.randn(5, 3, dtype=torch.float64)
    symmetric = pygeo.LatentMetric(centroids, 0.5 * (precisions + precisions.mT), lam=0.05, tau=metric.tau, rho=1.5)
    assert_close(metric.metric(z), symmetric.metric(z), torch.float64)


def test_from_encoder_uses_kmedoids_and_posterior_precisions():
    torch.manual_seed(1)
    data = torch.randn(300, 5)
    weight = torch.randn(5, 2)

    def encoder(x):
        return x @ weight, 0.1 * x[:, :2]

    metric = pygeo.LatentMetric.from_encoder(encoder, data, n_centroids=12, lam=0.05, tau=0.01, batch_size=64,
                                             seed=3, progress=False)
    mu, logvar = encoder(data)
    indices = kmedoids(mu, 12, seed=3).indices
    assert torch.equal(metric.centroids, mu[indices])
    assert torch.equal(metric.precisions, torch.exp(-logvar[indices]))
    assert metric.lam == 0.05 and metric.tau == 0.01
    with pytest.raises(ValueError, match="n_centroids"):
        pygeo.LatentMetric.from_encoder(encoder, data, n_centroids=0, progress=False)
