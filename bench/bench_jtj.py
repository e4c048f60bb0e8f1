"""G = J^T diag(w) J: pygeo backends vs the einsum a user writes today."""
import pytest
import torch

import pygeo

from conftest import devices, pygeo_backends_for, record_work

SIZES = {"cpu": [(1024, 784, 16), (4096, 784, 2), (256, 784, 64)], "cuda": [(8192, 784, 2), (8192, 784, 16), (8192, 784, 64)]}
CASES = [(device, size) for device in devices() for size in SIZES[device]]


def providers(device):
    return ["einsum"] + pygeo_backends_for(device)


@pytest.mark.parametrize("device,size", CASES, ids=[f"{d}-B{s[0]}-D{s[1]}-d{s[2]}" for d, s in CASES])
@pytest.mark.parametrize("provider", ["einsum", "cpp", "cuda", "triton"])
def test_jtj(run_benchmark, benchmark, device, size, provider):
    if provider not in providers(device):
        pytest.skip(f"{provider} not available on {device}")
    B, D, d = size
    J = torch.randn(B, D, d, device=device)
    weight = torch.rand(B, D, device=device)
    benchmark.group = f"jtj {device} B={B} D={D} d={d}"
    element = J.element_size()
    record_work(benchmark, flops=2.0 * B * D * d * (d + 1) / 2, bytes_moved=element * (B * D * d + B * D + B * d * d))
    if provider == "einsum":
        run_benchmark(lambda: torch.einsum("bri,br,brj->bij", J, weight, J), device)
    else:
        run_benchmark(lambda: pygeo.ops.jtj(J, weight, backend=provider), device)
