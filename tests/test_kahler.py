"""Kahler geometry of complex latents: the LSE Kahler metric op (every backend), the metrics, their real forms,
the complex Gaussian Fisher metric, regularisers and det-weighted sampling."""
import math

import pytest
import torch

import pygeo
from pygeo import _backend
from pygeo.metrics.kahler import to_complex, to_real
from pygeo.reference.lse_kahler_metric import lse_kahler_metric as reference

from conftest import assert_close, backend_params

BACKENDS = backend_params()
C128 = torch.complex128


def random_problem(B, K, n, diagonal, dtype=torch.float64, spread=1.0, seed=0):
    """z [B, n], centers [K, n], precisions ([K, n, n] Hermitian PD or [K, n] positive), log_weights [K]."""
    generator = torch.Generator().manual_seed(seed)
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64

    def cn(*shape):
        return torch.complex(torch.randn(*shape, generator=generator, dtype=dtype),
                             torch.randn(*shape, generator=generator, dtype=dtype)) / math.sqrt(2)

    z, centers = spread * cn(B, n), spread * cn(K, n)
    if diagonal:
        precisions = 0.3 + torch.rand(K, n, generator=generator, dtype=dtype)
    else:
        A = cn(K, n, n) / math.sqrt(n)
        precisions = (A @ A.mH + 0.3 * torch.eye(n, dtype=dtype)).to(complex_dtype)
    log_weights = torch.randn(K, generator=generator, dtype=dtype)
    return z, centers, precisions, log_weights


def wirtinger_metric_by_autograd(potential, z):
    """G = conj(d_a d_bbar Psi) from the real Hessian H of Psi(x), x = [Re z, Im z]:
    d_a d_bbar Psi = (H_xx + H_yy + i (H_xy - H_yx)) / 4."""
    n = z.shape[-1]
    out = []
    for point in z.reshape(-1, n):
        H = torch.autograd.functional.hessian(lambda x: potential(to_complex(x)), to_real(point))
        Hxx, Hyy, Hxy, Hyx = H[:n, :n], H[n:, n:], H[:n, n:], H[n:, :n]
        out.append(((Hxx + Hyy + 1j * (Hxy - Hyx)) / 4).conj())
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------- the maths (reference)
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("K", [1, 70])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_metric_is_the_wirtinger_hessian_of_the_potential(diagonal, K, temperature):
    z, centers, precisions, log_weights = random_problem(4, K, 3, diagonal)
    metric = pygeo.LSEKahlerMetric(centers, precisions, log_weights, temperature, backend="torch")
    expected = wirtinger_metric_by_autograd(metric.potential, z)
    assert_close(torch.view_as_real(metric.metric(z)), torch.view_as_real(expected), torch.float64)
    assert_close(torch.view_as_real(reference(z, centers, precisions, log_weights, temperature)),
                 torch.view_as_real(expected), torch.float64)


def test_quadratic_potential_gives_its_precision():
    """Psi = (z - c)^H P (z - c) has G = P (the convention h(u, u) = u^H G u)."""
    _, centers, precisions, _ = random_problem(1, 1, 4, diagonal=False)
    z = torch.randn(5, 4, dtype=C128)
    G = pygeo.ops.lse_kahler_metric(z, centers, precisions)
    assert_close(torch.view_as_real(G), torch.view_as_real(precisions.expand(5, 4, 4)), torch.float64)


def test_metric_is_hermitian_positive_definite_everywhere():
    z, centers, precisions, log_weights = random_problem(300, 9, 4, diagonal=False, spread=4.0)
    for temperature in (0.05, 1.0, 20.0):
        G = pygeo.ops.lse_kahler_metric(z, centers, precisions, log_weights, temperature)
        assert torch.equal(G, G.mH)
        floor = torch.linalg.eigvalsh(precisions).min()  # G >= sum_i p_i P_i >= min eigenvalue of the P_i
        assert bool((torch.linalg.eigvalsh(G) >= floor * (1 - 1e-9)).all())


def test_log_det_option():
    z, centers, precisions, log_weights = random_problem(6, 5, 3, diagonal=False)
    G, log_det = pygeo.ops.lse_kahler_metric(z, centers, precisions, log_weights, 0.7, with_log_det=True)
    torch.testing.assert_close(log_det, torch.linalg.slogdet(G)[1])
    metric = pygeo.LSEKahlerMetric(centers, precisions, log_weights, 0.7)
    torch.testing.assert_close(metric.log_volume(z), log_det)


