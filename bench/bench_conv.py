"""The generic (non-MLP) pullback path on the decoders of issue #24, side by side with the plain-PyTorch way
(`torch.func.vmap(torch.func.jacfwd(decoder))` + einsum):

- test_conv_metric: Linear(16, 64*7*7) -> Unflatten -> ConvTranspose2d(64, 32, 4, 2, 1) -> SiLU ->
  ConvTranspose2d(32, 1, 4, 2, 1), Bernoulli, B = 256: pygeo's tangent rows (the default for this nn.Sequential),
  pygeo's vmap(jvp) fallback (the same decoder hidden in a lambda), and the baseline.
- test_categorical_metric: 256-level pixels, 784 pixels, d = 16 (Linear(16, 64) -> Tanh -> Linear(64, 784*256) ->
  Unflatten), B = 8: pygeo's Gram reductions against the einsum with the C x C Fisher blocks diag(p) - p p^T, both the
  whole metric and the reduction alone (J given).
- test_peak_memory: peak extra resident memory (VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS
  before the call; each measurement in a fresh process) of one metric call of a 3x64x64-output conv decoder at d = 64,
  pygeo (max_memory default 256 MiB) at B = 256, 1024, 4096 and the baseline at B = 256, 512 (its J alone is
  B * 12288 * 64 * 4 bytes, 12.9 GB at B = 4096: more than this shared machine can give).

Run: cd bench && python -m pytest bench_conv.py -q -s --benchmark-columns=median,iqr
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import pygeo

L = torch.nn


def conv_decoder(d=16):
    torch.manual_seed(0)
    return L.Sequential(L.Linear(d, 64 * 7 * 7), L.Unflatten(1, (64, 7, 7)), L.ConvTranspose2d(64, 32, 4, 2, 1),
                        L.SiLU(), L.ConvTranspose2d(32, 1, 4, 2, 1))


def rgb_decoder(d=64):
    """d -> 3 x 64 x 64 logits."""
    torch.manual_seed(0)
    return L.Sequential(L.Linear(d, 64 * 8 * 8), L.Unflatten(1, (64, 8, 8)), L.ConvTranspose2d(64, 32, 4, 2, 1),
                        L.SiLU(), L.ConvTranspose2d(32, 16, 4, 2, 1), L.SiLU(), L.ConvTranspose2d(16, 3, 4, 2, 1))


def categorical_decoder(d=16, pixels=784, levels=256):
    torch.manual_seed(0)
    return L.Sequential(L.Linear(d, 64), L.Tanh(), L.Linear(64, pixels * levels), L.Unflatten(1, (pixels, levels)))


def baseline(decoder, likelihood):
    """What a user writes today: a forward-mode Jacobian per point, then an einsum with the Fisher weight."""
    jacobian = torch.func.vmap(torch.func.jacfwd(lambda x: decoder(x[None])[0]))

    def metric(z):
        B, d = z.shape
        out = decoder(z)
        J = jacobian(z)
        if likelihood == "categorical":
            C = out.shape[-1]
            p = torch.softmax(out, -1)
            fisher = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # [B, P, C, C]
            return torch.einsum("bpci,bpce,bpej->bij", J.reshape(B, -1, C, d), fisher, J.reshape(B, -1, C, d))
        p = torch.sigmoid(out).reshape(B, -1)
        J = J.reshape(B, -1, d)
        return torch.einsum("bri,br,brj->bij", J, p * (1 - p), J)
    return metric


def make_provider(name, decoder, likelihood):
    if name == "jacfwd+einsum":
        return baseline(decoder, likelihood)
    if name == "pygeo-vmap":  # hidden from the Sequential recogniser: vmap(jvp) + pygeo.ops.jtj
        return pygeo.PullbackMetric(lambda z: decoder(z), likelihood).metric
    return pygeo.PullbackMetric(decoder, likelihood).metric


def _run(benchmark, fn, z, expected_fn, rounds):
    with torch.no_grad():
        G = fn(z)
        expected = expected_fn(z)
    torch.testing.assert_close(G, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))

    def run():
        with torch.no_grad():
            return fn(z)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("provider", ["jacfwd+einsum", "pygeo", "pygeo-vmap"])
def test_conv_metric(benchmark, provider):
    benchmark.group = "conv decoder, bernoulli, B=256, d=16"
    decoder = conv_decoder()
    z = torch.randn(256, 16)
    _run(benchmark, make_provider(provider, decoder, "bernoulli"), z, baseline(decoder, "bernoulli"), rounds=5)


@pytest.mark.parametrize("provider", ["jacfwd+einsum", "pygeo", "pygeo-vmap"])
def test_categorical_metric(benchmark, provider):
    benchmark.group = "categorical decoder, C=256, 784 pixels, B=8, d=16"
    decoder = categorical_decoder()
    z = torch.randn(8, 16)
    _run(benchmark, make_provider(provider, decoder, "categorical"), z, baseline(decoder, "categorical"), rounds=3)


@pytest.mark.parametrize("provider", ["CxC-einsum", "pygeo-gram"])
def test_categorical_reduction(benchmark, provider):
    """The reduction alone, from logits [B, 784, 256] and their tangents Jt [B, d, 784 * 256]."""
    benchmark.group = "categorical reduction, C=256, 784 pixels, B=8, d=16"
    torch.manual_seed(0)
    B, P, C, d = 8, 784, 256, 16
    logits = torch.randn(B, P, C)
    Jt = torch.randn(B, d, P * C)
    metric = pygeo.PullbackMetric(categorical_decoder(), "categorical")
    metric._categories = C
    rows = logits.reshape(B, -1)

    def einsum(rows, Jt):
        p = torch.softmax(rows.reshape(B, P, C), -1)
        fisher = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        J = Jt.reshape(B, d, P, C)
        return torch.einsum("bipc,bpce,bjpe->bij", J, fisher, J)

    fn = einsum if provider == "CxC-einsum" else metric._gram
    G = fn(rows, Jt)
    expected = einsum(rows, Jt)
    torch.testing.assert_close(G, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    benchmark.pedantic(lambda: fn(rows, Jt), rounds=3, iterations=1, warmup_rounds=1)


_MEASURE = """
import json, sys, torch
sys.path.insert(0, {bench!r})
from bench_conv import {decoder}, make_provider


