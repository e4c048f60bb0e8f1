"""Pullback / Fisher metric of a 784-output MLP decoder (d -> 512 -> 784): pygeo against the plain-PyTorch way
(`torch.func.vmap(torch.func.jacfwd(decoder))` + einsum), pygeo's generic forward-mode path, and the fused
pygeo.ops.mlp_metric on each backend.

Run: cd bench && python -m pytest bench_pullback.py -q --benchmark-columns=median,iqr
test_peak_extra_memory prints the peak extra host memory of each provider (d=16, B=1024, measured in a fresh process).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import pygeo

CUDA = torch.cuda.is_available()
SIZES = [("cpu", 1024, d) for d in (2, 16, 64)] + ([("cuda", 8192, d) for d in (2, 16, 64)] if CUDA else [])
LIKELIHOODS = ("euclidean", "bernoulli")


def make_decoder(d, device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, 512), torch.nn.Tanh(), torch.nn.Linear(512, 784)).to(device)


def baseline(decoder, likelihood):
    """What a user writes today: a forward-mode Jacobian per point, then an einsum."""
    jacobian = torch.func.vmap(torch.func.jacfwd(decoder))

    def metric(z):
        J = jacobian(z)  # [B, 784, d]
        if likelihood == "euclidean":
            return torch.einsum("bri,brj->bij", J, J)
        p = torch.sigmoid(decoder(z))
        return torch.einsum("bri,br,brj->bij", J, p * (1 - p), J)
    return metric


def providers(device):
    names = ["jacfwd+einsum", "pygeo-generic", "pygeo-fused-torch"]
    if device == "cpu":
        names.append("pygeo-fused-cpp")
    else:
        names += ["pygeo-fused-triton", "pygeo-fused-cuda"]
    return names


def make_provider(name, decoder, likelihood):
    if name == "jacfwd+einsum":
        return baseline(decoder, likelihood)
    if name == "pygeo-generic":  # hidden from the MLP recogniser: forward-mode J + pygeo.ops.jtj
        return pygeo.PullbackMetric(lambda z: decoder(z), likelihood).metric
    backend = name.rsplit("-", 1)[1]
    return pygeo.PullbackMetric(decoder, likelihood, backend=backend).metric


CASES = [pytest.param(device, B, d, likelihood, provider, id=f"{device}-B{B}-d{d}-{likelihood}-{provider}")
         for device, B, d in SIZES for likelihood in LIKELIHOODS for provider in providers(device)]


@pytest.mark.parametrize("device, B, d, likelihood, provider", CASES)
def test_pullback_metric(benchmark, device, B, d, likelihood, provider):
    if provider.endswith(("cpp", "cuda", "triton")) and not pygeo.backends()[provider.rsplit("-", 1)[1]].available:
        pytest.skip(f"backend unavailable: {pygeo.backends()[provider.rsplit('-', 1)[1]].reason}")
    decoder = make_decoder(d, device)
    z = torch.randn(B, d, device=device)
    fn = make_provider(provider, decoder, likelihood)

    def run():
        with torch.no_grad():
            G = fn(z)
        if device == "cuda":
            torch.cuda.synchronize()
        return G

    G = run()
    expected = baseline(decoder, likelihood)(z)
    torch.testing.assert_close(G, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        run()
        benchmark.extra_info["peak_MB"] = torch.cuda.max_memory_allocated() / 2 ** 20
    benchmark.pedantic(run, rounds=5 if d < 64 else 3, iterations=1, warmup_rounds=1)


_MEASURE = """
import json, resource, sys, torch
sys.path.insert(0, {bench!r})
from bench_pullback import make_decoder, make_provider
decoder = make_decoder({d}, "cpu")
z = torch.randn({B}, {d})
fn = make_provider({provider!r}, decoder, {likelihood!r})
with torch.no_grad():
    fn(z[:8])  # import and first-call costs out of the way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(z)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps((after - before) / 1024))
"""


def test_peak_extra_memory():
    """Peak extra resident memory (MB) of one call at d=16, B=1024 on the CPU, each provider in a fresh process. The
    baseline holds J [B, 784, d]; the fused kernel only per-thread slabs and a packed copy of the weights."""
    rows = []
    for likelihood in LIKELIHOODS:
        for provider in providers("cpu"):
            code = _MEASURE.format(bench=os.path.dirname(os.path.abspath(__file__)), d=16, B=1024, provider=provider,
                                   likelihood=likelihood)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            rows.append((likelihood, provider, json.loads(out.stdout.strip().splitlines()[-1])))
    print("\npeak extra host memory of one call, d=16, B=1024 (MB; J [B, 784, 16] float32 is 49 MB)")
    for likelihood, provider, megabytes in rows:
        print(f"  {likelihood:<10} {provider:<20} {megabytes:8.1f}")
