"""geodesic_distances: the batched Gauss-Newton solver against closed forms and geodesic(), the graph method, Ctrl-C
(NaN for unsolved pairs, a warning), checkpoints (resume, refusal of other inputs), and volume_map."""
import math
import warnings

import pytest
import torch

import pygeo
from pygeo.geometry import distances as distances_module

from geometry_metrics import SphereEmbedding, great_circle, half_plane, sphere_function_metric, sphere_points


def small_decoder(seed=0):
    torch.manual_seed(seed)
    decoder = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Softplus(), torch.nn.Linear(16, 24)).double()
    with torch.no_grad():
        decoder[0].weight.mul_(2.0)  # a curved geometry: geodesics bend away from straight lines
    for parameter in decoder.parameters():
        parameter.requires_grad_(False)
    return decoder


def latent_points(n, seed=1, dtype=torch.float64):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class Interrupting:
    """Wraps a metric; raises KeyboardInterrupt on the `after`-th call of flat_coordinates or metric (as Ctrl-C
    would arrive in the middle of a solve) and counts every call. The counters are private attributes, which a
    checkpoint's fingerprint leaves out (they are not the metric's state)."""

    def __init__(self, metric, after=None):
        self.inner, self._after, self.calls = metric, after, 0
        self.has_flat_coordinates = getattr(metric, "has_flat_coordinates", False)

    @property
    def calls(self):
        return self._calls

    @calls.setter
    def calls(self, value):
        self._calls = value

    def _tick(self):
        self._calls += 1
        if self._after is not None and self._calls == self._after:
            raise KeyboardInterrupt

    def flat_coordinates(self, z):
        self._tick()
        return self.inner.flat_coordinates(z)

    def metric(self, z):
        self._tick()
        return self.inner.metric(z)


# ---------------------------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("metric", [SphereEmbedding(), sphere_function_metric], ids=["gauss-newton", "l-bfgs"])
def test_distances_on_the_sphere_are_great_circles(metric):
    x = sphere_points(7, torch.Generator().manual_seed(5))
    D = pygeo.geodesic_distances(metric, x, n_points=16, chunk_size=8, progress=False)
    assert torch.equal(D, D.T) and torch.equal(D.diagonal(), torch.zeros(7, dtype=torch.float64))
    torch.testing.assert_close(D, great_circle(x[:, None], x[None, :]), rtol=2e-3, atol=1e-6)


def test_odd_n_points_extrapolate_the_chord_length():
    """Chords are short by O(n^-2); with an even number of segments the length is Richardson-extrapolated from every
    other point's chords (O(n^-4)): 9 points beat 10 by far on the sphere, and are exact to ~1e-5."""
    x = sphere_points(6, torch.Generator().manual_seed(8))
    exact = great_circle(x[:, None], x[None, :])
    off = ~torch.eye(6, dtype=torch.bool)
    errors = {}
    for n_points in (9, 10):
        D = pygeo.geodesic_distances(SphereEmbedding(), x, n_points=n_points, tol=1e-8, progress=False)
        errors[n_points] = ((D[off] - exact[off]) / exact[off]).abs().max()
    assert errors[9] < 2e-5 and errors[9] < errors[10] / 20


def test_gauss_newton_matches_the_l_bfgs_geodesic_on_a_decoder():
    """The fused MLP jet + Gauss-Newton path against geodesic(method="energy") (autograd L-BFGS) on the same pairs and
    curve size: the same minimum-energy lengths."""
    metric = pygeo.PullbackMetric(small_decoder(), likelihood="bernoulli")
    x = latent_points(6)
    D = pygeo.geodesic_distances(metric, x, n_points=10, tol=1e-7, progress=False)
    rows, cols = torch.triu_indices(6, 6, offset=1)
    result = pygeo.geodesic(metric, x[rows], x[cols], n_points=10, max_iter=2000)
    assert result.converged.all()
    torch.testing.assert_close(D[rows, cols], result.length, rtol=1e-5, atol=0)
    weights = torch.linspace(0, 1, 10, dtype=torch.float64)[:, None]
    straight = x[rows][:, None] * (1 - weights) + x[cols][:, None] * weights
    # length <= sqrt(energy) <= sqrt(energy of the straight line): the solver went downhill from a curve no worse
    assert bool((D[rows, cols] <= pygeo.geometry.curve_energy(metric, straight)[0].sqrt() * (1 + 1e-9)).all())


@pytest.mark.parametrize("likelihood, sigma", [("bernoulli", None), ("euclidean", None), ("gaussian", 0.5),
                                               ("gaussian", "per-output")])
