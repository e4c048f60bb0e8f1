import pytest
import torch

import pygeo
from pygeo import _linalg
from pygeo.metrics.base import metric_and_derivative_by_autograd


def poincare(z):
    y = z[..., 1]
    eye = torch.eye(2, dtype=z.dtype, device=z.device)
    return eye / (y * y)[..., None, None]


def test_function_metric_contract_on_the_half_plane():
    metric = pygeo.FunctionMetric(poincare)
    z = torch.tensor([[0.3, 0.5], [1.0, 2.0]], dtype=torch.float64)
    G = metric.metric(z)
    torch.testing.assert_close(G, poincare(z))
    torch.testing.assert_close(metric.log_volume(z), -2 * z[:, 1].log())
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(metric.inner(z, u, u), 1 / z[:, 1] ** 2)


def test_metric_derivative_matches_closed_form():
    metric = pygeo.FunctionMetric(poincare)
    z = torch.tensor([[0.3, 0.5], [1.0, 2.0], [-1.0, 0.25]], dtype=torch.float64)
    G, dG = metric.metric_and_derivative(z)
    expected = torch.zeros(3, 2, 2, 2, dtype=torch.float64)
    expected[:, 1] = (-2 / z[:, 1] ** 3)[:, None, None] * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(dG, expected)


def test_reverse_mode_fallback_agrees_with_forward_mode():
    calls = {"n": 0}

    def not_vmappable(z):
        calls["n"] += 1
        if isinstance(z, torch.Tensor) and torch._C._functorch.is_batchedtensor(z):
            raise RuntimeError("no vmap here")
        return poincare(z) + torch.sin(z[..., :1, None]) * torch.eye(2, dtype=z.dtype)

    z = torch.tensor([[0.3, 0.5], [1.0, 2.0]], dtype=torch.float64)
    G_ref, dG_ref = torch.func.vmap(lambda p: (poincare(p) + torch.sin(p[:1, None]) * torch.eye(2, dtype=p.dtype),
                                               torch.func.jacfwd(lambda q: poincare(q) + torch.sin(q[:1, None]) * torch.eye(2, dtype=q.dtype))(p)))(z)
    G, dG = metric_and_derivative_by_autograd(not_vmappable, z)
    torch.testing.assert_close(G, G_ref)
    torch.testing.assert_close(dG, dG_ref.permute(0, 3, 1, 2))


def test_log_volume_gradient_matches_finite_differences():
    metric = pygeo.FunctionMetric(lambda z: torch.eye(2, dtype=z.dtype) * (1 + (z ** 2).sum(-1))[..., None, None]
                                  + 0.1 * z[..., :, None] * z[..., None, :])
    z = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(metric.log_volume, (z,))


def test_function_metric_rejects_wrong_shapes():
    metric = pygeo.FunctionMetric(lambda z: z)
    with pytest.raises(ValueError, match="must return G of shape"):
        metric.metric(torch.randn(3, 2))
    with pytest.raises(TypeError, match="fn must be callable"):
        pygeo.FunctionMetric(3)


def test_cholesky_jitter_rescues_semidefinite_and_refuses_indefinite():
    G = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 3.0]]], dtype=torch.float64)  # first is singular
    L = _linalg.cholesky(G)
    assert torch.isfinite(L).all()
    torch.testing.assert_close(L[1], torch.linalg.cholesky(G[1]))
    bad = torch.tensor([[[1.0, 0.0], [0.0, -1.0]]], dtype=torch.float64)
    with pytest.raises(ValueError, match="not positive definite at 1 of 1 points"):
        _linalg.cholesky(bad, name="G")


