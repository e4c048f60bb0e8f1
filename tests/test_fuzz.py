"""Fuzz every public op and the metric contract on random shapes, dtypes and values, extreme ones included (issue 14).

Each example asserts: the call returns or refuses with a ValueError / TypeError (nothing else escapes); a result from
finite inputs holds no NaN or Inf; and the torch and cpp backends agree, both refusing or both returning values equal
to a tolerance of the dtype (relative to the result's magnitude); the ensembles are also held to the mean of their
members (label "members": single-member mlp_metric calls, the members' own metrics). Triton is left out: its interpreter is too slow to
fuzz on the CPU (its kernels are compared with the reference in the op tests).

Bounded for CI: deadline=None, derandomize=True (the same examples every run), max_examples so that the file runs in
well under 30 s on one core (8 s for its 14 tests on the shared 2-core machine, 2026-12-07).

A campaign: PYGEO_FUZZ_EXAMPLES=N runs N randomised examples per op test (the slower contract tests run the same
fraction of N as of the CI count: 25/40 and 15/40), from the seed PYGEO_FUZZ_SEED (drawn at random when unset and
printed in the test session's header line "fuzz: ..."), so that a failure reproduces with the same two variables;
hypothesis also prints the falsifying example and a @reproduce_failure blob.

Campaign of 2026-12-04 (bench/RESULTS.md, "Dispatch, import time and the fuzz campaign"): 143,051 randomised cases
over the ops and the metric contract with fixes in between (a tolerance that ignored dropped terms' coefficients;
FunctionMetric's NaN gradient of a denormal G; langevin_step's target residual in every kernel; the LSE Kahler vjp's
0 * inf; the latent metric with every exponent -inf at lam = 0). Its open finding F4 (mlp_metric float32, weights
1e20, silu, C++ against torch 2.75e-8) no longer reproduces: run B's seed 1133959761 at N = 8000 passes all 8,000
mlp cases (run B stopped at its 1,247th); the fix that matches it is commit 9930723's (the C++ float exp flushes
below -87 instead of clamping: SiLU slopes of 1e-25 where torch has 0).

Campaign of 2026-12-07 (bench/RESULTS.md, "Fuzz campaign at scale"), after adding mlp_ensemble_metric,
PullbackMetric's categorical / poisson likelihoods and EnsembleMetric here. Findings, each fixed at its root with a
test that failed first:
- PullbackMetric categorical at B = 0: a RuntimeError from reshape(0, -1, C) (metrics/pullback.py;
  test_pullback_likelihoods.py::test_empty_batch; @example);
- PullbackMetric / EnsembleMetric log_volume_and_grad: a finite log-volume with a NaN gradient at a denormal G (a
  saturated tanh decoder), where every other metric refuses; their overrides now refuse the lost gradient too
  (test_bad_inputs.py; @example);
- the ensemble mean summed the members before dividing by M: finite members whose sum overflows were refused by
  mlp_ensemble_metric and gave G = inf on EnsembleMetric's member-by-member path; now sum_m (G_m / M) on every path
  (csrc/cpu/mlp_metric.cpp, reference, EnsembleMetric; test_mlp_ensemble_metric.py). Found by reading the mean forms
  against this file's "members" cross-check, not by a random case (the band of G_m it needs is narrow).
The run after the last fix: 110,000 randomised cases (13 tests, one process at a time, 1,251 s), 0 crashes, 0 NaN / Inf
from finite input, 0 disagreements beyond the tolerances, and a second one of 63,900 cases (660 s) just as clean; per
test cases and seeds in bench/RESULTS.md.

test_fuzz_manifold_statistics (2026-12-07, issue 25) runs the statistics ops (log_map, parallel_transport,
frechet_mean, tangent_pca, wrapped_normal, geodesic_kmedoids, brownian_motion) on the half-plane, a flat embedding and
a Bernoulli MLP; its finding F10 (log_map's .points NaN where the best velocity's path leaves the domain of a saturated
float32 decoder) is fixed in geometry/logmap.py (@example). After the fix, 1,200 cases with the seed that found it
(2512, N = 8000) were clean (bench/RESULTS.md, "Quasi-Newton Karcher flow ...").

Tolerances: the dtype's (TOLERANCE) relative to the result's magnitude, times the problem's condition number where
the output goes through an exponent (exponent_condition) or through G^-1 (the log-volume gradient: cond(G)), plus
the terms a kernel may drop as negligible (NEGLIGIBLE, dropped_terms_allowance) and tiny / eps near zero.
"""
import contextlib
import dataclasses
import math
import os
import random as _random
import warnings

import pytest
import torch
import hypothesis
from hypothesis import HealthCheck, example, given, settings, strategies as st

import pygeo
from pygeo import _backend
from pygeo.metrics import RHVAEMetric

BACKENDS = [name for name in ("torch", "cpp") if _backend.status(name).available]
SCALES = [0.0, 1e-30, 1e-6, 1e-2, 1.0, 10.0, 1e3, 1e8, 1e20, 1e40]
TOLERANCE = {torch.float32: 2e-3, torch.float64: 1e-9, torch.complex64: 2e-3, torch.complex128: 1e-9}
# The C++ kernels drop exponential weights below (log of the smallest normal) + 30 relative to the largest one
# (csrc/common/simd.h, negligible_below): terms that small, relative to the call's largest output, may differ.
NEGLIGIBLE = {torch.float32: math.exp(math.log(torch.finfo(torch.float32).tiny) + 31),
              torch.float64: math.exp(math.log(torch.finfo(torch.float64).tiny) + 31)}



