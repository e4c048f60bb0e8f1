"""k-medoids clustering (alternating / "PAM-lite"), batched and chunked so it runs on large sets and on GPU tensors:
under the Euclidean distance, a precomputed distance matrix, or the geodesic distance of a metric."""
from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Optional

import torch

from . import _checks
from .metrics.base import Metric


class KMedoidsResult(NamedTuple):
    indices: torch.Tensor  # [k] int64, rows of `points` that are the medoids (sorted)
    labels: torch.Tensor  # [n] int64, index into `indices` of each point's nearest medoid
    cost: float  # sum of distances from each point to its medoid
    n_iter: int  # alternating iterations run


class _EuclideanDistances:
    """Distances between the rows of points [n, d], computed when asked (never the whole [n, n] matrix)."""

    def __init__(self, points: torch.Tensor):
        self.points = points
        self.n, self.device = points.shape[0], points.device

    def rows_to(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """[len(rows), len(columns)] distances; rows and columns are index tensors."""
        return torch.cdist(self.points[rows], self.points[columns])

    def block_to(self, start: int, stop: int, columns: torch.Tensor) -> torch.Tensor:
        """[stop - start, len(columns)] distances of the points start .. stop - 1."""
        return torch.cdist(self.points[start:stop], self.points[columns])

    def squared_from(self, index: torch.Tensor) -> torch.Tensor:
        """[n] squared distances of every point to the point index [1]."""
        return ((self.points - self.points[index]) ** 2).sum(-1)

    def among(self, groups: torch.Tensor) -> torch.Tensor:
        """groups [g, S] of indices -> [g, S, S] distances within each group."""
        member_points = self.points[groups]
        return torch.cdist(member_points, member_points)


class _PrecomputedDistances:
    """The same queries, answered from a distance matrix [n, n]."""

    def __init__(self, distances: torch.Tensor):
        self.distances = distances
        self.n, self.device = distances.shape[0], distances.device

    def rows_to(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return self.distances[rows][:, columns]

    def block_to(self, start: int, stop: int, columns: torch.Tensor) -> torch.Tensor:
        return self.distances[start:stop][:, columns]

    def squared_from(self, index: torch.Tensor) -> torch.Tensor:
        return self.distances[index].reshape(-1) ** 2

    def among(self, groups: torch.Tensor) -> torch.Tensor:
        return self.distances[groups[:, :, None], groups[:, None, :]]


def _nearest(source, medoid_indices: torch.Tensor, chunk_size: int):
    """(labels [n], distances [n]) of every point to its nearest medoid, in chunks of rows (O(chunk * k) memory).

    A medoid is always labelled with its own cluster (ties between duplicate points could say otherwise), so the
    clusters are disjoint, never empty, and the updated medoids stay distinct."""
    labels, distances = [], []
    for start in range(0, source.n, chunk_size):
        dist = source.block_to(start, min(start + chunk_size, source.n), medoid_indices)
        best = dist.min(-1)
        labels.append(best.indices)
        distances.append(best.values)
    labels, distances = torch.cat(labels), torch.cat(distances)
    labels[medoid_indices] = torch.arange(medoid_indices.shape[0], device=labels.device)
    distances[medoid_indices] = 0
    return labels, distances


def _init_plus_plus(source, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next medoid drawn with probability proportional to its squared distance."""
    n, device = source.n, source.device
    first = torch.randint(n, (1,), generator=generator, device="cpu").to(device)
    chosen = [first]
    closest = source.squared_from(first)
    for _ in range(1, k):
        total = closest.sum()
        if not bool(total > 0):  # fewer distinct points than k: take any unchosen point
            taken = torch.zeros(n, dtype=torch.bool, device=device)
            taken[torch.cat(chosen)] = True
            pick = (~taken).nonzero()[0]
        else:
            u = torch.rand((), generator=generator, device="cpu").item() * float(total)
            pick = torch.searchsorted(closest.cumsum(0), torch.tensor([u], dtype=closest.dtype, device=device))
            pick = pick.clamp_max(n - 1)
        chosen.append(pick)
        closest = torch.minimum(closest, source.squared_from(pick))
    return torch.cat(chosen)


def _update_medoids(source, labels: torch.Tensor, k: int, medoids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Each cluster's member with the smallest sum of distances to the other members ([k] indices).

    Clusters are padded to the largest size S and processed a group at a time ([group, S, S] distances, about
    chunk_size * S elements), so the work is batched on the device rather than a Python loop over clusters. A cluster
    larger than chunk_size is done on its own, chunk_size candidate rows at a time ([chunk_size, S] distances).
    """
    counts = torch.bincount(labels, minlength=k)
    S = int(counts.max())
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(S, device=source.device)
    valid = slot[None, :] < counts[:, None]  # [k, S]
    members = order[(starts[:, None] + slot[None, :]).clamp_max(source.n - 1)]  # [k, S], padded slots repeat
    updated = medoids.clone()
    if S > chunk_size:
        for c in counts.nonzero().squeeze(-1).tolist():
            cluster = members[c, :int(counts[c])]  # [s]
            cost = torch.cat([source.rows_to(cluster[r:r + chunk_size], cluster).sum(-1)
                              for r in range(0, cluster.shape[0], chunk_size)])
            updated[c] = members[c, cost.argmin()]
        return updated
    group = max(1, chunk_size // S)
    for c0 in range(0, k, group):
        idx, mask = members[c0:c0 + group], valid[c0:c0 + group]
        cost = (source.among(idx) * mask[:, None, :]).sum(-1)  # [g, S]
        cost = cost.masked_fill(~mask, float("inf"))
        best = idx.gather(1, cost.argmin(-1, keepdim=True)).squeeze(1)
        nonempty = counts[c0:c0 + group] > 0
        updated[c0:c0 + group] = torch.where(nonempty, best, medoids[c0:c0 + group])
    return updated


def kmedoids(points: torch.Tensor, k: int, seed: Optional[int] = None, max_iter: int = 100,
             chunk_size: int = 4096, *, precomputed: bool = False) -> KMedoidsResult:
    """k medoids of points [n, d] under the Euclidean distance, or of a precomputed distance matrix.

    k-means++ seeding, then alternate: assign every point to its nearest medoid; in each cluster make the member with
    the smallest sum of distances to the other members the new medoid; stop when the medoids no longer change (at
    most max_iter rounds). Euclidean distances are computed in chunks (memory O(chunk_size * max(k, cluster size))),
    on the points' device. Deterministic for a given seed (seed=None draws one from torch's global generator).

    precomputed=True: `points` is a distance matrix [n, n] (float32 or float64, finite, >= 0, symmetric and with a
    zero diagonal up to rounding: 1e-5 of its largest entry in float32, 1e-10 in float64), e.g. from
    pygeo.geodesic_distances (see geodesic_kmedoids); the seeding then draws with probability proportional to the
    squared given distances.
    Returns KMedoidsResult(indices [k], labels [n], cost, n_iter).
    Raises ValueError / TypeError naming the argument for bad shapes, dtypes, NaN/Inf, k outside [1, n], bad seeds.
    """
    if not isinstance(precomputed, bool):
        raise TypeError(f"precomputed must be True or False, got {precomputed!r}")
    if precomputed:
        source = _PrecomputedDistances(_check_distance_matrix("points", points))
    else:
        _checks.real_tensor("points", points, min_dim=2)
        if points.dim() != 2 or points.shape[0] == 0 or points.shape[1] == 0:
            raise ValueError(f"points must have shape [n, d] with n >= 1 and d >= 1, got {tuple(points.shape)}")
        source = _EuclideanDistances(points.detach())
    n = source.n
    k = _check_k(k, n)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")
    if max_iter < 0 or chunk_size < 1:
        raise ValueError(f"max_iter must be >= 0 and chunk_size >= 1, got {max_iter} and {chunk_size}")
    generator = torch.Generator()
    generator.manual_seed(int(torch.randint(2**62, ()).item()) if seed is None else int(seed))
    medoids = _init_plus_plus(source, k, generator)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        labels, _ = _nearest(source, medoids, chunk_size)
        updated = _update_medoids(source, labels, k, medoids, chunk_size)
        if torch.equal(updated, medoids):
            break
        medoids = updated
    labels, distances = _nearest(source, medoids, chunk_size)
    order = torch.argsort(medoids)
    relabel = torch.empty_like(order)
    relabel[order] = torch.arange(k, device=order.device)
    return KMedoidsResult(medoids[order], relabel[labels], float(distances.sum()), n_iter)


def geodesic_kmedoids(metric: Metric, x: torch.Tensor, k: int, seed: Optional[int] = None, max_iter: int = 100,
                      **distance_options: Any) -> KMedoidsResult:
    """k medoids of the points x [N, d] under the geodesic distance of `metric`.

    Computes the [N, N] matrix pygeo.geodesic_distances(metric, x, **distance_options) (N (N - 1) / 2 geodesics:
    the cost, and memory N^2), then runs kmedoids on it (precomputed=True) with seed and max_iter.
    distance_options go to geodesic_distances unchanged: method ("energy" or "graph"), n_points, n_neighbors,
    chunk_size (pairs solved together), tol, resolution, progress, distributed, checkpoint (resumable: an
    interrupted run started again with the same folder solves only the missing blocks). max_iter is kmedoids' own
    (the solver keeps its default iteration limit). To cluster the same points again (another k or seed), compute
    the matrix once and call kmedoids(distances, k, precomputed=True).
    Returns KMedoidsResult(indices [k] rows of x, labels [N], cost = the sum of geodesic distances to the medoids,
    n_iter), as kmedoids.
    Raises ValueError / TypeError for bad x, k or options (before any geodesic is solved); KeyboardInterrupt when
    Ctrl-C stopped the distance computation (finished blocks stay in the checkpoint folder, if one was given).
    """
    from .geometry import geodesic_distances

    _checks.real_tensor("x", x, min_dim=2)
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must have shape [N, d] with N >= 1 and d >= 1, got {tuple(x.shape)}")
    _check_k(k, x.shape[0])
    if "y" in distance_options:
        raise TypeError("geodesic_kmedoids clusters x among itself: y is not an option")
    distances = geodesic_distances(metric, x, **distance_options)
    if not _checks.all_finite(distances):
        # geodesic_distances leaves the pairs it did not solve NaN only when Ctrl-C stopped it.
        raise KeyboardInterrupt("geodesic_kmedoids: the geodesic distances were interrupted (Ctrl-C); with "
                                "checkpoint=PATH a new call solves only the missing blocks")
    # The solver's matrix is symmetric with a zero diagonal by construction; kmedoids checks it all the same.
    return kmedoids(distances, k, seed=seed, max_iter=max_iter, precomputed=True)


def _check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, n={n}], got {k!r}")
    return int(k)


def _check_distance_matrix(name: str, distances: torch.Tensor) -> torch.Tensor:
    """A distance matrix [n, n]: real, finite, non-negative, symmetric with a zero diagonal (to rounding)."""
    _checks.real_tensor(name, distances, min_dim=2)
    if distances.dim() != 2 or distances.shape[0] != distances.shape[1] or distances.shape[0] == 0:
        raise ValueError(f"{name} (precomputed=True) must be a square distance matrix [n, n] with n >= 1, got shape "
                         f"{tuple(distances.shape)}")
    distances = distances.detach()
    if bool((distances < 0).any()):
        raise ValueError(f"{name} (precomputed=True) must be non-negative distances, got a minimum of "
                         f"{float(distances.min()):.3g}")
    tolerance = (1e-5 if distances.dtype == torch.float32 else 1e-10) * float(distances.max())
    asymmetry = float((distances - distances.T).abs().max())
    if asymmetry > tolerance:
        raise ValueError(f"{name} (precomputed=True) must be symmetric, got |D - D^T| up to {asymmetry:.3g}")
    diagonal = float(distances.diagonal().max())
    if diagonal > tolerance:
        raise ValueError(f"{name} (precomputed=True) must have a zero diagonal (the distance of a point to itself), "
                         f"got up to {diagonal:.3g}")
    return distances
