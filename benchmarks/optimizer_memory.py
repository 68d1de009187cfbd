"""Optimizer memory per rank: the replicated optimizer against --use-distributed-optimizer,
both measured in the same run on the same model, and the time of one optimizer step each.

Every rank builds the GPT-MoE model at the given layout, takes one real training step's
gradients, and steps each optimizer on them (Adam's moments exist from the first step). Memory
is counted from the tensors each optimizer holds (Adam moments, fp32 master weights with
--bf16), so it does not depend on the allocator; the step time is the median of --repeats.

    python -m benchmarks.optimizer_memory --nproc 4 --expert-model-parallel-size 2 \
        --hidden-size 512 --num-layers 4 --num-experts 8 [--bf16] [--markdown docs/parallelism.md]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def measure(rank, world_size, options):
    """Per rank: optimizer state bytes and step seconds (each repeat) of both optimizers."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    import megatron_lsh  # noqa: F401  (CPU workarounds)
    from megatron_lsh.models import build_gpt_moe_model
    from megatron_lsh.moe import LSHTransformerConfig
    from megatron_lsh.training.initialize import initialize_distributed
    from megatron_lsh.training.optimizer import TrainingOptimizer

    initialize_distributed(expert_model_parallel_size=options["ep"], seed=11)
    dtype = torch.bfloat16 if options["bf16"] else torch.float32
    config = LSHTransformerConfig(
        num_layers=options["layers"], hidden_size=options["hidden"], num_attention_heads=8,
        num_moe_experts=options["experts"], moe_router_topk=2, expert_model_parallel_size=options["ep"],
        add_bias_linear=False, params_dtype=dtype, bf16=options["bf16"], bias_activation_fusion=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
    )
    model = build_gpt_moe_model(config, vocab_size=1024, max_sequence_length=64)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    tokens = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(rank))
    ddp(tokens, torch.arange(64).unsqueeze(0).expand(2, -1), None, labels=tokens).float().mean().backward()
    finalize_model_grads([ddp])
    result = {}
    for name, sharded in (("replicated", False), ("distributed", True)):
        optimizer = TrainingOptimizer(model, lr=1e-4, weight_decay=0.1, fp32_master_weights=options["bf16"],
                                      shard_over_data_parallel=sharded)
        seconds = []
        for _ in range(options["repeats"]):
            optimizer.prepare_grads()
            torch.distributed.barrier()
            start = time.perf_counter()
            optimizer.step()
            torch.distributed.barrier()
            seconds.append(time.perf_counter() - start)
        result[name] = {"bytes": optimizer.state_bytes(), "seconds": seconds}
    result["parameters"] = sum(p.numel() for p in model.parameters())
    return result


def run(nproc: int, options: dict):
    from tests.distributed import run_distributed

    return run_distributed(measure, nproc, options, timeout=1800)


def report(results, options) -> str:
    lines = [
        f"Layout: {len(results)} ranks, expert parallel {options['ep']} (data parallel {len(results)}, "
        f"expert data parallel {len(results) // options['ep']}); hidden {options['hidden']}, "
        f"{options['layers']} layers, {options['experts']} experts, "
        f"{'bf16 with fp32 master weights' if options['bf16'] else 'fp32'}.",
        "",
        "| rank | parameters | replicated optimizer state (MB) | distributed (MB) | ratio | step ms replicated | step "
        "ms distributed |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rank, result in enumerate(results):
        replicated, distributed = result["replicated"], result["distributed"]
        lines.append(
            f"| {rank} | {result['parameters']:,} | {replicated['bytes'] / 2**20:.2f} | "
            f"{distributed['bytes'] / 2**20:.2f} | {distributed['bytes'] / replicated['bytes']:.3f} | "
            f"{1000 * statistics.median(replicated['seconds']):.1f} "
            f"(spread {1000 * (max(replicated['seconds']) - min(replicated['seconds'])):.1f}) | "
            f"{1000 * statistics.median(distributed['seconds']):.1f} "
            f"(spread {1000 * (max(distributed['seconds']) - min(distributed['seconds'])):.1f}) |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--expert-model-parallel-size", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", default=None, help="Append the table to this file.")
    args = parser.parse_args()
    options = dict(ep=args.expert_model_parallel_size, hidden=args.hidden_size, layers=args.num_layers,
                   experts=args.num_experts, bf16=args.bf16, repeats=args.repeats)
    table = report(run(args.nproc, options), options)
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
