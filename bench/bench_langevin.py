"""One Riemannian Langevin step for many chains: pygeo's fused kernels against the plain-PyTorch step
(torch.linalg.cholesky_ex, cholesky_solve, solve_triangular: pygeo/reference/langevin_step.py).

Run: cd bench && python -m pytest bench_langevin.py -q --benchmark-columns=median,iqr
The group title and extra_info carry the bytes floor (inputs read + outputs written, float32) to compare with memory
bandwidth: time floor = bytes / bandwidth (e.g. 2966 GB/s device copy on an H100, PERF.md).
"""
import pytest
import torch

import pygeo
from pygeo import _backend
from pygeo.reference.langevin_step import langevin_step as plain_pytorch_step

CPU_SIZES = [(2, 8192), (16, 4096), (64, 1024)]  # (d, B)
GPU_SIZES = [(2, 65536), (16, 65536), (64, 65536)]


def _cases():
    cases = []
    for drift in ("simplified", "full"):
        for d, B in CPU_SIZES:
            if drift == "full" and d == 64:
                continue  # dG alone is 1 GB at d=64
            for provider in ("torch", "cpp"):
                if provider == "torch" or _backend.status(provider).available:
                    cases.append(pytest.param("cpu", provider, drift, d, B, id=f"cpu-{provider}-{drift}-d{d}-B{B}"))
        if torch.cuda.is_available():
            for d, B in GPU_SIZES:
                if drift == "full" and d == 64:
                    continue
                for provider in ("torch", "triton", "cuda"):
                    if provider == "torch" or _backend.status(provider).available:
                        cases.append(pytest.param("cuda", provider, drift, d, B, id=f"cuda-{provider}-{drift}-d{d}-B{B}"))
    return cases


def _inputs(device, drift, d, B, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    A = torch.randn(B, d, d, generator=generator, dtype=dtype)
    G = A @ A.transpose(-1, -2) / d + torch.eye(d, dtype=dtype)
    inputs = dict(z=torch.randn(B, d, generator=generator, dtype=dtype), G=G,
                  grad_log_prob=torch.randn(B, d, generator=generator, dtype=dtype),
                  step_size=torch.full((B,), 0.1, dtype=dtype), noise=torch.randn(B, d, generator=generator, dtype=dtype),
                  target=torch.randn(B, d, generator=generator, dtype=dtype))
    if drift == "full":
        dG = torch.randn(B, d, d, d, generator=generator, dtype=dtype)
        inputs["dG"] = dG + dG.transpose(-1, -2)
    return {k: v.to(device) for k, v in inputs.items()}


def _bytes_floor(inputs, B, d, element):
    read = sum(v.numel() for v in inputs.values()) * element
    written = (2 * B * d + 3 * B) * element + B  # proposal, mean, three log terms, ok
    return read + written


@pytest.mark.parametrize("device, provider, drift, d, B", _cases())
def test_langevin_step(benchmark, device, provider, drift, d, B):
    inputs = _inputs(device, drift, d, B)
    floor_mb = _bytes_floor(inputs, B, d, 4) / 1e6
    benchmark.group = f"langevin_step {device} {drift} d={d} B={B}, bytes floor {floor_mb:.2f} MB"
    benchmark.extra_info["bytes_floor_MB"] = floor_mb
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if provider == "torch":
        def step():
            result = plain_pytorch_step(**inputs)
            sync()
            return result
    else:
        args = [inputs[k] for k in ("z", "G", "grad_log_prob", "step_size", "noise")]
        extra = {k: inputs[k] for k in ("dG", "target") if k in inputs}

        def step():
            result = pygeo.ops.langevin_step(*args, backend=provider, **extra)
            sync()
            return result

    result = benchmark(step)
    assert bool(result.ok.all())
