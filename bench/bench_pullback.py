"""Pullback / Fisher metric of a 784-output MLP decoder (d -> 512 -> 784): pygeo against the plain-PyTorch way
(`torch.func.vmap(torch.func.jacfwd(decoder))` + einsum), pygeo's generic forward-mode path, and the fused
pygeo.ops.mlp_metric on each backend.

Run: cd bench && python -m pytest bench_pullback.py -q --benchmark-columns=median,iqr
"pygeo-fused-cpp-cold" clears the cache of the Cholesky-compressed last layer (euclidean) before every call.
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
        names += ["pygeo-fused-cpp", "pygeo-fused-cpp-cold"]
    else:
        names += ["pygeo-fused-triton", "pygeo-fused-cuda"]
    return names


def make_provider(name, decoder, likelihood):
    if name == "jacfwd+einsum":
        return baseline(decoder, likelihood)
    if name == "pygeo-generic":  # hidden from the MLP recogniser: forward-mode J + pygeo.ops.jtj
        return pygeo.PullbackMetric(lambda z: decoder(z), likelihood).metric
    if name == "pygeo-fused-cpp-cold":  # the compressed last layer recomputed on every call (no cache)
        metric = pygeo.PullbackMetric(decoder, likelihood, backend="cpp").metric

        def cold(z):
            sys.modules["pygeo.ops.mlp_metric"]._COMPRESSED.clear()
            return metric(z)
        return cold
    backend = name.rsplit("-", 1)[1]
    return pygeo.PullbackMetric(decoder, likelihood, backend=backend).metric


CASES = [pytest.param(device, B, d, likelihood, provider, id=f"{device}-B{B}-d{d}-{likelihood}-{provider}")
         for device, B, d in SIZES for likelihood in LIKELIHOODS for provider in providers(device)]


@pytest.mark.parametrize("device, B, d, likelihood, provider", CASES)
def test_pullback_metric(benchmark, device, B, d, likelihood, provider):
    backend = provider.split("-")[2] if provider.startswith("pygeo-fused") else "torch"
    if not pygeo.backends()[backend].available:
        pytest.skip(f"backend unavailable: {pygeo.backends()[backend].reason}")
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
    with torch.no_grad():
        expected = baseline(decoder, likelihood)(z)
    torch.testing.assert_close(G, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max().detach()))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        run()
        benchmark.extra_info["peak_MB"] = torch.cuda.max_memory_allocated() / 2 ** 20
    benchmark.pedantic(run, rounds=5 if d < 64 else 3, iterations=1, warmup_rounds=1)


_MEASURE = """
import json, sys, torch
sys.path.insert(0, {bench!r})
from bench_pullback import make_decoder, make_provider


def status(field):  # kB from /proc/self/status
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


decoder = make_decoder({d}, "cpu")
z = torch.randn({B}, {d})
fn = make_provider({provider!r}, decoder, {likelihood!r})
with torch.no_grad():
    fn(z[:8])  # import and first-call costs out of the way
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current one
    before = status("VmRSS")
    fn(z)
    peak = status("VmHWM")
print(json.dumps((peak - before) / 1024))
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


GRADIENT_SIZES = [("cpu", 1024, 16)] + ([("cuda", 8192, 16)] if CUDA else [])
GRADIENT_PROVIDERS = ("jacfwd+slogdet+autograd", "pygeo-log_volume+autograd", "pygeo-log_volume_and_grad")


def gradient_provider(name, decoder):
    """z -> (1/2 log det G, its gradient in z) for a trainable decoder (every parameter requires grad), as samplers
    need it: the user's way, autograd through pygeo's log_volume, and the metric's own log_volume_and_grad."""
    if name == "pygeo-log_volume_and_grad":
        return pygeo.PullbackMetric(decoder).log_volume_and_grad
    log_volume = (pygeo.PullbackMetric(decoder).log_volume if name == "pygeo-log_volume+autograd" else
                  lambda z: 0.5 * torch.linalg.slogdet(baseline(decoder, "euclidean")(z))[1])

    def value_and_grad(z):
        point = z.detach().requires_grad_(True)
        value = log_volume(point)
        (grad,) = torch.autograd.grad(value.sum(), point)
        return value.detach(), grad
    return value_and_grad


@pytest.mark.parametrize("device, B, d, provider", [
    pytest.param(device, B, d, provider, id=f"{device}-B{B}-d{d}-{provider}")
    for device, B, d in GRADIENT_SIZES for provider in GRADIENT_PROVIDERS])
def test_log_volume_gradient(benchmark, device, B, d, provider):
    """The gradient of 1/2 log det G in z (what HMC and Langevin evaluate at every step), euclidean pullback."""
    benchmark.group = f"log-volume gradient {device} B={B} d={d}"
    decoder = make_decoder(d, device)
    z = torch.randn(B, d, device=device)
    fn = gradient_provider(provider, decoder)

    def run():
        out = fn(z)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    value, grad = run()
    expected_value, expected_grad = gradient_provider("jacfwd+slogdet+autograd", decoder)(z)
    torch.testing.assert_close(value, expected_value, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-2, atol=1e-2 * float(expected_grad.abs().max()))
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
