"""Issue 14 part 4: bad or extreme inputs give the right finite value or a clear ValueError / TypeError, never a silent
NaN; every test here failed before its fix."""
import math
import sys

import pytest
import torch

import pygeo
from pygeo import _backend
from pygeo.metrics import RHVAEMetric
from pygeo.reference import latent_metric as latent_reference

from conftest import backend_params


@pytest.mark.parametrize("backend_device", backend_params())
@pytest.mark.parametrize("dtype,exponents", [(torch.float32, (86.0, 90.0)), (torch.float64, (707.0, 712.0))])
def test_latent_metric_without_regulariser_is_finite_where_the_exponent_leaves_exp_range(backend_device, dtype,
                                                                                         exponents):
    """lam = 0: the regulariser's weight exp(e0 - s) (e0 = -tau |z|^2, s the largest centroid exponent) exceeds the
    dtype's exp range when the point is far from every centroid; 0 * inf was NaN in the C++ kernel."""
    backend, device = backend_device
    to = dict(dtype=dtype, device=device)
    squared = torch.linspace(*exponents, 41, dtype=torch.float64)
    z = torch.stack([squared.sqrt(), torch.zeros_like(squared)], -1)
    centroids, precisions = torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    out = pygeo.ops.latent_metric(z.to(**to), centroids.to(**to), precisions.to(**to), lam=0.0, tau=0.0, rho=1.0,
                                  derivative=True, log_volume=True, backend=backend)
    # G = exp(-|z|^2) I (it underflows to 0 or a subnormal in float32; never NaN); 1/2 log det G = -|z|^2 exactly.
    expected_G = torch.diag_embed(torch.exp(-squared)[:, None].expand(-1, 2))
    for name, value in zip(out._fields, out):
        assert torch.isfinite(value).all(), f"{name} has NaN/Inf"
    subnormal_resolution = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    torch.testing.assert_close(out.metric.cpu().double(), expected_G, rtol=1e-5, atol=4 * subnormal_resolution)
    torch.testing.assert_close(out.log_volume.cpu().double(), -squared, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(out.log_volume_grad.cpu().double(), -2 * z, rtol=1e-5, atol=1e-5)


def test_latent_metric_inner_checks_its_tangent_vectors():
    metric = pygeo.LatentMetric(torch.randn(5, 2, dtype=torch.float64), torch.ones(5, 2, dtype=torch.float64))
    z = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"u must have shape \[\.\.\., 2\]"):
        metric.inner(z, torch.zeros(3, 5, dtype=torch.float64), z)
    with pytest.raises(TypeError, match="v must have z's dtype"):
        metric.inner(z, z, torch.zeros(3, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="u contains NaN"):
        metric.inner(z, torch.full((3, 2), math.nan, dtype=torch.float64), z)


def test_function_metric_refuses_a_nan_from_the_users_function():
    hyperbolic = pygeo.FunctionMetric(lambda z: torch.eye(2, dtype=z.dtype) / z[..., 1:2, None] ** 2, dim=2)
    z = torch.tensor([[0.0, 1.0], [0.5, 0.0], [1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)  # y = 0: outside the domain
    with pytest.raises(ValueError, match=r"not finite at 2 of 4 points \(first: index 1\)"):
        hyperbolic.metric(z)
    assert torch.isfinite(hyperbolic.metric(z[[0, 2]])).all()


def test_complex_gaussian_fisher_metric_refuses_its_overflow():
    metric = pygeo.ComplexGaussianFisherMetric(lambda z: z ** 3, sigma=1.0)
    z = torch.tensor([[1.0 + 0j], [1e15 + 1e15j]], dtype=torch.complex64)  # |3 z^2|^2 ~ 1e61 > float32's 3e38
    with pytest.raises(ValueError, match=r"not finite at 1 of 2 points \(first: index 1\).*overflow"):
        metric.metric(z)
    G = metric.metric(z.to(torch.complex128))  # within complex128's range: the right value
    torch.testing.assert_close(G[1, 0, 0].real, torch.tensor(9 * (2e30) ** 2, dtype=torch.float64), rtol=1e-6, atol=0)


def _mlp(D=64, n=8, d=2, scale=1.0, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    decoder = torch.nn.Sequential(torch.nn.Linear(d, n), torch.nn.Tanh(), torch.nn.Linear(n, D)).to(dtype)
    with torch.no_grad():
        decoder[0].weight.mul_(scale)
    return decoder


def test_mlp_metric_refuses_overflowing_activations():
    decoder = _mlp(scale=1.0)
    with torch.no_grad():
        decoder[2].weight.mul_(1e20)  # J^T J ~ 1e40: beyond float32
    z = torch.randn(5, 2)
    for backend in ("torch", "cpp"):
        if not _backend.status(backend).available:
            continue
        with pytest.raises(ValueError, match=r"mlp_metric: G is not finite at 5 of 5 points \(first: index 0\)"):
            pygeo.ops.mlp_metric(z, [decoder[0].weight, decoder[2].weight], [decoder[0].bias, decoder[2].bias],
                                 ["tanh", "identity"], backend=backend)


def test_mlp_metric_activation_of_the_wrong_type_is_a_type_error():
    decoder = _mlp()
    with pytest.raises(TypeError, match=r"activations\[1\] must be a name"):
        pygeo.ops.mlp_metric(torch.randn(3, 2), [decoder[0].weight, decoder[2].weight], [decoder[0].bias, None],
                             ["tanh", None])


def test_mlp_metric_does_not_depend_on_the_calls_before_it():
    """The last layer's Cholesky compression is cached; whether a call uses it must depend on that call alone."""
    decoder = _mlp()
    metric = pygeo.PullbackMetric(decoder)
    torch.manual_seed(1)
    small, large = torch.randn(4, 2), torch.randn(500, 2)
    sys.modules["pygeo.ops.mlp_metric"]._COMPRESSED.clear()
    first = metric.metric(small)
    metric.metric(large)  # large enough to compress the last layer and cache it
    again = metric.metric(small)
    assert torch.equal(first, again)


def test_christoffel_of_a_tiny_positive_definite_metric_is_finite():
    """Gamma is invariant under G, dG -> c G, c dG; inverting a tiny G without rescaling gave inf."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, 3, generator=g, dtype=torch.float64)
    G = A @ A.mT + 3 * torch.eye(3, dtype=torch.float64)
    dG = torch.randn(3, 3, 3, 3, generator=g, dtype=torch.float64)
    expected = pygeo.ops.christoffel(G, dG, backend="torch")
    for scale, dtype in ((1e-39, torch.float32), (1e30, torch.float32), (1e-300, torch.float64)):
        for backend in ("torch", "cpp"):
            if not _backend.status(backend).available:
                continue
            Gamma = pygeo.ops.christoffel((scale * G).to(dtype), (scale * dG).to(dtype), backend=backend)
            assert torch.isfinite(Gamma).all(), (scale, backend)
            torch.testing.assert_close(Gamma.double(), expected, rtol=1e-3 if dtype == torch.float32 else 1e-10,
                                       atol=1e-4 if dtype == torch.float32 else 1e-12)


def test_default_rho_is_computed_in_blocks(monkeypatch):
    module = sys.modules["pygeo.ops.latent_metric"]

    g = torch.Generator().manual_seed(0)
    centroids = torch.randn(301, 3, generator=g, dtype=torch.float64)
    brute = torch.cdist(centroids, centroids).fill_diagonal_(math.inf).min(-1).values.max()
    monkeypatch.setattr(module, "_NEIGHBOUR_BLOCK_ELEMENTS", 64 * 301)
    largest = []
    original = torch.cdist
    monkeypatch.setattr(torch, "cdist", lambda a, b, *args, **kw: largest.append(a.shape[0] * b.shape[0])
                        or original(a, b, *args, **kw))
    assert module.default_rho(centroids) == float(brute)
    assert max(largest) <= 64 * 301


def test_rho_none_on_meta_tensors_says_to_pass_rho():
    with pytest.raises(ValueError, match="pass rho explicitly"):
        pygeo.LatentMetric(torch.randn(5, 2, device="meta"), torch.ones(5, 2, device="meta"))
    metric = pygeo.LatentMetric(torch.randn(5, 2, device="meta"), torch.ones(5, 2, device="meta"), rho=1.0)
    assert metric.metric(torch.zeros(3, 2, device="meta")).shape == (3, 2, 2)


def test_log_volume_and_grad_of_an_integer_z_is_a_type_error():
    metric = pygeo.FunctionMetric(lambda z: torch.eye(2, dtype=z.dtype).expand(*z.shape[:-1], 2, 2) * (1 + z[..., :1, None] ** 2))
    with pytest.raises(TypeError, match="z must be a floating tensor"):
        metric.log_volume_and_grad(torch.ones(3, 2, dtype=torch.long))


def test_hmc_step_size_auto_is_explained():
    metric = pygeo.LatentMetric(torch.randn(5, 2), torch.ones(5, 2), tau=0.1)
    with pytest.raises(ValueError, match="riemannian_uniform has no 'auto'"):
        pygeo.sample.riemannian_uniform(metric, 10, step_size="auto")


def test_pullback_metric_and_derivative_with_a_dtype_mismatch_says_which():
    metric = pygeo.PullbackMetric(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 4)))
    with pytest.raises(TypeError, match=r"z has dtype torch.float64 but the decoder's parameters are torch.float32"):
        metric.metric_and_derivative(torch.ones(3, 2, dtype=torch.float64))


def _kahler_problem(dtype=torch.complex128):
    g = torch.Generator().manual_seed(0)
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    centers = torch.randn(3, 2, dtype=torch.complex128, generator=g).to(dtype)
    return centers, torch.ones(3, 2, dtype=real)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_lse_kahler_metric_far_from_the_centres_is_right_and_agrees_across_backends(backend):
    """One component dominates (score gaps ~|z| / T >> 1), so G = its precision (here I); the torch backend's second
    moment minus squared mean cancelled to negative diagonals (~-1e14 at |z| = 1e12)."""
    if not _backend.status(backend).available:
        pytest.skip(f"{backend} unavailable")
    centers, precisions = _kahler_problem()
    z = torch.tensor([[1e12 * (1 + 1j), 0.5j], [1e8 * (1 - 1j), 0.2], [30.0, 1j]], dtype=torch.complex128)
    G = pygeo.ops.lse_kahler_metric(z, centers, precisions, None, 0.1, backend=backend)
    eye = torch.eye(2, dtype=torch.complex128).expand(3, 2, 2)
    torch.testing.assert_close(G, eye, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype,magnitude", [(torch.complex128, 1e100), (torch.complex128, 1e160),
                                             (torch.complex64, 1e19), (torch.complex64, 1e8)])
def test_lse_kahler_metric_refuses_points_whose_weights_rounding_cannot_resolve(backend, dtype, magnitude):
    """|z| ~ 1e100 at T = 0.1: the scores ~1e201 are rounded by more than the component gaps (~1e101): the backends
    returned two different wrong mixtures; at 1e160 |z|^2 overflows and G was NaN."""
    if not _backend.status(backend).available:
        pytest.skip(f"{backend} unavailable")
    centers, precisions = _kahler_problem(dtype)
    z = torch.tensor([[0.3, 0.1j], [magnitude * (1 + 1j), 0.5j]], dtype=dtype)
    with pytest.raises(ValueError, match=r"z: the weights .* not determined at 1 of 2 points \(first: index 1"):
        pygeo.ops.lse_kahler_metric(z, centers, precisions, None, 0.1, backend=backend)


def test_metric_and_derivative_of_a_0d_z_is_a_value_error():
    metric = pygeo.FunctionMetric(lambda z: torch.eye(z.shape[-1], dtype=z.dtype) * (1 + (z * z).sum(-1))[..., None, None])
    with pytest.raises(ValueError, match="z must have at least 1 dimensions"):
        metric.metric_and_derivative(torch.tensor(1.0))


def test_hyperbolic_geodesic_through_y_0_names_the_metric_domain():
    """The upper half-plane metric I / y^2 is infinite at y = 0: the solver's first curve crosses it, and the error
    used to be 'z contains NaN or Inf values' (about the solver's own NaN iterate, not the user's input)."""
    hyperbolic = pygeo.FunctionMetric(lambda z: torch.eye(2, dtype=z.dtype) / z[..., 1:2, None] ** 2, dim=2)
    with pytest.raises(ValueError, match=r"FunctionMetric: fn\(z\) is not finite .* outside the metric's domain"):
        pygeo.geodesic(hyperbolic, torch.tensor([0.0, 1.0]), torch.tensor([0.0, -1.0]))


@pytest.mark.parametrize("kind", ["lse", "fisher"])
def test_hermitian_metrics_have_metric_and_derivative(kind):
    """The README's metric contract lists metric_and_derivative; the Kahler metrics lacked it. dG[a, i, j] is the
    holomorphic Wirtinger derivative d G_ij / d z_a, checked against autograd in the real coordinates, and, for these
    Kahler metrics, symmetric in (a, j) (G_ij = d_ibar d_j Psi)."""
    g = torch.Generator().manual_seed(0)
    n = 3
    if kind == "lse":
        A = torch.randn(4, n, n, generator=g, dtype=torch.complex128)
        metric = pygeo.LSEKahlerMetric(torch.randn(4, n, generator=g, dtype=torch.complex128),
                                       A @ A.mH / n + 0.5 * torch.eye(n, dtype=torch.complex128), temperature=0.7)
    else:
        W = torch.randn(5, n, generator=g, dtype=torch.complex128)
        metric = pygeo.ComplexGaussianFisherMetric(lambda z: torch.tanh(z @ W.T), sigma=0.5)  # holomorphic decoder
    z = 0.5 * torch.randn(2, n, generator=g, dtype=torch.complex128)
    G, dG = metric.metric_and_derivative(z)
    assert G.shape == (2, n, n) and dG.shape == (2, n, n, n)
    torch.testing.assert_close(G, metric.metric(z))

    def G_of(x):  # real coordinates [2, 2n] -> (Re G, Im G)
        G = metric.metric(torch.complex(x[..., :n], x[..., n:]))
        return G.real, G.imag

    x = torch.cat([z.real, z.imag], -1)
    jac_re, jac_im = torch.autograd.functional.jacobian(lambda x: tuple(t.sum(0) for t in G_of(x)), x)  # [n, n, 2, 2n]
    d_dx = torch.complex(jac_re, jac_im).permute(2, 3, 0, 1)  # [2, 2n, n, n]
    expected = (d_dx[:, :n] - 1j * d_dx[:, n:]) / 2
    torch.testing.assert_close(dG, expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(dG, dG.permute(0, 3, 2, 1), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_lse_kahler_metric_gradient_with_a_sharp_softmax_keeps_float32_accuracy(backend):
    """T = 0.01: one weight ~1, the gradient ~1e-3 is what is left of terms ~|y|^2 / T ~ 30. Both backends summed the
    unshifted y_i and lost a third of it in float32; shifted by the dominant y (as the forward does) they keep it."""
    if not _backend.status(backend).available:
        pytest.skip(f"{backend} unavailable")
    centers = torch.tensor([[0.6614 + 0.2669j], [0.0617 + 0.6213j], [-0.4519 - 0.1661j]], dtype=torch.complex128)
    precisions = torch.tensor([[0.6923], [0.5236], [0.6195]], dtype=torch.float64)

    def gradient(dtype, backend):
        z = torch.zeros(1, 1, dtype=dtype, requires_grad=True)
        real = torch.float32 if dtype == torch.complex64 else torch.float64
        G = pygeo.ops.lse_kahler_metric(z, centers.to(dtype), precisions.to(real), None, 0.01, backend=backend)
        return torch.autograd.grad(G.real.sum(), z)[0]

    expected = gradient(torch.complex128, "torch")
    assert expected.abs().max() > 1e-5
    torch.testing.assert_close(gradient(torch.complex64, backend).to(torch.complex128), expected, rtol=1e-3,
                               atol=1e-3 * float(expected.abs().max()))


def test_function_metric_returning_another_dtype_is_a_type_error():
    metric = pygeo.FunctionMetric(lambda z: torch.eye(2).expand(*z.shape[:-1], 2, 2))  # always float32
    with pytest.raises(TypeError, match=r"fn\(z\) must return G in z's dtype torch.float64, got torch.float32"):
        metric.metric_and_derivative(torch.ones(3, 2, dtype=torch.float64))


def test_jittered_cholesky_keeps_every_gradient_finite():
    """A point whose G needs the jitter retry: the failed factor was merged in with torch.where, whose backward sent
    0 * NaN = NaN into the gradient of the whole batch (log_volume_and_grad of a near-singular pullback metric)."""
    def fn(z):
        scale = (1 + (z * z).sum(-1))[..., None, None]
        rank_one = torch.ones(2, 2, dtype=z.dtype)
        singular = (z[..., :1, None] > 0).to(z.dtype)  # points with z_0 > 0 get an exactly singular G
        return scale * (singular * rank_one + (1 - singular) * torch.eye(2, dtype=z.dtype))

    metric = pygeo.FunctionMetric(fn)
    z = torch.tensor([[-1.0, 0.5], [1.0, 0.5]], dtype=torch.float64)
    value, grad = metric.log_volume_and_grad(z)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    alone_value, alone_grad = metric.log_volume_and_grad(z[:1])
    torch.testing.assert_close(grad[:1], alone_grad)
    torch.testing.assert_close(grad[0], 2 * z[0] / (1 + (z[0] * z[0]).sum()))  # 1/2 log det = log(1 + |z|^2)


def test_a_metric_near_the_dtype_maximum_is_not_turned_into_inf_by_symmetrisation():
    """G = J^T J = 2.09e38 is a float32 number; (G + G^T) / 2 overflowed in the sum (the torch backend refused, cpp
    returned the value)."""
    weights = [torch.tensor([[1e20]]), torch.tensor([[0.1444]])]
    z = torch.zeros(2, 1)
    expected = float((torch.tensor(1e20, dtype=torch.float64) * 0.1444) ** 2)
    for backend in ("torch", "cpp"):
        if not _backend.status(backend).available:
            continue
        G = pygeo.ops.mlp_metric(z, weights, [None, None], ["tanh", "identity"], backend=backend)
        torch.testing.assert_close(G.double(), torch.full((2, 1, 1), expected, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend_device", backend_params())
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 700.0), (torch.float64, 1e20)])
def test_latent_log_volume_gradient_far_from_a_single_centroid(backend_device, full, dtype, scale):
    """lam = 0, one centroid: 1/2 log det G = 1/2 log det M - (d/2) q / rho^2, so the gradient is -d M (z - c) / rho^2.
    The C++ forward and backward rounded the exponent q / rho^2 differently (~|q| eps apart), and the backward's
    weight exp(e - s) was off by exp of that: 3% in float32 at q ~ 5e5, inf in float64 at |z| ~ 1e20."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(0)
    d = 3
    z = scale * torch.randn(2, d, generator=g, dtype=torch.float64)
    centroid = torch.randn(1, d, generator=g, dtype=torch.float64)
    if full:
        A = torch.randn(d, d, generator=g, dtype=torch.float64)
        M = (A @ A.T / d + 0.5 * torch.eye(d, dtype=torch.float64)).unsqueeze(0)
    else:
        M = 0.5 + torch.rand(1, d, generator=g, dtype=torch.float64)
    M_full = M[0] if full else torch.diag(M[0])
    expected = -d * (z - centroid) @ M_full  # rho = 1
    to = dict(dtype=dtype, device=device)
    out = pygeo.ops.latent_metric(z.to(**to), centroid.to(**to), M.to(**to), lam=0.0, rho=1.0, log_volume=True,
                                  backend=backend)
    assert torch.isfinite(out.log_volume_grad).all()
    torch.testing.assert_close(out.log_volume_grad.cpu().double(), expected, rtol=1e-3 if dtype == torch.float32 else 1e-9,
                               atol=0)


def test_inner_product_overflow_is_refused():
    metric = RHVAEMetric(torch.zeros(1, 1), torch.ones(1, 1), lam=0.01, rho=1.0)  # G = 100 far from the centroid
    z = torch.tensor([[1.5e19], [1.0]])  # |z|^2 = 2.3e38 is a float32 number, 100 |z|^2 is not
    with pytest.raises(ValueError, match=r"inner\(z, u, v\) is not finite at 1 of 2 points \(first: index 0\)"):
        metric.inner(z, z, z)


def test_log_volume_gradient_of_an_underflowing_metric_is_refused_not_nan():
    """Fuzz campaign 2026-12-04 (issue 30): FunctionMetric G = exp(-|z|^2) I at |z|^2 = 721, float64: G's entries
    are denormal (9e-314), the log-volume -(d/2)|z|^2 is fine, but reverse mode carries G^-1 (1e313, past float64's
    range) and the gradient came out NaN from finite input. Now a ValueError that says why; where G is in range the
    gradient is the closed form -d z."""
    metric = pygeo.FunctionMetric(lambda x: torch.eye(x.shape[-1], dtype=x.dtype)
                                  * torch.exp(-(x * x).sum(-1))[..., None, None])
    far = torch.tensor([[15.41, -2.9343, -21.7879]], dtype=torch.float64)
    with pytest.raises(ValueError, match="G\\^-1 overflows"):
        metric.log_volume_and_grad(far)
    near = torch.randn(5, 3, dtype=torch.float64)
    value, grad = metric.log_volume_and_grad(near)
    torch.testing.assert_close(value, -1.5 * (near * near).sum(-1))
    torch.testing.assert_close(grad, -3 * near)


def test_kahler_metric_derivative_far_from_the_centres_is_finite():
    """Fuzz campaign 2026-12-04 (issue 30): LSEKahlerMetric in complex64 at |z| ~ 8e18, torch backend: the closed-form
    vjp weighed a component of weight 0 by its e_i (~ |y_i - y_dominant|^2), which overflowed, so 0 * inf made dG
    and the log-volume gradient NaN while the C++ backend returned the exact 0 (G is constant there, P_dominant)."""
    generator = torch.Generator().manual_seed(0)
    z = torch.tensor([[7.5824e18 + 3.0872e18j]], dtype=torch.complex64)
    centers = torch.randn(3, 1, generator=generator, dtype=torch.complex64)
    precisions = torch.tensor([[0.35], [0.84], [1.0]])
    metric = pygeo.LSEKahlerMetric(centers, precisions, temperature=1.0, backend="torch")
    G, dG = metric.metric_and_derivative(z)
    _, grad = metric.log_volume_and_grad(z)
    assert bool(torch.isfinite(dG).all()) and bool(torch.isfinite(grad).all())
    dominant = int(torch.argmax(((z - centers.T).abs() ** 2 * precisions.T).real))  # the largest u_i wins
    torch.testing.assert_close(G.real, precisions[dominant].reshape(1, 1, 1))
    assert float(dG.abs().max()) == 0.0 and float(grad.abs().max()) == 0.0


@pytest.mark.parametrize("backend", [name for name in ("torch", "cpp") if pygeo._backend.status(name).available])
def test_latent_metric_with_every_exponent_overflowing_and_no_lam_is_refused(backend):
    """Fuzz campaign 2026-12-04 (issue 30): float32, |z - c|^2 M / rho^2 = 1.7e42 (past float32) and lam = 0: every
    weight's exponent is -inf, the log scale -inf, and G, dG and the log-volume came out NaN on both backends. G is 0
    (singular) there: refused, naming lam."""
    z = torch.tensor([[1.5145e19]])
    with pytest.raises(ValueError, match="lam = 0"):
        pygeo.ops.latent_metric(z, torch.tensor([[1.4833]]), torch.tensor([[0.7294]]), 0.0, 0.0, 0.01,
                                derivative=True, log_volume=True, backend=backend)
    G = pygeo.ops.latent_metric(z, torch.tensor([[1.4833]]), torch.tensor([[0.7294]]), 0.01, 0.0, 0.01,
                                backend=backend).metric
    torch.testing.assert_close(G, torch.full((1, 1, 1), 0.01))  # with lam the point is simply far: G = lam I


@pytest.mark.parametrize("ensemble", [False, True])
@pytest.mark.parametrize("backend", [b for b in ("torch", "cpp") if _backend.status(b).available])
def test_pullback_and_ensemble_log_volume_gradient_of_an_underflowing_metric_is_refused_not_nan(ensemble, backend):
    """Fuzz campaign 2026-12-07 (issue 30): a tanh decoder saturated at |z| ~ 700 (first-layer weights x 1e3) has a
    denormal G (1e-316, float64); PullbackMetric.log_volume_and_grad and EnsembleMetric.log_volume_and_grad (their own
    overrides) returned a finite log-volume with a NaN gradient, where every other metric refuses (G^-1 overflows in
    reverse mode). Now the same ValueError; at an ordinary point the gradient is finite."""
    torch.manual_seed(1)
    decoder = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    with torch.no_grad():
        decoder[0].weight.mul_(1e3)
    metric = pygeo.PullbackMetric(decoder, backend=backend)
    if ensemble:
        metric = pygeo.metrics.EnsembleMetric([metric])
    far = torch.tensor([[661.3522, 266.9241]], dtype=torch.float64)
    with pytest.raises(ValueError, match="G\\^-1 overflows"):
        metric.log_volume_and_grad(far)
    value, grad = metric.log_volume_and_grad(torch.full((1, 2), 1e-4, dtype=torch.float64))
    assert bool(torch.isfinite(value).all()) and bool(torch.isfinite(grad).all())
