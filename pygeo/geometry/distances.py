"""All-pairs geodesic distances: batched curve-energy solves started from shortest paths on a k-nearest-neighbour
graph (method="energy"), or shortest paths on a metric-weighted grid graph alone (method="graph"); resumable from a
checkpoint folder and shardable over a torch.distributed process group."""
from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import numbers
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import _checks, _distributed
from .._files import atomic_write
from ..metrics.pullback import PullbackMetric, _over_tangents
from .curvature import uses_flat_coordinates
from .geodesic import _default_tol, _energy_converged, _minimise_energy, curve_energy

METHODS = ("energy", "graph")
CHECKPOINT_FORMAT = 1  # bump when a solver change alters the distances a checkpoint holds


def geodesic_distances(metric, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, method: str = "energy",
                       n_points: int = 9, n_neighbors: int = 8, chunk_size: int = 512, max_iter: int = 300,
                       tol: Optional[float] = None, resolution: Optional[int] = None, progress: bool = True,
                       distributed: bool = False, checkpoint: Union[str, os.PathLike, None] = None) -> torch.Tensor:
    """Geodesic distances between the rows of x [N, d] and y [M, d] (y=None: x with itself) -> [N, M].

    method="energy" (default; accurate): each curve starts from the shortest path between its end points on the
      k-nearest-neighbour graph of all the points (n_neighbors; edge weight: the Riemannian length of the straight
      edge), resampled to n_points, and its discrete curve energy is then minimised, chunk_size pairs at a time as
      one batch; converged pairs leave the batch. Metrics with flat coordinates (PullbackMetric but the learned-std
      gaussian, or any metric with flat_coordinates) use a batched damped Gauss-Newton solver: one forward-mode pass
      of the decoder over the [pairs x (n_points - 2), d] interior points gives the energy, its gradient and the
      block-tridiagonal Gauss-Newton matrix (for an MLP decoder the tangents ride through the layers as extra GEMM
      rows). A pair converges when its scaled gradient |grad E| |z1 - z0| / E is below tol (default 1e-6 in float64,
      1e-2 in float32) or its Gauss-Newton decrement is below tol^2 E. Their length is the chord sum of the curve in
      flat coordinates; with an even number of segments (odd n_points, the default 9) it is extrapolated with the
      chords of every other point ((4 L_n - L_n/2) / 3, accurate to O(n^-4) instead of the chords' O(n^-2), at no
      extra decoder call). Other metrics use geodesic()'s batched L-BFGS and midpoint-rule lengths. Without y only
      the pairs i < j are solved (the matrix is symmetric with a zero diagonal).
    method="graph" (fast, approximate, always a little long): shortest paths (scipy.sparse.csgraph.dijkstra) on a
      graph whose edges are straight segments weighted by their midpoint-rule Riemannian length
      sqrt(dz^T G(midpoint) dz): for d = 2 a regular resolution x resolution grid (default 128) over the points'
      bounding box with 16 neighbours per node (the 8 of the 3 x 3 square and the 8 knight moves, so that paths turn
      in 22.5 degree steps), for d = 3 a grid (default 32 per axis) with 26 neighbours, and for d > 3 the kNN graph of
      the points themselves (much coarser). Each point is joined to the nearby grid nodes by its own edges. Its cost
      grows with the grid, not with the pairs. Ctrl-C raises KeyboardInterrupt (nothing partial to return).
    Measured on the demo's 2-D latent (bench/bench_distances.py: 200 points, 19,900 pairs; errors against 40-point
      float64 minimum-energy curves on 200 of the pairs; bench/RESULTS.md), on a shared 2-core machine (load ~6):
      energy, n_points=9: 79 s against 599 s for the per-pair L-BFGS version it replaced (7.6x; 36 s against
        247 s, 6.9x, on a quieter run), median error +0.00 % and 95th percentile of |error| 0.37 % (before: -0.17 %
        and 0.66 %); n_points=13 gives +0.01 % and 0.05 % in about twice the time, n_points=12 (no extrapolation)
        -0.17 % and 0.66 %;
      graph: 15 s, median +0.88 %, 95th percentile 2.8 % (stochman 0.3.0's 100 x 100 8-neighbour grid graph on the
        same points: 30 s, +4.0 % and 12.3 %).

    chunk_size: pairs solved together; also the block of a checkpoint and of the split between ranks, so results
      depend on it (bitwise) but never on the number of processes.
    distributed=True: the blocks are shared out between the ranks of the initialised default torch.distributed
      group (contiguous, balanced); every rank returns the whole matrix, bit-identical to one process. CPU tensors
      are gathered over gloo, CUDA tensors over NCCL on each rank's current device. Launch with torchrun.
    checkpoint=PATH: a folder; each finished block is written there atomically (temporary file, then os.replace)
      with a fingerprint of x, y, the options and the metric (its values at probe points derived from x and y, and
      the state_dicts of the modules it holds; not the counters or caches of a wrapper). Calling again with the
      same PATH solves only the missing blocks and returns the same matrix; a folder made for other inputs, options
      or metric is refused with a ValueError. With distributed=True, PATH must be on a file system every rank sees.
    Ctrl-C: stops within about a second; the pairs not solved are NaN in the returned matrix and a warning says how
      many (finished blocks stay in the checkpoint). Pairs whose solve did not converge keep their best length, and
      a warning says how many there were.
    """
    x, y = _check_points(x, y)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    options = _check_options(n_points=n_points, n_neighbors=n_neighbors, chunk_size=chunk_size, max_iter=max_iter,
                             tol=tol, resolution=resolution)
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True or False, got {distributed!r}")
    rank, world = _distributed.require_process_group() if distributed else (0, 1)
    symmetric = y is None
    N = x.shape[0]
    M = N if symmetric else y.shape[0]
    if N == 0 or M == 0:
        return x.new_zeros(N, M)
    nodes = x if symmetric else torch.cat([x, y])
    if method == "graph":
        if checkpoint is not None:
            raise ValueError("checkpoint is for method='energy' (the graph method has no blocks to resume)")
        with torch.no_grad():
            return _graph_distances(metric, nodes, N, symmetric, options, distributed)

    tol = _default_tol(x.dtype, "energy") if options["tol"] is None else options["tol"]
    if symmetric:
        rows, cols = torch.triu_indices(N, N, offset=1)
    else:
        rows = torch.arange(N).repeat_interleave(M)
        cols = torch.arange(N, N + M).repeat(N)
    chunk = options["chunk_size"]
    n_blocks = math.ceil(rows.numel() / chunk)
    store = None
    if checkpoint is not None:
        store = _Checkpoint(checkpoint, _fingerprint(metric, x, y, method, options), n_blocks, rank, distributed)

    lengths = torch.full((rows.numel(),), math.nan, dtype=x.dtype)
    failed_per_block = torch.zeros(n_blocks, dtype=torch.long)
    finished = torch.zeros(n_blocks, dtype=torch.bool)
    if store is not None:
        for block, (block_lengths, failed) in store.load_finished().items():
            lengths[block * chunk:block * chunk + block_lengths.numel()] = block_lengths
            failed_per_block[block], finished[block] = failed, True
    todo = (~finished).nonzero().squeeze(-1).tolist()
    mine = [todo[i] for i in _distributed.rank_share(len(todo), rank, world)]

    interrupted = False
    solved = []  # rows [block, failed, lengths...] of the blocks this rank solved in this call
    if mine:
        with torch.no_grad():
            graph = _KnnGraph(metric, nodes, options["n_neighbors"])
            bar = tqdm(total=len(mine), desc="geodesic distances" + (f" (rank {rank})" if distributed else ""),
                       unit="block", disable=not progress)
            try:
                for block in mine:
                    start, stop = block * chunk, min((block + 1) * chunk, rows.numel())
                    a, b = rows[start:stop], cols[start:stop]
                    result = _solve(metric, graph.initial_curves(a, b, options["n_points"]), options["max_iter"], tol)
                    block_lengths, failed = result[0].to(x.dtype).cpu(), int((~result[1]).sum())
                    lengths[start:stop], failed_per_block[block] = block_lengths, failed
                    solved.append((block, failed, block_lengths))
                    if store is not None:
                        store.save(block, block_lengths, failed)
                    bar.update(1)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                bar.close()
    if distributed:
        lengths, failed_per_block = _gather_blocks(solved, lengths, failed_per_block, chunk, x.dtype)

    distances = torch.full((N, M), math.nan, dtype=x.dtype)
    column = cols if symmetric else cols - N
    distances[rows, column] = lengths
    if symmetric:
        distances[column, rows] = lengths
        distances.fill_diagonal_(0)
    unsolved = int(torch.isnan(lengths).sum())
    if interrupted or unsolved:
        warnings.warn(f"geodesic_distances interrupted: {unsolved} of {rows.numel()} pairs were not solved and are NaN "
                      f"in the result" + (f" (finished blocks are kept in {checkpoint})" if store is not None else ""),
                      stacklevel=2)
    failed = int(failed_per_block.sum())
    if failed:
        warnings.warn(f"geodesic_distances: {failed} of {rows.numel()} geodesic solves did not converge "
                      f"(their best lengths are returned); raise max_iter or n_points", stacklevel=2)
    return distances.to(x.device)


