"""pygeo._distributed and the distributed geodesic distances / volume map: 2 gloo processes on the CPU, started by
torch.multiprocessing inside the test (pygeo itself never starts processes), compared bitwise with one process."""
import datetime
import os
import pickle
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pygeo import _distributed

SPAWN_TIMEOUT_S = 240  # a hung collective fails the test instead of hanging CI (~6 s on a quiet 2-core machine)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, job, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=SPAWN_TIMEOUT_S))
    try:
        result = job(rank, world)
        with open(os.path.join(out_dir, f"rank{rank}.pt"), "wb") as handle:
            pickle.dump(result, handle)
    finally:
        dist.destroy_process_group()


def run_on_ranks(job, world=2):
    """job(rank, world) on `world` gloo processes; returns the list of their (picklable) results in rank order."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_worker, args=(world, _free_port(), job, out_dir), nprocs=world, join=False,
                                     start_method="spawn")
        # join(timeout) returns False while processes run; bound the whole wait so a hang fails the test.
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"the {world} gloo processes did not finish within {SPAWN_TIMEOUT_S} s")
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.pt"), "rb") as handle:
                results.append(pickle.load(handle))
    return results


# ------------------------------------------------------------------------------------------------ the helpers
def test_rank_share_is_balanced_contiguous_and_complete():
    for n in (0, 1, 5, 7, 100):
        for world in (1, 2, 3, 8):
            shares = [_distributed.rank_share(n, rank, world) for rank in range(world)]
            assert [i for share in shares for i in share] == list(range(n))
            sizes = [len(share) for share in shares]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("bad, message", [
    (dict(n_items=-1, rank=0, world=1), "n_items must be >= 0"),
    (dict(n_items=3, rank=2, world=2), r"rank must be in \[0, world\)"),
    (dict(n_items=3, rank=0, world=0), "world must be >= 1"),
])
def test_rank_share_refuses_bad_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        _distributed.rank_share(**bad)


def test_without_a_process_group_distributed_is_refused():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="initialised default process group.*torchrun"):
        _distributed.require_process_group()




# ------------------------------------------------------------------------------ distances and volume maps, 2 ranks
def _decoder_metric():
    import pygeo

    torch.manual_seed(0)
    decoder = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Softplus(), torch.nn.Linear(16, 24)).double()
    with torch.no_grad():
        decoder[0].weight.mul_(2.0)
    return pygeo.PullbackMetric(decoder.requires_grad_(False), likelihood="bernoulli")


def _points():
    return torch.randn(9, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _geometry_job(checkpoint):
    def job(rank, world):
        import pygeo

        metric = _decoder_metric()
        return {
            "distances": pygeo.geodesic_distances(metric, _points(), chunk_size=5, distributed=True, progress=False),
            "resumable": pygeo.geodesic_distances(metric, _points(), chunk_size=5, distributed=True, progress=False,
                                                  checkpoint=checkpoint),
            "graph": pygeo.geodesic_distances(metric, _points(), method="graph", resolution=40, distributed=True,
                                              progress=False),
            "volume": pygeo.geometry.volume_map(metric, [-2, -2], [2, 2], 9, batch_size=7, dtype=torch.float64,
                                                distributed=True, progress=False).log_volume,
        }
    return job


class _Job:  # a picklable closure for spawn; one spawn for every check (starting processes costs seconds)
    def __init__(self, checkpoint):
        self.checkpoint = checkpoint

    def __call__(self, rank, world):
        rows = torch.arange(3 * (rank + 1), dtype=torch.float64).reshape(rank + 1, 3) + 100 * rank  # 1 row, 2 rows
        result = _geometry_job(self.checkpoint)(rank, world)
        result["gathered"] = _distributed.all_gather_rows(rows)
        result["share"] = list(_distributed.rank_share(10, *_distributed.require_process_group()))
        return result


def test_two_ranks_return_what_one_process_returns_bit_for_bit(tmp_path):
    """2 gloo processes: all_gather_rows, then geodesic_distances (plain, with a shared checkpoint, graph) and
    volume_map with distributed=True against one process, bitwise."""
    import pygeo

    results = run_on_ranks(_Job(str(tmp_path / "shared")))
    expected_rows = torch.cat([torch.arange(3, dtype=torch.float64).reshape(1, 3),
                               torch.arange(6, dtype=torch.float64).reshape(2, 3) + 100])
    for result in results:
        assert torch.equal(result["gathered"], expected_rows)
    assert [result["share"] for result in results] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    metric = _decoder_metric()
    single = pygeo.geodesic_distances(metric, _points(), chunk_size=5, progress=False)
    assert not bool(torch.isnan(single).any())
    graph = pygeo.geodesic_distances(metric, _points(), method="graph", resolution=40, progress=False)
    volume = pygeo.geometry.volume_map(metric, [-2, -2], [2, 2], 9, batch_size=7, dtype=torch.float64,
                                       progress=False).log_volume
    for result in results:
        assert torch.equal(result["distances"], single)
        assert torch.equal(result["resumable"], single)
        assert torch.equal(result["graph"], graph)
        assert torch.equal(result["volume"], volume)
    # The blocks the two ranks wrote (one file per block) resume a single process without any solve.
    assert len(list((tmp_path / "shared").glob("block-*.pt"))) == 8  # 36 pairs in blocks of 5
    assert torch.equal(pygeo.geodesic_distances(metric, _points(), chunk_size=5, progress=False,
                                                checkpoint=tmp_path / "shared"), single)
