"""Run a function on several CPU processes joined by gloo, as torchrun would start them."""

from __future__ import annotations

import os
import pickle
import traceback

import torch.multiprocessing as mp

from megatron_lsh.training.initialize import free_port


def _worker(rank, world_size, port, fn, args, results):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    try:
        import torch

        torch.set_num_threads(1)
        # Plain pickle bytes: torch's queue pickling would share tensors through file
        # descriptors that vanish when this process exits before the parent reads them.
        results.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # report any failure to the parent, which raises it
        results.put((rank, "error", traceback.format_exc()))
    finally:
        from megatron_lsh.training.initialize import destroy_distributed

        destroy_distributed()


# Ranks fork from one server process that has imported torch and megatron-core once (about 6 s
# a process on 2 cores), instead of importing them afresh for every rank of every test.
mp.set_forkserver_preload(["torch", "megatron.core", "megatron_lsh", "tests.moe_workers"])


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0):
    """fn(rank, world_size, *args) on world_size processes; returns the results in rank order.

    fn must be importable (a module-level function) and return something picklable.
    """
    ctx = mp.get_context("forkserver")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, results))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes = {}
    try:
        import time

        deadline = time.monotonic() + timeout
        while len(outcomes) < world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks ran over {timeout}s")
            if results.empty():
                if any(p.exitcode not in (None, 0) for p in procs) and results.empty():
                    dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    raise RuntimeError(f"ranks {dead} of {fn.__name__} died without a result")
                time.sleep(0.05)
                continue
            rank, status, value = results.get()
            if status == "error":
                raise RuntimeError(f"rank {rank} of {fn.__name__} failed:\n{value}")
            outcomes[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [outcomes[r] for r in range(world_size)]