# ------------------------------------------------------------------------------------------------ input checks
def _check_points(x, y):
    _checks.real_tensor("x", x, min_dim=2)
    if x.dim() != 2:
        raise ValueError(f"x must have shape [N, d], got {tuple(x.shape)}")
    if y is not None:
        _checks.real_tensor("y", y, min_dim=2)
        _checks.same_device(x=x, y=y)
        _checks.same_dtype(x=x, y=y)
        if y.dim() != 2 or y.shape[1] != x.shape[1]:
            raise ValueError(f"y must have shape [M, d] with d={x.shape[1]} like x, got {tuple(y.shape)}")
    return x, y


def _check_options(**options):
    for name in ("n_points", "n_neighbors", "chunk_size", "max_iter", "resolution"):
        value = options[name]
        if value is None and name == "resolution":
            continue
        low = {"n_points": 2, "max_iter": 0, "resolution": 2}.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        options[name] = int(value)
    tol = options["tol"]
    if tol is not None:
        tol = _checks.number("tol", tol)
        if not tol > 0 or not math.isfinite(tol):
            raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
        options["tol"] = tol
    return options


# ----------------------------------------------------------------------------------------------- energy solver
def _solve(metric, curves: torch.Tensor, max_iter: int, tol: float):
    """(lengths [P], converged [P]) of the minimum-energy curves started from curves [P, T, d]."""
    if uses_flat_coordinates(metric) and curves.shape[1] > 2:
        return _gauss_newton(metric, curves, max_iter, tol)
    result = _minimise_energy(metric, curves, max_iter, tol, progress=False)
    return result.length, result.converged