def test_fused_jet_equals_forward_mode_through_flat_coordinates(likelihood, sigma):
    if sigma == "per-output":
        sigma = torch.linspace(0.5, 2.0, 24, dtype=torch.float64)
    metric = pygeo.PullbackMetric(small_decoder(), likelihood=likelihood, sigma=sigma)
    assert distances_module._mlp_flat_jet(metric, latent_points(3)) is not None  # the fused path is the one tested
    points = latent_points(15).reshape(3, 5, 2)
    phi, J = distances_module._flat_jet(metric, points)
    flat = points.reshape(-1, 2)
    expected_J = torch.func.vmap(torch.func.jacfwd(lambda z: metric.flat_coordinates(z[None])[0]))(flat)
    torch.testing.assert_close(phi.reshape(15, -1), metric.flat_coordinates(flat))
    torch.testing.assert_close(J.reshape(15, 2, -1).transpose(1, 2), expected_J)


def test_rectangular_distances_and_float32():
    metric = pygeo.PullbackMetric(small_decoder().float(), likelihood="bernoulli")
    x, y = latent_points(4, dtype=torch.float32), latent_points(3, seed=2, dtype=torch.float32)
    D_xy = pygeo.geodesic_distances(metric, x, y, chunk_size=5, progress=False)
    D_all = pygeo.geodesic_distances(metric, torch.cat([x, y]), progress=False)
    assert D_xy.shape == (4, 3) and D_xy.dtype == torch.float32
    torch.testing.assert_close(D_xy, D_all[:4, 4:], rtol=2e-3, atol=1e-5)


def test_graph_method_is_close_and_never_much_shorter():
    metric = pygeo.PullbackMetric(small_decoder(), likelihood="bernoulli")
    x = latent_points(12)
    energy = pygeo.geodesic_distances(metric, x, n_points=24, progress=False)
    graph = pygeo.geodesic_distances(metric, x, method="graph", resolution=96, progress=False)
    assert torch.equal(graph, graph.T) and bool((graph.diagonal() == 0).all())
    off = ~torch.eye(12, dtype=torch.bool)
    relative = (graph[off] - energy[off]) / energy[off]
    assert float(relative.median()) < 0.03 and float(relative.min()) > -0.01
    y = latent_points(3, seed=5)
    graph_xy = pygeo.geodesic_distances(metric, x, y, method="graph", resolution=96, progress=False)
    graph_all = pygeo.geodesic_distances(metric, torch.cat([x, y]), method="graph", resolution=96, progress=False)
    torch.testing.assert_close(graph_xy, graph_all[:12, 12:])  # the same grid (over x and y), the same paths
    # d > 3: the kNN graph of the points themselves (a flat metric: distances no shorter than straight lines)
    x5 = latent_points(30).repeat(1, 3)[:, :5]
    A = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    from geometry_metrics import LinearEmbedding
    D5 = pygeo.geodesic_distances(LinearEmbedding(A, torch.zeros(7, dtype=torch.float64)), x5, method="graph",
                                  progress=False)
    straight = ((x5[:, None] - x5[None]) @ A.T).norm(dim=-1)
    assert bool((D5 >= straight * (1 - 1e-9)).all())


