"""pygeo.sample.brownian_motion: Riemannian Brownian motion (generator 1/2 Laplace-Beltrami), Euler-Maruyama.

Closed forms (docs/MATH.md section 8): on the unit sphere E <X_t, X_0> = exp(-t) (the coordinate functions are
eigenfunctions of 1/2 Delta with eigenvalue -1); on flat R^d with a constant G the endpoints are N(z0, t G^-1), and
the scheme is exact; on the half-plane G = I / y^2 the drift vanishes, dy = y dW_2 so log y_t ~ N(log y_0 - t/2, t),
and dx = y dW_1 so E (x_t - x_0)^2 = y_0^2 (e^t - 1). Statistical tests run at fixed seeds with tolerances of about
4 standard errors plus the O(dt) weak error of the scheme."""
import math

import pytest
import torch

import pygeo
from pygeo.sample import BrownianResult, brownian_motion
from pygeo.sample._chains import ChainStreams
from pygeo.sample.brownian import laplace_beltrami_drift

from conftest import backend_params

DTYPES = [torch.float32, torch.float64]


def inverse_stereographic(z):
    """R^2 -> the unit sphere in R^3 (projection from the north pole; z = 0 is the south pole)."""
    r2 = (z * z).sum(-1, keepdim=True)
    return torch.cat([2 * z / (1 + r2), (r2 - 1) / (1 + r2)], -1)


sphere_chart = pygeo.PullbackMetric(inverse_stereographic)


def half_plane_fn(z):
    # Defined on y > 0 only: NaN below makes FunctionMetric refuse the point (a path that crosses must escape).
    y = z[..., 1]
    scale = torch.where(y > 0, 1 / (y * y), torch.full_like(y, math.nan))
    return scale[..., None, None] * torch.eye(2, dtype=z.dtype)


half_plane = pygeo.FunctionMetric(half_plane_fn, dim=2)


def constant_metric(G):
    return pygeo.FunctionMetric(lambda z: G.to(z.dtype).expand(*z.shape[:-1], *G.shape).clone())