def _flat_jet(metric, points: torch.Tensor):
    """phi [A, T, D] and its Jacobian, tangent-major, Jt [A, T, d, D] (Jt[..., i, :] = d phi / d z_i) at points
    [A, T, d], in one batched pass over [A x T, d]: for a PullbackMetric of an MLP decoder the d tangents ride through
    the layers as extra GEMM rows (_mlp_flat_jet), else d forward-mode tangents through metric.flat_coordinates
    (vmapped where the decoder allows it)."""
    A, T, d = points.shape
    flat = points.reshape(A * T, d)
    fused = _pullback_flat_jet(metric, flat)
    if fused is None:
        fused = _ensemble_flat_jet(metric, flat)
    if fused is not None:
        phi, Jt = fused
        return phi.reshape(A, T, -1), Jt.reshape(A, T, d, -1)
    basis = torch.eye(d, dtype=flat.dtype, device=flat.device).unsqueeze(1).expand(d, A * T, d)
    phi, columns = _over_tangents(lambda tangent: torch.func.jvp(metric.flat_coordinates, (flat,), (tangent,)), basis)
    return phi.reshape(A, T, -1), columns.transpose(0, 1).reshape(A, T, d, -1)


def _pullback_flat_jet(metric, flat: torch.Tensor):
    """(phi [B, D], J_phi^T [B, d, D]) for a PullbackMetric with flat coordinates, else None: the fused MLP jet where
    it applies, else the tangents of the decoder's rows (as extra batch rows through an nn.Sequential, else vmapped
    jvps) and d phi / d rows in closed form."""
    fused = _mlp_flat_jet(metric, flat)
    if fused is None and type(metric) is PullbackMetric and metric.has_flat_coordinates:
        fused = metric._phi_and_tangents_of_rows(*metric._rows_and_tangents(metric._flatten(flat)[0]))
    return fused


def _mlp_flat_jet(metric, flat: torch.Tensor):
    """(phi [B, D], J_phi^T [B, d, D]) for a PullbackMetric whose decoder is an MLP with a linear output layer and a
    flat-coordinate likelihood, else None. The basis tangents go through the hidden layers as rows of the same GEMMs
    as the points (as in PullbackMetric._fused_geodesic_acceleration), J_out = rows W_L^T, and J_phi = (d phi / d out)
    J_out in closed form (sqrt(w) elementwise for a diagonal Fisher weight w, MATH.md section 1; per position for the
    categorical likelihood)."""
    from ..metrics.pullback import PullbackMetric

    if type(metric) is not PullbackMetric or metric.learned_std:
        return None
    mlp = metric._fused_mlp(flat)
    if mlp is None or mlp.activation_modules[-1] is not None:
        return None
    B, d = flat.shape
    a = flat
    rows = torch.eye(d, dtype=flat.dtype, device=flat.device).expand(B, d, d)  # [B, d, width]: d a / d z as rows
    for linear, activation in zip(mlp.linears[:-1], mlp.activation_modules[:-1]):
        h = linear(a)
        rows = (rows.reshape(-1, rows.shape[-1]) @ linear.weight.t()).reshape(B, d, linear.out_features)
        if activation is None:
            a = h
            continue
        # (s(h), s'(h)) by one forward-mode pass with a unit tangent (exact for the module as configured); the
        # module gets a copy of h so that in-place activations mutate nothing.
        a, slope = torch.func.jvp(lambda x: activation(x.clone()), (h,), (torch.ones_like(h),))
        rows = slope.unsqueeze(1) * rows
    last = mlp.linears[-1]
    output = last(a)
    output = metric._rows_of_output(output, B)  # checked; the categories of categorical logits
    Jt = (rows.reshape(-1, rows.shape[-1]) @ last.weight.t()).reshape(B, d, last.out_features)
    return metric._phi_and_tangents_of_rows(output, Jt)  # d phi / d output in closed form, per likelihood


