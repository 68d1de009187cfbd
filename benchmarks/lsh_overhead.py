"""LSH cost against the expert MLP it saves traffic for, both measured in the same run.

For each hidden size and number of tokens per rank: route tokens top-k over the experts
(uniformly at random), permute them by expert as megatron-core does, then time
  * megatron-core's expert MLPs (SequentialMLP, ffn = 4 x hidden), forward + backward, on all
    token rows: the stock path;
  * the LSH work on the same rows, forward + backward: hashing, clustering into centroids,
    quantising them to the payload formats and back (both all-to-alls, both directions, on one
    rank: the formats' cost without the wire), and expanding centroid outputs back to tokens;
  * the expert MLPs on the centroids only: what the experts cost under LSH.
and print the compression rate and the bytes ratio of all four all-to-alls against bf16 stock
(every row counted as remote).

    python benchmarks/lsh_overhead.py                     # CPU, fp32, hidden 256-1024, training's `--lsh` settings
    python benchmarks/lsh_overhead.py --device cuda --dtype bf16 --hidden-sizes 4096
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import MISSING

import torch

import megatron_lsh  # noqa: F401  (CPU workarounds)
from megatron.core.transformer.moe.moe_utils import permute
from megatron.core.transformer.spec_utils import build_module
from megatron_lsh.data.synthetic import clustered_hidden_states
from megatron_lsh.lsh import build_hash_family, expand_to_tokens, hash_and_cluster
from megatron_lsh.moe import LSHTransformerConfig, get_lsh_moe_module_spec
from megatron_lsh.moe.config import PAYLOAD_SETTINGS, WithAndWithoutLSH, added_settings
from megatron_lsh.moe.payload import BF16_BYTES, payload_all_to_all, row_bytes
from megatron_lsh.training.arguments import add_setting_flag
from megatron_lsh.training.initialize import initialize_distributed


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--tokens-per-rank", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--moe-router-topk", type=int, default=2)
    # The LSH settings' flags as training has them, with the defaults a plain `--lsh` run takes.
    settings = {f.name: f for f in added_settings()}
    for name in ("lsh_hash_type", "lsh_num_hashes", "lsh_num_buckets", "lsh_error_bound", *PAYLOAD_SETTINGS):
        flag_default = settings[name].metadata["flag_default"]  # one for --lsh and one for --no-lsh: take --lsh's
        add_setting_flag(p, settings[name], default=flag_default.value(lsh_enabled=True)
                         if isinstance(flag_default, WithAndWithoutLSH) else MISSING)
    p.add_argument("--lsh-merge-threshold", type=float, default=None,
                   help="Coarse-to-fine clustering at this merge threshold, as the compression controller "
                        "runs it (--lsh-target-compression); default: plain buckets of all hashes.")
    p.add_argument("--data", choices=["clustered", "gaussian"], default="clustered")
    p.add_argument("--prototypes", type=int, default=64, help="Clustered data: cluster count.")
    p.add_argument("--relative-noise", type=float, default=0.1, help="Clustered data: spread.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


def timed(fn, repeats, device):
    """Median wall time of fn() over `repeats` runs after one warm-up run."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def experts_for(hidden, args, dtype):
    config = LSHTransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=max(1, hidden // 64),
        ffn_hidden_size=4 * hidden,
        moe_ffn_hidden_size=4 * hidden,
        num_moe_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk,
        add_bias_linear=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
    )
    spec = get_lsh_moe_module_spec(args.num_experts).submodules.experts
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return build_module(spec, args.num_experts, config, pg_collection=get_default_pg_collection())


