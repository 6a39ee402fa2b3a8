"""Run a test worker in 2 spawned gloo processes and collect what each rank reports."""
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, args, world: int = 2, timeout: float = 300):
    """Start ``worker(rank, world, port, *args, queue)`` on every rank; returns {rank: report}.

    A worker puts ``(rank, report)`` on the queue, or ``(rank, "<repr of an exception>")``:
    the parent then fails with the reason instead of hanging.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, report = queue.get(timeout=timeout)
        assert not isinstance(report, str), report
        results[rank] = report
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def rank_env(rank: int, world: int, port: int) -> dict:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}