def _ensemble_flat_jet(metric, flat: torch.Tensor):
    """(phi [B, sum_m D_m], J_phi^T [B, d, sum_m D_m]) for an EnsembleMetric whose members are all pullbacks with flat
    coordinates (_pullback_flat_jet):
    the members' fused jets concatenated and scaled by 1 / sqrt(M), as EnsembleMetric.flat_coordinates; else None."""
    from ..metrics.ensemble import EnsembleMetric

    if type(metric) is not EnsembleMetric or not metric.has_flat_coordinates:
        return None
    parts = []
    for member in metric.metrics:
        part = _pullback_flat_jet(member, flat)
        if part is None:
            return None
        parts.append(part)
    scale = 1.0 / math.sqrt(len(parts))
    return torch.cat([phi for phi, _ in parts], -1) * scale, torch.cat([Jt for _, Jt in parts], -1) * scale


def _gauss_newton_system(phi: torch.Tensor, Jt: torch.Tensor):
    """Energy E [A], length L [A] (Richardson-extrapolated from the chords when T - 1 is even), gradient g [A, n] and
    Gauss-Newton matrix H [A, n, n] (n = (T-2) d, the interior nodes) of E = (T-1) sum_t |phi_{t+1} - phi_t|^2, from
    phi [A, T, D] and the interior Jacobians Jt [A, T-2, d, D]: with r_t = phi_{t+1} - phi_t,
    dE/dc_t = 2 (T-1) J_t^T (r_{t-1} - r_t), and H has diagonal blocks 4 (T-1) J_t^T J_t and off-diagonal blocks
    -2 (T-1) J_t^T J_{t+1} (block tridiagonal). The contractions over D are batched matrix products."""
    A, m, d, D = Jt.shape
    T = m + 2
    scale = T - 1
    r = phi[:, 1:] - phi[:, :-1]  # [A, T-1, D]
    squared = r.pow(2).sum(-1)
    energy, length = scale * squared.sum(-1), squared.sqrt().sum(-1)
    if scale % 2 == 0:
        # Chords cut corners: on a smooth curve sampled at equal steps the chord sum is L - C / n^2 + O(n^-4), and
        # the minimiser's points are equally spaced and O(h^2) off the geodesic, which costs O(h^4) in length (it
        # is stationary there). So every other point's chords give L - 4 C / n^2, and (4 L_n - L_{n/2}) / 3 is the
        # length to O(h^4) (Richardson) at no extra decoder call.
        coarse = (phi[:, 2::2] - phi[:, :-2:2]).norm(dim=-1).sum(-1)
        length = (4 * length - coarse) / 3
    Ji = Jt.reshape(-1, d, D)  # [A (T-2), d, D]
    bend = (r[:, :-1] - r[:, 1:]).reshape(-1, D, 1)
    gradient = (2 * scale) * torch.bmm(Ji, bend).reshape(A, -1)
    diagonal = (4 * scale) * torch.bmm(Ji, Ji.transpose(1, 2)).reshape(A, T - 2, d, d)
    off = (-2 * scale) * torch.bmm(Jt[:, :-1].reshape(-1, d, D),
                                   Jt[:, 1:].reshape(-1, d, D).transpose(1, 2)).reshape(A, T - 3, d, d)
    m = T - 2
    H = Jt.new_zeros(A, m, d, m, d)
    index = torch.arange(m, device=Jt.device)
    H[:, index, :, index, :] = diagonal.permute(1, 0, 2, 3)
    if m > 1:
        H[:, index[:-1], :, index[1:], :] = off.permute(1, 0, 2, 3)
        H[:, index[1:], :, index[:-1], :] = off.transpose(-1, -2).permute(1, 0, 2, 3)
    return energy, length, gradient, H.reshape(A, m * d, m * d)