def random_spd(d, dtype, seed):
    A = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (A @ A.T + 0.5 * torch.eye(d, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sphere_inner_product_with_the_start_decays_as_exp_minus_t(dtype):
    n_paths, t = 3000, 0.6
    # Starts in the southern hemisphere (|z| < 1): few paths come near the north pole, which the chart misses.
    starts = torch.rand(n_paths, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.4 - 0.7
    result = brownian_motion(sphere_chart, starts.to(dtype), t, 60, seed=5, progress=False, keep_every=15)
    assert isinstance(result, BrownianResult)
    assert result.paths.shape == (n_paths, 5, 2) and result.paths.dtype == dtype
    assert result.endpoints.shape == (n_paths, 2) and torch.equal(result.endpoints, result.paths[:, -1])
    torch.testing.assert_close(result.times, torch.tensor([0.0, 0.15, 0.3, 0.45, 0.6], dtype=dtype))
    assert result.step_size == pytest.approx(0.01) and not result.interrupted and result.n_steps_done == 60
    # A path that runs past the north pole is stopped and flagged, never NaN: there may be a few, no more.
    assert torch.isfinite(result.paths).all() and int(result.escaped.sum()) <= n_paths // 100
    X = inverse_stereographic(result.paths.double())  # [n_paths, T, 3]
    inner = (X * X[:, :1]).sum(-1)  # [n_paths, T]
    mean, standard_error = inner.mean(0), inner.std(0) / math.sqrt(n_paths)
    expected = torch.exp(-result.times.double())
    assert ((mean - expected).abs()[1:] <= 4 * standard_error[1:] + 0.006).all(), (mean, expected, standard_error)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 3])
def test_flat_metric_endpoints_are_the_summed_scaled_noise(dtype, d):
    """Constant G: no drift, each step adds sqrt(dt) C^-T xi with G = C C^T, so the endpoint is
    z0 + sqrt(dt) C^-T (sum of the xi), the xi being path p's draws from the block streams of the seed."""
    G = random_spd(d, dtype, seed=d)
    z0 = torch.linspace(-1, 1, d, dtype=dtype)
    n_paths, n_steps, t, seed = 70, 9, 1.7, 123
    result = brownian_motion(constant_metric(G), z0, t, n_steps, n_paths=n_paths, seed=seed, progress=False)
    streams = ChainStreams(seed, 0, n_paths, torch.device("cpu"))
    noise_sum = sum(streams.normal(d, dtype).double() for _ in range(n_steps))  # [n_paths, d]
    C = torch.linalg.cholesky(G.double())
    increments = torch.linalg.solve_triangular(C.T, noise_sum.T, upper=True).T * math.sqrt(t / n_steps)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(result.endpoints.double(), z0.double() + increments, **tolerance)
    assert result.paths.shape == (n_paths, n_steps + 1, d) and torch.equal(result.paths[:, 0], z0.expand(n_paths, d))


@pytest.mark.parametrize("dtype", DTYPES)
def test_flat_metric_endpoints_have_law_normal_z0_t_Ginv(dtype):
    d, n_paths, t = 3, 6000, 0.8
    G = random_spd(d, dtype, seed=7)
    z0 = torch.tensor([0.5, -1.0, 2.0], dtype=dtype)
    result = brownian_motion(constant_metric(G), z0, t, 4, n_paths=n_paths, seed=2, progress=False)
    # Whitened by G = C C^T: w = C^T (z_t - z0) / sqrt(t) ~ N(0, I).
    C = torch.linalg.cholesky(G.double())
    w = (result.endpoints.double() - z0.double()) @ C / math.sqrt(t)
    assert (w.mean(0).abs() < 4 / math.sqrt(n_paths)).all()
    covariance = torch.cov(w.T)
    # Entries of a sample covariance of N(0, I) have standard error <= sqrt(2 / n).
    assert (covariance - torch.eye(d, dtype=torch.float64)).abs().max() < 4 * math.sqrt(2 / n_paths)


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_plane_log_height_is_normal_and_the_drift_vanishes(dtype):
    z0 = torch.tensor([0.3, 1.5], dtype=dtype)
    probe = torch.tensor([[0.0, 0.5], [2.0, 3.0], [-1.0, 1.2]], dtype=dtype)
    drift = laplace_beltrami_drift(half_plane, probe)
    assert drift.abs().max() <= 1e-6 if dtype == torch.float32 else drift.abs().max() <= 1e-12
    n_paths, t = 4000, 0.5
    result = brownian_motion(half_plane, z0, t, 100, n_paths=n_paths, seed=9, progress=False, keep_every=100)
    assert not result.escaped.any() and result.paths.shape == (n_paths, 2, 2)
    log_y = result.endpoints[:, 1].double().log()
    # log y_t ~ N(log y0 - t/2, t); the Euler-Maruyama bias is O(dt) = 0.005 here.
    assert abs(float(log_y.mean()) - (math.log(1.5) - t / 2)) < 4 * math.sqrt(t / n_paths) + 0.005
    assert abs(float(log_y.var()) - t) < 4 * t * math.sqrt(2 / n_paths) + 0.01
    # E y_t = y0 (a martingale) and E (x_t - x0)^2 = y0^2 (e^t - 1).
    y = result.endpoints[:, 1].double()
    assert abs(float(y.mean()) - 1.5) < 4 * float(y.std()) / math.sqrt(n_paths)
    squared = (result.endpoints[:, 0].double() - 0.3) ** 2
    assert abs(float(squared.mean()) - 1.5 ** 2 * math.expm1(t)) < 4 * float(squared.std()) / math.sqrt(n_paths) + 0.02


@pytest.mark.parametrize("backend_device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 3])
def test_drift_is_minus_half_the_contracted_christoffel_symbols(backend_device, dtype, d):
    """b = 1/2 [div(G^-1) + G^-1 grad log sqrt(det G)] (what the fused step computes) against -1/2 G^ij Gamma^k_ij
    from pygeo.christoffel, on a position-dependent metric, in float64 as the reference."""
    generator = torch.Generator().manual_seed(d)
    W = torch.randn(d * d, d, generator=generator, dtype=torch.float64)
    b = torch.randn(d * d, generator=generator, dtype=torch.float64)

    def fn(z):
        A = torch.tanh(z @ W.to(z.dtype).T + b.to(z.dtype)).reshape(*z.shape[:-1], d, d)
        return A @ A.transpose(-1, -2) + torch.eye(d, dtype=z.dtype) * (1 + (z * z).sum(-1))[..., None, None]

    metric = pygeo.FunctionMetric(fn)
    z = torch.randn(7, d, generator=generator, dtype=torch.float64)
    Gamma = pygeo.christoffel(metric, z, backend="torch")
    expected = -0.5 * torch.einsum("bij,bkij->bk", torch.linalg.inv(metric.metric(z)), Gamma)
    backend, device = backend_device
    drift = laplace_beltrami_drift(metric, z.to(device=device, dtype=dtype), backend=backend)
    assert drift.dtype == dtype
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(drift.double().cpu(), expected, **tolerance)


def test_one_dimensional_drift_closed_form():
    """d = 1, g = 1 + z^2: Delta z = (1/sqrt g) d(sqrt(g) / g) = -g' / (2 g^2), so b = -z / (2 (1 + z^2)^2)."""
    metric = pygeo.FunctionMetric(lambda z: (1 + z * z)[..., None])
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    torch.testing.assert_close(laplace_beltrami_drift(metric, z), -z / (2 * (1 + z * z) ** 2))


def test_same_seed_gives_identical_paths_and_backends_agree():
    z0 = torch.tensor([0.2, -0.4], dtype=torch.float64)
    run = dict(t=0.3, n_steps=12, n_paths=80, progress=False)
    first = brownian_motion(sphere_chart, z0, seed=4, **run)
    again = brownian_motion(sphere_chart, z0, seed=4, **run)
    other = brownian_motion(sphere_chart, z0, seed=5, **run)
    assert torch.equal(first.paths, again.paths) and torch.equal(first.endpoints, again.endpoints)
    assert not torch.allclose(first.endpoints, other.endpoints)
    # Path p's noise depends only on (seed, p): the first 64 paths (one block) are those of a run of 64.
    fewer = brownian_motion(sphere_chart, z0, seed=4, **{**run, "n_paths": 64})
    torch.testing.assert_close(fewer.paths, first.paths[:64], rtol=1e-12, atol=1e-12)
    reference = brownian_motion(sphere_chart, z0, seed=4, backend="torch", **run)
    torch.testing.assert_close(reference.paths, first.paths, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paths_leaving_the_domain_stop_and_are_flagged(dtype):
    """Large steps on the half-plane (defined for y > 0 only) send some paths below y = 0: those stop at their last
    valid state, are flagged with the step that was refused, and the others run on; nothing is NaN."""
    z0 = torch.tensor([0.0, 1.0], dtype=dtype)
    result = brownian_motion(half_plane, z0, 6.0, 12, n_paths=200, seed=0, progress=False)
    assert 0 < int(result.escaped.sum()) < 200
    assert torch.isfinite(result.paths).all() and (result.paths[..., 1] > 0).all()
    for p in result.escaped.nonzero().flatten().tolist():
        step = int(result.escape_step[p])
        assert 1 <= step <= 12
        frozen = result.paths[p, step - 1:]
        assert torch.equal(frozen, frozen[:1].expand_as(frozen)) and torch.equal(result.endpoints[p], frozen[0])
    assert (result.escape_step[~result.escaped] == -1).all()
    live = ~result.escaped
    assert not torch.equal(result.paths[live, -1], result.paths[live, -2])


def test_a_metric_that_turns_indefinite_stops_the_path():
    """G = diag(1, 1 - z_0): finite everywhere, not positive definite for z_0 >= 1."""
    metric = pygeo.FunctionMetric(
        lambda z: torch.diag_embed(torch.stack([torch.ones_like(z[..., 0]), 1 - z[..., 0]], -1)))
    result = brownian_motion(metric, torch.tensor([0.5, 0.0], dtype=torch.float64), 2.0, 40, n_paths=100, seed=1,
                             progress=False)
    assert result.escaped.any() and (result.paths[..., 0] < 1).all() and torch.isfinite(result.paths).all()


class InterruptingMetric(pygeo.FunctionMetric):
    """A flat metric whose metric_and_derivative raises KeyboardInterrupt on call number limit + 1."""

    def __init__(self, limit):
        super().__init__(lambda z: (1 + 0 * z[..., :1, None]) * torch.eye(2, dtype=z.dtype), dim=2)
        self.limit, self.calls = limit, 0

    def metric_and_derivative(self, z):
        self.calls += 1
        if self.limit is not None and self.calls > self.limit:
            raise KeyboardInterrupt
        return super().metric_and_derivative(z)


@pytest.mark.parametrize("keep_every", [1, 2])
def test_ctrl_c_returns_the_completed_steps(keep_every):
    z0 = torch.zeros(2, dtype=torch.float64)
    run = dict(t=1.0, n_steps=8, n_paths=5, seed=3, progress=False, keep_every=keep_every)
    full = brownian_motion(InterruptingMetric(None), z0, **run)
    # One call at the start, then one per step (at the proposals): call 1 + 5 + 1 falls inside step 6.
    stopped = brownian_motion(InterruptingMetric(1 + 5), z0, **run)
    assert stopped.interrupted and not full.interrupted and stopped.n_steps_done == 5
    assert stopped.final_time == pytest.approx(5 / 8)
    n_kept = 5 // keep_every + 1
    assert stopped.paths.shape == (5, n_kept, 2)
    assert torch.equal(stopped.paths, full.paths[:, :n_kept])
    assert torch.equal(stopped.times, full.times[:n_kept])
    every_step = brownian_motion(InterruptingMetric(None), z0, **{**run, "keep_every": 1})
    assert torch.equal(stopped.endpoints, every_step.paths[:, 5])


def test_ctrl_c_before_the_first_step_returns_the_starts():
    stopped = brownian_motion(InterruptingMetric(1), torch.zeros(3, 2), 1.0, 4, progress=False)
    assert stopped.interrupted and stopped.n_steps_done == 0 and stopped.paths.shape == (3, 1, 2)
    assert torch.equal(stopped.endpoints, torch.zeros(3, 2))


def test_hermitian_metric_runs_on_its_real_form_and_returns_complex_states():
    metric = pygeo.LSEKahlerMetric(torch.zeros(2, 2, dtype=torch.complex128),
                                   torch.eye(2, dtype=torch.complex128).expand(2, 2, 2).clone())
    result = brownian_motion(metric, torch.zeros(2, dtype=torch.complex128), 0.5, 5, n_paths=4, seed=0, progress=False)
    assert result.endpoints.dtype == torch.complex128 and result.endpoints.shape == (4, 2)
    assert result.paths.shape == (4, 6, 2) and (result.endpoints != 0).all()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(t=0.0), ValueError, "t must be a positive"),
    (dict(t=-1.0), ValueError, "t must be a positive"),
    (dict(t=math.inf), ValueError, "t must be a positive"),
    (dict(t="1"), TypeError, "t must be a real number"),
    (dict(n_steps=0), ValueError, "n_steps must be an integer >= 1"),
    (dict(n_steps=2.5), ValueError, "n_steps must be an integer >= 1"),
    (dict(n_paths=0), ValueError, "n_paths must be an integer >= 1"),
    (dict(n_paths=3, z0=torch.ones(2, 2)), ValueError, "z0 has 2 rows but n_paths=3"),
    (dict(z0=torch.ones(2, 2, 2)), ValueError, "z0 must have shape"),
    (dict(z0=torch.ones(2, dtype=torch.int64)), TypeError, "z0 must be a real floating tensor"),
    (dict(z0=torch.tensor([0.0, math.nan])), ValueError, "z0 contains NaN"),
    (dict(z0=torch.tensor([0.0, -1.0])), ValueError, "z0: the metric is not finite and positive definite"),
    (dict(keep_every=3), ValueError, "multiple of keep_every"),
    (dict(keep_every=0), ValueError, "keep_every must be"),
    (dict(backend="nope"), ValueError, "backend"),
    (dict(metric="not a metric"), TypeError, "metric must follow the metric contract"),
    (dict(progress="yes"), TypeError, "progress must be True or False"),
])
def test_bad_arguments_are_refused(kwargs, error, message):
    arguments = {**dict(metric=half_plane, z0=torch.tensor([0.0, 1.0]), t=1.0, n_steps=4, progress=False), **kwargs}
    with pytest.raises(error, match=message):
        brownian_motion(**arguments)