def _campaign_examples():
    """PYGEO_FUZZ_EXAMPLES as a positive int, or None (unset or empty: the bounded CI run)."""
    text = os.environ.get("PYGEO_FUZZ_EXAMPLES", "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"PYGEO_FUZZ_EXAMPLES={text!r}: expected a positive number of examples per test")
    return value


CAMPAIGN_EXAMPLES = _campaign_examples()
FUZZ_SEED = (int(os.environ.get("PYGEO_FUZZ_SEED") or _random.SystemRandom().randrange(2**32))
             if CAMPAIGN_EXAMPLES else None)


def fuzz_settings(ci_examples: int):
    """CI: ci_examples derandomised examples. Campaign: CAMPAIGN_EXAMPLES * ci_examples / 40, seeded by FUZZ_SEED."""
    if CAMPAIGN_EXAMPLES is None:
        return settings(deadline=None, derandomize=True, max_examples=ci_examples, database=None,
                        suppress_health_check=[HealthCheck.too_slow])
    campaign = settings(deadline=None, derandomize=False, max_examples=max(1, CAMPAIGN_EXAMPLES * ci_examples // 40),
                        database=None, print_blob=True, suppress_health_check=list(HealthCheck))
    return lambda test: campaign(hypothesis.seed(FUZZ_SEED)(test))


FUZZ = fuzz_settings(40)


@pytest.fixture(autouse=True, scope="module")
def _announce_campaign(request):
    """The campaign's seed and size, on the terminal (a failure reproduces with the same two variables)."""
    if CAMPAIGN_EXAMPLES is not None:
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            print(f"\nfuzz: PYGEO_FUZZ_SEED={FUZZ_SEED} PYGEO_FUZZ_EXAMPLES={CAMPAIGN_EXAMPLES}", flush=True)
    yield

seeds = st.integers(0, 2**31 - 1)
scales = st.sampled_from(SCALES)
real_dtypes = st.sampled_from([torch.float32, torch.float64])
sizes = st.integers(0, 3)  # batch sizes, 0 included
dims = st.integers(1, 3)


def random(shape, seed, scale, dtype):
    """Normal draws times scale, cast to dtype (large scales overflow float32 to inf: not a finite input then)."""
    g = torch.Generator().manual_seed(seed)
    complex_ = dtype in (torch.complex64, torch.complex128)
    values = torch.randn(*shape, 2 if complex_ else 1, generator=g, dtype=torch.float64) * scale
    values = torch.complex(values[..., 0], values[..., 1]) if complex_ else values[..., 0]
    return values.to(dtype)


def finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, torch.Tensor))