# ---------------------------------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("B,K,n", [(1, 1, 1), (7, 3, 3), (5, 70, 17), (1000, 5, 2)])
def test_lse_kahler_metric_matches_float64_reference(backend_device, dtype, diagonal, B, K, n):
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and B > 64:
        pytest.skip("Triton interpreter on CPU: one program per point, B = 1000 takes minutes; (5, 70, 17) covers the "
                    "same code, and this size runs compiled on a GPU")
    z, centers, precisions, log_weights = random_problem(B, K, n, diagonal)
    expected = reference(z, centers, precisions, log_weights, 0.8)
    complex_dtype = torch.complex64 if dtype == torch.float32 else C128
    G = pygeo.ops.lse_kahler_metric(
        z.to(device, complex_dtype), centers.to(device, complex_dtype),
        precisions.to(device, dtype if diagonal else complex_dtype), log_weights.to(device, dtype), 0.8, backend=backend)
    assert G.shape == (B, n, n) and G.dtype == complex_dtype
    assert torch.equal(G, G.mH), "G must be exactly Hermitian"
    assert_close(torch.view_as_real(G.cpu()), torch.view_as_real(expected), dtype)


@pytest.mark.skipif(not _backend.status("cpp").available, reason="needs the compiled C++ backend")
@pytest.mark.parametrize("simd_bytes", ["16", "32", "64"])
@pytest.mark.parametrize("diagonal", [False, True])
def test_lse_kahler_metric_cpp_every_vector_width(monkeypatch, simd_bytes, diagonal):
    """The C++ kernel is compiled for 16-, 32- and 64-byte vectors and picks the CPU's widest at run time;
    PYGEO_SIMD_BYTES caps the width, so each version runs here (sizes that are not multiples of a tile or a block,
    a sharp softmax that moves the shift and underflows weights)."""
    monkeypatch.setenv("PYGEO_SIMD_BYTES", simd_bytes)
    for (B, K, n), spread, temperature in [((37, 19, 6), 1.0, 0.8), ((21, 40, 3), 6.0, 0.02), ((3, 2, 33), 1.0, 2.0)]:
        z, centers, precisions, log_weights = random_problem(B, K, n, diagonal, spread=spread)
        expected = reference(z, centers, precisions, log_weights, temperature)
        scale = float(expected.abs().max())
        for dtype, tol in ((torch.float32, 1e-3), (torch.float64, 1e-9)):
            cd = torch.complex64 if dtype == torch.float32 else C128
            G = pygeo.ops.lse_kahler_metric(z.to(cd), centers.to(cd), precisions.to(dtype if diagonal else cd),
                                            log_weights.to(dtype), temperature, backend="cpp")
            assert torch.equal(G, G.mH)
            torch.testing.assert_close(torch.view_as_real(G).double() / scale, torch.view_as_real(expected) / scale,
                                       rtol=tol, atol=tol)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_lse_kahler_metric_far_points_and_sharp_softmax(backend_device):
    """Scores spread over hundreds of units (online softmax rescaling, weights underflowing to zero) stay exact."""
    backend, device = backend_device
    z, centers, precisions, log_weights = random_problem(9, 40, 3, diagonal=False, spread=6.0)
    for temperature in (0.02, 50.0):
        expected = reference(z, centers, precisions, log_weights, temperature)
        for dtype in (torch.float32, torch.float64):
            cd = torch.complex64 if dtype == torch.float32 else C128
            G = pygeo.ops.lse_kahler_metric(z.to(device, cd), centers.to(device, cd), precisions.to(device, cd),
                                            log_weights.to(device, dtype), temperature, backend=backend)
            tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
            scale = float(expected.abs().max())
            torch.testing.assert_close(torch.view_as_real(G.cpu()).double() / scale,
                                       torch.view_as_real(expected) / scale, **tol)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_lse_kahler_metric_batch_dims(backend_device):
    backend, device = backend_device
    _, centers, precisions, log_weights = random_problem(1, 4, 2, diagonal=False)
    z = torch.randn(2, 3, 2, dtype=C128)
    G = pygeo.ops.lse_kahler_metric(z.to(device), centers.to(device), precisions.to(device), log_weights.to(device),
                                    backend=backend)
    assert G.shape == (2, 3, 2, 2)
    expected = reference(z.reshape(6, 2), centers, precisions, log_weights, 1.0).reshape(2, 3, 2, 2)
    assert_close(torch.view_as_real(G.cpu()), torch.view_as_real(expected), torch.float64)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("diagonal", [False, True])
