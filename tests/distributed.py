"""Run a function on N local gloo processes and bring back each rank's return value.

Process launches cost ~10-25 s on two cores, so each test module makes one launch that runs all its
layouts (creating and destroying Megatron's model-parallel groups between them) and asserts on the
returned results in ordinary pytest functions.
"""

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on this machine now, for a launch's MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    try:
        from megatron_psft.platform import parallel

        parallel.init_process_group(timeout_minutes=5)
        queue.put((rank, "ok", fn(*args)))
    except BaseException:  # report every failure to the parent, with its traceback
        queue.put((rank, "error", traceback.format_exc()))
        raise


def run_distributed(world_size, fn, *args):
    """`fn(*args)` on `world_size` gloo ranks; returns the list of per-rank results, rank order.

    `fn` must be a module-level function (it is pickled to spawned processes)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    context = mp.start_processes(_worker, args=(world_size, free_port(), fn, args, queue),
                                 nprocs=world_size, join=False, start_method="spawn")
    results, errors = {}, []

    def drain():  # while the ranks run: a result larger than the pipe buffer blocks its sender until read
        while not queue.empty():
            rank, status, value = queue.get()
            if status == "error":
                errors.append((rank, value))
            else:
                results[rank] = value

    try:
        while not context.join(timeout=0.2):
            drain()
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        pass  # the traceback comes through the queue
    drain()
    if errors:
        rank, trace = errors[0]
        raise AssertionError(f"rank {rank} failed:\n{trace}")
    assert len(results) == world_size, f"only ranks {sorted(results)} reported"
    return [results[r] for r in range(world_size)]


def run_interpreted(world_size, fn, *args):
    """:func:`run_distributed` with Triton's interpreter on in the ranks (``TRITON_INTERPRET=1`` in their
    environment from the start: triton reads it when a kernel is defined, before any test code runs)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return run_distributed(world_size, fn, *args)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
