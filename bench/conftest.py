"""Shared benchmark helpers: providers are compared side by side in one run; CUDA timings synchronise inside the call."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's interpreter is far too slow to benchmark: without a GPU the triton provider is skipped, not interpreted.
    os.environ.pop("TRITON_INTERPRET", None)

from pygeo import _backend  # noqa: E402


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pygeo_backends_for(device, implemented=("cpp", "cuda", "triton")):
    """pygeo backends of an op that can run on `device` here."""
    names = []
    for name in implemented:
        if not _backend.status(name).available:
            continue
        if (device == "cpu" and name == "cpp") or (device == "cuda" and name in ("cuda", "triton")):
            names.append(name)
    return names


def timed(fn, device):
    """Wrap fn so that a CUDA benchmark waits for the GPU inside the timed call."""
    if device == "cuda":
        def run():
            out = fn()
            torch.cuda.synchronize()
            return out
        return run
    return fn


@pytest.fixture
def run_benchmark(benchmark):
    def go(fn, device, rounds=None):
        fn = timed(fn, device)
        fn()  # warm-up (compilation, caches)
        if rounds:
            return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
        return benchmark(fn)
    return go


def record_work(benchmark, flops: float, bytes_moved: float):
    """Attach the op's arithmetic and memory traffic, so bench/gpu.py can report the fraction of the roofline."""
    benchmark.extra_info["flops"] = float(flops)
    benchmark.extra_info["bytes"] = float(bytes_moved)