def measure(hidden, tokens, args, device, dtype):
    generator = torch.Generator().manual_seed(hidden * 100003 + tokens)
    if args.data == "clustered":
        x = clustered_hidden_states(tokens, hidden, args.prototypes, args.relative_noise, generator)
    else:
        x = torch.randn(tokens, hidden, generator=generator)
    x = x.to(device=device, dtype=dtype)
    scores = torch.rand(tokens, args.num_experts, generator=generator).to(device)
    chosen = scores.topk(args.moe_router_topk, dim=1).indices
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, chosen, True)
    rows, _, _ = permute(x, routing_map, num_out_tokens=tokens * args.moe_router_topk)
    rows_per_expert = routing_map.sum(dim=0)
    expert_of_row = torch.repeat_interleave(torch.arange(args.num_experts, device=device), rows_per_expert)
    experts = experts_for(hidden, args, dtype).to(device)
    family = build_hash_family(args.lsh_hash_type, hidden, args.lsh_num_hashes, args.lsh_num_buckets, seed=1)

    def cluster(r):
        return hash_and_cluster(r, family, expert_of_row, args.num_experts, args.lsh_merge_threshold,
                                args.lsh_error_bound)[0]

    clusters = cluster(rows)
    centroids_per_expert = clusters.clusters_per_group.cpu()
    grad_rows = torch.randn_like(rows)
    grad_centroids = torch.randn_like(clusters.centroids)

    def expert_pass(inputs, per_expert, grad):
        inputs = inputs.detach().requires_grad_(True)
        out, _ = experts(inputs, per_expert, torch.ones(inputs.size(0), device=device))
        out.backward(grad)

    group = torch.distributed.group.WORLD  # one rank: the formats act, nothing is sent

    def lsh_pass():
        r = rows.detach().requires_grad_(True)
        c = cluster(r)
        n = [c.num_clusters]
        # An identity expert in between: every LSH and payload op, forward and backward, and
        # nothing else.
        sent = payload_all_to_all(group, c.centroids, n, n, args.moe_dispatch_fwd_dtype, args.moe_dispatch_bwd_dtype)
        back = payload_all_to_all(group, sent, n, n, args.moe_combine_fwd_dtype, args.moe_combine_bwd_dtype)
        expand_to_tokens(back, c, r).backward(grad_rows)

    t_expert = timed(lambda: expert_pass(rows, rows_per_expert.cpu(), grad_rows), args.repeats, device)
    t_lsh = timed(lsh_pass, args.repeats, device)
    t_expert_centroids = timed(
        lambda: expert_pass(clusters.centroids, centroids_per_expert, grad_centroids), args.repeats, device
    )
    centroid_bytes = sum(row_bytes(getattr(args, name), hidden) for name in PAYLOAD_SETTINGS)
    stock_bytes = 4 * row_bytes("bf16", hidden) + 2 * BF16_BYTES  # and a prob each way
    return {
        "rows": rows.size(0),
        "centroids": clusters.num_clusters,
        "rate": clusters.num_clusters / rows.size(0),
        "bytes_ratio": clusters.num_clusters * centroid_bytes / (rows.size(0) * stock_bytes),
        "t_expert": t_expert,
        "t_lsh": t_lsh,
        "t_expert_centroids": t_expert_centroids,
    }


def main():
    args = parse_args()
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1").items():
        os.environ.setdefault(key, value)
    initialize_distributed(seed=1)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    data = (
        f"clustered ({args.prototypes} prototypes, relative noise {args.relative_noise})"
        if args.data == "clustered"
        else "Gaussian (no structure: worst case)"
    )
    print(
        f"device {device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else f"device {torch.cuda.get_device_name()}",
        f"| {args.dtype} | {args.num_experts} experts, top-{args.moe_router_topk}, ffn 4h | "
        f"LSH {args.lsh_hash_type}, {args.lsh_num_hashes} hashes x {args.lsh_num_buckets} buckets, merge threshold "
        f"{args.lsh_merge_threshold or 'none'}, error bound {args.lsh_error_bound or 'none'} | payloads "
        + ", ".join(f"{name[4:-6]} {getattr(args, name)}" for name in PAYLOAD_SETTINGS) + f" | data {data}",
    )
    header = (
        f"{'hidden':>6} {'tokens':>6} {'rows':>6} {'centroids':>9} {'rate':>6} {'bytes':>6} "
        f"{'expert ms':>10} {'lsh ms':>8} {'overhead':>8} {'expert on centroids':>20}"
    )
    print(header)
    print("-" * len(header))
    for hidden in args.hidden_sizes:
        for tokens in args.tokens_per_rank:
            r = measure(hidden, tokens, args, device, dtype)
            print(
                f"{hidden:>6} {tokens:>6} {r['rows']:>6} {r['centroids']:>9} {r['rate']:>6.3f} "
                f"{r['bytes_ratio']:>6.3f} {1000 * r['t_expert']:>10.1f} {1000 * r['t_lsh']:>8.1f} "
                f"{r['t_lsh'] / r['t_expert']:>8.1%} {r['t_expert_centroids'] / r['t_expert']:>19.2f}x",
                flush=True,
            )
    print(
        "rate: centroids / token rows. bytes: all four all-to-alls vs bf16 stock (token rows + bf16 probs). "
        "overhead: LSH and payload formats fwd+bwd / expert MLP fwd+bwd on all rows."
    )


if __name__ == "__main__":
    main()
