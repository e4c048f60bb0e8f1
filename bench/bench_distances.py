"""All-pairs geodesic distances on the demo's 2-D latent (issue 14 part 2, issue 18 part 5): times beside the median
and 95th-percentile relative errors against a fine reference, side by side in one run.

Setting: the VAE of `python -m pygeo demo` (bench/distance_setting.py: 20 epochs on the 5,000 shipped digits, seed 0,
cached), its Bernoulli pullback metric, 200 encoded digits, 19,900 pairs.
Reference: on a fixed random sample of 200 pairs, the minimum-energy curve with 40 points in float64 (a float64 copy
of the decoder, Gauss-Newton to a scaled gradient or decrement test of 1e-7), the shorter of two starts (the kNN-graph
path and the straight line); 40-point chords are within ~0.03 % of the curve length where 12 points are ~0.3 % short.
Providers:
  pygeo before     geodesic_distances as of commit 85a76ee (per-pair L-BFGS in blocks of 256, per-pair Python
                   initialisation), loaded from git history when git and that commit are at hand;
  pygeo energy     geodesic_distances(method="energy") now;
  pygeo graph      geodesic_distances(method="graph") (128 x 128 grid, 16 neighbours, midpoint-rule edges);
  grid-8 graph     stochman's DiscretizedManifold idea written with scipy: a grid over the points' bounding box,
                   8-neighbour edges weighted by their length, end points snapped to the nearest grid node, Dijkstra;
  stochman graph   stochman.discretized_manifold.DiscretizedManifold itself (networkx), when stochman imports.

Run: cd bench && python -m pytest bench_distances.py   (60 points; errors in extra_info), or the full table:
     python bench_distances.py [--points 200] [--reference-pairs 200] [--skip before,stochman]
     python bench_distances.py --distributed 2000   (1 against 2 gloo processes, started here as torchrun would;
     the library itself never starts processes)
     stochman: not a dependency; to compare, put its sources on PYTHONPATH (pip download stochman, unpack).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pygeo
from pygeo.geometry import distances as distances_module

sys.path.insert(0, str(Path(__file__).parent))
from distance_setting import cache_dir, demo_setting  # noqa: E402

BEFORE_COMMIT = "85a76ee"


# --------------------------------------------------------------------------------------------------- reference
def reference_lengths(metric, points, a, b, n_points=40):
    """Fine reference distances [P] for the pairs (a[k], b[k]) (float64; cached by the pairs and the weights)."""
    key = distances_module._fingerprint(metric, points, None, "reference", {"a": a.tolist(), "b": b.tolist(),
                                                                             "n_points": n_points})[:16]
    path = cache_dir() / f"reference-{key}.pt"
    if path.exists():
        return torch.load(path)
    fine = copy.deepcopy(metric)
    fine.decoder = copy.deepcopy(metric.decoder).double()
    fine._mlp = type(metric._mlp).recognise(fine.decoder) if metric._mlp is not None else None
    nodes = points.double()
    with torch.no_grad():
        graph = distances_module._KnnGraph(fine, nodes, 8)
        starts = [graph.initial_curves(a, b, n_points)]
        weights = torch.linspace(0, 1, n_points, dtype=torch.float64)[:, None]
        starts.append(nodes[a][:, None] * (1 - weights) + nodes[b][:, None] * weights)
        best = torch.full((a.numel(),), math.inf, dtype=torch.float64)
        for start in starts:
            for lo in range(0, a.numel(), 64):
                lengths, _ = distances_module._gauss_newton(fine, start[lo:lo + 64], 500, 1e-7)
                best[lo:lo + 64] = torch.minimum(best[lo:lo + 64], lengths)
    torch.save(best, path)
    return best


# --------------------------------------------------------------------------------------------------- providers
def before_geodesic_distances():
    """geodesic_distances as of BEFORE_COMMIT, imported from git history into pygeo.geometry (its relative imports
    resolve against today's geodesic solver, which that version called unchanged), or None without git."""
    root = Path(__file__).resolve().parent.parent
    try:
        source = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:pygeo/geometry/distances.py"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = cache_dir() / "distances_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("pygeo.geometry._distances_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.geodesic_distances


def grid8_graph_distances(metric, points, resolution=100):
    """stochman's grid-graph distance (DiscretizedManifold.fit + shortest_path) written with scipy: a resolution^2
    grid over the points' bounding box, 8 neighbours, each edge weighted by the decoded length of the straight edge
    (for a pullback: |phi(end) - phi(start)|, stochman's 2-point curve_length), end points snapped to the nearest
    grid node, Dijkstra."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import dijkstra

    low, high = points.min(0).values, points.max(0).values
    axes = [torch.linspace(float(low[k]), float(high[k]), resolution, dtype=points.dtype) for k in range(2)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    index = torch.arange(resolution ** 2).reshape(resolution, resolution)
    source, target = [], []
    for dx, dy in ((1, 0), (0, 1), (1, 1), (1, -1)):
        src = index[max(0, -dx):resolution - max(0, dx), max(0, -dy):resolution - max(0, dy)]
        dst = index[max(0, dx):resolution - max(0, -dx), max(0, dy):resolution - max(0, -dy)]
        source.append(src.reshape(-1))
        target.append(dst.reshape(-1))
    source, target = torch.cat(source), torch.cat(target)
    with torch.no_grad():
        phi = torch.cat([metric.flat_coordinates(chunk) for chunk in grid.split(4096)])
    weight = (phi[target] - phi[source]).norm(dim=-1).double().numpy()
    graph = csr_matrix((weight, (source.numpy(), target.numpy())), shape=(len(grid), len(grid)))
    snapped = torch.cdist(points, grid).argmin(1).numpy()
    table = dijkstra(graph, directed=False, indices=np.unique(snapped))
    row = {node: i for i, node in enumerate(np.unique(snapped))}
    return torch.from_numpy(table[[row[s] for s in snapped]][:, snapped])


def stochman_graph_distances(metric, points, resolution=100):
    """stochman 0.3.0's DiscretizedManifold on a resolution^2 grid (its fit, networkx single-source Dijkstra from
    each point's grid node), or None when stochman does not import."""
    try:
        import networkx as nx
        from stochman.discretized_manifold import DiscretizedManifold
        from stochman.manifold import EmbeddedManifold
    except ImportError:
        return None

    class Decoded(EmbeddedManifold):
        def embed(self, c, jacobian=False):
            return metric.flat_coordinates(c)

    low, high = points.min(0).values, points.max(0).values
    grid = [torch.linspace(float(low[k]), float(high[k]), resolution) for k in range(2)]
    manifold = DiscretizedManifold()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "your model does not implement a metric": only its GP interpolation needs it
        Decoded.metric = lambda self, p: (_ for _ in ()).throw(NotImplementedError())
        manifold.fit(Decoded(), grid, batch_size=4096)
    nodes = [manifold._grid_point(p) for p in points]
    table = torch.zeros(len(points), len(points), dtype=torch.float64)
    for i, node in enumerate(nodes):
        lengths = nx.single_source_dijkstra_path_length(manifold.G, node, weight="weight")
        table[i] = torch.tensor([lengths[other] for other in nodes], dtype=torch.float64)
    return table


# ------------------------------------------------------------------------------------------------------- main
def errors(matrix, a, b, reference):
    relative = (matrix[a, b].double() - reference) / reference
    return float(relative.median()), float(relative.abs().quantile(0.95)), float(relative.quantile(0.05)), \
        float(relative.quantile(0.95))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--reference-pairs", type=int, default=200)
    parser.add_argument("--skip", default="", help="comma-separated providers to leave out (before, stochman, ...)")
    parser.add_argument("--distributed", type=int, default=0, help="points for the 1 vs 2 process benchmark")
    args = parser.parse_args(argv)
    if args.distributed:
        return distributed_benchmark(args.distributed)
    skip = set(filter(None, args.skip.split(",")))
    metric, points = demo_setting(args.points)
    N = points.shape[0]
    rows, cols = torch.triu_indices(N, N, offset=1)
    sample = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(7))[:args.reference_pairs]
    a, b = rows[sample], cols[sample]
    start = time.perf_counter()
    reference = reference_lengths(metric, points, a, b)
    print(f"reference: {a.numel()} pairs, 40 points, float64 ({time.perf_counter() - start:.1f} s, cached after)")

    providers = []
    if "before" not in skip and (before := before_geodesic_distances()) is not None:
        providers.append(("pygeo before (85a76ee)", lambda: before(metric, points, progress=False)))
    providers += [
        ("pygeo energy", lambda: pygeo.geodesic_distances(metric, points, progress=False)),
        ("pygeo graph", lambda: pygeo.geodesic_distances(metric, points, method="graph", progress=False)),
        ("grid-8 graph (stochman's idea, scipy)", lambda: grid8_graph_distances(metric, points)),
    ]
    if "stochman" not in skip:
        providers.append(("stochman graph (DiscretizedManifold)", lambda: stochman_graph_distances(metric, points)))
    print(f"{N} points, {rows.numel()} pairs; relative error against the reference on {a.numel()} pairs; "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"| provider | time (s) | median error | p95 abs error | 5th pct | 95th pct |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, run in providers:
        if any(word in name for word in skip):
            continue
        start = time.perf_counter()
        matrix = run()
        seconds = time.perf_counter() - start
        if matrix is None:
            print(f"| {name} | not available | | | | |")
            continue
        median, p95, low, high = errors(matrix.cpu(), a, b, reference)
        print(f"| {name} | {seconds:.1f} | {100 * median:+.2f} % | {100 * p95:.2f} % | {100 * low:+.2f} % | "
              f"{100 * high:+.2f} % |", flush=True)


# ------------------------------------------------------------------------------------- pytest-benchmark entry
PYTEST_PROVIDERS = {
    "pygeo energy": lambda metric, points: pygeo.geodesic_distances(metric, points, progress=False),
    "pygeo graph": lambda metric, points: pygeo.geodesic_distances(metric, points, method="graph", progress=False),
    "grid-8 graph": grid8_graph_distances,
}


@pytest.mark.parametrize("provider", list(PYTEST_PROVIDERS))
def test_distances_demo_setting(benchmark, provider):
    """A smaller form of main() for `python -m pytest bench_distances.py`: 60 points (1,770 pairs), errors against
    the reference on 100 of them in extra_info."""
    metric, points = demo_setting(60)
    rows, cols = torch.triu_indices(60, 60, offset=1)
    sample = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(7))[:100]
    reference = reference_lengths(metric, points, rows[sample], cols[sample])
    benchmark.group = "geodesic distances, demo latent, 60 points"
    matrix = benchmark.pedantic(lambda: PYTEST_PROVIDERS[provider](metric, points), rounds=1, iterations=1)
    median, p95, _, _ = errors(matrix.cpu(), rows[sample], cols[sample], reference)
    benchmark.extra_info.update(median_error=median, p95_abs_error=p95)


# ------------------------------------------------------------------------------------------------ distributed
def _distributed_worker(rank, world, port, n_points, n_targets, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    metric, points = demo_setting(n_points)
    targets = points[:n_targets]
    results = {}
    for name, run in [
        ("graph, all pairs", lambda: pygeo.geodesic_distances(metric, points, method="graph", distributed=world > 1,
                                                              progress=False)),
        (f"energy, {n_points} x {n_targets}", lambda: pygeo.geodesic_distances(
            metric, points, targets, distributed=world > 1, progress=rank == 0)),
    ]:
        dist.barrier()
        start = time.perf_counter()
        matrix = run()
        results[name] = {"seconds": time.perf_counter() - start, "matrix": matrix}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def distributed_benchmark(n_points, n_targets=10):
    """1 against 2 gloo processes (started here, as torchrun would): the graph method over all pairs of n_points,
    and the energy method from n_points points to n_targets of them (all pairs of 2,000 points by energy solves
    would take hours on 2 cores)."""
    import socket

    import torch.multiprocessing as mp

    results = {}
    for world in (1, 2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        out = cache_dir() / f"distributed-{world}.pt"
        mp.start_processes(_distributed_worker, args=(world, port, n_points, n_targets, str(out)), nprocs=world,
                           start_method="spawn")
        results[world] = torch.load(out)
    for name in results[1]:
        one, two = results[1][name], results[2][name]
        pairs = one["matrix"].numel() - (one["matrix"].shape[0] if one["matrix"].shape[0] == one["matrix"].shape[1]
                                         else 0)
        same = torch.equal(one["matrix"], two["matrix"])
        print(f"{name} ({pairs} entries): 1 process {one['seconds']:.1f} s, 2 processes {two['seconds']:.1f} s, "
              f"ratio {one['seconds'] / two['seconds']:.2f}x; bit-identical: {same}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared with other jobs)")


if __name__ == "__main__":
    main()