def test_derivative_through_custom_ops_is_not_silently_zero():
    # Forward-mode AD yields zeros through custom ops without a forward formula (pygeo's kernels): the generic
    # derivative must notice and fall back to reverse mode.
    A = torch.randn(5, 2, dtype=torch.float64)

    def through_kernel(z):
        return pygeo.ops.jtj(torch.sin(z[..., None, :] * A))

    def plain(z):
        J = torch.sin(z[..., None, :] * A)
        return J.transpose(-1, -2) @ J

    z = torch.randn(3, 2, dtype=torch.float64)
    _, dG = pygeo.FunctionMetric(through_kernel).metric_and_derivative(z)
    _, dG_plain = pygeo.FunctionMetric(plain).metric_and_derivative(z)
    assert dG_plain.abs().max() > 0.1
    torch.testing.assert_close(dG, dG_plain)


def test_constant_metric_has_zero_derivative():
    metric = pygeo.FunctionMetric(lambda z: torch.eye(3, dtype=z.dtype).expand(*z.shape[:-1], 3, 3))
    G, dG = metric.metric_and_derivative(torch.randn(4, 3, dtype=torch.float64))
    assert torch.equal(dG, torch.zeros(4, 3, 3, 3, dtype=torch.float64))


def test_a_zero_metric_is_refused_not_jittered_into_a_finite_volume():
    """G = 0 (e.g. a decoder whose ReLUs are all dead) has no scale for a relative jitter to fix: log_volume must say
    it is not positive definite rather than return log det of a jitter of the smallest float."""
    metric = pygeo.FunctionMetric(lambda z: torch.zeros(*z.shape, z.shape[-1], dtype=z.dtype), dim=2)
    with pytest.raises(ValueError, match="not positive definite"):
        metric.log_volume(torch.randn(3, 2, dtype=torch.float64))


def test_where_defined_turns_failing_rows_into_nan_rows():
    from pygeo.metrics.base import where_defined

    calls = []

    def fn(x):  # raises for the whole batch when any row is negative, like a Cholesky of a batch
        calls.append(bool(torch.isnan(x).any()))
        if bool((x < 0).any()):
            raise ValueError("not positive definite")
        return x.sum(-1), 2 * x

    x = torch.tensor([[1.0], [-1.0], [2.0], [float("nan")], [3.0], [4.0], [-5.0], [6.0]])
    value, double = where_defined(fn, (x,), lambda n: (torch.full((n,), float("nan")), torch.full((n, 1), float("nan"))))
    expected = torch.tensor([1.0, float("nan"), 2.0, float("nan"), 3.0, 4.0, float("nan"), 6.0])
    torch.testing.assert_close(value, expected, equal_nan=True)
    torch.testing.assert_close(double[:, 0], 2 * expected, equal_nan=True)
    assert calls and not any(calls)  # the NaN row is never passed to fn
    with pytest.raises(TypeError):  # other errors still propagate
        where_defined(lambda x: (_ for _ in ()).throw(TypeError("bug")), (x,), lambda n: torch.zeros(n))


def test_log_volume_under_vmap_of_grad():
    """Per-point gradients by torch.func.vmap(grad(log_volume)) equal the batched autograd gradient, for a generic
    metric (its Cholesky) and for the latent metric (its fused op)."""
    z = torch.rand(4, 2, dtype=torch.float64) + 0.5
    latent = pygeo.LatentMetric(torch.randn(5, 2, dtype=torch.float64), torch.rand(5, 2, dtype=torch.float64) + 0.5)
    for metric in (pygeo.FunctionMetric(poincare), latent):
        per_point = torch.func.vmap(torch.func.grad(metric.log_volume))(z)
        point = z.clone().requires_grad_(True)
        (batched,) = torch.autograd.grad(metric.log_volume(point).sum(), point)
        torch.testing.assert_close(per_point, batched)


@pytest.mark.parametrize("make", [
    lambda: pygeo.PullbackMetric(torch.nn.Linear(2, 3), backend="bogus"),
    lambda: pygeo.LatentMetric(torch.randn(3, 2), torch.ones(3, 2), backend="bogus"),
    lambda: pygeo.LSEKahlerMetric(torch.randn(3, 2, dtype=torch.complex64), torch.ones(3, 2), backend="bogus"),
])
def test_an_unknown_backend_is_refused_when_the_metric_is_built(make):
    with pytest.raises(ValueError, match="backend='bogus'"):
        make()