def status(field):  # kB from /proc/self/status
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


decoder = {decoder}({d})
z = torch.randn({B}, {d})
fn = make_provider({provider!r}, decoder, {likelihood!r})
with torch.no_grad():
    fn(z[:2])  # import and first-call costs out of the way
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current one
    before = status("VmRSS")
    fn(z)
    peak = status("VmHWM")
print(json.dumps((peak - before) / 1024))
"""


def peak_megabytes(decoder, d, B, provider, likelihood):
    code = _MEASURE.format(bench=os.path.dirname(os.path.abspath(__file__)), decoder=decoder, d=d, B=B,
                           provider=provider, likelihood=likelihood)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory():
    rows = [("rgb_decoder 3x64x64, bernoulli, d=64", provider, B,
             peak_megabytes("rgb_decoder", 64, B, provider, "bernoulli"))
            for provider, sizes in (("pygeo", (256, 1024, 4096)), ("jacfwd+einsum", (256, 512)))
            for B in sizes]
    rows += [("categorical C=256 x 784, d=16", provider, 8, peak_megabytes("categorical_decoder", 16, 8, provider,
                                                                           "categorical"))
             for provider in ("pygeo", "jacfwd+einsum")]
    print("\npeak extra resident memory of one metric call (MB), each in a fresh process")
    for case, provider, B, megabytes in rows:
        print(f"  {case:<40} {provider:<15} B={B:<5} {megabytes:10.1f}")
