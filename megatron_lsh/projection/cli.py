"""The projection's command line: the model and cluster from flags, or from a run's checkpoint and
tensorboard logs; prints the predicted step times with and without LSH (projection/model.py).

    python -m megatron_lsh.projection --help
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Dict, List, Optional

from megatron_lsh.models.architectures import gpt_moe_pattern
from megatron_lsh.moe.config import LSH_PAYLOADS, PAYLOAD_SETTINGS, flag_named_after
from megatron_lsh.moe.payload import PAYLOAD_FORMATS
from megatron_lsh.projection.model import (
    Cluster,
    ModelShape,
    Projection,
    ProjectionError,
    project,
)
from megatron_lsh.tools.loading import saved_run, tokenizer_model_path
from megatron_lsh.training.arguments import default_ffn_hidden_size
from megatron_lsh.training.checkpointing import CheckpointError


def _moe_pattern(value: str, num_layers: int) -> List[int]:
    """--moe-layer-freq as Megatron-LM: N or a list like [1,0,1,0], placed as training places it."""
    text = value.strip()
    freq = [int(v) for v in text.strip("[]").split(",") if v.strip()] if text.startswith("[") else int(text)
    return gpt_moe_pattern({"moe_layer_freq": freq, "num_layers": num_layers})


def compression_from_tensorboard(path: str, last_fraction: float = 0.5) -> List[float]:
    """Per-layer compression rates a run logged ('lsh compression rate/<layer>'), averaged over
    the last ``last_fraction`` of its logged intervals (the rate drifts early on)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(path, size_guidance={"scalars": 0})
    events.Reload()
    # The logger also writes each scalar against tokens and time (' vs tokens', ' vs time').
    tags = [t for t in events.Tags()["scalars"] if t.startswith("lsh compression rate/") and " vs " not in t]
    tags.sort(key=lambda t: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", t)])
    if not tags:
        raise ProjectionError(f"--compression-from {path}: no 'lsh compression rate/<layer>' scalars there; "
                              "point it at a run's --tensorboard-dir trained with --lsh")
    rates = []
    for tag in tags:
        values = [e.value for e in events.Scalars(tag)]
        tail = values[-max(1, math.ceil(len(values) * last_fraction)):]
        rates.append(sum(tail) / len(tail))
    return rates


def model_from_checkpoint(load_dir: str) -> Dict:
    """The flags a megatron-lsh GPT-MoE run saved with its checkpoints, with its tokenizer's size."""
    try:
        saved, task, _ = saved_run(load_dir)
    except CheckpointError as error:
        raise ProjectionError(f"--load {load_dir}: {error}") from None
    if task != "GPT-MoE":
        raise ProjectionError(f"--load {load_dir} is a {task} run; the projection models decoder-only GPT-MoE "
                              "steps: give the model flags instead (both stacks' layers as --num-layers)")
    tokenizer = tokenizer_model_path(load_dir, saved)
    if saved.get("vocab_size") is None and tokenizer and os.path.isfile(tokenizer):
        import sentencepiece

        saved = {**saved, "vocab_size": sentencepiece.SentencePieceProcessor(model_file=tokenizer).get_piece_size()}
    return saved


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model (or --load a run's checkpoints)")
    model.add_argument("--load", help="Take the model flags from this megatron-lsh checkpoint directory.")
    model.add_argument("--num-layers", type=int)
    model.add_argument("--hidden-size", type=int)
    model.add_argument("--ffn-hidden-size", type=int, help="Default Megatron-LM's: 4 x hidden (2/3 of it with "
                                                           "--swiglu).")
    model.add_argument("--moe-ffn-hidden-size", type=int, help="Default --ffn-hidden-size.")
    model.add_argument("--num-experts", type=int)
    model.add_argument("--moe-router-topk", type=int, help="Default 2.")
    model.add_argument("--moe-layer-freq", help="N or a list like [1,0,1,0] (default 1).")
    model.add_argument("--seq-length", type=int)
    model.add_argument("--global-batch-size", type=int)
    model.add_argument("--micro-batch-size", type=int, help="Default 1.")
    model.add_argument("--vocab-size", type=int, help="Default 32000 (with --load: the run's tokenizer's).")
    model.add_argument("--swiglu", action="store_true", default=None)
    model.add_argument("--fp32", action="store_true", help="Activations travel in fp32 (default bf16).")
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--nodes", type=int, required=True)
    cluster.add_argument("--gpus-per-node", type=int, required=True)
    cluster.add_argument("--intra-node-gbps", type=float, required=True,
                         help="Per GPU, each direction (NVLink 4: 3600; PCIe 5: 500).")
    cluster.add_argument("--inter-node-gbps", type=float, required=True,
                         help="Per node, each direction, all NICs together (8 x 400G InfiniBand: 3200).")
    cluster.add_argument("--gpu-tflops", type=float, required=True,
                         help="Achieved per GPU (e.g. 40%% of an H100's 989 bf16 TFLOP/s: 400).")
    cluster.add_argument("--latency-us", type=float, default=20.0,
                         help="Fixed cost of one collective in a running job, waiting for the slowest rank "
                              "included (benchmarks/collective_bench.py measures it under load).")
    cluster.add_argument("--expert-model-parallel-size", type=int, default=None, help="Default: every GPU.")
    cluster.add_argument("--overlap-grad-reduce", action="store_true")
    lsh = parser.add_argument_group("LSH and payloads (the run projected against megatron-core's bf16 dispatch)")
    rate = lsh.add_mutually_exclusive_group()
    rate.add_argument("--compression", type=float, help="Centroids per row, every MoE layer.")
    rate.add_argument("--compression-from", metavar="TENSORBOARD_DIR",
                      help="Per-layer rates a run logged (mean of its second half).")
    rate.add_argument("--no-lsh", action="store_true",
                      help="No LSH: project the payload formats alone (e.g. the four below mxfp8).")
    for name in PAYLOAD_SETTINGS:
        lsh.add_argument(flag_named_after(name), choices=PAYLOAD_FORMATS, default=None,
                         help=f"Default as training's ({LSH_PAYLOADS}); with --load, the run's.")
    lsh.add_argument("--lsh-scope", choices=("all", "inter-node"), default="all")
    lsh.add_argument("--lsh-overhead", type=float, default=0.05,
                     help="Hashing and clustering time as a share of the exact experts' time "
                          "(benchmarks/lsh_overhead.py measures it; default 0.05).")
    return parser


_MODEL_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "moe_ffn_hidden_size", "num_experts",
                "moe_router_topk", "moe_layer_freq", "seq_length", "global_batch_size", "micro_batch_size",
                "vocab_size", "swiglu")
_MODEL_DEFAULTS = {"moe_router_topk": 2, "moe_layer_freq": 1, "micro_batch_size": 1, "vocab_size": 32000,
                   "swiglu": False}


def _model_from_args(args, saved: Dict) -> ModelShape:
    """The flags given, then the run's own (``saved``: with --load), then the defaults."""
    values = {}
    for name in _MODEL_FLAGS:
        given = getattr(args, name)
        values[name] = given if given is not None else saved.get(name, _MODEL_DEFAULTS.get(name))
    missing = [k for k in ("num_layers", "hidden_size", "num_experts", "seq_length", "global_batch_size")
               if values[k] is None]
    if missing:
        raise ProjectionError("missing " + ", ".join("--" + k.replace("_", "-") for k in missing)
                              + " (or --load a run's checkpoints)")
    ffn = values["ffn_hidden_size"] or default_ffn_hidden_size(values["hidden_size"], bool(values["swiglu"]))
    return ModelShape(
        num_layers=values["num_layers"], hidden_size=values["hidden_size"], ffn_hidden_size=ffn,
        moe_ffn_hidden_size=values["moe_ffn_hidden_size"] or ffn, num_experts=values["num_experts"],
        topk=values["moe_router_topk"], seq_length=values["seq_length"],
        global_batch_size=values["global_batch_size"], micro_batch_size=values["micro_batch_size"],
        moe_layer_pattern=_moe_pattern(str(values["moe_layer_freq"]), values["num_layers"]),
        vocab_size=values["vocab_size"] or 32000, swiglu=bool(values["swiglu"]),
        bytes_per_value=4 if args.fp32 else 2,
    )


def _payloads_from_args(args, saved: Dict, lsh_enabled: bool) -> Dict[str, str]:
    """Each direction's format: the flag given, then the run's (with --load), then training's default."""
    return {name: getattr(args, name) or saved.get(name) or LSH_PAYLOADS.value(lsh_enabled)
            for name in PAYLOAD_SETTINGS}


def report(projection: Projection) -> str:
    stock, run = projection.stock, projection.projected
    rates = projection.compression
    if rates is None:
        label, what = "this run", "payloads alone"
    else:
        label = "LSH"
        rate_text = (f"{rates[0]:.3f}" if len(set(rates)) == 1
                     else f"{sum(rates) / len(rates):.3f} mean of {len(rates)} layers")
        what = f"LSH at compression {rate_text}"
    if set(projection.payloads.values()) != {"bf16"}:
        what += " with " + "/".join(sorted(set(projection.payloads.values()))) + " payloads"
    lines = [
        f"{'':24}{'stock':>12}{label:>12}",
        f"{'step time (ms)':24}{1e3 * stock.step_s:12.1f}{1e3 * run.step_s:12.1f}",
        f"{'  compute (ms)':24}{1e3 * stock.compute_s:12.1f}{1e3 * run.compute_s:12.1f}",
        f"{'  all-to-all (ms)':24}{1e3 * stock.a2a_s:12.1f}{1e3 * run.a2a_s:12.1f}",
        f"{'  gradient reduce (ms)':24}{1e3 * stock.grad_reduce_s:12.1f}{1e3 * run.grad_reduce_s:12.1f}",
        f"{'all-to-all share':24}{100 * stock.a2a_share:11.1f}%{100 * run.a2a_share:11.1f}%",
        f"{'inter-node MB/node/step':24}{(stock.a2a_inter_bytes + stock.grad_inter_bytes) / 1e6:12.1f}"
        f"{(run.a2a_inter_bytes + run.grad_inter_bytes) / 1e6:12.1f}",
        f"speedup with {what}: {projection.speedup:.2f}x",
        "assumptions:",
        *(f"  - {a}" for a in projection.assumptions),
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        saved = model_from_checkpoint(args.load) if args.load else {}
        model = _model_from_args(args, saved)
        cluster = Cluster(args.nodes, args.gpus_per_node, args.intra_node_gbps, args.inter_node_gbps,
                          args.gpu_tflops, args.latency_us, args.expert_model_parallel_size,
                          args.overlap_grad_reduce)
        if model.num_experts % cluster.expert_parallel:
            raise ProjectionError(f"--num-experts {model.num_experts} is not divisible by expert parallel "
                                  f"{cluster.expert_parallel}")
        if args.compression is not None:
            compression = args.compression
        elif args.compression_from is not None:
            compression = compression_from_tensorboard(args.compression_from)
        elif args.no_lsh:
            compression = None
        else:
            raise ProjectionError("give --compression, --compression-from or --no-lsh (payload formats alone)")
        projection = project(model, cluster, compression, args.lsh_scope, args.lsh_overhead,
                             _payloads_from_args(args, saved, lsh_enabled=compression is not None))
    except ProjectionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report(projection))
    return 0
