"""pygeo.metrics.RHVAEMetric: the metric given by its inverse G^-1 = sum_i L_i L_i^T w_i(z) + lam I, against a float64
plain-PyTorch reference (explicit inverse) and autograd."""
import pytest
import torch

from pygeo.metrics import RHVAEMetric
from pygeo.reference import latent_metric as reference

from conftest import backend_params


def problem(kind, N=7, d=3, B=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(N, d, generator=g, dtype=torch.float64)
    z = 1.2 * torch.randn(B, d, generator=g, dtype=torch.float64)
    if kind == "diagonal":
        return z, centroids, 0.3 + torch.rand(N, d, generator=g, dtype=torch.float64)
    factors = torch.tril(torch.randn(N, d, d, generator=g, dtype=torch.float64))
    factors.diagonal(dim1=-2, dim2=-1).abs_().add_(0.3)
    return z, centroids, factors


def reference_metric(z, centroids, matrices, lam, tau, rho):
    return torch.linalg.inv(reference.broadcast_metric(z, centroids, matrices, lam, tau, rho))


@pytest.mark.parametrize("backend_device", backend_params(("torch", "cpp")))
@pytest.mark.parametrize("kind", ["diagonal", "factors"])
def test_rhvae_metric_matches_the_inverse_of_the_sum(backend_device, kind):
    backend, _ = backend_device
    z, centroids, given = problem(kind)
    matrices = given if kind == "diagonal" else given @ given.mT
    lam, tau, rho = 0.05, 0.1, 1.3
    metric = RHVAEMetric(centroids, given, lam=lam, tau=tau, rho=rho, backend=backend, factors=kind == "factors")
    point = z.clone().requires_grad_(True)
    f = lambda x: reference_metric(x, centroids, matrices, lam, tau, rho)
    G_ref = f(point)
    dG_ref = torch.autograd.functional.jacobian(lambda x: f(x).sum(0), z).permute(2, 3, 0, 1)  # [B, k, i, j]
    log_volume_ref = 0.5 * torch.linalg.slogdet(G_ref)[1]
    (grad_ref,) = torch.autograd.grad(log_volume_ref.sum(), point, retain_graph=True)

    G, dG = metric.metric_and_derivative(z)
    assert torch.equal(G, G.mT)
    torch.testing.assert_close(G, G_ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metric.metric(z), G_ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dG, dG_ref, rtol=1e-9, atol=1e-11)
    value, grad = metric.log_volume_and_grad(z)
    torch.testing.assert_close(value, log_volume_ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-11)
    # log_volume is differentiable through the fused op; metric through the op's backward and the Cholesky inverse.
    (grad_autograd,) = torch.autograd.grad(metric.log_volume(point).sum(), point)
    torch.testing.assert_close(grad_autograd, grad_ref, rtol=1e-9, atol=1e-11)
    (grad_G,) = torch.autograd.grad((metric.metric(point) * G_ref.detach()).sum(), point)
    (grad_G_ref,) = torch.autograd.grad((G_ref * G_ref.detach()).sum(), point)
    torch.testing.assert_close(grad_G, grad_G_ref, rtol=1e-9, atol=1e-11)


def test_rhvae_metric_far_from_the_centroids_is_bounded_by_one_over_lam():
    z, centroids, factors = problem("factors")
    metric = RHVAEMetric(centroids, factors, lam=0.01, rho=1.0, factors=True)
    far = torch.full((2, 3), 40.0, dtype=torch.float64)
    torch.testing.assert_close(metric.metric(far), torch.eye(3, dtype=torch.float64).expand(2, 3, 3) / 0.01)
    torch.testing.assert_close(metric.log_volume(far), torch.full((2,), -1.5 * torch.log(torch.tensor(0.01)).item(),
                                                                  dtype=torch.float64))


def test_rhvae_metric_bad_factors():
    with pytest.raises(ValueError, match=r"factors=True needs matrices L_i of shape \[N, d, d\]"):
        RHVAEMetric(torch.zeros(3, 2), torch.ones(3, 2), factors=True)
