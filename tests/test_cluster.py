import warnings

import pytest
import torch

import pygeo
from pygeo.cluster import KMedoidsResult, geodesic_kmedoids, kmedoids


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_precomputed_distances_give_the_euclidean_clustering(dtype):
    points, centres = blobs(n_per=30, seed=4)
    points = points.to(dtype)
    direct = kmedoids(points, 3, seed=1)
    from_matrix = kmedoids(torch.cdist(points, points).fill_diagonal_(0), 3, seed=1, precomputed=True)
    assert isinstance(from_matrix, KMedoidsResult)
    assert torch.equal(direct.indices, from_matrix.indices) and torch.equal(direct.labels, from_matrix.labels)
    assert from_matrix.cost == pytest.approx(direct.cost, rel=1e-5)


def test_precomputed_medoids_are_cluster_optima_of_a_non_euclidean_matrix():
    """An l1 distance matrix (not Euclidean): each medoid minimises the summed given distances in its cluster."""
    points = torch.randn(41, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    D = torch.cdist(points, points, p=1)
    result = kmedoids(D, 4, seed=0, precomputed=True)
    assert torch.equal(result.labels, D[:, result.indices].argmin(-1))
    for cluster in range(4):
        members = (result.labels == cluster).nonzero().squeeze(-1)
        assert result.indices[cluster] == members[D[members][:, members].sum(-1).argmin()]
    assert result.cost == pytest.approx(float(D[:, result.indices].min(-1).values.sum()))


def _bad_matrices():
    points = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    D = torch.cdist(points, points).fill_diagonal_(0)
    asymmetric = D.clone()
    asymmetric[0, 1] += 1
    diagonal = D.clone()
    diagonal[2, 2] = 1
    negative = D.clone()
    negative[0, 1] = negative[1, 0] = -1
    nan = D.clone()
    nan[0, 1] = float("nan")
    return [(torch.ones(4, 5), "square distance matrix"), (asymmetric, "symmetric"), (diagonal, "zero diagonal"),
            (negative, "non-negative"), (nan, "contains NaN"), (torch.ones(5, 5, dtype=torch.int64), "real floating")]


@pytest.mark.parametrize("matrix, message", _bad_matrices())
def test_bad_precomputed_matrices_are_refused(matrix, message):
    with pytest.raises((ValueError, TypeError), match=message):
        kmedoids(matrix, 2, precomputed=True)


def wall_metric():
    """Conformal metric (1 + 20 exp(-(x / 0.3)^2))^2 I: a band around x = 0 that costs about 11 to cross."""
    def fn(z):
        factor = 1 + 20 * torch.exp(-(z[..., 0] / 0.3) ** 2)
        return (factor ** 2)[..., None, None] * torch.eye(2, dtype=z.dtype)
    return pygeo.FunctionMetric(fn)


def two_columns(n=10, dtype=torch.float64):
    """Two columns of n points at x = -0.6 and x = 0.6, y in [-3, 3]: Euclidean 2-medoids cut them top / bottom,
    geodesic ones (across the wall) left / right."""
    g = torch.Generator().manual_seed(0)
    y = torch.linspace(-3, 3, n, dtype=torch.float64)
    columns = [torch.stack([x0 + 0.05 * torch.randn(n, generator=g, dtype=torch.float64), y], -1) for x0 in (-0.6, 0.6)]
    return torch.cat(columns).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_geodesic_kmedoids_finds_the_clusters_the_band_separates(dtype):
    x = two_columns(dtype=dtype)
    side = torch.arange(20) >= 10
    euclidean = kmedoids(x, 2, seed=0)
    same_side = (euclidean.labels == euclidean.labels[0]) == ~side
    assert not same_side.all(), "the Euclidean clusters must differ from the sides, or the test shows nothing"
    result = geodesic_kmedoids(wall_metric(), x, 2, seed=0, method="graph", progress=False)
    assert isinstance(result, KMedoidsResult) and result.indices.shape == (2,) and result.labels.shape == (20,)
    assert torch.equal(result.labels == result.labels[0], ~side)
    D = pygeo.geodesic_distances(wall_metric(), x, method="graph", progress=False)
    assert result.cost == pytest.approx(float(D[:, result.indices].min(-1).values.sum()), rel=1e-6)


def test_geodesic_kmedoids_passes_the_distance_options_through(tmp_path):
    x = two_columns(n=6)
    options = dict(method="energy", n_points=7, chunk_size=8, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unconverged solves across the wall: best lengths kept
        result = geodesic_kmedoids(wall_metric(), x, 2, seed=3, checkpoint=tmp_path / "blocks", **options)
        D = pygeo.geodesic_distances(wall_metric(), x, **options)
    expected = kmedoids(D, 2, seed=3, precomputed=True)
    assert torch.equal(result.indices, expected.indices) and torch.equal(result.labels, expected.labels)
    assert torch.equal(result.labels == result.labels[0], torch.arange(12) < 6)
    assert any((tmp_path / "blocks").iterdir()), "checkpoint reached geodesic_distances"


class CountingMetric(pygeo.FunctionMetric):
    def __init__(self):
        super().__init__(lambda z: (1 + 0 * z[..., :1, None]) * torch.eye(z.shape[-1], dtype=z.dtype))
        self.calls = 0

    def metric(self, z):
        self.calls += 1
        return super().metric(z)


@pytest.mark.parametrize("args, options, error, message", [
    ((torch.randn(5, 2, dtype=torch.float64), 6), {}, ValueError, "k must be"),
    ((torch.randn(5, 2, dtype=torch.float64), 0), {}, ValueError, "k must be"),
    ((torch.randn(5, dtype=torch.float64), 2), {}, ValueError, "x must have"),
    ((torch.zeros(5, 2, dtype=torch.int64), 2), {}, TypeError, "x must be a real floating tensor"),
    ((torch.randn(5, 2, dtype=torch.float64), 2), {"y": torch.randn(3, 2)}, TypeError, "y is not an option"),
    ((torch.randn(5, 2, dtype=torch.float64), 2), {"method": "nope"}, ValueError, "method must be"),
    ((torch.randn(5, 2, dtype=torch.float64), 2), {"no_such_option": 1}, TypeError, "no_such_option"),
])
def test_geodesic_kmedoids_refuses_bad_arguments_before_solving(args, options, error, message):
    metric = CountingMetric()
    with pytest.raises(error, match=message):
        geodesic_kmedoids(metric, *args, progress=False, **options)
    assert metric.calls == 0


class InterruptingMetric(CountingMetric):
    """Raises KeyboardInterrupt (Ctrl-C) once the distance solver has called it `limit` times."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def metric(self, z):
        if self.calls >= self.limit:
            raise KeyboardInterrupt
        return super().metric(z)


@pytest.mark.parametrize("method, limit", [("energy", 3), ("graph", 0)])
def test_ctrl_c_in_the_distances_stops_geodesic_kmedoids(method, limit):
    """geodesic_distances returns NaN for the pairs it did not solve (energy) or re-raises (graph): either way no
    clustering of a partial matrix comes back."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(KeyboardInterrupt):
            geodesic_kmedoids(InterruptingMetric(limit), two_columns(n=5), 2, seed=0, method=method, progress=False)
