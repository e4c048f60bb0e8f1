"""Log maps and Frechet means on the demo's 2-D latent (issue 25): pygeo against geomstats 2.8 on the same decoder
metric, log maps against geodesic_distances on the same pairs, and the Frechet mean of 2,000 codes.

Setting: the VAE of `python -m pygeo demo` (bench/distance_setting.py: 20 epochs on the 5,000 shipped digits, seed 0,
cached), its Bernoulli pullback metric on a float64 copy of the decoder, encoded digits.
Providers (side by side in one run):
  pygeo log_map          pygeo.log_map (9-point Gauss-Newton curve, then Newton on the RK4 shooting residual, 32 steps)
  geodesic_distances     pygeo.geodesic_distances(x, y) on the same pairs, as a matrix row by row is not the same
                         work: here the B pairs are the diagonal, solved as B separate pairs (x[i], y[i]) by the
                         energy solver's Gauss-Newton (distances_module._solve on straight-line starts), which is
                         what geodesic_distances does per pair
  geomstats              geomstats 2.8 (pytorch backend) PullbackMetric of an ImmersedSet whose immersion is pygeo's
                         flat coordinates phi (so that G = J_phi^T J_phi is pygeo's G), exp by its RK4 integrator
                         with 32 steps (the same integrator as pygeo's), log by its LogShootingSolver (scipy L-BFGS-B
                         with autodiff gradients); FrechetMean by its default gradient descent. geomstats is slow:
                         it runs on a subset (--geomstats-pairs, --geomstats-points) and its time is scaled to the
                         full size per pair / per point (stated in the output).
Accuracy: the log maps' shooting residual |exp_map(z0, v) - z1| / |z1 - z0| with pygeo's exp_map (32 RK4 steps), for
both libraries; the Frechet means' gradient norm |mean of log_m(x_i)|_G(m) with pygeo's log maps.

Run: cd bench && python -m pytest bench_statistics.py        (small sizes; geomstats where installed), or the table:
     python bench_statistics.py [--pairs 1000] [--points 200] [--codes 2000] [--geomstats-pairs 10]
     [--geomstats-points 20] [--skip pairs,points,codes,geomstats] [--baseline REV [--baseline-points-iterations 100]
     [--baseline-codes-iterations 1]]
--baseline REV times the log map and the Frechet mean of an earlier git revision too (its pygeo/geometry/logmap.py,
_rates.py and pygeo/statistics.py, loaded beside the working tree's), each run right before the current one on the
same data (before/after in one process, interleaved); on the codes its Karcher flow is cut after
--baseline-codes-iterations iterations (the earlier flow is slow: a lower bound on its time, stated in the output).
Every line gives wall and CPU (process) time: on a shared machine the wall time overstates the cost.
geomstats is not a dependency: `python -m pip install "geomstats==2.8.*" torch==2.13.0` (the `compare` extra).
"""
from __future__ import annotations

import argparse
import copy
import math
import importlib.util
import os
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import pygeo
import pygeo.statistics as statistics
from pygeo.geometry import distances as distances_module
from pygeo.geometry.geodesic import _default_tol, _straight_lines

sys.path.insert(0, str(Path(__file__).parent))
from distance_setting import demo_setting  # noqa: E402

HAS_GEOMSTATS = importlib.util.find_spec("geomstats") is not None
REPOSITORY = Path(__file__).resolve().parent.parent


def baseline_modules(revision: str):
    """(log_map, frechet_mean) of an earlier git revision: its logmap.py, _rates.py and statistics.py loaded as
    modules of their own (pygeo.geometry._baseline_logmap, ...) over the current package's other modules."""
    import subprocess
    import tempfile

    def load(name, path, package):
        text = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=REPOSITORY, check=True, capture_output=True,
                              text=True).stdout
        folder = Path(tempfile.mkdtemp(prefix="pygeo-baseline-"))
        (folder / Path(path).name).write_text(text)
        spec = importlib.util.spec_from_file_location(name, folder / Path(path).name)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = package
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    rates = load("pygeo.geometry._baseline_rates", "pygeo/geometry/_rates.py", "pygeo.geometry")
    logmap = load("pygeo.geometry._baseline_logmap", "pygeo/geometry/logmap.py", "pygeo.geometry")
    if hasattr(rates, "integrate"):  # revisions before 8241399 integrated the log map's shots there
        logmap._integrate = rates.integrate
    stats = load("pygeo._baseline_statistics", "pygeo/statistics.py", "pygeo")
    for name in vars(stats).copy():  # what statistics.py imported from the current logmap: the revision's instead
        if name in vars(logmap) and getattr(stats, name) is getattr(sys.modules["pygeo.geometry.logmap"], name, None):
            setattr(stats, name, getattr(logmap, name))
    return logmap.log_map, stats.frechet_mean


