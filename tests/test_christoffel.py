import pytest
import torch

import pygeo
from pygeo.reference.christoffel import christoffel as christoffel_reference

from conftest import assert_close, backend_params

BACKENDS = backend_params()


def random_metric(batch, d, dtype=torch.float64, device="cpu"):
    """Well-conditioned SPD G [B, d, d] and a dG [B, d, d, d] symmetric in its last two indices."""
    A = torch.randn(*batch, d, d, dtype=torch.float64)
    G = A @ A.transpose(-1, -2) / d + torch.eye(d, dtype=torch.float64)
    dG = torch.randn(*batch, d, d, d, dtype=torch.float64)
    dG = dG + dG.transpose(-1, -2)
    return G.to(dtype=dtype, device=device), dG.to(dtype=dtype, device=device)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,d", [(1, 1), (7, 3), (3, 17), (1000, 2), (50, 16)])
def test_christoffel_matches_float64_reference(backend_device, dtype, B, d):
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and B * d > 100:
        pytest.skip("Triton interpreter on CPU: one program per point, B * d > 100 takes minutes; smaller cases "
                    "cover the same code, and these sizes run compiled on a GPU")
    G, dG = random_metric((B,), d)
    expected = christoffel_reference(G, dG)
    Gamma = pygeo.ops.christoffel(G.to(device=device, dtype=dtype), dG.to(device=device, dtype=dtype), backend=backend)
    assert Gamma.shape == (B, d, d, d) and Gamma.dtype == dtype
    assert torch.equal(Gamma, Gamma.transpose(-1, -2)), "Gamma must be exactly symmetric in its lower indices"
    assert_close(Gamma.cpu(), expected, dtype)


@pytest.mark.skipif(not pygeo.backends()["cpp"].available, reason="needs the compiled C++ backend")
@pytest.mark.parametrize("simd_bytes", ["16", "32", "64"])
def test_christoffel_cpp_every_vector_width(monkeypatch, simd_bytes):
    """The C++ kernel is compiled for 16-, 32- and 64-byte vectors and picks the CPU's widest at run time;
    PYGEO_SIMD_BYTES caps the width, so each version runs here, with d not a multiple of any vector width too."""
    monkeypatch.setenv("PYGEO_SIMD_BYTES", simd_bytes)
    for B, d in [(3, 5), (4, 16), (2, 37)]:
        G, dG = random_metric((B,), d)
        expected = christoffel_reference(G, dG)
        for dtype in (torch.float32, torch.float64):
            Gamma = pygeo.ops.christoffel(G.to(dtype), dG.to(dtype), backend="cpp")
            assert torch.equal(Gamma, Gamma.transpose(-1, -2))
            assert_close(Gamma, expected, dtype)


def test_reference_is_the_formula():
    # Straight from MATH.md with an explicit inverse and loops, on a small case.
    G, dG = random_metric((2,), 3)
    Ginv = torch.linalg.inv(G)
    expected = torch.zeros(2, 3, 3, 3, dtype=torch.float64)
    for k in range(3):
        for i in range(3):
            for j in range(3):
                for l in range(3):
                    expected[:, k, i, j] += 0.5 * Ginv[:, k, l] * (dG[:, i, l, j] + dG[:, j, l, i] - dG[:, l, i, j])
    torch.testing.assert_close(christoffel_reference(G, dG), expected)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_christoffel_batch_dims_and_noncontiguous(backend_device):
    backend, device = backend_device
    G, dG = random_metric((2, 3), 4, device=device)
    dG_view = dG.transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous view of the same values
    Gamma = pygeo.ops.christoffel(G, dG_view, backend=backend)
    assert Gamma.shape == (2, 3, 4, 4, 4)
    assert_close(Gamma.cpu(), christoffel_reference(G.cpu(), dG.cpu()), torch.float64)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_christoffel_gradcheck(backend_device):
    backend, device = backend_device
    interpreted = backend == "triton" and device == "cpu"  # ~0.1 s per forward call: one small point only
    G, dG = random_metric((1,) if interpreted else (2,), 2 if interpreted else 3, device=device)
    G.requires_grad_(True)
    dG.requires_grad_(True)
    fn = lambda G, dG: pygeo.ops.christoffel(G, dG, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (G, dG))
    if not interpreted:
        assert torch.autograd.gradgradcheck(fn, (G[:1].detach().requires_grad_(), dG[:1].detach().requires_grad_()))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_christoffel_opcheck(backend_device):
    backend, device = backend_device
    G, dG = random_metric((4,), 3, device=device)
    torch.library.opcheck(torch.ops.pygeo.christoffel.default, (G.requires_grad_(True), dG.requires_grad_(True), backend))


def test_christoffel_compiles():
    G, dG = random_metric((5,), 3, dtype=torch.float32)
    compiled = torch.compile(lambda G, dG: pygeo.ops.christoffel(G, dG), fullgraph=True)
    assert_close(compiled(G, dG), christoffel_reference(G.double(), dG.double()), torch.float32)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_christoffel_not_positive_definite_raises(backend_device):
    backend, device = backend_device
    G, dG = random_metric((4,), 3, device=device)
    G[2] = -G[2]
    with pytest.raises(ValueError, match="not positive definite at 1 of"):
        pygeo.ops.christoffel(G, dG, backend=backend)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_christoffel_semidefinite_point_is_jittered_not_nan(backend_device):
    backend, device = backend_device
    G, dG = random_metric((3,), 2, device=device)
    G[1] = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # singular: Cholesky fails without jitter
    Gamma = pygeo.ops.christoffel(G, dG, backend=backend)
    assert torch.isfinite(Gamma).all()
    assert_close(Gamma[0].cpu(), christoffel_reference(G[:1].cpu(), dG[:1].cpu())[0], torch.float64)


@pytest.mark.parametrize("bad, message", [
    (lambda: pygeo.ops.christoffel(torch.eye(3), torch.zeros(3, 3)), "dG must have at least 3 dimensions"),
    (lambda: pygeo.ops.christoffel(torch.eye(3), torch.zeros(2, 2, 2)), r"dG must have shape \[..., d, d, d\]"),
    (lambda: pygeo.ops.christoffel(torch.ones(3, 2), torch.zeros(2, 2, 2)), r"G must have shape \[..., d, d\]"),
    (lambda: pygeo.ops.christoffel(torch.eye(2).expand(4, 2, 2), torch.zeros(3, 2, 2, 2)), "same batch shape"),
    (lambda: pygeo.ops.christoffel(torch.eye(2, dtype=torch.int64), torch.zeros(2, 2, 2)), "G must be a real floating"),
    (lambda: pygeo.ops.christoffel(torch.eye(2), torch.zeros(2, 2, 2, dtype=torch.float64)), "same dtype"),
    (lambda: pygeo.ops.christoffel(torch.eye(2), torch.full((2, 2, 2), float("nan"))), "dG contains NaN"),
    (lambda: pygeo.ops.christoffel(torch.eye(2), torch.zeros(2, 2, 2), backend="nope"), "backend must be"),
])
def test_christoffel_bad_input(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        bad()
