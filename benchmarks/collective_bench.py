"""All-to-all latency and bandwidth of the process group, as nccl-tests' alltoall_perf would give
them for a real cluster: the two network numbers the speedup projection takes.

    torchrun --nproc_per_node 2 benchmarks/collective_bench.py --output a2a.json

Each rank sends every other rank the same number of bytes; the time is the median of --repeats
calls after a warm-up. Bandwidth comes from the slope between the smallest and the largest
message, so that the fixed cost is left out: per node, what its ranks send to other nodes (with
more than one node), else per rank, what it sends to the others. Latency under load is what a
small all-to-all adds to a step of compute when it sits between two such steps, as in training:
it includes waiting for the slowest rank, which a lone collective after a barrier does not.
Written by rank 0 as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist


def timed_all_to_all(bytes_per_peer: int, repeats: int) -> float:
    world = dist.get_world_size()
    elements = max(1, bytes_per_peer // 4)
    send = torch.ones(world * elements, dtype=torch.float32)
    receive = torch.empty_like(send)
    times = []
    for attempt in range(repeats + 2):
        dist.barrier()
        start = time.perf_counter()
        dist.all_to_all_single(receive, send)
        elapsed = time.perf_counter() - start
        # The slowest rank's time is the collective's.
        elapsed_tensor = torch.tensor([elapsed], dtype=torch.float64)
        dist.all_reduce(elapsed_tensor, op=dist.ReduceOp.MAX)
        if attempt >= 2:
            times.append(elapsed_tensor.item())
    return statistics.median(times)


def compute_block(size: int, repeats: int) -> None:
    a = torch.ones(size, size)
    for _ in range(repeats):
        a = (a @ a) * (1.0 / size)


def latency_under_load(compute_ms: float, rounds: int) -> float:
    """Seconds a small all-to-all adds between blocks of about ``compute_ms`` of compute."""
    size = 192
    start = time.perf_counter()
    compute_block(size, 20)
    repeats = max(1, int(compute_ms / 1e3 / ((time.perf_counter() - start) / 20)))
    send = torch.ones(dist.get_world_size() * 16)
    receive = torch.empty_like(send)

    def timed(with_collective: bool) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(rounds):
            compute_block(size, repeats)
            if with_collective:
                dist.all_to_all_single(receive, send)
        dist.all_to_all_single(receive, send)  # one closing collective in both: ends together
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return elapsed.item()

    timed(True)  # warm-up
    # Interleaved, so that a slow spell of the shared machine hits both kinds alike.
    alone, mixed = [], []
    for _ in range(5):
        alone.append(timed(False))
        mixed.append(timed(True))
    return max(statistics.median(mixed) - statistics.median(alone), 0.0) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small-bytes", type=int, default=1024, help="per peer: the latency probe")
    parser.add_argument("--large-bytes", type=int, default=4 << 20, help="per peer: the bandwidth probe")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compute-ms", type=float, default=5.0, help="compute between collectives")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    small = timed_all_to_all(args.small_bytes, args.repeats)
    large = timed_all_to_all(args.large_bytes, args.repeats)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    extra = args.large_bytes - args.small_bytes
    seconds = max(large - small, 1e-9)
    result = {
        "world": world,
        "local_world": local,
        "latency_us": small * 1e6,
        "latency_under_load_us": latency_under_load(args.compute_ms, 40) * 1e6,
        "small_s": small,
        "large_s": large,
        "large_bytes": args.large_bytes,
    }
    if local < world:  # several nodes: what each node's link carried
        result["inter_node_gbps_per_node"] = local * (world - local) * extra * 8 / seconds / 1e9
    else:
        result["intra_node_gbps_per_rank"] = (world - 1) * extra * 8 / seconds / 1e9
    if dist.get_rank() == 0:
        with open(args.output, "w") as handle:
            json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
