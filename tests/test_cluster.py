import pytest
import torch

from pygeo.cluster import kmedoids


def blobs(n_per=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[6.0, 0.0], [-6.0, 0.0], [0.0, 9.0]])
    return torch.cat([c + torch.randn(n_per, 2, generator=g) for c in centres]), centres


def test_kmedoids_finds_separated_blobs():
    points, centres = blobs()
    result = kmedoids(points, 3, seed=0)
    assert result.indices.shape == (3,) and result.labels.shape == (180,)
    found = points[result.indices]
    # one medoid per blob, and every point labelled with its own blob's medoid
    owner = torch.cdist(found, centres).argmin(-1)
    assert sorted(owner.tolist()) == [0, 1, 2]
    blob_of_point = torch.arange(3).repeat_interleave(60)
    assert torch.equal(owner[result.labels], blob_of_point)
    expected_cost = torch.cdist(points, found).min(-1).values.sum()
    assert result.cost == pytest.approx(float(expected_cost), rel=1e-6)


def test_kmedoids_medoids_are_cluster_optima():
    g = torch.Generator().manual_seed(1)
    points = torch.randn(90, 3, generator=g, dtype=torch.float64)
    result = kmedoids(points, 5, seed=2)
    # converged: labels are nearest medoids, and each medoid minimises the distance sum within its cluster
    assert torch.equal(result.labels, torch.cdist(points, points[result.indices]).argmin(-1))
    for cluster in range(5):
        members = (result.labels == cluster).nonzero().squeeze(-1)
        costs = torch.cdist(points[members], points[members]).sum(-1)
        assert result.indices[cluster] == members[costs.argmin()]


def test_kmedoids_is_deterministic_and_chunking_invariant():
    points, _ = blobs(n_per=40, seed=3)
    first = kmedoids(points, 7, seed=11)
    again = kmedoids(points, 7, seed=11)
    chunked = kmedoids(points, 7, seed=11, chunk_size=5)
    assert torch.equal(first.indices, again.indices) and torch.equal(first.labels, again.labels)
    assert torch.equal(first.indices, chunked.indices)


def test_kmedoids_edge_cases():
    points = torch.randn(6, 2)
    everyone = kmedoids(points, 6, seed=0)
    assert torch.equal(everyone.indices, torch.arange(6)) and everyone.cost == 0.0
    duplicates = torch.zeros(5, 2)
    result = kmedoids(duplicates, 3, seed=0)
    assert len(set(result.indices.tolist())) == 3
    single = kmedoids(points, 1, seed=0)
    assert single.indices.shape == (1,) and (single.labels == 0).all()


@pytest.mark.parametrize("args, message", [
    ((torch.randn(5, 2), 0), "k must be"),
    ((torch.randn(5, 2), 6), "k must be"),
    ((torch.randn(5), 2), "points must have"),
    ((torch.full((5, 2), float("nan")), 2), "points contains NaN"),
    ((torch.zeros(5, 2, dtype=torch.int64), 2), "points must be a real floating tensor"),
])
def test_kmedoids_bad_input(args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        kmedoids(*args)


def test_clusters_larger_than_a_chunk_are_done_in_rows_with_the_same_result():
    """A cluster of S > chunk_size members is costed chunk_size candidate rows at a time (memory chunk_size * S, not
    S^2), with the same medoids as the batched path."""
    points = torch.randn(3000, 4, generator=torch.Generator().manual_seed(0))
    small_chunks = kmedoids(points, 3, seed=0, chunk_size=256)
    one_chunk = kmedoids(points, 3, seed=0, chunk_size=100000)
    assert torch.equal(small_chunks.indices, one_chunk.indices) and torch.equal(small_chunks.labels, one_chunk.labels)


def test_kmedoids_takes_numpy_integers_and_refuses_bad_k_and_seed():
    import numpy as np

    points = torch.randn(50, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(kmedoids(points, np.int64(3), seed=2).indices, kmedoids(points, 3, seed=2).indices)
    for bad in (True, 0, 51, 2.0):
        with pytest.raises(ValueError, match="k must be"):
            kmedoids(points, bad)
    with pytest.raises(ValueError, match="seed must be"):
        kmedoids(points, 3, seed=2**70)
    with pytest.raises(ValueError, match="d >= 1"):
        kmedoids(torch.randn(5, 0), 1)