def _gauss_newton(metric, curves: torch.Tensor, max_iter: int, tol: float, max_halvings: int = 8,
                  return_points: bool = False):
    """Batched damped Gauss-Newton on the interior points of curves [P, T, d] for a metric with flat coordinates.

    Each iteration solves H p = -g (Cholesky of the [n, n] Gauss-Newton matrix, n = (T-2) d, batched over pairs)
    and backtracks on the energy (Armijo) from the full step; the trial point's jet is the next iteration's, so an
    accepted full step costs one forward-mode pass. Pairs that converge (the scaled-gradient test of geodesic(), or
    a Gauss-Newton decrement below tol^2 E) or can no longer decrease the energy leave the batch. Returns
    (lengths [P], converged [P]), and the solved curves [P, T, d] third with return_points=True (pygeo.log_map)."""
    P, T, d = curves.shape
    points = curves.clone()
    span = (points[:, -1] - points[:, 0]).norm(dim=-1)
    converged = torch.zeros(P, dtype=torch.bool, device=points.device)
    # The end points never move: their flat coordinates once, the interior's jet at every trial.
    ends = metric.flat_coordinates(points[:, [0, -1]].reshape(2 * P, d)).reshape(P, 2, -1)

    def system(rows, interior):  # pairs `rows` [A] with interior points [A, T-2, d] -> (E, L, g, H)
        phi, Jt = _flat_jet(metric, interior)
        return _gauss_newton_system(torch.cat([ends[rows, :1], phi, ends[rows, 1:]], 1), Jt)

    active = torch.arange(P, device=points.device)
    energy, length, gradient, H = system(active, points[:, 1:-1])
    for _ in range(max_iter):
        direction = _newton_direction(H, gradient)
        slope = (direction * gradient).sum(-1)
        # Converged: the scaled gradient of geodesic(), or a Gauss-Newton decrement -slope = g^T H^-1 g (twice the
        # predicted energy decrease) below tol^2 E, the same test with the metric's own scaling of the step.
        done = _energy_converged(gradient, energy, span[active], tol) | (-slope <= tol * tol * energy)
        if bool(done.any()):
            converged[active[done]] = True
            keep = ~done
            active, energy, gradient, H = active[keep], energy[keep], gradient[keep], H[keep]
            direction, slope = direction[keep], slope[keep]
        if active.numel() == 0:
            break
        base = points[active, 1:-1]
        step = torch.ones_like(energy)
        pending = torch.arange(active.numel(), device=points.device)
        new_energy, new_gradient, new_H = energy.clone(), gradient.clone(), H.clone()
        moved = torch.zeros(active.numel(), dtype=torch.bool, device=points.device)
        for _ in range(max_halvings):  # backtracking, all pending pairs of the batch at once
            trial = base[pending] + (step[pending, None] * direction[pending]).reshape(-1, T - 2, d)
            trial_E, trial_L, trial_g, trial_H = system(active[pending], trial)
            ok = torch.isfinite(trial_E) & (trial_E <= energy[pending] + 1e-4 * step[pending] * slope[pending]) \
                & (trial_E < energy[pending])
            accepted = pending[ok]
            points[active[accepted], 1:-1] = trial[ok]
            length[active[accepted]] = trial_L[ok]
            new_energy[accepted], new_gradient[accepted], new_H[accepted] = trial_E[ok], trial_g[ok], trial_H[ok]
            moved[accepted] = True
            pending = pending[~ok]
            if pending.numel() == 0:
                break
            step[pending] *= 0.5
        energy, gradient, H = new_energy, new_gradient, new_H
        if not bool(moved.all()):  # no decrease left along the Gauss-Newton direction: finished where it stands
            stuck = ~moved
            converged[active[stuck]] = _energy_converged(gradient[stuck], energy[stuck], span[active[stuck]], tol)
            active, energy, gradient, H = active[moved], energy[moved], gradient[moved], H[moved]
    else:
        if active.numel():
            converged[active] = _energy_converged(gradient, energy, span[active], tol)
    return (length, converged, points) if return_points else (length, converged)


