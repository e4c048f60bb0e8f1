"""k-medoids clustering (alternating / "PAM-lite"), batched and chunked so it runs on large sets and on GPU tensors."""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import torch

from . import _checks


class KMedoidsResult(NamedTuple):
    indices: torch.Tensor  # [k] int64, rows of `points` that are the medoids (sorted)
    labels: torch.Tensor  # [n] int64, index into `indices` of each point's nearest medoid
    cost: float  # sum of distances from each point to its medoid
    n_iter: int  # alternating iterations run


def _nearest(points: torch.Tensor, medoid_indices: torch.Tensor, chunk_size: int):
    """(labels [n], distances [n]) of every point to its nearest medoid, in chunks of rows (O(chunk * k) memory).

    A medoid is always labelled with its own cluster (ties between duplicate points could say otherwise), so the
    clusters are disjoint, never empty, and the updated medoids stay distinct."""
    medoids = points[medoid_indices]
    labels, distances = [], []
    for start in range(0, points.shape[0], chunk_size):
        dist = torch.cdist(points[start:start + chunk_size], medoids)
        best = dist.min(-1)
        labels.append(best.indices)
        distances.append(best.values)
    labels, distances = torch.cat(labels), torch.cat(distances)
    labels[medoid_indices] = torch.arange(medoid_indices.shape[0], device=labels.device)
    distances[medoid_indices] = 0
    return labels, distances


def _init_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next medoid drawn with probability proportional to its squared distance."""
    n = points.shape[0]
    first = torch.randint(n, (1,), generator=generator, device="cpu").to(points.device)
    chosen = [first]
    closest = ((points - points[first]) ** 2).sum(-1)
    for _ in range(1, k):
        total = closest.sum()
        if not bool(total > 0):  # fewer distinct points than k: take any unchosen point
            taken = torch.zeros(n, dtype=torch.bool, device=points.device)
            taken[torch.cat(chosen)] = True
            pick = (~taken).nonzero()[0]
        else:
            u = torch.rand((), generator=generator, device="cpu").item() * float(total)
            pick = torch.searchsorted(closest.cumsum(0), torch.tensor([u], dtype=closest.dtype, device=points.device))
            pick = pick.clamp_max(n - 1)
        chosen.append(pick)
        closest = torch.minimum(closest, ((points - points[pick]) ** 2).sum(-1))
    return torch.cat(chosen)


def _update_medoids(points: torch.Tensor, labels: torch.Tensor, k: int, medoids: torch.Tensor,
                    chunk_size: int) -> torch.Tensor:
    """Each cluster's member with the smallest sum of distances to the other members ([k] indices).

    Clusters are padded to the largest size S and processed a group at a time ([group, S, S] distances, about
    chunk_size * S elements), so the work is batched on the device rather than a Python loop over clusters. A cluster
    larger than chunk_size is done on its own, chunk_size candidate rows at a time ([chunk_size, S] distances).
    """
    counts = torch.bincount(labels, minlength=k)
    S = int(counts.max())
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(S, device=points.device)
    valid = slot[None, :] < counts[:, None]  # [k, S]
    members = order[(starts[:, None] + slot[None, :]).clamp_max(points.shape[0] - 1)]  # [k, S], padded slots repeat
    updated = medoids.clone()
    if S > chunk_size:
        for c in counts.nonzero().squeeze(-1).tolist():
            member_points = points[members[c, :int(counts[c])]]  # [s, d]
            cost = torch.cat([torch.cdist(member_points[r:r + chunk_size], member_points).sum(-1)
                              for r in range(0, member_points.shape[0], chunk_size)])
            updated[c] = members[c, cost.argmin()]
        return updated
    group = max(1, chunk_size // S)
    for c0 in range(0, k, group):
        idx, mask = members[c0:c0 + group], valid[c0:c0 + group]
        member_points = points[idx]  # [g, S, d]
        cost = (torch.cdist(member_points, member_points) * mask[:, None, :]).sum(-1)
        cost = cost.masked_fill(~mask, float("inf"))
        best = idx.gather(1, cost.argmin(-1, keepdim=True)).squeeze(1)
        nonempty = counts[c0:c0 + group] > 0
        updated[c0:c0 + group] = torch.where(nonempty, best, medoids[c0:c0 + group])
    return updated


def kmedoids(points: torch.Tensor, k: int, seed: Optional[int] = None, max_iter: int = 100,
             chunk_size: int = 4096) -> KMedoidsResult:
    """k medoids of points [n, d] under the Euclidean distance.

    k-means++ seeding, then alternate: assign every point to its nearest medoid; in each cluster make the member with
    the smallest sum of distances to the other members the new medoid; stop when the medoids no longer change.
    Distances are computed in chunks (memory O(chunk_size * max(k, cluster size))), on the points' device.
    Deterministic for a given seed (seed=None draws one from torch's global generator).
    Returns KMedoidsResult(indices [k], labels [n], cost, n_iter).
    """
    _checks.real_tensor("points", points, min_dim=2)
    if points.dim() != 2 or points.shape[0] == 0 or points.shape[1] == 0:
        raise ValueError(f"points must have shape [n, d] with n >= 1 and d >= 1, got {tuple(points.shape)}")
    n = points.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, n={n}], got {k!r}")
    k = int(k)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")
    if max_iter < 0 or chunk_size < 1:
        raise ValueError(f"max_iter must be >= 0 and chunk_size >= 1, got {max_iter} and {chunk_size}")
    generator = torch.Generator()
    generator.manual_seed(int(torch.randint(2**62, ()).item()) if seed is None else seed)
    points = points.detach()
    medoids = _init_plus_plus(points, k, generator)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        labels, _ = _nearest(points, medoids, chunk_size)
        updated = _update_medoids(points, labels, k, medoids, chunk_size)
        if torch.equal(updated, medoids):
            break
        medoids = updated
    labels, distances = _nearest(points, medoids, chunk_size)
    order = torch.argsort(medoids)
    relabel = torch.empty_like(order)
    relabel[order] = torch.arange(k, device=order.device)
    return KMedoidsResult(medoids[order], relabel[labels], float(distances.sum()), n_iter)
