"""Test setup shared by every test file.

- Without a GPU, Triton kernels run through Triton's interpreter: TRITON_INTERPRET=1 must be set before any
  @triton.jit is defined, so it is set here, before pygeo (or triton) is imported.
- Kernel outputs are NaN-poisoned before kernels run, so an element a kernel forgets to write fails the comparison.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["PYGEO_POISON_OUTPUTS"] = "1"

import pytest  # noqa: E402

import pygeo  # noqa: E402
from pygeo import _backend  # noqa: E402

_backend.POISON_OUTPUTS = True

# Per-dtype tolerances against the float64 reference (relative to the magnitude of the reference values).
TOLERANCES = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def available_backends(op_backends=("torch", "cpp", "cuda", "triton")):
    """The backends of an op that can run here, each paired with the device its tests use."""
    found = []
    for name in op_backends:
        entry = _backend.status(name)
        if not entry.available:
            continue
        device = "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"
        found.append((name, device))
    return found


def backend_params(op_backends=("torch", "cpp", "cuda", "triton")):
    """pytest params over every backend of an op: unavailable ones are reported as skipped with the reason."""
    params = []
    for name in op_backends:
        entry = _backend.status(name)
        device = "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"
        marks = [] if entry.available else [pytest.mark.skip(reason=f"backend {name} unavailable: {entry.reason}")]
        params.append(pytest.param((name, device), id=name, marks=marks))
    return params


def assert_close(actual, expected, dtype):
    """Compare against a float64 reference with the dtype's tolerance, scaled by the reference's magnitude."""
    tol = TOLERANCES[dtype]
    expected = expected.to(torch.float64)
    actual = actual.to(torch.float64)
    assert not torch.isnan(actual).any(), "output contains NaN (unwritten element or bad arithmetic)"
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * float(scale))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