def test_lse_kahler_metric_gradcheck(backend_device, diagonal):
    backend, device = backend_device
    z, centers, precisions, log_weights = (t.to(device).requires_grad_() for t in random_problem(2, 2, 2, diagonal))

    def fn(z, centers, precisions, log_weights):
        if not diagonal:
            precisions = 0.5 * (precisions + precisions.mH)  # gradcheck perturbs entries one at a time
        return torch.view_as_real(pygeo.ops.lse_kahler_metric(z, centers, precisions, log_weights, 0.6, backend=backend))

    assert torch.autograd.gradcheck(fn, (z, centers, precisions, log_weights))


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpp") if _backend.status(b).available])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("temperature", [0.3, 2.0])
def test_closed_form_gradient_in_z_matches_autograd_through_the_reference(backend, dtype, diagonal, temperature):
    """The op's first-order backward in z (the C++ kernel for cpp, reference.lse_kahler_metric_vjp_z for torch)
    against autograd through the closed-form metric in float64, with odd sizes, K larger than a tile and a random
    upstream gradient."""
    z, centers, precisions, log_weights = random_problem(9, 70, 5, diagonal, dtype=dtype)
    complex_dtype = z.dtype
    upstream = torch.randn(9, 5, 5, dtype=complex_dtype, generator=torch.Generator().manual_seed(4))
    point = z.clone().requires_grad_()
    G = pygeo.ops.lse_kahler_metric(point, centers, precisions, log_weights, temperature, backend=backend)
    (actual,) = torch.autograd.grad(torch.view_as_real(G), point, torch.view_as_real(upstream))
    wide = lambda t: t.to(torch.complex128 if t.is_complex() else torch.float64)
    point = wide(z).requires_grad_()
    G = reference(point, wide(centers), wide(precisions), wide(log_weights), temperature)
    (expected,) = torch.autograd.grad(torch.view_as_real(G), point, torch.view_as_real(wide(upstream)))
    assert_close(torch.view_as_real(actual), torch.view_as_real(expected), dtype)


def test_lse_kahler_metric_gradgradcheck():
    """The backward (recomputation through the reference) is differentiable again, for every input."""
    z, centers, precisions, log_weights = random_problem(2, 2, 2, diagonal=True)
    z, log_weights = z.requires_grad_(), log_weights.requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda z, log_weights: torch.view_as_real(pygeo.ops.lse_kahler_metric(z, centers, precisions, log_weights, 0.6)),
        (z, log_weights))


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("diagonal", [False, True])
def test_lse_kahler_metric_opcheck(backend_device, diagonal):
    backend, device = backend_device
    z, centers, precisions, log_weights = random_problem(4, 3, 2, diagonal)
    args = (torch.view_as_real(z).contiguous(), torch.view_as_real(centers).contiguous(),
            precisions if diagonal else torch.view_as_real(precisions).contiguous(), log_weights)
    args = tuple(t.to(device).requires_grad_() for t in args)
    torch.library.opcheck(torch.ops.pygeo.lse_kahler_metric.default, (*args, 0.9, backend))


def test_lse_kahler_metric_compiles():
    z, centers, precisions, log_weights = random_problem(5, 3, 2, diagonal=False)
    compiled = torch.compile(lambda z: pygeo.ops.lse_kahler_metric(z, centers, precisions, log_weights, 0.5),
                             fullgraph=True)
    assert_close(torch.view_as_real(compiled(z)), torch.view_as_real(reference(z, centers, precisions, log_weights, 0.5)),
                 torch.float64)


# ------------------------------------------------------------------------------------------------------- bad inputs
def _good():
    z, centers, precisions, log_weights = random_problem(3, 2, 2, diagonal=False)
    return dict(z=z, centers=centers, precisions=precisions, log_weights=log_weights)


