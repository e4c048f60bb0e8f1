"""pygeo._distributed and the distributed geodesic distances / volume map: 2 gloo processes on the CPU, started by
torch.multiprocessing inside the test (pygeo itself never starts processes), compared bitwise with one process."""
import os
import pickle
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pygeo import _distributed

SPAWN_TIMEOUT_S = 120  # a hung collective fails the test instead of hanging CI


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, job, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=_timedelta(SPAWN_TIMEOUT_S))
    try:
        result = job(rank, world)
        with open(os.path.join(out_dir, f"rank{rank}.pt"), "wb") as handle:
            pickle.dump(result, handle)
    finally:
        dist.destroy_process_group()


def _timedelta(seconds):
    import datetime
    return datetime.timedelta(seconds=seconds)


def run_on_ranks(job, world=2):
    """job(rank, world) on `world` gloo processes; returns the list of their (picklable) results in rank order."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_worker, args=(world, _free_port(), job, out_dir), nprocs=world, join=False,
                                     start_method="spawn")
        # join(timeout) returns False while processes run; bound the whole wait so a hang fails the test.
        import time
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


def _gather_job(rank, world):
    rows = torch.arange(3 * (rank + 1), dtype=torch.float64).reshape(rank + 1, 3) + 100 * rank  # 1 row, then 2 rows
    return _distributed.all_gather_rows(rows), _distributed.rank_share(10, *_distributed.require_process_group())


def test_all_gather_rows_concatenates_variable_blocks_in_rank_order():
    results = run_on_ranks(_gather_job)
    expected = torch.cat([torch.arange(3, dtype=torch.float64).reshape(1, 3),
                          torch.arange(6, dtype=torch.float64).reshape(2, 3) + 100])
    for gathered, share in results:
        assert torch.equal(gathered, expected)
    assert [list(share) for _, share in results] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