def _newton_direction(H: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """-H^{-1} g by Cholesky, with a relative jitter on the diagonal (H is positive definite when the metric is, but
    can be close to singular in float32); rows whose factorisation still fails take the steepest-descent direction
    scaled by the inverse mean diagonal."""
    n = H.shape[-1]
    diagonal = H.diagonal(dim1=-2, dim2=-1)
    mean_diagonal = diagonal.mean(-1).clamp_min(torch.finfo(H.dtype).tiny)
    jitter = (10 * torch.finfo(H.dtype).eps) * mean_diagonal
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    factor, info = torch.linalg.cholesky_ex(H + jitter[:, None, None] * eye)
    good = info == 0
    direction = -gradient / mean_diagonal[:, None]
    if bool(good.any()):
        solved = -torch.cholesky_solve(gradient[good].unsqueeze(-1), factor[good]).squeeze(-1)
        direction[good] = solved
    usable = torch.isfinite(direction).all(-1) & ((direction * gradient).sum(-1) < 0)
    return torch.where(usable[:, None], direction, -gradient / mean_diagonal[:, None])


class _KnnGraph:
    """The symmetrised k-nearest-neighbour graph of all the nodes, edges weighted by the Riemannian length of the
    straight edge (curve_energy over 3 segments), and the shortest paths that start the curves. Dijkstra runs per
    block for the block's source nodes only (memory O(sources x nodes)); a source's predecessors do not depend on
    which other sources share the call, so the curves never depend on how the pairs are split into blocks or ranks."""

    def __init__(self, metric, nodes: torch.Tensor, n_neighbors: int):
        from scipy.sparse import csr_matrix  # not at module level: `import pygeo` works without scipy

        self.nodes = nodes
        n = nodes.shape[0]
        k = min(n_neighbors, n - 1)
        self.graph = None
        if k == 0:
            return
        source, target = _nearest_neighbours(nodes, k)
        weights = torch.linspace(0, 1, 4, dtype=nodes.dtype, device=nodes.device)[:, None]
        segments = nodes[source][:, None, :] * (1 - weights) + nodes[target][:, None, :] * weights
        _, lengths = curve_energy(metric, segments)
        # Zero-length edges (duplicate points) must stay edges: scipy treats explicit zeros as missing.
        lengths = lengths.clamp_min(torch.finfo(lengths.dtype).tiny).cpu().double().numpy()
        self.graph = csr_matrix((lengths, (source.cpu().numpy(), target.cpu().numpy())), shape=(n, n))

    def initial_curves(self, a: torch.Tensor, b: torch.Tensor, n_points: int) -> torch.Tensor:
        """Curves [P, n_points, d] from nodes[a] to nodes[b]: the graph path (straight line where b is unreachable
        from a) resampled at equal Euclidean spacing, all pairs at once."""
        a_np, b_np = a.numpy(), b.numpy()
        if self.graph is None:
            walk = np.stack([a_np, b_np])
        else:
            from scipy.sparse.csgraph import dijkstra

            sources, source_row = np.unique(a_np, return_inverse=True)
            _, predecessors = dijkstra(self.graph, directed=False, indices=sources, return_predecessors=True)
            # Walk every path back from its target at once; a finished walk repeats its source.
            current, steps = b_np.copy(), [b_np.copy()]
            while True:
                before = predecessors[source_row, current]
                moving = (current != a_np) & (before >= 0)
                if not moving.any():
                    break
                current = np.where(moving, before, current)
                steps.append(current.copy())
            walk = np.stack(steps[::-1])  # [L, P], source first (repeated), target last
            walk[0] = a_np  # unreachable targets: the walk is [b, b, ...]; make it the straight line a -> b
        polyline = self.nodes[torch.from_numpy(walk.T).to(self.nodes.device)]  # [P, L, d]
        return _resample_by_arc_length(polyline, n_points)


def _nearest_neighbours(nodes: torch.Tensor, k: int, rows_per_chunk: int = 2048):
    """Directed kNN edges (source [n k], target [n k]) by Euclidean distance, in row chunks (memory O(chunk x n))."""
    n = nodes.shape[0]
    targets = []
    for start in range(0, n, rows_per_chunk):
        block = torch.cdist(nodes[start:start + rows_per_chunk], nodes)
        own = torch.arange(block.shape[0], device=nodes.device)
        block[own, own + start] = math.inf
        targets.append(block.topk(k, largest=False).indices)
    source = torch.arange(n, device=nodes.device).repeat_interleave(k)
    return source, torch.cat(targets).reshape(-1)


def _resample_by_arc_length(polyline: torch.Tensor, n_points: int) -> torch.Tensor:
    """Polylines [P, L, d] (zero-length steps allowed) resampled to [P, n_points, d] at equal Euclidean spacing."""
    P, L, d = polyline.shape
    if L == 1:
        return polyline.expand(P, n_points, d).clone()
    steps = (polyline[:, 1:] - polyline[:, :-1]).norm(dim=-1)  # [P, L-1]
    arc = torch.cat([steps.new_zeros(P, 1), steps.cumsum(1)], 1)  # [P, L]
    wanted = torch.linspace(0, 1, n_points, dtype=polyline.dtype, device=polyline.device) * arc[:, -1:]
    segment = torch.searchsorted(arc.contiguous(), wanted.contiguous(), right=True).clamp(1, L - 1) - 1  # [P, T]
    start = arc.gather(1, segment)
    length = steps.gather(1, segment).clamp_min(torch.finfo(polyline.dtype).tiny)
    fraction = ((wanted - start) / length).clamp(0, 1)[..., None]
    left = polyline.gather(1, segment[..., None].expand(P, n_points, d))
    right = polyline.gather(1, (segment + 1)[..., None].expand(P, n_points, d))
    curves = left * (1 - fraction) + right * fraction
    curves[:, 0], curves[:, -1] = polyline[:, 0], polyline[:, -1]  # end points exact
    return curves


# ------------------------------------------------------------------------------------------------- graph method
def _graph_distances(metric, nodes: torch.Tensor, N: int, symmetric: bool, options, distributed: bool):
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import dijkstra

    n, d = nodes.shape
    if d <= 3:
        source, target, points = _grid_edges(nodes, options["resolution"])
    else:
        source, target = _nearest_neighbours(nodes, min(options["n_neighbors"], n - 1))
        points = nodes
    lengths = _midpoint_lengths(metric, points[source], points[target])
    lengths = lengths.clamp_min(torch.finfo(lengths.dtype).tiny).cpu().double().numpy()
    total = points.shape[0]
    graph = csr_matrix((lengths, (source.cpu().numpy(), target.cpu().numpy())), shape=(total, total))
    # The query points are the first n graph nodes; Dijkstra from each of x's N rows, shared out between ranks.
    rank, world = _distributed.require_process_group() if distributed else (0, 1)
    share = _distributed.rank_share(N, rank, world)
    # Sources in groups, keeping only the columns of the query nodes: memory O(group x graph nodes), not O(n x nodes).
    dist = torch.from_numpy(np.concatenate(
        [dijkstra(graph, directed=False, indices=np.arange(lo, min(lo + 256, share.stop)))[:, :n]
         for lo in range(share.start, share.stop, 256)] or [np.zeros((0, n))]))
    if distributed:
        dist = _distributed.all_gather_rows(dist)
    dist = dist if symmetric else dist[:, N:]
    if symmetric:  # Dijkstra is symmetric up to rounding of the path sums: make it exactly so
        dist = torch.minimum(dist, dist.T)
        dist.fill_diagonal_(0)
    return dist.to(nodes.dtype).to(nodes.device)


_GRID_RESOLUTION = {2: 128, 3: 32}


def _grid_edges(nodes: torch.Tensor, resolution: Optional[int]):
    """(source, target, points): the query nodes first, then a regular grid over their bounding box (5 % margin);
    grid edges along the primitive stencil offsets (16 neighbours in 2-D, 26 in 3-D), and from every query node to
    the grid nodes within two cells."""
    n, d = nodes.shape
    R = _GRID_RESOLUTION[d] if resolution is None else resolution
    low, high = nodes.min(0).values, nodes.max(0).values
    margin = 0.05 * (high - low).clamp_min(1e-3)
    low, high = low - margin, high + margin
    axes = [torch.linspace(float(low[k]), float(high[k]), R, dtype=nodes.dtype, device=nodes.device)
            for k in range(d)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, d)
    reach = 2 if d == 2 else 1
    offsets = [o for o in itertools.product(range(-reach, reach + 1), repeat=d)
               if any(o) and math.gcd(*o) == 1 and o > tuple([0] * d)]  # one of each +-pair: undirected edges
    index = torch.arange(R ** d, device=nodes.device).reshape([R] * d)
    sources, targets = [], []
    for offset in offsets:
        src = index[tuple(slice(max(0, -o), R - max(0, o)) for o in offset)]
        dst = index[tuple(slice(max(0, o), R - max(0, -o)) for o in offset)]
        sources.append(src.reshape(-1))
        targets.append(dst.reshape(-1))
    # Each query node to the grid nodes of the (2 reach) ^ d cells around it.
    cell = ((nodes - low) / (high - low) * (R - 1)).floor().long().clamp(0, R - 2)  # [n, d]
    around = torch.tensor(list(itertools.product(range(1 - reach, reach + 1), repeat=d)), device=nodes.device)
    corners = (cell[:, None, :] + around).clamp(0, R - 1)  # [n, (2 reach)^d, d]
    flat_corner = (corners * torch.tensor([R ** (d - 1 - k) for k in range(d)], device=nodes.device)).sum(-1)
    query_source = torch.arange(n, device=nodes.device).repeat_interleave(corners.shape[1])
    source = torch.cat([query_source, n + torch.cat(sources)])
    target = torch.cat([n + flat_corner.reshape(-1), n + torch.cat(targets)])
    return source, target, torch.cat([nodes, grid])


def _midpoint_lengths(metric, start: torch.Tensor, end: torch.Tensor, batch: int = 65536) -> torch.Tensor:
    """sqrt(dz^T G((start + end) / 2) dz) for segments [E, d], in batches of metric calls."""
    lengths = []
    for lo in range(0, start.shape[0], batch):
        a, b = start[lo:lo + batch], end[lo:lo + batch]
        step = b - a
        G = metric.metric(0.5 * (a + b))
        lengths.append(torch.einsum("ei,eij,ej->e", step, G, step).clamp_min(0).sqrt())
    return torch.cat(lengths) if lengths else start.new_zeros(0)


# -------------------------------------------------------------------------------------------- distributed, resume
def _gather_blocks(solved, lengths, failed_per_block, chunk: int, dtype):
    """Every rank's newly solved blocks, gathered to every rank and written into lengths / failed_per_block. Rows:
    [block, failed, lengths of the block (NaN-padded to chunk)] in float64 (exact for float32 and float64 lengths
    and for block indices below 2^53)."""
    table = torch.full((len(solved), chunk + 2), math.nan, dtype=torch.float64)
    for row, (block, failed, block_lengths) in enumerate(solved):
        table[row, 0], table[row, 1] = block, failed
        table[row, 2:2 + block_lengths.numel()] = block_lengths.double()
    everything = _distributed.all_gather_rows(table)
    total = lengths.numel()
    for row in everything:
        block = int(row[0])
        start, stop = block * chunk, min((block + 1) * chunk, total)
        lengths[start:stop] = row[2:2 + stop - start].to(dtype)
        failed_per_block[block] = int(row[1])
    return lengths, failed_per_block


# Probe points of a checkpoint's fingerprint (at most, plus as many midpoints) and the mantissa bits kept of the
# metric's values there: coarser than rounding, so that another thread count or rank rounding G differently in its
# last bits still resumes, fine enough that a changed metric does not (2^-12 relative in float32, 2^-32 in float64).
_PROBES = 64
_PROBE_BITS = {torch.float16: 6, torch.bfloat16: 4, torch.float32: 12, torch.float64: 32}


def _probe_points(x, y) -> torch.Tensor:
    """[P, d]: up to _PROBES points of x and y (evenly strided, first and last included) and the midpoints of the
    pairs (p_i, p_{P-1-i}), so that the metric is also probed between the points: a function of x and y only."""
    points = x if y is None else torch.cat([x, y])
    n = points.shape[0]
    picked = points[torch.linspace(0, n - 1, min(n, _PROBES)).round().long().unique()]
    return torch.cat([picked, (picked + picked.flip(0)) / 2])


def _modules_held(value, found, seen, depth=0) -> None:
    """Append to found every nn.Module that value holds, in a fixed order (attributes sorted by name, public and
    private; lists, tuples and dicts looked into), each once; a module's own submodules are in its state_dict."""
    if id(value) in seen or depth > 4:
        return
    seen.add(id(value))
    if isinstance(value, torch.nn.Module):
        found.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _modules_held(item, found, seen, depth + 1)
    elif isinstance(value, dict):
        for key in sorted(value, key=repr):
            _modules_held(value[key], found, seen, depth + 1)
    elif hasattr(value, "__dict__") and not isinstance(value, (type, torch.Tensor)) and not inspect.isroutine(value):
        for name in sorted(vars(value)):
            _modules_held(vars(value)[name], found, seen, depth + 1)


def _fingerprint(metric, x, y, method, options) -> str:
    """sha256 of what defines the result: the options, x and y (by value), and the metric by what defines it: its
    class, its values G at probe points derived from x and y (_probe_points; rounded to _PROBE_BITS mantissa bits
    relative to each point's largest entry), and the state_dicts of the nn.Modules it holds. Counters, caches and
    other attributes of a metric or of a wrapper around it do not count. A change to the metric smaller than the
    rounding at the probe points, in a part it holds outside a module (a tensor captured by a closure), goes
    unnoticed."""
    digest = hashlib.sha256()

    def add(tensor):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"tensor{tuple(tensor.shape)}{tensor.dtype}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())

    digest.update(f"pygeo geodesic_distances checkpoint format {CHECKPOINT_FORMAT}, method {method}".encode())
    digest.update(json.dumps(options, sort_keys=True).encode())
    add(x)
    if y is not None:
        add(y)
    digest.update(type(metric).__qualname__.encode())
    modules = []
    _modules_held(metric, modules, set())
    for module in modules:
        digest.update(type(module).__qualname__.encode())
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            add(tensor)
    try:
        with torch.no_grad():
            G = metric.metric(_probe_points(x, y))
    except Exception as error:  # noqa: BLE001 - the solve itself reports it; here it only marks the fingerprint
        digest.update(f"metric failed at the probes: {type(error).__qualname__}".encode())
    else:
        G = torch.view_as_real(G) if G.is_complex() else G
        bits = _PROBE_BITS.get(G.dtype, 32)
        values = G.detach().double().cpu().nan_to_num(nan=0.0, posinf=1e308, neginf=-1e308).flatten(1)  # [P, d*d]
        size = values.abs().amax(1, keepdim=True)
        mantissa, exponent = torch.frexp(size)
        add(torch.round(mantissa * 2**bits).long())
        add(exponent.long())
        add(torch.round(values / size.clamp_min(torch.finfo(torch.float64).tiny) * 2**bits).long())
    return digest.hexdigest()


class _Checkpoint:
    """A folder of finished blocks: fingerprint.json, and block-<index>.pt = {fingerprint, block, lengths, failed}
    per block, each written to a temporary name and renamed into place (os.replace is atomic), so an interrupted
    write leaves either the old state or the whole block."""

    def __init__(self, path, fingerprint: str, n_blocks: int, rank: int, distributed: bool):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"checkpoint must be a folder (or a path to create one), got the file {self.path}")
        self.fingerprint, self.n_blocks, self.rank, self.distributed = fingerprint, n_blocks, rank, distributed
        stamp = self.path / "fingerprint.json"
        if rank == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            if not stamp.exists():
                atomic_write(stamp, lambda handle: handle.write(json.dumps(
                    {"fingerprint": fingerprint, "blocks": n_blocks}).encode()))
        if distributed:
            _distributed.barrier()  # rank 0 made the folder and its stamp before anyone reads them
        stored = json.loads(stamp.read_text())["fingerprint"] if stamp.exists() else None
        if stored != fingerprint:
            raise ValueError(f"checkpoint {self.path} was made for other inputs or options (its fingerprint differs "
                             f"from this call's: another x, y, metric, method, n_points, n_neighbors, chunk_size, "
                             f"max_iter, tol or resolution); pass another folder or delete it to start over")

    def block_path(self, block: int) -> Path:
        return self.path / f"block-{block:09d}.pt"

    def load_finished(self):
        """{block: (lengths, failed)} for the blocks finished earlier. Distributed: the blocks every rank can read
        (the ranks agree through an all-gather, so they share out the same missing blocks)."""
        finished = {}
        for block in range(self.n_blocks):
            path = self.block_path(block)
            if path.exists():
                record = torch.load(path, weights_only=True)
                if record["fingerprint"] != self.fingerprint:
                    raise ValueError(f"checkpoint file {path} was made for other inputs or options")
                finished[block] = (record["lengths"], int(record["failed"]))
        if self.distributed:
            seen = torch.zeros(1, self.n_blocks, dtype=torch.long)
            seen[0, list(finished)] = 1
            everywhere = _distributed.all_gather_rows(seen).min(0).values.bool()
            finished = {block: value for block, value in finished.items() if everywhere[block]}
        return finished

    def save(self, block: int, lengths: torch.Tensor, failed: int) -> None:
        record = {"fingerprint": self.fingerprint, "block": torch.tensor(block), "lengths": lengths.clone(),
                  "failed": torch.tensor(failed)}
        atomic_write(self.block_path(block), lambda handle: torch.save(record, handle))
