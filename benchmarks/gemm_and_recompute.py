"""--moe-grouped-gemm against megatron-core's sequential experts (the stock path), and what
activation recomputation and fused attention (--attention-backend flash) save and cost, measured
on CPU.

Experts: a rank's local experts (8, 32, 64) of hidden 256 and FFN 512 with SwiGLU (fine-grained
experts, as Qwen3-MoE's), 4096 rows (2048 tokens x top-2) spread unevenly over them; forward and
backward of megatron-core's SequentialMLP and of GroupedGemmExperts holding the same weights.
Recomputation: a 4-layer GPT-MoE (hidden 256, 8 experts, sequence 512, micro-batch 4) forward and
backward, without recomputation and with full (uniform, 1 layer) and selective (core_attn) ones,
and with torch's fused attention instead of megatron-core's unfused one:
peak resident memory growth of the step (tracemalloc cannot see torch's allocations, so the
process's maxrss is read in a fresh subprocess per setting) and the step time.

Times: median and min-max over --repeats (at least 3) after a warm-up; ratios against the stock
path of the same run. This machine is shared; the spread says how much.

    python benchmarks/gemm_and_recompute.py --write-doc    # measure, keep docs/data/gemm_and_recompute.json, write the
    doc
    python benchmarks/gemm_and_recompute.py --report-only  # docs/gemm_and_recompute.md from the summary
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUMMARY = REPO / "docs" / "data" / "gemm_and_recompute.json"
GPU_SUMMARY = REPO / "docs" / "data" / "gemm_and_recompute_cuda.json"
DOC = REPO / "docs" / "gemm_and_recompute.md"
LOCAL_EXPERTS = (8, 32, 64)
ROWS = 4096
RECOMPUTE = {
    "kept": [],
    "full": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    "selective": ["--recompute-granularity", "selective"],
    "fused attention": ["--attention-backend", "flash"],
}


def _init_one_process() -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from megatron_lsh.training.initialize import free_port, initialize_distributed

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    initialize_distributed(seed=1)


def _timed(step, repeats: int) -> list:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def measure_experts(local: int, repeats: int, device: str = "cpu", dtype: str = "fp32") -> dict:
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import build_module

    from megatron_lsh.moe import LSHTransformerConfig
    from megatron_lsh.moe.experts import GroupedGemmExperts

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    config = LSHTransformerConfig(num_layers=1, hidden_size=256, num_attention_heads=4, ffn_hidden_size=512,
                                  moe_ffn_hidden_size=512, num_moe_experts=local, moe_router_topk=2,
                                  gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                                  params_dtype=torch_dtype, bf16=dtype == "bf16")
    spec = get_moe_module_spec(use_te=False, num_experts=local).submodules.experts
    groups = get_default_pg_collection()
    sequential = build_module(spec, local, config, pg_collection=groups)
    grouped = GroupedGemmExperts(local, config, spec.submodules, pg_collection=groups)
    grouped.load_state_dict(sequential.state_dict())
    sequential, grouped = sequential.to(device), grouped.to(device)
    generator = torch.Generator().manual_seed(0)
    share = torch.rand(local, generator=generator) + 0.2  # uneven, every expert some rows
    counts = (share / share.sum() * ROWS).floor().long()
    counts[0] += ROWS - int(counts.sum())
    rows = torch.randn(ROWS, 256, generator=generator).to(device, torch_dtype)
    probs = torch.rand(ROWS, generator=generator).to(device)

    def step(module):
        def run():
            module.zero_grad()
            inputs = rows.clone().requires_grad_()
            output, _ = module(inputs, counts, probs)
            output.float().sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    with torch.no_grad():
        difference = (grouped(rows, counts, probs)[0] - sequential(rows, counts, probs)[0]).abs().max().item()
    stock, ours = _timed(step(sequential), repeats), _timed(step(grouped), repeats)
    return {"local_experts": local, "sequential_s": stock, "grouped_s": ours, "max_abs_difference": difference,
            "device": device, "dtype": dtype}


def measure_recompute(setting: str, repeats: int) -> dict:
    """One setting in a fresh process: peak RSS growth over the model's build, and step times."""
    code = f"""
import json, resource, sys, time
sys.argv = ["x"]
sys.path.insert(0, {str(REPO)!r})
from benchmarks.gemm_and_recompute import recompute_step
print("RESULT " + json.dumps(recompute_step({RECOMPUTE[setting]!r}, {repeats})))
"""
    finished = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                              env={**{k: v for k, v in os.environ.items() if k != "MASTER_PORT"},  # the parent's
                                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    lines = [line for line in finished.stdout.splitlines() if line.startswith("RESULT ")]
    if finished.returncode != 0 or not lines:
        raise RuntimeError(f"recompute {setting}: failed\n{finished.stderr[-3000:]}")
    return {"setting": setting, **json.loads(lines[-1][len("RESULT "):])}


def recompute_step(flags: list, repeats: int) -> dict:
    """Called in the subprocess: a GPT-MoE forward and backward with these recompute flags."""
    import resource

    import torch

    _init_one_process()
    from megatron_lsh.training.arguments import parse_args, validate_args
    from megatron_lsh.training.config import transformer_config_from_args
    from megatron_lsh.training.gpt_task import GPT_TASK

    args = parse_args("benchmark", ["--mock-data", "--num-layers", "4", "--hidden-size", "256",
                                    "--num-attention-heads", "4", "--seq-length", "512", "--micro-batch-size", "4",
                                    "--num-experts", "8", "--vocab-size", "1024", "--lr", "1e-4", "--train-iters", "1",
                                    "--no-lsh", *flags])
    validate_args(args, world_size=1)
    config = transformer_config_from_args(args)
    model = GPT_TASK.build_model(args, config, 1024)
    tokens = torch.randint(0, 1024, (4, 512), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(512).expand(4, 512)

    def step():
        model.zero_grad()
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = _timed(step, repeats)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"step_s": times, "peak_rss_growth_mib": peak_kib / 1024}


def _median_spread(values: list) -> str:
    return f"{statistics.median(values):.3f} s ({min(values):.3f}-{max(values):.3f})"


def _gpu_summary():
    return json.loads(GPU_SUMMARY.read_text()) if GPU_SUMMARY.exists() else None


def _experts_table(rows: list) -> list:
    lines = ["| local experts | sequential (stock) | grouped GEMM | grouped / stock | max abs output difference |",
             "|---|---|---|---|---|"]
    for row in rows:
        ratio = statistics.median(row["grouped_s"]) / statistics.median(row["sequential_s"])
        lines.append(f"| {row['local_experts']} | {_median_spread(row['sequential_s'])} | "
                     f"{_median_spread(row['grouped_s'])} | {ratio:.2f}x | {row['max_abs_difference']:.1e} |")
    return lines


def write_doc(summary: dict, gpu: dict = None) -> None:
    lines = ["# Grouped GEMM experts and activation recomputation on CPU", "",
             "Written by `python benchmarks/gemm_and_recompute.py --write-doc` (summary: "
             "`docs/data/gemm_and_recompute.json`; "
             "`--report-only` rewrites this page from it). One process, "
             f"{summary['threads']} thread(s), {summary['repeats']} timed repeats after a warm-up; median (min-max). "
             ""
             "On CPU `grouped_mm` is a reference kernel; its GPU kernel is what the flag is for.", "",
             "## --moe-grouped-gemm against megatron-core's sequential experts", "",
             f"Forward and backward of one rank's local experts (hidden 256, FFN 512, SwiGLU), {ROWS} rows spread "
             "unevenly over them, the same weights in both.", "",
             *_experts_table(summary["experts"]), ""]
    if gpu is None:
        lines += ["On a GPU: not measured yet (`scripts/gpu_check.sh` runs `--device cuda --dtype bf16`)."]
    else:
        lines += [f"On {gpu['device']} (bf16, {gpu['repeats']} repeats):", "", *_experts_table(gpu["experts"])]
    kept = next(row for row in summary["recompute"] if row["setting"] == "kept")
    lines += ["", "## Activation recomputation and fused attention", "",
              "A 4-layer GPT-MoE (hidden 256, 8 experts, sequence 512, micro-batch 4, fp32), forward and backward. "
              "Memory: growth of the process's peak resident memory over the timed steps (fresh process per "
              "setting; the model is built before it is read). Losses with and without recomputation are equal "
              "(tests/test_precision_and_recompute.py); fused attention's equal megatron-core's unfused ones to "
              "float rounding (tests/test_fused_attention.py). Every row against the first (unfused attention, "
              "nothing recomputed).", "",
              "| setting | step time | time / kept | peak memory growth | memory / kept |", "|---|---|---|---|---|"]
    for row in summary["recompute"]:
        time_ratio = statistics.median(row["step_s"]) / statistics.median(kept["step_s"])
        memory_ratio = row["peak_rss_growth_mib"] / kept["peak_rss_growth_mib"] if kept["peak_rss_growth_mib"] else 0
        flags = " ".join(RECOMPUTE[row["setting"]]) or "(none)"
        lines.append(f"| {row['setting']} (`{flags}`) | {_median_spread(row['step_s'])} | {time_ratio:.2f}x | "
                     f"{row['peak_rss_growth_mib']:.0f} MiB | {memory_ratio:.2f}x |")
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-doc", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: the experts only, in --dtype, into docs/data/gemm_and_recompute_cuda.json "
                             "(scripts/gpu_check.sh)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--experts-only", action="store_true", help="leave recomputation out (a rehearsal)")
    args = parser.parse_args()
    if args.report_only:
        write_doc(json.loads(SUMMARY.read_text()), _gpu_summary())
        return
    if args.repeats < 3:
        parser.error("--repeats: at least 3 (the machine is shared; one timing says little)")
    import torch

    _init_one_process()
    experts = []
    for local in LOCAL_EXPERTS:
        experts.append(measure_experts(local, args.repeats, args.device, args.dtype))
        row = experts[-1]
        print(f"{local} local experts: sequential {_median_spread(row['sequential_s'])}, grouped "
              f"{_median_spread(row['grouped_s'])}", flush=True)
    if args.experts_only and args.device == "cpu":
        return
    if args.device == "cuda":
        summary = {"repeats": args.repeats, "device": torch.cuda.get_device_name(0), "experts": experts}
        if args.write_doc:
            GPU_SUMMARY.write_text(json.dumps(summary, indent=1))
            write_doc(json.loads(SUMMARY.read_text()), summary)
        return
    recompute = []
    for setting in RECOMPUTE:
        recompute.append(measure_recompute(setting, args.repeats))
        print(f"recompute {setting}: {_median_spread(recompute[-1]['step_s'])}, peak +"
              f"{recompute[-1]['peak_rss_growth_mib']:.0f} MiB", flush=True)
    summary = {"repeats": args.repeats, "threads": torch.get_num_threads(), "experts": experts,
               "recompute": recompute}
    if args.write_doc:
        SUMMARY.write_text(json.dumps(summary, indent=1))
        write_doc(summary, _gpu_summary())


if __name__ == "__main__":
    main()
