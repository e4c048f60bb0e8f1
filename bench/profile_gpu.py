"""Where the GPU time of pygeo's main ops goes: torch.profiler per case, the CUDA kernels sorted by their time.

    python bench/profile_gpu.py [--out DIR]

Writes profile.txt to --out (default $OUT, else ./gpu-results). Each case is warmed up, then profiled over a few calls;
the wall time per call (synchronised) is printed beside the kernels, so launch and host overheads show as the gap.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pygeo  # noqa: E402
from bench_langevin import _inputs as langevin_inputs  # noqa: E402
from bench_latent_metric import problem as latent_problem  # noqa: E402
from bench_pullback import make_decoder  # noqa: E402


def cases():
    z, c, m = latent_problem(65536, 1000, 16, "diagonal", "cuda")
    for backend in ("triton", "cuda"):
        yield f"latent_metric {backend} d=16 N=1000 B=65536", \
            lambda backend=backend: pygeo.ops.latent_metric(z, c, m, 0.01, 0.0, 1.0, backend=backend).metric
    for drift in ("simplified", "full"):
        inputs = langevin_inputs("cuda", drift, 16, 65536)
        args = [inputs[k] for k in ("z", "G", "grad_log_prob", "step_size", "noise")]
        extra = {k: inputs[k] for k in ("dG", "target") if k in inputs}
        for backend in ("triton", "cuda"):
            yield f"langevin_step {backend} {drift} d=16 B=65536", \
                lambda args=args, extra=extra, backend=backend: pygeo.ops.langevin_step(*args, backend=backend, **extra)
    zp = torch.randn(8192, 16, device="cuda")
    decoder = make_decoder(16, "cuda")
    for likelihood in ("euclidean", "bernoulli"):
        metric = pygeo.PullbackMetric(decoder, likelihood, backend="triton").metric
        yield f"pullback triton {likelihood} d=16 B=8192", lambda metric=metric: metric(zp)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = []
    for name, fn in cases():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 10
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70)
        report.append(f"## {name}: {wall * 1e3:.3f} ms per call (wall, synchronised; profile over 5 calls)\n{table}\n")
        print(report[-1], flush=True)
    (out / "profile.txt").write_text("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