def outcome(call):
    """('ok', tensors) or ('refused', the ValueError / TypeError); any other exception fails the example."""
    try:
        out = call()
    except (ValueError, TypeError) as error:
        assert str(error), "a refusal must say why"
        return "refused", error
    tensors = [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
    return "ok", tensors


def check(call_for_backend, inputs_finite: bool, backends=BACKENDS, condition: float = 1.0, absolute: float = 0.0):
    """Run call_for_backend(name) on each backend and assert the three properties; returns the outcomes.
    condition: the problem's condition number (the tolerance is the dtype's times it); absolute: a further allowance
    the problem justifies (terms a kernel may drop)."""
    results = {name: outcome(lambda: call_for_backend(name)) for name in backends}
    kinds = {name: kind for name, (kind, _) in results.items()}
    assert len(set(kinds.values())) == 1, f"backends disagree: {kinds} ({[r[1] for r in results.values()]})"
    kind, first = next(iter(results.values()))
    if kind == "refused":
        return results
    if inputs_finite:
        for name, (_, tensors) in results.items():
            for t in tensors:
                assert finite(t), f"{name}: NaN/Inf out of finite input"
    finite_magnitudes = [float(t.abs().max()) for t in first if t.numel() and t.dtype != torch.bool]
    largest = max([m for m in finite_magnitudes if math.isfinite(m)], default=0.0)
    for name, (_, tensors) in list(results.items())[1:]:
        for a, b in zip(first, tensors):
            assert a.shape == b.shape and a.dtype == b.dtype
            if a.numel() == 0 or a.dtype == torch.bool:
                continue
            magnitude = max(float(a.abs().max()), float(b.abs().max()))
            if not math.isfinite(magnitude):
                continue
            # Relative to the result's magnitude; values within tiny / eps of zero (where the kernels flush or clamp
            # underflowing exponentials) count as equal.
            real = a.real.dtype if a.is_complex() else a.dtype
            tol = (TOLERANCE[a.dtype] * condition * magnitude + torch.finfo(real).tiny / torch.finfo(real).eps
                   + NEGLIGIBLE[real] * condition * largest + absolute)
            difference = float((a - b).abs().max())
            assert difference <= tol, f"{name} differs from {BACKENDS[0]} by {difference:.3g} (tol {tol:.3g})"
    return results


@FUZZ
@given(seed=seeds, scale=scales, dtype=real_dtypes, B=sizes, D=st.integers(1, 5), d=dims, weighted=st.booleans())
def test_fuzz_jtj(seed, scale, dtype, B, D, d, weighted):
    J = random((B, D, d), seed, scale, dtype)
    weight = random((B, D), seed + 1, 1.0, dtype).abs() if weighted else None
    check(lambda b: pygeo.ops.jtj(J, weight, backend=b), finite(J, weight))


def exponent_condition(z, centroids, precisions, tau, rho):
    """1 + the largest |exponent| (z - c)^T M (z - c) / rho^2 + tau |z|^2: exp(e) carries a relative error of |e| eps,
    so backends that round e differently (the C++ kernel's passes use two algebraic forms of the quadratic) may
    differ by that much."""
    if not z.numel():
        return 1.0
    z64, c64 = z.double(), centroids.double()
    size = float(precisions.double().abs().amax())
    if precisions.dim() == 3:
        size *= precisions.shape[-1]
    distance = float(torch.cdist(z64, c64).max()) ** 2
    return 1.0 + size * distance / (rho if rho is not None else 0.5) ** 2 + tau * float((z64 * z64).sum(-1).max())


def dropped_terms_allowance(z, centroids, precisions, lam, tau, rho):
    """What the C++ latent-metric kernel may leave out: it sets exp(e_i - s) to 0 below NEGLIGIBLE (s the largest
    exponent of the point, the lam term's included), so every output may miss those terms. A term's weight is tiny
    relative to the largest weight, but its coefficient (|M_i| in G, |M_i| 2 |M_i (z - c_i)| / rho^2 in dG) can be far
    larger than the largest term's (lam): NEGLIGIBLE * largest output, the general allowance, underestimates it (fuzz
    campaign 2026-12-04: float64, one centroid with precision 1e8 at exponent -684 against lam = 0.01 gives a dG of
    3e-286 that the kernel returns as 0; relative to G that is 1e-284, a value no consumer of dG can tell from 0).
    Bound: the dropped terms' coefficient sum, times d ||G^-1|| for the log-volume and its gradient."""
    if not z.numel() or not finite(z):
        return 0.0
    from pygeo.ops.latent_metric import default_rho
    from pygeo.reference.latent_metric import _exponents, broadcast_metric
    z64, c64, p64 = z.double(), centroids.double(), precisions.double()
    try:
        rho = rho if rho is not None else default_rho(c64)
    except ValueError:  # the op refuses these centroids too
        return 0.0
    e, e0, s, Y = _exponents(z64, c64, p64, lam, tau, rho)
    size = p64.abs().flatten(1).amax(1) * (p64.shape[-1] if p64.dim() == 3 else 1)  # [N]: bounds |M_i|
    coefficient = size * (1 + 2 * Y.norm(dim=-1) / rho**2)  # [B, N]
    dropped = (e - s[:, None]) < math.log(NEGLIGIBLE[z.dtype])
    missing = (torch.exp(e) * coefficient * dropped).sum(-1)  # [B]
    if not bool(missing.gt(0).any()):
        return 0.0
    smallest = torch.linalg.eigvalsh(broadcast_metric(z64, c64, p64, lam, tau, rho))[:, 0]
    inverse_size = torch.where(smallest > 0, z.shape[-1] / smallest, torch.ones_like(smallest)).clamp_min(1.0)
    return float((missing * inverse_size).max())


def latent_problem(seed, scale, dtype, B, N, d, full, precision_scale):
    z = random((B, d), seed, scale, dtype)
    centroids = random((N, d), seed + 1, 1.0, dtype)
    if full:
        A = random((N, d, d), seed + 2, 1.0, torch.float64)
        precisions = (A @ A.mT / d + 0.3 * torch.eye(d, dtype=torch.float64)) * precision_scale
    else:
        precisions = (0.3 + random((N, d), seed + 2, 1.0, torch.float64).abs()) * precision_scale
    return z, centroids, precisions.to(dtype)


@FUZZ
@given(seed=seeds, scale=scales, dtype=real_dtypes, B=sizes, N=st.integers(1, 4), d=dims, full=st.booleans(),
       precision_scale=st.sampled_from([1e-8, 1.0, 1e8]), lam=st.sampled_from([0.0, 0.01, 10.0]),
       tau=st.sampled_from([0.0, 0.5]), rho=st.sampled_from([None, 0.01, 1.0, 100.0]))
@example(seed=1, scale=1.0, dtype=torch.float64, B=1, N=1, d=1, full=True, precision_scale=1e8, lam=0.01, tau=0.0,
         rho=100.0)  # campaign 2026-12-04: a dropped term of large coefficient (dropped_terms_allowance)
@example(seed=12072, scale=1e20, dtype=torch.float32, B=1, N=1, d=1, full=False, precision_scale=1.0, lam=0.0,
         tau=0.0, rho=0.01)  # campaign 2026-12-04: every exponent -inf with lam = 0, NaN out: now refused
def test_fuzz_latent_metric(seed, scale, dtype, B, N, d, full, precision_scale, lam, tau, rho):
    z, centroids, precisions = latent_problem(seed, scale, dtype, B, N, d, full, precision_scale)
    check(lambda b: pygeo.ops.latent_metric(z, centroids, precisions, lam, tau, rho, derivative=True, log_volume=True,
                                            backend=b), finite(z, centroids, precisions),
          condition=exponent_condition(z, centroids, precisions, tau, rho),
          absolute=dropped_terms_allowance(z, centroids, precisions, lam, tau, rho))


@FUZZ
@given(seed=seeds, scale=scales, dtype=real_dtypes, B=sizes, N=st.integers(1, 4), d=dims, full=st.booleans(),
       lam=st.sampled_from([0.0, 0.01, 1.0]), rhvae=st.booleans())
def test_fuzz_latent_metric_classes(seed, scale, dtype, B, N, d, full, lam, rhvae):
    z, centroids, precisions = latent_problem(seed, scale, dtype, B, N, d, full, 1.0)
    kind = RHVAEMetric if rhvae else pygeo.LatentMetric

    def contract(backend):
        metric = kind(centroids, precisions, lam=lam, rho=1.0, backend=backend)
        G, dG = metric.metric_and_derivative(z)
        return (metric.metric(z), G, dG, metric.log_volume(z), *metric.log_volume_and_grad(z),
                metric.inner(z, z, z))

    check(contract, finite(z), condition=exponent_condition(z, centroids, precisions, 0.0, 1.0))


@FUZZ
@given(seed=seeds, scale=scales, weight_scale=st.sampled_from([1e-20, 1.0, 1e3, 1e20]), dtype=real_dtypes, B=sizes,
       d=dims, hidden=st.integers(1, 6), D=st.integers(1, 8),
       activation=st.sampled_from(["tanh", "relu", "softplus", "sigmoid", "elu", "silu", "identity"]),
       likelihood=st.sampled_from(["euclidean", "gaussian", "bernoulli"]))
def test_fuzz_mlp_metric(seed, scale, weight_scale, dtype, B, d, hidden, D, activation, likelihood):
    z = random((B, d), seed, scale, dtype)
    weights = [random((hidden, d), seed + 1, weight_scale, dtype), random((D, hidden), seed + 2, 1.0, dtype)]
    biases = [random((hidden,), seed + 3, 1.0, dtype), None]
    sigma = 0.5 if likelihood == "gaussian" else None
    check(lambda b: pygeo.ops.mlp_metric(z, weights, biases, [activation, "identity"], likelihood=likelihood,
                                         sigma=sigma, backend=b), finite(z, *weights))


@FUZZ
@given(seed=seeds, scale=scales, weight_scale=st.sampled_from([1e-20, 1.0, 1e3, 1e20]), dtype=real_dtypes, B=sizes,
       d=dims, hidden=st.integers(1, 6), D=st.integers(1, 8), M=st.integers(1, 3),
       activation=st.sampled_from(["tanh", "relu", "softplus", "sigmoid", "elu", "silu", "identity"]),
       likelihood=st.sampled_from(["euclidean", "gaussian", "bernoulli"]))
def test_fuzz_mlp_ensemble_metric(seed, scale, weight_scale, dtype, B, d, hidden, D, M, activation, likelihood):
    """The fused ensemble op on both backends, and (label "members") the mean of M single-member mlp_metric calls on
    the first backend: the same metric, so the same outcome (both refuse or both agree)."""
    z = random((B, d), seed, scale, dtype)
    weights = [random((M, hidden, d), seed + 1, weight_scale, dtype), random((M, D, hidden), seed + 2, 1.0, dtype)]
    biases = [random((M, hidden), seed + 3, 1.0, dtype), None]
    activations = [activation, "identity"]
    options = dict(likelihood=likelihood, sigma=0.5 if likelihood == "gaussian" else None)

    def call(label):
        if label == "members":
            return sum(pygeo.ops.mlp_metric(z, [W[m] for W in weights], [biases[0][m], None], activations,
                                            backend=BACKENDS[0], **options) / M for m in range(M))
        return pygeo.ops.mlp_ensemble_metric(z, weights, biases, activations, backend=label, **options)

    check(call, finite(z, *weights, biases[0]), backends=BACKENDS + ["members"])


@FUZZ
@given(seed=seeds, scale=scales, dtype=st.sampled_from([torch.complex64, torch.complex128]), B=sizes,
       K=st.integers(1, 4), n=dims, diagonal=st.booleans(), temperature=st.sampled_from([1e-3, 0.1, 1.0, 100.0]))
def test_fuzz_lse_kahler_metric(seed, scale, dtype, B, K, n, diagonal, temperature):
    real = torch.float32 if dtype == torch.complex64 else torch.float64
    z = random((B, n), seed, scale, dtype)
    centers = random((K, n), seed + 1, 1.0, dtype)
    if diagonal:
        precisions = 0.3 + random((K, n), seed + 2, 1.0, real).abs()
    else:
        A = random((K, n, n), seed + 2, 1.0, torch.complex128)
        precisions = (A @ A.mH / n + 0.3 * torch.eye(n, dtype=torch.complex128)).to(dtype)
    log_weights = random((K,), seed + 3, 1.0, real)
    check(lambda b: pygeo.ops.lse_kahler_metric(z, centers, precisions, log_weights, temperature, with_log_det=True,
                                                backend=b), finite(z))


@FUZZ
@given(seed=seeds, scale=scales, derivative_scale=st.sampled_from([0.0, 1.0, 1e6]), dtype=real_dtypes, B=sizes,
       d=dims, condition=st.sampled_from([1.0, 1e3, 1e12]))
def test_fuzz_christoffel(seed, scale, derivative_scale, dtype, B, d, condition):
    A = torch.linalg.qr(random((B, d, d), seed, 1.0, torch.float64))[0]
    spectrum = torch.logspace(0, math.log10(condition), d, dtype=torch.float64)
    G = (scale * (A * spectrum[..., None, :]) @ A.mT).to(dtype)
    dG = random((B, d, d, d), seed + 1, derivative_scale * scale, dtype)
    check(lambda b: pygeo.ops.christoffel(G, dG, backend=b), finite(G, dG), condition=condition)


@FUZZ
@given(seed=seeds, scale=scales, dtype=real_dtypes, B=sizes, d=dims, step=st.sampled_from([1e-8, 0.01, 1.0, 1e4]),
       with_derivative=st.booleans())
@example(seed=0, scale=1e8, dtype=torch.float32, B=1, d=1, step=1e-8, with_derivative=False)  # campaign 2026-12-04
def test_fuzz_langevin_step(seed, scale, dtype, B, d, step, with_derivative):
    z = random((B, d), seed, scale, dtype)
    A = random((B, d, d), seed + 1, 1.0, torch.float64)
    G = (A @ A.mT + 0.1 * torch.eye(d, dtype=torch.float64)).to(dtype)
    grad = random((B, d), seed + 2, scale, dtype)
    noise = random((B, d), seed + 3, 1.0, dtype)
    dG = random((B, d, d, d), seed + 4, 1.0, dtype) if with_derivative else None
    check(lambda b: pygeo.ops.langevin_step(z, G, grad, step, noise, dG=dG, target=z, backend=b), finite(z, grad, dG))


@fuzz_settings(25)
@given(seed=seeds, scale=scales, weight_scale=st.sampled_from([1e-3, 1.0, 1e3]), dtype=real_dtypes, B=sizes, d=dims,
       likelihood=st.sampled_from(["euclidean", "gaussian", "bernoulli"]), mlp=st.booleans())
@example(seed=0, scale=10.0, weight_scale=0.001, dtype=torch.float64, B=1, d=3, likelihood="euclidean", mlp=False)
def test_fuzz_pullback_and_function_metrics(seed, scale, weight_scale, dtype, B, d, likelihood, mlp):
    """The contract of PullbackMetric (the fused MLP path and a generic decoder) and FunctionMetric."""
    z = random((B, d), seed, scale, dtype)
    torch.manual_seed(seed)
    decoder = torch.nn.Sequential(torch.nn.Linear(d, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).to(dtype)
    with torch.no_grad():
        decoder[0].weight.mul_(weight_scale)
    if not mlp:  # a callable that is not an nn.Sequential: the generic autograd path
        decoder = (lambda module: lambda x: module(x))(decoder)

    def contract(backend):
        metric = pygeo.PullbackMetric(decoder, likelihood=likelihood, sigma=0.5 if likelihood == "gaussian" else None,
                                      backend=backend)
        G, dG = metric.metric_and_derivative(z)
        return (metric.metric(z), G, dG, *metric.log_volume_and_grad(z), metric.inner(z, z, z))

    condition = 1.0
    if z.numel() and finite(z):  # the log-volume gradient goes through G^-1: its error grows with G's condition
        try:
            G = pygeo.PullbackMetric(decoder, likelihood=likelihood, sigma=0.5 if likelihood == "gaussian" else None,
                                     backend="torch").metric(z).double()
            condition = float(torch.linalg.cond(G).max()) if finite(G) else 1.0
        except ValueError:
            pass
    check(contract, finite(z), condition=min(condition, 1e30) if math.isfinite(condition) else 1e30)
    function = pygeo.FunctionMetric(lambda x: torch.eye(x.shape[-1], dtype=x.dtype) * torch.exp(-(x * x).sum(-1))[..., None, None])
    check(lambda _: (function.metric(z), *function.metric_and_derivative(z), *function.log_volume_and_grad(z)),
          finite(z), backends=["torch"])


def pullback_decoder(seed, d, likelihood, C, dtype, weight_scale, kind):
    """A small decoder for the categorical (logits [B, P, C] or [B, C]) and poisson (log-rates) likelihoods:
    "mlp" an nn.Sequential of Linear / activations (the fused MLP / tangent-rows path), "positions" the same with an
    Unflatten to [B, 2, C] (several categorical distributions per point), "callable" a plain function around it (the
    generic vmap(jvp) path)."""
    torch.manual_seed(seed)
    outputs = 2 * C if kind == "positions" else C
    layers = [torch.nn.Linear(d, 5), torch.nn.Tanh() if seed % 2 else torch.nn.Softplus(), torch.nn.Linear(5, outputs)]
    if kind == "positions":
        layers.append(torch.nn.Unflatten(1, (2, C)))
    decoder = torch.nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        decoder[0].weight.mul_(weight_scale)
    if kind == "callable":
        decoder = (lambda module: lambda x: module(x))(decoder)
    return decoder


def metric_condition(metric_for_torch, z):
    """The condition number of G at z (1 where G is not available): the log-volume gradient goes through G^-1, so
    its rounding error grows with it (the same argument as in test_fuzz_pullback_and_function_metrics)."""
    if not (z.numel() and finite(z)):
        return 1.0
    try:
        G = metric_for_torch().metric(z).detach().double()
    except ValueError:
        return 1.0
    if not finite(G):
        return 1.0
    condition = float(torch.linalg.cond(G).max())
    return min(condition, 1e30) if math.isfinite(condition) else 1e30


def contract_outputs(metric, z):
    """Every output of the metric contract, the flat coordinates included where the metric has them."""
    G, dG = metric.metric_and_derivative(z)
    out = (metric.metric(z), G, dG, *metric.log_volume_and_grad(z), metric.inner(z, z, z))
    if getattr(metric, "has_flat_coordinates", False):
        out = out + (metric.flat_coordinates(z),)
    return out


@fuzz_settings(25)
@given(seed=seeds, scale=scales, weight_scale=st.sampled_from([1e-3, 1.0, 1e3]), dtype=real_dtypes, B=sizes, d=dims,
       likelihood=st.sampled_from(["categorical", "poisson"]), C=st.integers(2, 4),
       kind=st.sampled_from(["mlp", "positions", "callable"]))
@example(seed=0, scale=1.0, weight_scale=1.0, dtype=torch.float64, B=0, d=1, likelihood="categorical", C=2,
         kind="mlp")  # campaign 2026-12-07: B = 0, a RuntimeError from reshape(0, -1, C) (test_pullback_likelihoods.py)
def test_fuzz_pullback_categorical_and_poisson(seed, scale, weight_scale, dtype, B, d, likelihood, C, kind):
    """The contract of PullbackMetric with the categorical (logits, categories on the last dim) and poisson
    (log-rates) likelihoods, through the MLP's tangent-rows path and the generic one, flat coordinates included."""
    z = random((B, d), seed, scale, dtype)
    decoder = pullback_decoder(seed, d, likelihood, C, dtype, weight_scale, kind)

    def metric(backend):
        return pygeo.PullbackMetric(decoder, likelihood=likelihood, backend=backend)

    check(lambda backend: contract_outputs(metric(backend), z), finite(z),
          condition=metric_condition(lambda: metric("torch"), z))


@fuzz_settings(25)
@given(seed=seeds, scale=scales, weight_scale=st.sampled_from([1e-3, 1.0, 1e3]), dtype=real_dtypes, B=sizes, d=dims,
       M=st.integers(1, 3), likelihood=st.sampled_from(["euclidean", "gaussian", "bernoulli", "categorical", "poisson"]),
       kind=st.sampled_from(["mlp", "callable", "mixed"]))
@example(seed=1, scale=1000.0, weight_scale=1000.0, dtype=torch.float64, B=1, d=2, M=1, likelihood="euclidean",
         kind="mlp")  # campaign 2026-12-07: denormal G, NaN log-volume gradient: now refused (test_bad_inputs.py)
def test_fuzz_ensemble_metric(seed, scale, weight_scale, dtype, B, d, M, likelihood, kind):
    """The contract of EnsembleMetric over M PullbackMetrics (flat coordinates included): "mlp" members of one MLP
    architecture take the fused pygeo.ops.mlp_ensemble_metric path (euclidean, gaussian, bernoulli), "callable" and
    "mixed" (the last member a generic callable) the member-by-member path. On the first backend the ensemble's G is
    also checked against the mean of its members' G (label "members")."""
    z = random((B, d), seed, scale, dtype)
    decoders = [pullback_decoder(seed + 7 * m, d, likelihood, 3, dtype, weight_scale,
                                 "callable" if kind == "callable" or (kind == "mixed" and m == M - 1) else "mlp")
                for m in range(M)]
    sigma = 0.5 if likelihood == "gaussian" else None

    def ensemble(backend):
        return pygeo.metrics.EnsembleMetric([pygeo.PullbackMetric(decoder, likelihood=likelihood, sigma=sigma,
                                                                  backend=backend) for decoder in decoders])

    check(lambda backend: contract_outputs(ensemble(backend), z), finite(z),
          condition=metric_condition(lambda: ensemble("torch"), z))

    def metric_of(label):
        members = ensemble(BACKENDS[0]).metrics
        if label == "members":
            return sum(member.metric(z) / M for member in members)
        return pygeo.metrics.EnsembleMetric(members).metric(z)

    check(metric_of, finite(z), backends=["ensemble", "members"])


@fuzz_settings(25)
@given(seed=seeds, scale=st.sampled_from([0.0, 1e-6, 1.0, 10.0, 1e3, 1e8, 1e20]),
       dtype=st.sampled_from([torch.complex64, torch.complex128]), B=sizes, n=st.integers(1, 2),
       temperature=st.sampled_from([0.01, 1.0, 100.0]))
@example(seed=227, scale=1e20, dtype=torch.complex64, B=1, n=1, temperature=1.0)  # campaign 2026-12-04: 0 * inf
def test_fuzz_hermitian_metrics(seed, scale, dtype, B, n, temperature):
    """The contract of LSEKahlerMetric (both backends) and ComplexGaussianFisherMetric, metric_and_derivative included."""
    real = torch.float32 if dtype == torch.complex64 else torch.float64
    z = random((B, n), seed, scale, dtype)
    centers = random((3, n), seed + 1, 1.0, dtype)
    precisions = 0.3 + random((3, n), seed + 2, 1.0, real).abs()

    def contract(backend):
        metric = pygeo.LSEKahlerMetric(centers, precisions, temperature=temperature, backend=backend)
        G, dG = metric.metric_and_derivative(z)
        return (metric.metric(z), G, dG, *metric.log_volume_and_grad(z), metric.inner(z, z, z))

    check(contract, finite(z))
    W = random((4, n), seed + 3, 1.0, dtype)
    fisher = pygeo.ComplexGaussianFisherMetric(lambda x: torch.tanh(x @ W.T), sigma=0.5)
    check(lambda _: (fisher.metric(z), *fisher.metric_and_derivative(z), fisher.log_volume(z)) if z.numel()
          else (fisher.metric(z),), finite(z), backends=["torch"])


@fuzz_settings(15)
@given(seed=seeds, scale=st.sampled_from([1e-3, 1.0, 10.0, 1e3]), d=st.integers(1, 2), B=st.integers(1, 2),
       which=st.sampled_from(["latent", "rhvae", "function", "pullback"]))
def test_fuzz_christoffel_and_curvature_of_metrics(seed, scale, d, B, which):
    """pygeo.christoffel and pygeo.curvature over the metric classes (float64: curvature differentiates twice)."""
    dtype = torch.float64
    z = random((B, d), seed, scale, dtype)
    if which in ("latent", "rhvae"):
        _, centroids, precisions = latent_problem(seed, 1.0, dtype, 1, 3, d, True, 1.0)
        kind = RHVAEMetric if which == "rhvae" else pygeo.LatentMetric
        metric = kind(centroids, precisions, lam=0.1, rho=1.0)
    elif which == "function":
        metric = pygeo.FunctionMetric(lambda x: torch.eye(x.shape[-1], dtype=x.dtype) * (1 + (x * x).sum(-1))[..., None, None])
    else:
        torch.manual_seed(seed)
        metric = pygeo.PullbackMetric(torch.nn.Sequential(torch.nn.Linear(d, 4), torch.nn.Tanh(),
                                                          torch.nn.Linear(4, 3)).double())
    for backend in BACKENDS:
        kind, out = outcome(lambda: (pygeo.christoffel(metric, z, backend=backend),
                                     pygeo.curvature(metric, z, backend=backend).scalar))
        if kind == "ok":
            assert all(finite(t) for t in out), f"{which} {backend}: NaN/Inf out of finite input"



class _HalfPlane(pygeo.FunctionMetric):
    """G = I / y^2 on y > 0 (d = 2), with in_domain: points below the axis must be refused, not integrated."""

    def __init__(self):
        super().__init__(lambda z: torch.eye(2, dtype=z.dtype) / z[..., 1, None, None] ** 2, dim=2)

    def in_domain(self, z):
        return z[..., 1] > 0


def _manifold_metric(kind: str, d: int, seed: int, weight_scale: float, dtype):
    """(metric, d): the half-plane (d = 2), a linear embedding (flat), or a small Bernoulli MLP pullback."""
    if kind == "half-plane":
        return _HalfPlane(), 2
    torch.manual_seed(seed)
    if kind == "flat":
        decoder = torch.nn.Linear(d, d + 1)
    else:
        decoder = torch.nn.Sequential(torch.nn.Linear(d, 6), torch.nn.Softplus(), torch.nn.Linear(6, 5))
    decoder = decoder.to(dtype)
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.mul_(weight_scale)
            parameter.requires_grad_(False)
    return pygeo.PullbackMetric(decoder, likelihood="euclidean" if kind == "flat" else "bernoulli"), d


def _fields(result):
    """The tensors of a result dataclass, or the tensor itself."""
    if isinstance(result, torch.Tensor):
        return [result]
    if dataclasses.is_dataclass(result):  # its declared fields (not the internal attributes some solvers attach)
        values = [getattr(result, field.name) for field in dataclasses.fields(result)]
    else:
        values = list(result)  # named tuples
    return [value for value in values if isinstance(value, torch.Tensor)]


@fuzz_settings(6)
@example(seed=0, scale=1.0, weight_scale=1.0, dtype=torch.float64, B=2, d=2, kind="half-plane", op="frechet_mean")
@example(seed=1, scale=10.0, weight_scale=1.0, dtype=torch.float32, B=2, d=2, kind="mlp", op="log_map")
@example(seed=2825, scale=10.0, weight_scale=30.0, dtype=torch.float32, B=1, d=2, kind="mlp", op="log_map")  # F10
@given(seed=seeds, scale=st.sampled_from([0.0, 1e-6, 0.3, 1.0, 10.0, 1e3]),
       weight_scale=st.sampled_from([1e-3, 1.0, 30.0]), dtype=real_dtypes, B=st.integers(1, 3), d=st.integers(1, 2),
       kind=st.sampled_from(["half-plane", "flat", "mlp"]),
       op=st.sampled_from(["log_map", "parallel_transport", "frechet_mean", "tangent_pca", "wrapped_normal",
                           "geodesic_kmedoids", "brownian_motion"]))
def test_fuzz_manifold_statistics(seed, scale, weight_scale, dtype, B, d, kind, op):
    """The statistics ops (issue 25) on random points, extreme ones included (points outside the half-plane,
    saturated decoders whose G is singular): each returns or refuses with a ValueError / TypeError, and what it
    returns from finite input is finite (log maps that do not converge say so in .converged, with their best finite
    v; Brownian paths that escape are flagged). Iteration counts are cut so that an example takes well under a
    second; convergence itself is tested in test_log_map.py and test_statistics.py."""
    metric, d = _manifold_metric(kind, d, seed, weight_scale, dtype)
    z0, z1, v = (random((B, d), seed + k, scale, dtype) for k in range(3))
    if not finite(z0, z1, v):
        return
    statistics, quick = pygeo.statistics, dict(max_iter=3, energy_max_iter=20)
    calls = {
        "log_map": lambda: pygeo.log_map(metric, z0, z1, return_result=True, **quick),
        "parallel_transport": lambda: pygeo.parallel_transport(metric, z0, z1, v, **quick),
        "frechet_mean": lambda: statistics.frechet_mean(metric, z1, weights=z0[:, 0].abs(), max_iter=2,
                                                        energy_max_iter=20),
        "tangent_pca": lambda: statistics.tangent_pca(metric, z1, n_components=max(1, d - 1), mean=z0[0]),
        "wrapped_normal": lambda: statistics.wrapped_normal(metric, z0[0], torch.diag(v[0] * v[0]), 3, seed=seed),
        "geodesic_kmedoids": lambda: pygeo.cluster.geodesic_kmedoids(metric, z1, k=min(2, B), seed=seed,
                                                                     progress=False),
        "brownian_motion": lambda: pygeo.sample.brownian_motion(metric, z0[0], t=0.1, n_steps=4, n_paths=3,
                                                                seed=seed, progress=False),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not converge" warnings: what is checked here is the returned values
        try:
            result = calls[op]()
        except (ValueError, TypeError) as error:
            assert str(error), "a refusal must say why"
            result = None
    hypothesis.event(f"{op}: {'refused' if result is None else 'ok'}")  # --hypothesis-show-statistics
    if result is not None and op == "log_map":  # the documented flag: residual +inf where the path left the domain
        assert bool(torch.isfinite(result.residual[result.converged]).all())
        assert not bool(torch.isnan(result.residual).any())
        result.residual = result.residual.nan_to_num(posinf=0.0)
    if result is not None:
        for t in _fields(result):
            if t.dtype != torch.bool and t.is_floating_point():
                assert finite(t), f"{op} on {kind}: NaN/Inf out of finite input"


def test_fuzz_bad_arguments_are_refused_clearly():
    """Wrong types, ranks and dtypes at every op: a ValueError or TypeError, nothing else."""
    z = torch.zeros(2, 2)
    calls = [
        lambda: pygeo.ops.jtj(torch.zeros(2, 3, dtype=torch.long)),
        lambda: pygeo.ops.jtj(torch.tensor(1.0)),
        lambda: pygeo.ops.latent_metric(torch.tensor(1.0), torch.zeros(2, 2), torch.ones(2, 2)),
        lambda: pygeo.ops.latent_metric(z, torch.zeros(2, 2), torch.ones(2, 3)),
        lambda: pygeo.ops.latent_metric(z.double(), torch.zeros(2, 2), torch.ones(2, 2)),
        lambda: pygeo.ops.mlp_metric(torch.tensor(1.0), [torch.zeros(3, 2)], [None], ["tanh"]),
        lambda: pygeo.ops.mlp_metric(z, [torch.zeros(3, 5)], [None], ["tanh"]),
        lambda: pygeo.ops.lse_kahler_metric(z, torch.zeros(2, 2, dtype=torch.complex64), torch.ones(2, 2)),
        lambda: pygeo.ops.lse_kahler_metric(torch.tensor(1j), torch.zeros(2, 2, dtype=torch.complex64), torch.ones(2, 2)),
        lambda: pygeo.ops.christoffel(torch.eye(2), torch.zeros(2, 2)),
        lambda: pygeo.ops.christoffel(torch.tensor(1.0), torch.zeros(1, 1, 1)),
        lambda: pygeo.ops.langevin_step(z, torch.eye(2).expand(2, 2, 2), z, "auto", z),
        lambda: pygeo.ops.langevin_step(z, torch.eye(3).expand(2, 3, 3), z, 0.1, z),
        lambda: pygeo.LatentMetric(torch.zeros(2, 2), torch.ones(2, 2), rho=1.0).metric(torch.tensor(1.0)),
        lambda: pygeo.LatentMetric(torch.zeros(2, 2), torch.ones(2, 2), rho=1.0).log_volume_and_grad(z.long()),
        lambda: pygeo.christoffel(pygeo.LatentMetric(torch.zeros(2, 2), torch.ones(2, 2), rho=1.0), torch.tensor(1.0)),
        lambda: pygeo.curvature(pygeo.LatentMetric(torch.zeros(2, 2), torch.ones(2, 2), rho=1.0), torch.zeros(2, 3)),
    ]
    for index, call in enumerate(calls):
        with pytest.raises((ValueError, TypeError)):
            call()
