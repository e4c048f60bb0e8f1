"""All-pairs geodesic distances, initialised from shortest paths on a k-nearest-neighbour graph of the points."""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import _checks
from .geodesic import curve_energy, geodesic


def geodesic_distances(metric, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, n_points: int = 12,
                       n_neighbors: int = 8, chunk_size: int = 256, max_iter: int = 300, tol: Optional[float] = None,
                       progress: bool = True) -> torch.Tensor:
    """Geodesic distances between the rows of x [N, d] and y [M, d] (y=None: x with itself) -> [N, M].

    Every curve starts from the shortest path between its end points on the k-nearest-neighbour graph of all the points
    (edge weights: Riemannian lengths of the straight edges), resampled to n_points, and is then refined by
    geodesic(..., method="energy") in chunks of chunk_size pairs (bounded memory), with a progress bar. Without y only
    the pairs i < j are solved (the matrix is symmetric with a zero diagonal). Pairs whose solve did not converge keep
    their best length, and a warning says how many there were.
    """
    _checks.real_tensor("x", x, min_dim=2)
    if x.dim() != 2:
        raise ValueError(f"x must have shape [N, d], got {tuple(x.shape)}")
    symmetric = y is None
    if not symmetric:
        _checks.real_tensor("y", y, min_dim=2)
        _checks.same_device(x=x, y=y)
        _checks.same_dtype(x=x, y=y)
        if y.dim() != 2 or y.shape[1] != x.shape[1]:
            raise ValueError(f"y must have shape [M, d] with d={x.shape[1]} like x, got {tuple(y.shape)}")
    for name, value in (("n_neighbors", n_neighbors), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    N = x.shape[0]
    if N == 0 or (not symmetric and y.shape[0] == 0):
        return x.new_zeros(N, N if symmetric else y.shape[0])
    nodes = x if symmetric else torch.cat([x, y])
    targets = torch.arange(N) if symmetric else torch.arange(N, N + y.shape[0])
    with torch.no_grad():
        predecessors, reachable = _graph_paths(metric, nodes, n_neighbors, N)
    if symmetric:
        rows, cols = torch.triu_indices(N, N, offset=1)
    else:
        rows = torch.arange(N).repeat_interleave(targets.numel())
        cols = targets.repeat(N)
    distances = x.new_zeros(N, targets.numel())
    failed = 0
    chunks = range(0, rows.numel(), chunk_size)
    try:
        for start in tqdm(chunks, desc="geodesic distances", disable=not progress):
            i, j = rows[start:start + chunk_size], cols[start:start + chunk_size]
            init = torch.stack([_initial_curve(nodes, predecessors, reachable, int(a), int(b), n_points)
                                for a, b in zip(i.tolist(), j.tolist())])
            result = geodesic(metric, nodes[i], nodes[j], n_points=n_points, method="energy", init=init,
                              max_iter=max_iter, tol=tol)
            failed += int((~result.converged).sum())
            column = j if symmetric else j - N
            distances[i, column] = result.length
            if symmetric:
                distances[column, i] = result.length
    except KeyboardInterrupt:
        warnings.warn("geodesic_distances interrupted: the pairs not yet solved are 0 in the result")
    if failed:
        warnings.warn(f"geodesic_distances: {failed} of {rows.numel()} geodesic solves did not converge "
                      f"(their best lengths are returned); raise max_iter or n_points")
    return distances


def _graph_paths(metric, nodes: torch.Tensor, n_neighbors: int, n_sources: int):
    """Dijkstra from the first n_sources nodes over the symmetrised kNN graph; edge weight = Riemannian length of the
    straight edge (3 segments). Returns (predecessors [n_sources, n_nodes] numpy, reachable [n_sources, n_nodes])."""
    # scipy is imported here, not at module level, so that `import pygeo` works without it (mlxtend depends on it).
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import dijkstra

    n = nodes.shape[0]
    k = min(n_neighbors, n - 1)
    if k == 0:
        return np.full((n_sources, n), -9999), np.eye(n_sources, n, dtype=bool)
    euclidean = torch.cdist(nodes, nodes)
    euclidean.fill_diagonal_(float("inf"))
    neighbours = euclidean.topk(k, largest=False).indices  # [n, k]
    source = torch.arange(n).repeat_interleave(k)
    target = neighbours.reshape(-1)
    weights = torch.linspace(0, 1, 4, dtype=nodes.dtype, device=nodes.device)[:, None]
    segments = nodes[source][:, None, :] * (1 - weights) + nodes[target][:, None, :] * weights
    _, lengths = curve_energy(metric, segments)
    # Zero-length edges (duplicate points) must stay edges: scipy treats explicit zeros as missing.
    lengths = lengths.clamp_min(torch.finfo(lengths.dtype).tiny).cpu().numpy()
    graph = csr_matrix((lengths, (source.numpy(), target.cpu().numpy())), shape=(n, n))
    dist, predecessors = dijkstra(graph, directed=False, indices=np.arange(n_sources), return_predecessors=True)
    return predecessors, np.isfinite(dist)


def _initial_curve(nodes, predecessors, reachable, a: int, b: int, n_points: int) -> torch.Tensor:
    """The graph path a -> b (straight line if b is unreachable) resampled to n_points at equal Euclidean spacing."""
    if reachable[a, b]:
        path = [b]
        while path[-1] != a:
            path.append(int(predecessors[a, path[-1]]))
        polyline = nodes[torch.tensor(path[::-1], device=nodes.device)]
    else:
        polyline = nodes[[a, b]]
    if polyline.shape[0] == 1:
        return polyline.expand(n_points, -1)
    steps = (polyline[1:] - polyline[:-1]).norm(dim=-1)
    arc = torch.cat([steps.new_zeros(1), steps.cumsum(0)])
    wanted = torch.linspace(0, 1, n_points, dtype=nodes.dtype, device=nodes.device) * arc[-1]
    segment = torch.searchsorted(arc, wanted, right=True).clamp(1, polyline.shape[0] - 1) - 1
    fraction = ((wanted - arc[segment]) / steps[segment].clamp_min(torch.finfo(nodes.dtype).tiny)).clamp(0, 1)[:, None]
    return polyline[segment] * (1 - fraction) + polyline[segment + 1] * fraction