def float64_setting(n_points: int):
    """(metric on a float64 copy of the demo decoder, latents [n_points, 2] float64)."""
    metric, latents = demo_setting(n_points)
    fine = copy.copy(metric)
    fine.decoder = copy.deepcopy(metric.decoder).double()
    fine._mlp = type(metric._mlp).recognise(fine.decoder) if metric._mlp is not None else None
    return fine, latents.double()


def pairs(latents: torch.Tensor, n_pairs: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randint(len(latents), (n_pairs,), generator=generator)
    b = (a + 1 + torch.randint(len(latents) - 1, (n_pairs,), generator=generator)) % len(latents)
    return latents[a].contiguous(), latents[b].contiguous()


def relative_residual(metric, z0, z1, v):
    end = pygeo.exp_map(metric, z0, v)
    return ((end - z1).norm(dim=-1) / (z1 - z0).norm(dim=-1).clamp_min(1e-300))


# --------------------------------------------------------------------------------------------------- providers
def pygeo_log_maps(metric, z0, z1):
    return pygeo.log_map(metric, z0, z1, return_result=True)


def pygeo_pair_distances(metric, z0, z1, n_points: int = 9):
    """The energy solver of geodesic_distances on the pairs (z0[k], z1[k]) from straight lines."""
    with torch.no_grad():
        curves = _straight_lines(z0, z1, n_points)
        return distances_module._solve(metric, curves, 300, _default_tol(z0.dtype, "energy"))[0]


def geomstats_space(metric):
    """A geomstats 2.8 ImmersedSet whose immersion is the metric's flat coordinates, equipped with its
    PullbackMetric, exp by RK4 with 32 steps."""
    os.environ.setdefault("GEOMSTATS_BACKEND", "pytorch")
    import numpy

    if not hasattr(numpy, "trapz"):  # geomstats 2.8 imports numpy.trapz, which NumPy 2.4 removed (trapezoid remains)
        numpy.trapz = numpy.trapezoid
    import geomstats.backend as gs

    gs.set_default_dtype("float64")  # the same precision as pygeo's float64 log maps (its default is float32)
    from geomstats.geometry.base import ImmersedSet
    from geomstats.geometry.euclidean import Euclidean
    from geomstats.geometry.pullback_metric import PullbackMetric
    from geomstats.numerics.geodesic import ExpODESolver
    from geomstats.numerics.ivp import GSIVPIntegrator

    D = metric.flat_coordinates(torch.zeros(1, 2, dtype=torch.float64)).shape[-1]

    class DecoderManifold(ImmersedSet):
        def __init__(self):
            super().__init__(dim=2, equip=False)

        def _define_embedding_space(self):
            return Euclidean(dim=D)

        def immersion(self, point):
            return metric.flat_coordinates(point)

    space = DecoderManifold()
    space.equip_with_metric(PullbackMetric)
    space.metric.exp_solver = ExpODESolver(space, integrator=GSIVPIntegrator(n_steps=32, step_type="rk4"))
    return space


def geomstats_log_maps(space, z0, z1):
    return space.metric.log(z1, z0)


def geomstats_frechet_mean(space, x, max_iter: int = 32):
    from geomstats.learning.frechet_mean import FrechetMean

    estimator = FrechetMean(space)
    estimator.set(max_iter=max_iter)
    estimator.fit(x)
    return estimator.estimate_


# ------------------------------------------------------------------------------------------------ pytest-benchmark
@pytest.fixture(scope="module")
def small_setting():
    metric, latents = float64_setting(60)
    return metric, pairs(latents, 50)


@pytest.mark.parametrize("provider", ["pygeo log_map", "geodesic_distances", "geomstats"])
def test_log_maps(benchmark, small_setting, provider):
    metric, (z0, z1) = small_setting
    if provider == "pygeo log_map":
        result = benchmark.pedantic(lambda: pygeo_log_maps(metric, z0, z1), rounds=2, iterations=1)
        assert bool(result.converged.all())
        benchmark.extra_info["max relative residual"] = float(relative_residual(metric, z0, z1, result.v).max())
    elif provider == "geodesic_distances":
        lengths = benchmark.pedantic(lambda: pygeo_pair_distances(metric, z0, z1), rounds=2, iterations=1)
        assert bool(torch.isfinite(lengths).all())
    else:
        if not HAS_GEOMSTATS:
            pytest.skip("geomstats not installed (pip install 'geomstats==2.8.*' torch==2.13.0)")
        space = geomstats_space(metric)
        v = benchmark.pedantic(lambda: geomstats_log_maps(space, z0[:5], z1[:5]), rounds=1, iterations=1)
        benchmark.extra_info["pairs"] = 5
        benchmark.extra_info["max relative residual"] = float(relative_residual(metric, z0[:5], z1[:5], v).max())


def test_frechet_mean(benchmark, small_setting):
    metric, (z0, _) = small_setting
    result = benchmark.pedantic(lambda: statistics.frechet_mean(metric, z0[:40]), rounds=1, iterations=1)
    assert result.converged
    benchmark.extra_info["iterations"] = result.n_iter


# ---------------------------------------------------------------------------------------------------- the table
CPU_SECONDS = []  # process CPU time of each _time call: on a shared machine wall time overstates the cost


def _time(fn):
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    CPU_SECONDS.append(time.process_time() - cpu)
    return time.perf_counter() - start, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--points", type=int, default=200, help="points of the Frechet-mean comparison")
    parser.add_argument("--codes", type=int, default=2000, help="codes of the large Frechet mean (float32, as the demo)")
    parser.add_argument("--geomstats-pairs", type=int, default=10)
    parser.add_argument("--geomstats-points", type=int, default=20)
    parser.add_argument("--skip", default="", help="comma-separated: pairs,points,codes,geomstats; pygeo skips pygeo's "
                        "own Frechet mean of --points (to time geomstats's alone)")
    parser.add_argument("--baseline", default=None, help="a git revision to time beside the working tree")
    parser.add_argument("--baseline-points-iterations", type=int, default=100,
                        help="max_iter of the baseline's float64 Frechet mean of --points (its default: 100)")
    parser.add_argument("--baseline-codes-iterations", type=int, default=1,
                        help="Karcher iterations of the baseline on the codes (a lower bound on its time)")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    print(f"torch threads: {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    metric, latents = float64_setting(max(args.points, 400))
    z0, z1 = pairs(latents, args.pairs)
    if args.baseline:
        baseline_log_map, baseline_frechet_mean = baseline_modules(args.baseline)
    space = None

    if "pairs" not in skip:
        print(f"\n## Log maps of {args.pairs} pairs (demo latent, Bernoulli pullback, float64)")
        if args.baseline:
            t_old, old = _time(lambda: baseline_log_map(metric, z0, z1, return_result=True))
            cpu_old = CPU_SECONDS[-1]
            residual = relative_residual(metric, z0, z1, old.v)
            print(f"baseline log_map:     {t_old:8.2f} s ({cpu_old:.2f} s CPU)  converged {int(old.converged.sum())}/"
                  f"{args.pairs}, relative residual median {float(residual.median()):.1e} max "
                  f"{float(residual.max()):.1e}, Newton iterations mean {float(old.iterations.double().mean()):.2f}")
        t_log, result = _time(lambda: pygeo_log_maps(metric, z0, z1))
        cpu_log = CPU_SECONDS[-1]
        residual = relative_residual(metric, z0, z1, result.v)
        print(f"pygeo log_map:        {t_log:8.2f} s ({cpu_log:.2f} s CPU)  converged {int(result.converged.sum())}/"
              f"{args.pairs}, relative residual median {float(residual.median()):.1e} max {float(residual.max()):.1e}, "
              f"iterations mean {float(result.iterations.double().mean()):.2f}")
        if args.baseline:
            print(f"speed-up over the baseline: {t_old / t_log:.2f}x wall, {cpu_old / cpu_log:.2f}x CPU; "
                  f"|v - v_baseline| / |v| max {float(((result.v - old.v).norm(dim=-1) / result.v.norm(dim=-1)).max()):.1e}")
        t_dist, lengths = _time(lambda: pygeo_pair_distances(metric, z0, z1))
        cpu_dist = CPU_SECONDS[-1]
        gap = (result.distance - lengths).abs() / lengths
        print(f"geodesic distances:   {t_dist:8.2f} s ({cpu_dist:.2f} s CPU)  (energy solver on the same pairs); log map / "
              f"distances time ratio {t_log / t_dist:.2f} wall, {cpu_log / cpu_dist:.2f} CPU"
              + (f" (baseline {t_old / t_dist:.2f} wall, {cpu_old / cpu_dist:.2f} CPU)" if args.baseline else "")
              + f"; |v|_G against its lengths: median {float(gap.median()):.1e}, max {float(gap.max()):.1e}")
        if HAS_GEOMSTATS and "geomstats" not in skip:
            space = geomstats_space(metric)
            k = args.geomstats_pairs
            print(f"geomstats 2.8 log of {k} pairs started {time.strftime('%H:%M:%S')} (if the run is stopped before it "
                  f"ends, the time from here is a lower bound)", flush=True)
            t_gs, v_gs = _time(lambda: geomstats_log_maps(space, z0[:k], z1[:k]))
            v_gs = torch.as_tensor(v_gs).reshape(k, 2).to(z0.dtype)
            residual_gs = relative_residual(metric, z0[:k], z1[:k], v_gs)
            scaled = t_gs / k * args.pairs
            print(f"geomstats 2.8 log:    {t_gs:8.2f} s ({CPU_SECONDS[-1]:.2f} s CPU) for {k} pairs -> {scaled:.0f} s for {args.pairs} (scaled per pair); "
                  f"relative residual median {float(residual_gs.median()):.1e} max {float(residual_gs.max()):.1e}; "
                  f"pygeo speed-up {scaled / t_log:.0f}x")

    if "points" not in skip:
        print(f"\n## Frechet mean of {args.points} points (float64)")
        x = latents[:args.points]
        if args.baseline:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # "did not converge": in the line below
                t_old, old = _time(lambda: baseline_frechet_mean(metric, x, max_iter=args.baseline_points_iterations))
            print(f"baseline frechet_mean: {t_old:8.2f} s ({CPU_SECONDS[-1]:.2f} s CPU)  converged {old.converged}, "
                  f"{old.n_iter} iterations, gradient norm {float(old.gradient_norm):.1e}, variance {float(old.variance):.6f}")
        t_mean = math.nan
        if "pygeo" not in skip:
            t_mean, mean = _time(lambda: statistics.frechet_mean(metric, x))
            print(f"pygeo frechet_mean:   {t_mean:8.2f} s ({CPU_SECONDS[-1]:.2f} s CPU)  converged {mean.converged}, "
                  f"{mean.n_iter} iterations, gradient norm {float(mean.gradient_norm):.1e}, variance "
                  f"{float(mean.variance):.6f}"
                  + (f"; |mean - baseline mean| {float((mean.mean - old.mean).norm()):.1e}" if args.baseline else ""))
        if HAS_GEOMSTATS and "geomstats" not in skip and args.geomstats_points > 0:
            space = space or geomstats_space(metric)
            k = args.geomstats_points
            print(f"geomstats FrechetMean of {k} points started {time.strftime('%H:%M:%S')} (if the run is stopped "
                  f"before it ends, the time from here is a lower bound)", flush=True)
            t_gs, m_gs = _time(lambda: geomstats_frechet_mean(space, x[:k]))
            cpu_gs = CPU_SECONDS[-1]
            m_gs = torch.as_tensor(m_gs).reshape(2).to(x.dtype)
            small = statistics.frechet_mean(metric, x[:k])
            logs = pygeo.log_map(metric, m_gs, x[:k])
            G = metric.metric(m_gs[None])[0]
            g = logs.mean(0)
            scaled = t_gs / k * args.points
            print(f"geomstats FrechetMean: {t_gs:8.2f} s ({cpu_gs:.2f} s CPU) for {k} points -> {scaled:.0f} s for {args.points} (scaled per "
                  f"point); its gradient norm {float((g @ G @ g).sqrt()):.1e} (pygeo on the same {k}: "
                  f"{float(small.gradient_norm):.1e}, |mean difference| {float((small.mean - m_gs).norm()):.1e}); "
                  f"pygeo speed-up {scaled / t_mean:.0f}x")

    if "codes" not in skip:
        print(f"\n## Frechet mean of {args.codes} codes (float32, the demo's metric)")
        metric32, codes = demo_setting(args.codes)
        if args.baseline:
            k = args.baseline_codes_iterations
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # cut short: "did not converge"
                t_old, old = _time(lambda: baseline_frechet_mean(metric32, codes, max_iter=k))
            extent = (f"converged in {old.n_iter} iterations" if old.converged else
                      f"for its first {old.n_iter} iteration(s) (cut at max_iter={k}: a lower bound)")
            print(f"baseline frechet_mean: {t_old:8.2f} s wall, {CPU_SECONDS[-1]:.2f} s CPU {extent}, gradient norm "
                  f"{float(old.gradient_norm):.1e}")
        t_codes, big = _time(lambda: statistics.frechet_mean(metric32, codes, progress=False))
        print(f"pygeo frechet_mean:   {t_codes:8.2f} s wall, {CPU_SECONDS[-1]:.2f} s CPU (process), converged "
              f"{big.converged}, {big.n_iter} iterations, gradient norm {float(big.gradient_norm):.1e} "
              f"(<= 2e-3 sqrt(2F) = {2e-3 * float((2 * big.variance).sqrt()):.1e}), variance {float(big.variance):.4f}, "
              f"log maps converged {int(big.log_maps_converged.sum())}/{args.codes}; goal < 30 s: "
              f"{'met' if t_codes < 30 else 'not met'} (wall)")


if __name__ == "__main__":
    main()