def _with(**changes):
    args = _good()
    args.update(changes)
    return lambda: pygeo.ops.lse_kahler_metric(args["z"], args["centers"], args["precisions"], args["log_weights"],
                                               changes.get("temperature", 1.0))


@pytest.mark.parametrize("bad, message", [
    (_with(z=torch.randn(3, 2, dtype=torch.float64)), "z must be a complex tensor"),
    (_with(z=torch.randn(3, 5, dtype=C128)), "centers must have shape"),
    (_with(centers=torch.randn(2, 2, dtype=torch.float64)), "centers must be a complex tensor"),
    (_with(precisions=torch.randn(2, 2, 2, dtype=C128)), "precisions must be Hermitian"),
    (_with(precisions=-torch.eye(2, dtype=C128).expand(2, 2, 2)), "precisions must be positive definite"),
    (_with(precisions=-torch.rand(2, 2, dtype=torch.float64)), "must be positive"),
    (_with(precisions=torch.eye(2, dtype=C128).expand(3, 2, 2)), "precisions must have K=2"),
    (_with(precisions=torch.eye(3, dtype=C128).expand(2, 3, 3)), "precisions must have shape"),
    (_with(log_weights=torch.zeros(3, dtype=torch.float64)), "log_weights must have shape"),
    (_with(log_weights=torch.zeros(2, dtype=torch.float32)), "same dtype"),
    (_with(temperature=0.0), "temperature must be"),
    (_with(temperature=-1.0), "temperature must be"),
    (_with(z=torch.full((3, 2), float("nan"), dtype=C128)), "z contains NaN"),
    (_with(centers=torch.randn(2, 2, dtype=torch.complex64)), "same dtype"),
    (lambda: pygeo.LSEKahlerMetric(torch.randn(2, 2, dtype=C128), torch.randn(2, 2, 2, dtype=C128)), "Hermitian"),
    (lambda: pygeo.LSEKahlerMetric(torch.randn(2, 2, dtype=C128), torch.rand(2, 2, dtype=torch.float64) + 1,
                                   temperature=0), "temperature must be"),
    (lambda: pygeo.LSEKahlerMetric(torch.randn(2, 2, dtype=C128), torch.rand(2, 2, dtype=torch.float64) + 1).metric(
        torch.randn(4, 2, dtype=torch.float64)), "z must be a complex tensor"),
    (lambda: pygeo.LSEKahlerMetric(torch.randn(2, 2, dtype=C128), torch.rand(2, 2, dtype=torch.float64) + 1).as_real()
     .metric(torch.randn(4, 3, dtype=torch.float64)), "x must have shape"),
    (lambda: pygeo.ops.lse_kahler_metric(**_good(), backend="nope"), "backend must be"),
])
def test_bad_inputs(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        bad()


# ----------------------------------------------------------------------------------------------------- real form
def test_real_form_determinant_is_det_G_squared_up_to_a_constant():
    z, centers, precisions, log_weights = random_problem(20, 6, 3, diagonal=False)
    metric = pygeo.LSEKahlerMetric(centers, precisions, log_weights, 0.5)
    real = metric.as_real()
    assert isinstance(real, pygeo.Metric)
    x = to_real(z)
    G_real = real.metric(x)
    torch.testing.assert_close(G_real, G_real.transpose(-1, -2))
    log_det_real = torch.linalg.slogdet(G_real)[1]
    log_det_complex = torch.linalg.slogdet(metric.metric(z))[1]  # log |det G|
    torch.testing.assert_close(log_det_real, 2 * log_det_complex + 2 * 3 * math.log(2.0))
    torch.testing.assert_close(real.log_volume(x), 0.5 * log_det_real)
    # the line element: x-tangent v = [Re u, Im u] has length^2 v^T G_real v = 2 u^H G u
    u = torch.randn(20, 3, dtype=C128)
    v = to_real(u)
    torch.testing.assert_close(real.inner(x, v, v), 2 * metric.inner(z, u, u).real)


def test_real_form_has_derivatives_for_geometry():
    z, centers, precisions, log_weights = random_problem(2, 3, 2, diagonal=False)
    real = pygeo.LSEKahlerMetric(centers, precisions, log_weights).as_real()
    x = to_real(z)
    G, dG = real.metric_and_derivative(x)  # dG[..., k, i, j] = d G_real[i, j] / d x_k
    torch.testing.assert_close(G, real.metric(x))
    eps = 1e-6
    for k in range(4):
        step = torch.zeros(4, dtype=torch.float64)
        step[k] = eps
        fd = (real.metric(x + step) - real.metric(x - step)) / (2 * eps)
        torch.testing.assert_close(dG[:, k], fd, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------- complex Gaussian Fisher metric
def _decoder(W, V):
    def decode(z):  # neither holomorphic nor antiholomorphic
        return torch.tanh(z @ W.T) + (z.conj() @ V.T) ** 2
    return decode


def test_complex_gaussian_fisher_metric_is_the_wirtinger_hessian_of_the_kl():
    """G = conj(d_a d_bbar KL(p_z0 || p_z)) at z = z0, KL = |m(z) - m(z0)|^2 / sigma^2, by central finite differences."""
    n, D, sigma = 2, 5, 0.7
    W, V = torch.randn(D, n, dtype=C128) / 2, torch.randn(D, n, dtype=C128) / 2
    decode = _decoder(W, V)
    metric = pygeo.ComplexGaussianFisherMetric(decode, sigma)
    z0 = torch.randn(n, dtype=C128)
    m0 = decode(z0.unsqueeze(0))[0]

    def kl(x):
        return ((decode(to_complex(x).unsqueeze(0))[0] - m0).abs() ** 2).sum() / sigma ** 2

    h, x0 = 1e-4, to_real(z0)
    H = torch.zeros(2 * n, 2 * n, dtype=torch.float64)
    for i in range(2 * n):
        for j in range(2 * n):
            ei, ej = torch.zeros(2 * n, dtype=torch.float64), torch.zeros(2 * n, dtype=torch.float64)
            ei[i], ej[j] = h, h
            H[i, j] = (kl(x0 + ei + ej) - kl(x0 + ei - ej) - kl(x0 - ei + ej) + kl(x0 - ei - ej)) / (4 * h * h)
    expected = ((H[:n, :n] + H[n:, n:] + 1j * (H[:n, n:] - H[n:, :n])) / 4).conj()
    G = metric.metric(z0.unsqueeze(0))[0]
    torch.testing.assert_close(G, expected, rtol=1e-5, atol=1e-6)


def test_complex_gaussian_fisher_metric_holomorphic_is_JHJ():
    n, D = 3, 6
    W = torch.randn(D, n, dtype=C128)
    metric = pygeo.ComplexGaussianFisherMetric(lambda z: torch.exp(z @ W.T), 2.0)
    z = torch.randn(4, n, dtype=C128) / 3
    J = torch.exp(z @ W.T).unsqueeze(-1) * W  # d m_r / d z_a, [4, D, n]
    torch.testing.assert_close(metric.metric(z), J.mH @ J / 4.0)
    u = torch.randn(4, n, dtype=C128)
    torch.testing.assert_close(metric.inner(z, u, u).real, ((J @ u.unsqueeze(-1)).abs() ** 2).sum((-1, -2)) / 4.0)


def test_complex_gaussian_fisher_metric_bad_input():
    with pytest.raises(TypeError, match="decoder must be callable"):
        pygeo.ComplexGaussianFisherMetric(3.0, 1.0)
    with pytest.raises(ValueError, match="sigma must be"):
        pygeo.ComplexGaussianFisherMetric(lambda z: z, 0.0)
    with pytest.raises(TypeError, match="z must be a complex tensor"):
        pygeo.ComplexGaussianFisherMetric(lambda z: z, 1.0).metric(torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"sigma must be a float or a tensor \[D\] with D=2"):
        pygeo.ComplexGaussianFisherMetric(lambda z: z, torch.ones(3)).metric(torch.randn(2, 2, dtype=C128))


# ------------------------------------------------------------------------------------------------ PyTorch convention
def test_torch_grad_of_a_real_loss_at_a_complex_tensor_is_twice_d_dzbar():
    """For L(z) = |z - a|^2 + Re(b z^2): dL/dzbar = (z - a) + conj(b z); PyTorch's .grad is 2 dL/dzbar
    (= dL/dx + i dL/dy), the steepest-ascent direction in R^2."""
    a, b = torch.tensor(0.3 - 0.2j, dtype=C128), torch.tensor(0.5 + 1.5j, dtype=C128)
    z = torch.tensor(1.1 + 0.7j, dtype=C128, requires_grad=True)
    loss = (z - a).abs() ** 2 + (b * z * z).real
    loss.backward()
    d_dzbar = (z.detach() - a) + (b * z.detach()).conj()
    torch.testing.assert_close(z.grad, 2 * d_dzbar)


def test_hermitian_log_volume_and_grad_is_d_dre_plus_i_d_dim():
    """log_volume_and_grad of a Kahler metric: log det G and d/dRe z + i d/dIm z, against central differences."""
    z, centers, precisions, log_weights = random_problem(4, 6, 3, diagonal=False)
    metric = pygeo.LSEKahlerMetric(centers, precisions, log_weights, temperature=0.8)
    value, grad = metric.log_volume_and_grad(z)
    torch.testing.assert_close(value, metric.log_volume(z))
    h = 1e-6
    expected = torch.zeros_like(z)
    for k in range(3):
        for direction in (1.0, 1.0j):
            step = torch.zeros(3, dtype=z.dtype)
            step[k] = h * direction
            slope = (metric.log_volume(z + step) - metric.log_volume(z - step)) / (2 * h)
            expected[:, k] += slope * direction
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------- det-weighted sampling (real form)
def test_det_weighted_sampling_through_the_real_form():
    """Target w(z) det G(z) with the prior w = CN(0, 1) (density exp(-|z|^2)), n = 1: HMC on the real form's
    log_volume (= log det G + const) against grid quadrature."""
    centers = torch.tensor([[1.0 + 0.5j], [-1.0 - 0.2j], [0.2 - 1.2j]], dtype=C128)
    metric = pygeo.LSEKahlerMetric(centers, torch.tensor([[2.0], [0.7], [1.5]], dtype=torch.float64), temperature=0.5)
    real = metric.as_real()
    log_prob = metric.det_weighted_log_prob(gamma=1.0, base_log_prob=lambda z: -(z.abs() ** 2).sum(-1))
    x = torch.randn(5, 2, dtype=torch.float64)
    # the same target through the real form's volume: sqrt(det G_real) = 2^n det G
    torch.testing.assert_close(log_prob(x), -(x ** 2).sum(-1) + real.log_volume(x) - math.log(2.0))

    grid = torch.linspace(-5, 5, 121, dtype=torch.float64)
    points = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    density = (log_prob(points) - log_prob(points).max()).exp()
    density = density / density.sum()
    expected_mean = (density.unsqueeze(-1) * points).sum(0)
    expected_radius2 = (density * (points ** 2).sum(-1)).sum()

    prior = lambda x: -(x ** 2).sum(-1)  # noqa: E731  CN(0, 1) on x = [Re z, Im z]
    init = torch.randn(128, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.7
    # pygeo's HMC on the real form targets sqrt(det G_real) * prior, i.e. det G * prior
    hmc = pygeo.sample.riemannian_uniform(real, 128 * 50, n_chains=128, n_steps=50, n_leapfrog=4, step_size=0.3,
                                          init=init, seed=1, log_prob=prior, warmup=20, progress=False)
    torch.testing.assert_close(hmc.samples.mean(0), expected_mean, atol=0.06, rtol=0)
    torch.testing.assert_close((hmc.samples ** 2).sum(-1).mean(), expected_radius2, atol=0.08, rtol=0.05)
    # the Langevin sampler targets the same law through the det-weighted log density, preconditioned by the real form
    mala = pygeo.sample.riemannian_langevin(real, 128 * 50, log_prob=log_prob, n_chains=128, n_steps=50, init=init,
                                            seed=2, warmup=30, full_drift=False, progress=False)
    torch.testing.assert_close(mala.samples.mean(0), expected_mean, atol=0.08, rtol=0)
    torch.testing.assert_close((mala.samples ** 2).sum(-1).mean(), expected_radius2, atol=0.1, rtol=0.05)
    # the det weighting matters: the prior's own E|z|^2 = 1 is far from the target's
    assert abs(float(expected_radius2) - 1.0) > 0.15


def test_samplers_take_a_hermitian_metric_directly():
    """A Hermitian metric given to the samplers runs through its real form, with a base log-density of complex z, and
    the samples come back complex: the same draws (same seed, same start) as the explicit real-form run."""
    centers = torch.tensor([[1.0 + 0.5j, 0.2j], [-1.0 - 0.2j, 0.3 - 0.1j]], dtype=C128)
    metric = pygeo.LSEKahlerMetric(centers, torch.tensor([[2.0, 1.0], [0.7, 1.3]], dtype=torch.float64))
    init = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=C128)
    prior_z = lambda z: -(z.abs() ** 2).sum(-1)  # noqa: E731
    prior_x = lambda x: -(x ** 2).sum(-1)  # noqa: E731
    settings = dict(n_chains=16, n_steps=6, seed=4, progress=False)

    direct = pygeo.sample.riemannian_uniform(metric, 32, init=init, base_log_prob=prior_z, n_leapfrog=3,
                                             step_size=0.2, warmup=3, **settings)
    real = pygeo.sample.riemannian_uniform(metric.as_real(), 32, init=to_real(init), base_log_prob=prior_x,
                                           n_leapfrog=3, step_size=0.2, warmup=3, **settings)
    assert direct.samples.dtype == C128 and direct.samples.shape == (32, 2)
    torch.testing.assert_close(to_real(direct.samples), real.samples)

    direct = pygeo.sample.riemannian_langevin(metric, 32, base_log_prob=prior_z, init=init, warmup=3,
                                              full_drift=False, **settings)
    real = pygeo.sample.riemannian_langevin(metric.as_real(), 32, log_prob=metric.det_weighted_log_prob(1.0, prior_z),
                                            init=to_real(init), warmup=3, full_drift=False, **settings)
    assert direct.samples.dtype == C128 and direct.samples.shape == (32, 2)
    torch.testing.assert_close(to_real(direct.samples), real.samples)
    assert float(direct.acceptance.mean()) > 0


# ------------------------------------------------------------------------------------------------------ regularisers
def test_log_det_regularisers_values_and_gradients():
    from pygeo.regularizers import log_det_gradient_penalty, log_det_variance

    z, centers, precisions, log_weights = random_problem(12, 4, 2, diagonal=False)
    centers = centers.clone().requires_grad_(True)
    metric = pygeo.LSEKahlerMetric(centers, precisions, log_weights, 0.7)
    samples = z.reshape(3, 4, 2)  # [S, batch, n]
    log_det = torch.linalg.slogdet(reference(z, centers, precisions, log_weights, 0.7))[1].reshape(3, 4)
    torch.testing.assert_close(log_det_variance(metric, samples), log_det.var(0).mean())

    penalty = log_det_gradient_penalty(metric, z)
    x = to_real(z).requires_grad_(True)
    real_log_det = torch.linalg.slogdet(reference(to_complex(x), centers, precisions, log_weights, 0.7))[1]
    (grad_x,) = torch.autograd.grad(real_log_det.sum(), x, create_graph=True)
    expected = (grad_x ** 2).sum(-1).mean()
    torch.testing.assert_close(penalty, expected)
    (dp,) = torch.autograd.grad(penalty, centers)
    (de,) = torch.autograd.grad(expected, centers)
    torch.testing.assert_close(dp, de)
    assert float(dp.abs().sum()) > 0


def test_log_det_variance_trains_a_decoder():
    """Differentiable w.r.t. decoder parameters through the complex Fisher metric: gradient vs finite differences."""
    from pygeo.regularizers import log_det_variance

    torch.manual_seed(3)
    W = torch.randn(6, 2, dtype=C128, requires_grad=True)

    def variance(W):
        metric = pygeo.ComplexGaussianFisherMetric(lambda z: torch.tanh(z @ W.T) + 0.3 * (z @ W.T).conj() ** 2, 0.5)
        return log_det_variance(metric, torch.randn(3, 4, 2, dtype=C128, generator=torch.Generator().manual_seed(0)))

    (grad,) = torch.autograd.grad(variance(W), W)
    direction = torch.randn(6, 2, dtype=C128)
    eps = 1e-6
    fd = (variance(W.detach() + eps * direction) - variance(W.detach() - eps * direction)) / (2 * eps)
    torch.testing.assert_close((grad.conj() * direction).real.sum(), fd, rtol=1e-5, atol=1e-8)  # .grad = dL/dRe + i dL/dIm


def test_regulariser_bad_input():
    from pygeo.regularizers import log_det_variance

    metric = pygeo.LSEKahlerMetric(torch.zeros(1, 2, dtype=C128), torch.ones(1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="S >= 2"):
        log_det_variance(metric, torch.zeros(1, 3, 2, dtype=C128))
    with pytest.raises(TypeError, match="metric must be"):
        log_det_variance(object(), torch.zeros(2, 3, 2, dtype=C128))


# ------------------------------------------------------------------------------------------------------- complex VAE
def test_complex_vae_trains_and_samples_its_posterior():
    from pygeo.models import ComplexVAE, train_complex_vae

    generator = torch.Generator().manual_seed(0)
    data = (torch.rand(256, 20, generator=generator) > 0.5).float()
    model = ComplexVAE(data_dim=20, latent_dim=1, hidden=32)
    mu, logvar = model.encoder(data[:5])
    assert mu.shape == (5, 1) and mu.is_complex() and logvar.shape == (5, 1) and not logvar.is_complex()
    z = model.sample_posterior(mu.detach(), logvar.detach(), n_samples=20000)
    torch.testing.assert_close((z - mu.detach()).abs().pow(2).mean(0), logvar.detach().exp(), rtol=0.05, atol=0)
    assert model.decoder(z[0]).shape == (5, 20)
    losses = train_complex_vae(model, data, epochs=6, batch_size=64, progress=False)
    assert len(losses) == 6 and losses[-1] < losses[0]
    with pytest.raises(ValueError, match="likelihood must be"):
        ComplexVAE(20, likelihood="poisson")


def test_complex_vae_training_is_reproducible_and_checks_its_inputs():
    """The same seed gives the same losses whatever the global random state, which it leaves as it was."""
    from pygeo.models import ComplexVAE, train_complex_vae

    data = (torch.rand(64, 12, generator=torch.Generator().manual_seed(0)) > 0.5).float()

    def run(global_seed):
        torch.manual_seed(0)
        model = ComplexVAE(12, 1, hidden=16)
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        losses = train_complex_vae(model, data, epochs=3, batch_size=16, seed=1, progress=False)
        assert torch.equal(torch.get_rng_state(), state)
        return losses

    assert run(5) == run(999)
    model = ComplexVAE(12, 1, hidden=16)
    for bad, message in [
        (dict(data=torch.rand(0, 12)), "at least one example"),
        (dict(data=torch.rand(8, 13)), r"data must have shape \[N, data_dim\]"),
        (dict(data=torch.rand(8, 12) * 3), r"in \[0, 1\]"),
        (dict(data=data, batch_size=0), "batch_size must be a positive int"),
        (dict(data=data, epochs=-1), "epochs must be a positive int"),
    ]:
        with pytest.raises(ValueError, match=message):
            train_complex_vae(model, **{"progress": False, **bad})
    for bad in (dict(sigma=0.0, likelihood="gaussian"), dict(hidden=0), dict(data_dim=0)):
        with pytest.raises(ValueError):
            ComplexVAE(**{"data_dim": 12, **bad})


# ------------------------------------------------------------------------------------------------------ demo section
def test_demo_section_runs_on_a_tiny_context(tmp_path):
    import contextlib
    from types import SimpleNamespace

    from pygeo.cli.sections import kahler as section

    generator = torch.Generator().manual_seed(0)
    ctx = SimpleNamespace(out_dir=tmp_path, show_progress=False, images=torch.rand(300, 784, generator=generator), labels=torch.zeros(300),
                          seed=0, quick=True, device=torch.device("cpu"),
                          timed=lambda name: contextlib.nullcontext(), progress=lambda iterable, desc=None: iterable,
                          save_figure=lambda figure, name, description: figure.savefig(tmp_path / name) or
                          f"![{description}]({name})")
    text = section.run(ctx)
    assert isinstance(section.TITLE, str) and "det G" in text
    assert (tmp_path / "kahler_det_heatmap.png").exists() and (tmp_path / "kahler_samples.png").exists()
