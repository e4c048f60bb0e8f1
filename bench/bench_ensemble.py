"""Expected metric of a decoder ensemble (Syrota et al. 2024): 8 MLP decoders 16-512-784 (tanh), B = 1024, Bernoulli.

Providers, side by side in one run:
  vmap-jacfwd-x8   what a user writes today: torch.func.vmap(jacfwd(decoder)) + einsum per member, averaged;
  fused-x8         8 separate calls of the fused op (PullbackMetric(decoder).metric per member), averaged;
  ensemble         pygeo.metrics.EnsembleMetric(members).metric: one call of pygeo.ops.mlp_ensemble_metric.
Goals (issue 24): ensemble >= 5x faster than vmap-jacfwd-x8 and >= 2x faster than fused-x8.

Run: cd bench && python -m pytest bench_ensemble.py -q --benchmark-columns=median,iqr
 or: python bench/bench_ensemble.py [--batch 1024] [--repeats 5]   (a table of medians, ratios and GFLOP/s)
"""
import argparse
import statistics
import time

import pytest
import torch

import pygeo
from pygeo.metrics import EnsembleMetric

M, LATENT, HIDDEN, DATA = 8, 16, 512, 784


def make_decoders(device="cpu", seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Sequential(torch.nn.Linear(LATENT, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, DATA)).to(device)
            for _ in range(M)]


def providers(decoders):
    jacobians = [torch.func.vmap(torch.func.jacfwd(decoder)) for decoder in decoders]

    def vmap_jacfwd(z):
        total = 0
        for decoder, jacobian in zip(decoders, jacobians):
            J = jacobian(z)  # [B, 784, d]
            p = torch.sigmoid(decoder(z))
            total = total + torch.einsum("bri,br,brj->bij", J, p * (1 - p), J)
        return total / len(decoders)

    members = [pygeo.PullbackMetric(decoder, likelihood="bernoulli") for decoder in decoders]

    def fused_separately(z):
        total = 0
        for member in members:
            total = total + member.metric(z)
        return total / len(members)

    ensemble = EnsembleMetric(members)
    return {"vmap-jacfwd-x8": vmap_jacfwd, "fused-x8": fused_separately, "ensemble": ensemble.metric}


def flops(B):
    """Multiply-adds x 2 of the tangent propagation (d + 1 rows per point through both layers) plus the Gram."""
    per_point = (LATENT + 1) * (LATENT * HIDDEN + HIDDEN * DATA) + DATA * LATENT * (LATENT + 1) / 2
    return 2 * M * B * per_point


@pytest.fixture(scope="module")
def setting():
    decoders = make_decoders()
    z = torch.randn(1024, LATENT)
    return providers(decoders), z


@pytest.mark.parametrize("provider", ["vmap-jacfwd-x8", "fused-x8", "ensemble"])
def test_ensemble_metric(benchmark, setting, provider):
    fns, z = setting
    benchmark.group = "ensemble of 8 MLPs 16-512-784, B=1024, bernoulli"
    with torch.no_grad():
        G = benchmark(fns[provider], z)
    assert G.shape == (1024, LATENT, LATENT)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    fns = providers(make_decoders())
    z = torch.randn(args.batch, LATENT)
    times, results = {name: [] for name in fns}, {}
    with torch.no_grad():
        for name, fn in fns.items():  # warm-up (the ensemble's first call packs nothing: kernels pack per call)
            results[name] = fn(z)
        for _ in range(args.repeats):  # interleaved, so that load changes on a shared machine hit every provider
            for name, fn in fns.items():
                start = time.perf_counter()
                fn(z)
                times[name].append(time.perf_counter() - start)
    reference = results["vmap-jacfwd-x8"].double()
    base = statistics.median(times["vmap-jacfwd-x8"])
    separate = statistics.median(times["fused-x8"])
    print(f"B={args.batch}, M={M}, {LATENT}-{HIDDEN}-{DATA} tanh, bernoulli, float32, threads={torch.get_num_threads()}")
    print("| provider | median ms | vs vmap-jacfwd-x8 | vs fused-x8 | GFLOP/s | max rel. diff to vmap-jacfwd |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in fns:
        median = statistics.median(times[name])
        diff = float((results[name].double() - reference).abs().max() / reference.abs().max())
        print(f"| {name} | {1e3 * median:.1f} | {base / median:.2f}x | {separate / median:.2f}x | "
              f"{flops(args.batch) / median / 1e9:.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
