"""Side-by-side demonstration: the same GPT-MoE trained with stock megatron-core dispatch and
with LSH dispatch, on a synthetic language, printing loss, compression, bytes and step time."""

from __future__ import annotations

import argparse
import os
import time

import torch

from megatron_lsh.data.synthetic import counting_sequences
from megatron_lsh.models import build_gpt_moe_model
from megatron_lsh.moe import CompressionStats, LSHTransformerConfig, get_compression_tracker
from megatron_lsh.training.arguments import add_lsh_args, lsh_config_kwargs
from megatron_lsh.training.initialize import initialize_distributed, set_seed
from megatron_lsh.training.step import lm_train_step


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--moe-router-topk", type=int, default=2)
    parser.add_argument(
        "--expert-model-parallel-size", type=int, default=None, help="Default: all ranks."
    )
    parser.add_argument("--train-iters", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--vocab-size", type=int, default=256)
    add_lsh_args(parser)
    return parser.parse_args(argv)


def run(args, lsh_enabled: bool, ep_size: int, log) -> dict:
    set_seed(args.seed)
    config = LSHTransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=4 * args.hidden_size,
        moe_ffn_hidden_size=4 * args.hidden_size,
        num_moe_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk,
        moe_router_pre_softmax=args.moe_router_topk == 1,
        moe_aux_loss_coeff=1e-2,
        expert_model_parallel_size=ep_size,
        add_bias_linear=False,
        **{**lsh_config_kwargs(args), "lsh_enabled": lsh_enabled},
    )
    model = build_gpt_moe_model(config, args.vocab_size, args.seq_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    rank = torch.distributed.get_rank()
    generator = torch.Generator().manual_seed(args.seed + rank)
    name = "lsh  " if lsh_enabled else "stock"
    tracker = get_compression_tracker()
    tracker.reset()
    totals: dict = {}
    step_times = []
    for iteration in range(1, args.train_iters + 1):
        tokens = counting_sequences(args.micro_batch_size, args.seq_length + 1, args.vocab_size, generator)
        torch.distributed.barrier()
        start = time.perf_counter()
        loss = lm_train_step(model, optimizer, tokens)
        step_times.append(time.perf_counter() - start)
        stats = tracker.take(group=torch.distributed.group.WORLD)
        for layer, s in stats.items():
            totals[layer] = totals.get(layer, CompressionStats()) + s
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            line = (
                f"[{name}] iteration {iteration:4d}/{args.train_iters} | lm loss {loss:.4f} | "
                f"{1000 * sum(step_times[-args.log_interval:]) / len(step_times[-args.log_interval:]):.1f} ms/step"
            )
            if stats:
                rates = " ".join(f"{k} {v.compression_rate:.3f}" for k, v in sorted(stats.items()))
                merged = sum(stats.values(), CompressionStats())
                line += f" | compression {rates} | a2a bytes {merged.dispatch_bytes_ratio:.3f}x of stock"
            log(line)
    # Skip the first steps: one-time allocation and warm-up.
    steady = step_times[min(5, len(step_times) - 1):]
    return {"loss": loss, "step_time": sum(steady) / len(steady), "stats": totals}


def main(argv=None) -> None:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    ep_size = args.expert_model_parallel_size or world
    initialize_distributed(expert_model_parallel_size=ep_size, seed=args.seed)
    is_first = torch.distributed.get_rank() == 0
    log = print if is_first else (lambda *_: None)
    log(
        f"GPT-MoE: {args.num_layers} layers, hidden {args.hidden_size}, {args.num_experts} experts, "
        f"top-{args.moe_router_topk}, expert parallel {ep_size} of {world} ranks; LSH "
        f"{args.lsh_hash_type}, {args.lsh_num_hashes} hashes x {args.lsh_num_buckets} buckets, "
        f"compensation {'on' if args.lsh_error_compensation else 'off'}"
    )
    stock = run(args, lsh_enabled=False, ep_size=ep_size, log=log)
    lsh = run(args, lsh_enabled=True, ep_size=ep_size, log=log)
    merged = sum(lsh["stats"].values(), CompressionStats())
    log("")
    log(f"{'':24s}{'stock':>12s}{'lsh':>12s}{'lsh/stock':>12s}")
    log(f"{'final lm loss':24s}{stock['loss']:12.4f}{lsh['loss']:12.4f}{lsh['loss'] / stock['loss']:12.3f}")
    log(
        f"{'step time (ms)':24s}{1000 * stock['step_time']:12.1f}{1000 * lsh['step_time']:12.1f}"
        f"{lsh['step_time'] / stock['step_time']:12.3f}"
    )
    log(
        f"{'dispatch a2a (KiB)':24s}{merged.dispatch_bytes_stock / 1024:12.1f}"
        f"{merged.dispatch_bytes / 1024:12.1f}{merged.dispatch_bytes_ratio:12.3f}"
    )
    log(
        f"{'combine a2a (KiB)':24s}{merged.combine_bytes_stock / 1024:12.1f}"
        f"{merged.combine_bytes / 1024:12.1f}{merged.combine_bytes_ratio:12.3f}"
    )
    for layer, s in sorted(lsh["stats"].items()):
        log(f"compression rate {layer}: {s.compression_rate:.3f} ({s.centroids} centroids / {s.tokens} token rows)")
    log(
        "On one machine the all-to-all is a memory copy, so the step-time ratio shows LSH's "
        "compute overhead; the saving appears where the network is the bottleneck."
    )
