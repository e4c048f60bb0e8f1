import pytest
import torch

import pygeo
from pygeo.reference.jtj import jtj as jtj_reference

from conftest import assert_close, backend_params

BACKENDS = backend_params()


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,D,d", [(1, 1, 1), (7, 33, 3), (4, 50, 7), (3, 100, 17), (1000, 5, 2)])
@pytest.mark.parametrize("weight_kind", ["none", "shared", "batched"])
def test_jtj_matches_float64_reference(backend_device, dtype, B, D, d, weight_kind):
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and B * D > 4000:
        pytest.skip("Triton interpreter on CPU: one program per item, B * D > 4000 takes minutes; smaller cases "
                    "cover the same code, and these sizes run compiled on a GPU")
    J = torch.randn(B, D, d, dtype=torch.float64)
    weight = {"none": None, "shared": torch.rand(D, dtype=torch.float64),
              "batched": torch.rand(B, D, dtype=torch.float64)}[weight_kind]
    expected = jtj_reference(J, weight)
    to = dict(device=device, dtype=dtype)
    G = pygeo.ops.jtj(J.to(**to), None if weight is None else weight.to(**to), backend=backend)
    assert G.shape == (B, d, d) and G.dtype == dtype
    assert torch.equal(G, G.transpose(-1, -2)), "G must be exactly symmetric"
    assert_close(G.cpu(), expected, dtype)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_jtj_batch_dims_and_broadcast_weight(backend_device):
    backend, device = backend_device
    J = torch.randn(2, 3, 11, 4, dtype=torch.float64, device=device)
    weight = torch.rand(1, 3, 11, dtype=torch.float64, device=device)
    G = pygeo.ops.jtj(J, weight, backend=backend)
    assert G.shape == (2, 3, 4, 4)
    assert_close(G.cpu(), jtj_reference(J.cpu(), weight.cpu()), torch.float64)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("weight_kind", ["none", "shared", "batched"])
def test_jtj_gradcheck(backend_device, weight_kind):
    backend, device = backend_device
    J = torch.randn(3, 6, 3, dtype=torch.float64, device=device, requires_grad=True)
    weight = {"none": None, "shared": torch.rand(6, dtype=torch.float64, device=device, requires_grad=True),
              "batched": torch.rand(3, 6, dtype=torch.float64, device=device, requires_grad=True)}[weight_kind]
    inputs = (J,) if weight is None else (J, weight)
    fn = (lambda J: pygeo.ops.jtj(J, backend=backend)) if weight is None else (lambda J, w: pygeo.ops.jtj(J, w, backend=backend))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_jtj_opcheck(backend_device):
    backend, device = backend_device
    J = torch.randn(4, 9, 3, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.rand(4, 9, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.pygeo.jtj.default, (J, weight, backend))
    torch.library.opcheck(torch.ops.pygeo.jtj.default, (J, None, backend))


def test_jtj_compiles():
    J = torch.randn(5, 12, 3)
    compiled = torch.compile(lambda J: pygeo.ops.jtj(J), fullgraph=True)
    assert_close(compiled(J), jtj_reference(J.double()), torch.float32)


@pytest.mark.parametrize("bad, message", [
    (lambda: pygeo.ops.jtj(torch.randn(5)), "J must have at least 2 dimensions"),
    (lambda: pygeo.ops.jtj(torch.randint(0, 3, (4, 3))), "J must be a real floating tensor"),
    (lambda: pygeo.ops.jtj(torch.randn(4, 3, dtype=torch.complex64)), "J must be a real floating tensor"),
    (lambda: pygeo.ops.jtj(torch.randn(4, 3), torch.rand(5)), "weight must have shape"),
    (lambda: pygeo.ops.jtj(torch.randn(2, 4, 3), torch.rand(3, 4)), "must broadcast to J's batch shape"),
    (lambda: pygeo.ops.jtj(torch.randn(4, 3), torch.rand(4, dtype=torch.float64)), "same dtype"),
    (lambda: pygeo.ops.jtj(torch.full((4, 3), float("nan"))), "J or weight contains NaN"),
    (lambda: pygeo.ops.jtj(torch.ones(4, 3), torch.tensor([1.0, float("inf"), 1.0, 1.0])), "J or weight contains NaN or Inf"),
    (lambda: pygeo.ops.jtj(torch.randn(4, 3), backend="nope"), "backend must be"),
])
def test_jtj_bad_input(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        bad()


def test_jtj_noncontiguous_input():
    J = torch.randn(3, 4, 10, dtype=torch.float64).transpose(-1, -2)  # [3, 10, 4] view
    assert_close(pygeo.ops.jtj(J), jtj_reference(J), torch.float64)


def test_unavailable_backend_says_why():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present, so the cuda backend is available and cannot be shown unavailable")
    with pytest.raises(pygeo.BackendUnavailableError, match="cuda"):
        pygeo.ops.jtj(torch.randn(4, 3), backend="cuda")


@pytest.mark.skipif(not pygeo.backends()["cpp"].available, reason="needs the compiled C++ backend")
@pytest.mark.parametrize("simd_bytes", ["16", "32", "64"])
def test_jtj_cpp_every_vector_width(monkeypatch, simd_bytes):
    """The C++ kernel (d >= 8) is compiled for 16-, 32- and 64-byte vectors and picks the CPU's widest at run time;
    PYGEO_SIMD_BYTES caps the width, so each version runs here: d a multiple of the block width (rows read in place),
    d that is not (a padded copy), one- and two-vector blocks, several chunks of rows."""
    monkeypatch.setenv("PYGEO_SIMD_BYTES", simd_bytes)
    for B, D, d in [(5, 9, 8), (3, 100, 16), (2, 70, 40), (2, 300, 64), (3, 41, 33)]:
        J = torch.randn(B, D, d, dtype=torch.float64)
        weight = torch.rand(B, D, dtype=torch.float64)
        for w in (None, weight):
            expected = jtj_reference(J, w)
            for dtype in (torch.float32, torch.float64):
                G = pygeo.ops.jtj(J.to(dtype), None if w is None else w.to(dtype), backend="cpp")
                assert torch.equal(G, G.transpose(-1, -2))
                assert_close(G, expected, dtype)


def test_forward_and_reverse_transforms_differentiate_jtj():
    """torch.func transforms run the differentiable plain-PyTorch path: a custom op would give zero forward tangents."""
    J, w = torch.randn(3, 5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    expected = torch.autograd.functional.jacobian(lambda J: pygeo.ops.jtj(J, w), J)
    assert expected.abs().max() > 0
    assert_close(torch.func.jacfwd(lambda J: pygeo.ops.jtj(J, w))(J), expected, torch.float64)
    assert_close(torch.func.jacrev(lambda J: pygeo.ops.jtj(J, w))(J), expected, torch.float64)
    assert_close(torch.func.vmap(pygeo.ops.jtj)(J), jtj_reference(J), torch.float64)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_empty_sum_over_D_is_zero(backend_device):
    backend, device = backend_device
    J = torch.randn(2, 0, 3, device=device)
    assert torch.equal(pygeo.ops.jtj(J, backend=backend), torch.zeros(2, 3, 3, device=device))
    assert torch.equal(pygeo.ops.jtj(J, torch.rand(2, 0, device=device), backend=backend), torch.zeros(2, 3, 3, device=device))
