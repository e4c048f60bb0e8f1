"""Every metric pygeo returns is symmetric (Hermitian) to the bit, on every backend, by construction.

The inputs here are chosen so that a matrix product computing G_ij and G_ji as two separate dot products rounds them
differently on any CPU: precisions that are symmetric only to rounding (torch.linalg.inv of a covariance), and a user
function whose G is off by an ulp. (A BLAS that rounds the two triangles of a symmetric product differently, as on AMD
EPYC, is the case that made this matter; these inputs expose the same fault on every machine.)"""
import pytest
import torch

import pygeo

from conftest import backend_params


def _exactly_symmetric(A, name):
    assert torch.equal(A, A.transpose(-1, -2)), f"{name} is not exactly symmetric"


def _inverse_covariances(N, d, generator):
    A = torch.randn(N, d, d, generator=generator, dtype=torch.float64)
    covariances = A @ A.mT / d + 0.5 * torch.eye(d, dtype=torch.float64)
    return torch.linalg.inv(covariances)  # symmetric only to rounding


@pytest.mark.parametrize("backend_device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_latent_metric_and_derivative_symmetric(backend_device, dtype):
    backend, device = backend_device
    g = torch.Generator().manual_seed(3)
    d = 7
    precisions = _inverse_covariances(40, d, g)
    assert not torch.equal(precisions, precisions.mT)  # the premise: input asymmetric by rounding
    to = dict(dtype=dtype, device=device)
    z, centroids = torch.randn(33, d, generator=g).to(**to), torch.randn(40, d, generator=g).to(**to)
    out = pygeo.ops.latent_metric(z, centroids, precisions.to(**to), 0.01, 0.1, 1.2, derivative=True, backend=backend)
    _exactly_symmetric(out.metric, "G")
    _exactly_symmetric(out.derivative, "dG (in i, j)")
    metric = pygeo.LatentMetric(centroids, precisions.to(**to), lam=0.01, tau=0.1, rho=1.2, backend=backend)
    G, dG = metric.metric_and_derivative(z)
    _exactly_symmetric(G, "LatentMetric G")
    _exactly_symmetric(dG, "LatentMetric dG")


@pytest.mark.parametrize("backend_device", backend_params())
def test_pullback_metric_symmetric(backend_device):
    backend, device = backend_device
    torch.manual_seed(1)
    decoder = torch.nn.Sequential(torch.nn.Linear(5, 31), torch.nn.Softplus(), torch.nn.Linear(31, 50)).to(device)
    z = torch.randn(19, 5, device=device)
    for likelihood in ("euclidean", "bernoulli"):
        metric = pygeo.PullbackMetric(decoder, likelihood=likelihood, backend=backend)
        _exactly_symmetric(metric.metric(z), f"PullbackMetric({likelihood}) G")
        G, dG = metric.metric_and_derivative(z)
        _exactly_symmetric(G, "G of metric_and_derivative")
    J = torch.randn(4, 50, 6, device=device)
    _exactly_symmetric(pygeo.ops.jtj(J, torch.rand(50, device=device), backend=backend), "jtj")


def test_function_metric_symmetric_by_construction():
    skew = torch.tensor([[0.0, 1e-7], [-1e-7, 0.0]], dtype=torch.float64)

    def fn(z):  # an SPD G that a user computed with a rounding error in one triangle
        base = torch.eye(2, dtype=z.dtype) * (1 + (z * z).sum(-1))[..., None, None]
        return base + skew.to(z.dtype)

    metric = pygeo.FunctionMetric(fn)
    z = torch.randn(9, 2, dtype=torch.float64)
    _exactly_symmetric(metric.metric(z), "FunctionMetric G")
    G, dG = metric.metric_and_derivative(z)
    _exactly_symmetric(G, "FunctionMetric G")
    _exactly_symmetric(dG, "FunctionMetric dG")


def test_hermitian_metrics_exact():
    g = torch.Generator().manual_seed(0)
    n, K = 3, 5
    A = torch.randn(K, n, n, dtype=torch.complex128, generator=g)
    precisions = torch.linalg.inv(A @ A.mH / n + torch.eye(n, dtype=torch.complex128))  # Hermitian to rounding only
    centers = torch.randn(K, n, dtype=torch.complex128, generator=g)
    z = torch.randn(11, n, dtype=torch.complex128, generator=g)
    G = pygeo.LSEKahlerMetric(centers, 0.5 * (precisions + precisions.mH), temperature=0.7).metric(z)
    assert torch.equal(G, G.mH), "LSE Kahler G is not exactly Hermitian"
    W = torch.randn(4, n, dtype=torch.complex128, generator=g)
    fisher = pygeo.ComplexGaussianFisherMetric(lambda u: torch.tanh(u @ W.mT), sigma=0.5).metric(z)
    assert torch.equal(fisher, fisher.mH), "complex Gaussian Fisher G is not exactly Hermitian"