@pytest.mark.parametrize("bad, message", [
    (dict(method="exact"), "method must be one of"),
    (dict(n_points=1), "n_points must be an integer >= 2"),
    (dict(resolution=1), "resolution must be an integer >= 2"),
    (dict(tol=0.0), "tol must be a finite number > 0"),
    (dict(distributed="yes"), "distributed must be True or False"),
    (dict(method="graph", checkpoint="somewhere"), "checkpoint is for method='energy'"),
])
def test_bad_options_name_the_argument(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        pygeo.geodesic_distances(half_plane, torch.ones(3, 2, dtype=torch.float64), progress=False, **bad)


def test_distributed_without_a_process_group_is_refused():
    with pytest.raises(RuntimeError, match="initialised default process group"):
        pygeo.geodesic_distances(SphereEmbedding(), sphere_points(3, torch.Generator().manual_seed(1)),
                                 distributed=True, progress=False)


# ------------------------------------------------------------------------------------------------------ Ctrl-C
@pytest.mark.parametrize("inner", [SphereEmbedding(), sphere_function_metric], ids=["gauss-newton", "l-bfgs"])
def test_interrupt_propagates_out_of_the_energy_solvers(inner):
    z0, z1 = sphere_points(3, torch.Generator().manual_seed(2)), sphere_points(3, torch.Generator().manual_seed(3))
    metric = Interrupting(inner, after=3)
    with pytest.raises(KeyboardInterrupt):
        pygeo.geodesic(metric, z0, z1, n_points=8)
    assert metric.calls == 3  # nothing ran after the interrupt


def test_interrupted_distances_are_nan_with_a_warning_and_work_stops():
    x = sphere_points(8, torch.Generator().manual_seed(4))
    full = pygeo.geodesic_distances(SphereEmbedding(), x, chunk_size=4, progress=False)
    counting = Interrupting(SphereEmbedding())
    pygeo.geodesic_distances(counting, x, chunk_size=4, progress=False)
    metric = Interrupting(SphereEmbedding(), after=counting.calls // 2)
    with pytest.warns(UserWarning, match=r"interrupted: \d+ of 28 pairs were not solved and are NaN"):
        D = pygeo.geodesic_distances(metric, x, chunk_size=4, progress=False)
    assert metric.calls == counting.calls // 2  # Ctrl-C stopped the work at once
    solved = ~torch.isnan(D)
    assert 0 < int(solved.sum()) < 64 and torch.equal(solved, solved.T)
    assert torch.equal(D[solved], full[solved])  # the finished blocks are the uninterrupted values


def test_a_real_ctrl_c_stops_the_solves_within_a_second():
    """SIGINT from a timer thread (the way a terminal's Ctrl-C arrives) in the middle of a job of many blocks: the
    call returns soon after with NaN for the unsolved pairs."""
    import os
    import signal
    import threading
    import time

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not \
            signal.default_int_handler:
        pytest.skip("needs Python's default SIGINT handler in the main thread")
    sent = {}

    class Slow(Interrupting):  # starts the timer on its first call, so the signal lands inside the block loop
        def flat_coordinates(self, z):
            if "at" not in sent:
                sent["at"] = None
                timer = threading.Timer(0.3, lambda: (sent.update(at=time.perf_counter()),
                                                      os.kill(os.getpid(), signal.SIGINT)))
                timer.daemon = True
                timer.start()
            time.sleep(0.01)  # a slow decoder: the whole job would take ~minutes
            return super().flat_coordinates(z)

    x = sphere_points(40, torch.Generator().manual_seed(9))
    with pytest.warns(UserWarning, match="not solved and are NaN"):
        D = pygeo.geodesic_distances(Slow(SphereEmbedding()), x, chunk_size=4, progress=False)
    assert time.perf_counter() - sent["at"] < 1.0
    assert bool(torch.isnan(D).any())


# -------------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_resumes_after_an_interrupt_and_equals_an_uninterrupted_run(tmp_path):
    metric_inner = pygeo.PullbackMetric(small_decoder(), likelihood="bernoulli")
    x = latent_points(9)
    counting = Interrupting(metric_inner)
    full = pygeo.geodesic_distances(counting, x, chunk_size=5, progress=False)
    interrupted = Interrupting(metric_inner, after=counting.calls // 2)
    with pytest.warns(UserWarning, match="not solved"):
        partial = pygeo.geodesic_distances(interrupted, x, chunk_size=5, checkpoint=tmp_path / "run", progress=False)
    assert bool(torch.isnan(partial).any())
    saved = sorted(path.name for path in (tmp_path / "run").glob("block-*.pt"))
    assert 0 < len(saved) < math.ceil(36 / 5) and not list((tmp_path / "run").glob(".*tmp"))
    resumed_metric = Interrupting(metric_inner)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = pygeo.geodesic_distances(resumed_metric, x, chunk_size=5, checkpoint=tmp_path / "run",
                                           progress=False)
    assert torch.equal(resumed, full)
    assert resumed_metric.calls < counting.calls  # only the missing blocks were solved
    # A third call finds every block done: no solve at all, the same matrix.
    done_metric = Interrupting(metric_inner)
    assert torch.equal(pygeo.geodesic_distances(done_metric, x, chunk_size=5, checkpoint=tmp_path / "run",
                                                progress=False), full)
    assert done_metric.calls == 1  # the fingerprint's one evaluation at its probe points: no solve


@pytest.mark.parametrize("change", ["points", "option", "weights"])
def test_a_checkpoint_for_other_inputs_is_refused(tmp_path, change):
    decoder = small_decoder()
    x = latent_points(4)
    pygeo.geodesic_distances(pygeo.PullbackMetric(decoder), x, checkpoint=tmp_path, progress=False)
    options = {}
    if change == "points":
        x = x + 1e-3
    elif change == "option":
        options["n_points"] = 11
    else:
        decoder = small_decoder(seed=1)
    with pytest.raises(ValueError, match="made for other inputs or options"):
        pygeo.geodesic_distances(pygeo.PullbackMetric(decoder), x, checkpoint=tmp_path, progress=False, **options)


class PublicCounter:
    """A wrapper as users write them: it counts its calls in a public attribute (issue 24: the fingerprint used to
    hash every public attribute, so the counter made a checkpoint refuse to resume)."""

    def __init__(self, metric):
        self.inner, self.calls, self.has_flat_coordinates = metric, 0, getattr(metric, "has_flat_coordinates", False)

    def flat_coordinates(self, z):
        self.calls += 1
        return self.inner.flat_coordinates(z)

    def metric(self, z):
        self.calls += 1
        return self.inner.metric(z)


def test_checkpoint_resumes_although_a_wrapper_counter_changed(tmp_path):
    wrapper = PublicCounter(pygeo.PullbackMetric(small_decoder(), likelihood="bernoulli"))
    x = latent_points(5)
    first = pygeo.geodesic_distances(wrapper, x, chunk_size=4, checkpoint=tmp_path, progress=False)
    assert wrapper.calls > 1
    calls = wrapper.calls
    again = pygeo.geodesic_distances(wrapper, x, chunk_size=4, checkpoint=tmp_path, progress=False)
    assert torch.equal(again, first)
    assert wrapper.calls == calls + 1  # resumed: only the fingerprint's probe evaluation, no block solved again


def test_checkpoint_refuses_a_metric_whose_weights_or_values_changed(tmp_path):
    decoder = small_decoder()
    wrapper = PublicCounter(pygeo.PullbackMetric(decoder))
    x = latent_points(4)
    pygeo.geodesic_distances(wrapper, x, checkpoint=tmp_path / "pullback", progress=False)
    with torch.no_grad():
        decoder[-1].weight.mul_(1.01)  # the same objects, other weights
    with pytest.raises(ValueError, match="made for other inputs or options"):
        pygeo.geodesic_distances(wrapper, x, checkpoint=tmp_path / "pullback", progress=False)
    # No module to hash: the values at the probe points tell the metrics apart.
    centroids = torch.randn(3, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    latent = pygeo.LatentMetric(centroids, torch.ones(3, 2, dtype=torch.float64), lam=0.1, rho=1.0)
    pygeo.geodesic_distances(latent, x, checkpoint=tmp_path / "latent", progress=False)
    assert torch.equal(pygeo.geodesic_distances(latent, x, checkpoint=tmp_path / "latent", progress=False),
                       pygeo.geodesic_distances(latent, x, progress=False))
    moved = pygeo.LatentMetric(centroids + 1e-3, torch.ones(3, 2, dtype=torch.float64), lam=0.1, rho=1.0)
    with pytest.raises(ValueError, match="made for other inputs or options"):
        pygeo.geodesic_distances(moved, x, checkpoint=tmp_path / "latent", progress=False)


def test_checkpoint_must_be_a_folder(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match="checkpoint must be a folder"):
        pygeo.geodesic_distances(SphereEmbedding(), sphere_points(3, torch.Generator().manual_seed(1)),
                                 checkpoint=path, progress=False)


# --------------------------------------------------------------------------------------------------- volume map
def test_volume_map_is_the_log_volume_on_the_grid():
    metric = pygeo.PullbackMetric(small_decoder(), likelihood="bernoulli")
    result = pygeo.geometry.volume_map(metric, [-1, -2], [1.5, 2], (5, 7), batch_size=6, dtype=torch.float64,
                                       progress=False)
    assert result.log_volume.shape == (5, 7) and [a.numel() for a in result.axes] == [5, 7]
    grid = torch.stack(torch.meshgrid(*result.axes, indexing="ij"), -1)
    torch.testing.assert_close(result.log_volume, metric.log_volume(grid.reshape(-1, 2)).reshape(5, 7))
    torch.testing.assert_close(result.axes[1][[0, -1]], torch.tensor([-2.0, 2.0], dtype=torch.float64))


@pytest.mark.parametrize("bad, message", [
    (dict(lo=[0, 0], hi=[1]), "same number of coordinates"),
    (dict(lo=[0, 1], hi=[1, 1]), "hi must exceed lo"),
    (dict(resolution=1), "resolution must be an int >= 2"),
    (dict(resolution=(3, 3, 3)), "resolution must be an int >= 2 or 2 ints"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(lo=[0, float("nan")]), "finite numbers"),
    (dict(lo=3), "lo must be a sequence"),
    (dict(distributed=True), "initialised default process group"),
])
def test_volume_map_bad_input(bad, message):
    arguments = dict(lo=[0, 0], hi=[1, 1], resolution=3)
    arguments.update(bad)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        pygeo.geometry.volume_map(SphereEmbedding(), progress=False, **arguments)
