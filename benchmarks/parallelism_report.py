"""docs/parallelism.md: how LSH fits each parallel layout, what the tests check, and the optimizer
memory per rank measured by benchmarks/optimizer_memory.py.

    python benchmarks/parallelism_report.py                 # measures (a few minutes on 2 cores)
    python benchmarks/parallelism_report.py --report-only   # the doc again from docs/data/parallelism.json

Every number in the doc comes from the measurement; every test the doc cites must exist (the
script stops otherwise), so the table cannot describe a test that was renamed or removed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.optimizer_memory import report, run  # noqa: E402

DOCS = REPO / "docs"
RESULTS = DOCS / "data" / "parallelism.json"
MODEL = dict(hidden=512, layers=4, experts=8, bf16=True, repeats=5)
NPROC = 4

LAYOUTS = """# Parallel layouts: tensor, sequence, pipeline, expert and data parallelism with LSH

What megatron-lsh runs, how LSH fits each layout, and what was measured (on CPU, gloo; no GPU was
available to this work). Regenerate with `python benchmarks/parallelism_report.py`.

## Where clustering happens

- **Tensor + sequence parallel** (`--tensor-model-parallel-size T --sequence-parallel`): megatron-core
  hands an MoE layer each tensor-parallel rank's own sequence shard. Each rank routes, clusters and
  dispatches its shard before the expert-parallel all-to-all, so every byte LSH saves is a byte of
  that rank's all-to-all. With `--expert-tensor-parallel-size 1` (the launchers' default) experts
  stay whole and tensor-parallel ranks serve as expert-parallel ranks; with `E > 1` the centroids a
  rank receives are gathered among its expert-tensor-parallel peers, and the outputs
  reduce-scattered back: both carry centroids, and the statistics count them too (bytes each rank
  sends in the gather and the reduce-scatter, against the token rows stock megatron-core would
  send there).
- **Pipeline parallel** (`--pipeline-model-parallel-size P`, interleaved with
  `--num-layers-per-virtual-pipeline-stage N`): megatron-core's own 1F1B and interleaved schedules
  run the micro-batches; nothing about LSH changes inside a stage. Compression statistics and the
  compression controller's all-reductions span all stages (each rank fills in the layers it does
  not hold with zeros), and every rank follows every layer's merge threshold, so the checkpoint
  (written by rank 0) holds all of them.
- **T5-MoE** runs under tensor, sequence, expert and data parallelism; pipeline parallelism is
  refused (`--pipeline-model-parallel-size`: megatron-core 0.16 has no pipeline split between
  encoder and decoder).
- **Distributed optimizer** (`--use-distributed-optimizer`): each data-parallel rank owns whole
  parameters, balanced by size, and keeps Adam's moments and the fp32 master weights (bf16 runs)
  for its own only; after the step the owners' new values are all-gathered into every replica.
  Dense parameters are shared over the data-parallel group, expert parameters over the
  expert-data-parallel group. Gradients are still all-reduced by megatron-core's DDP
  (`--overlap-grad-reduce` overlaps that with the last micro-batch's backward). The checkpoint
  format is the same sharded one either way: a replicated optimizer's checkpoint loads into a
  sharded one and back, on any layout.

megatron-core's own `DistributedOptimizer` is not used: it allocates `device='cuda'` tensors and
checks `param.type() == 'torch.cuda.FloatTensor'`, so it cannot run in the CPU test suite, and no
GPU was available to verify a second, GPU-only path. `--overlap-param-gather` is not implemented
(the owners' values are gathered right after the step).
"""

# (layout, what is checked, the tests that check it as file::function)
TESTS = [
    ("TP2 x SP x EP2, ETP 1 and 2 (one MoE layer)",
     "every token its own cluster: outputs, input gradients and parameter gradients equal stock "
     "megatron-core's to 1e-5",
     ["test_dispatcher_multirank.py::test_singleton_clusters_match_stock_under_tensor_and_sequence_parallelism"]),
    ("TP2 x SP x EP2, ETP 1 and 2 (GPT)",
     "trains with LSH: loss falls; the controller pulls the compression rate down from its start; bytes below stock",
     ["test_parallel_layouts.py::test_four_ranks_train_with_lsh_and_falling_loss"]),
    ("PP2 x VPP2 x EP2 (GPT, interleaved: two chunks of one layer per rank)",
     "loss falls; killed at a checkpoint and resumed: the same losses as an uninterrupted run, and the final "
     "checkpoints (weights and optimizer state) equal bit for bit",
     ["test_parallel_layouts.py::test_pipeline_parallel_kill_and_resume_gives_the_same_losses"]),
    ("TP2 x SP x EP2 -> TP1 x EP4 with a sharded optimizer (GPT, stock dispatch)",
     "the steps after the checkpoint and the final validation loss agree to 1e-4; both final checkpoints "
     "evaluate alike in one process",
     ["test_parallel_layouts.py::"
      "test_checkpoint_saved_at_tp2_ep2_resumes_at_tp1_ep4_with_a_sharded_optimizer_and_the_same_losses"]),
    ("TP2 x SP x EP2 -> TP1 x EP4 (T5, stock dispatch)", "validation loss at the checkpoint agrees to 1e-5",
     ["test_parallel_layouts.py::test_t5_trained_at_tp2_ep2_evaluates_alike_at_tp1_ep4"]),
    ("DP4 x EP2, `--use-distributed-optimizer --overlap-grad-reduce`, bf16",
     "the same losses as the replicated optimizer (1e-6), and a resume from its sharded checkpoint repeats them "
     "exactly; each rank holds under two thirds of the replicated state",
     ["test_parallel_layouts.py::test_distributed_optimizer_and_overlapped_reduction_train_like_the_replicated_optimizer",
      "test_parallel_layouts.py::test_distributed_optimizer_holds_a_share_of_the_state_on_each_rank"]),
    ("launchers", "`TENSOR_PARALLEL=2 PIPELINE_PARALLEL=2` reach the trainer; a layout that does not divide the "
     "processes stops before torchrun with one error naming the knob",
     ["test_launchers.py::test_layout_knobs_reach_the_trainer",
      "test_launchers.py::test_a_layout_that_does_not_fit_the_processes_stops_before_launching"]),
]


def check_tests_exist() -> None:
    for _, _, tests in TESTS:
        for test in tests:
            path, name = test.split("::")
            if not re.search(rf"^def {name}\(", (REPO / "tests" / path).read_text(), re.MULTILINE):
                sys.exit(f"error: docs/parallelism.md cites tests/{path}::{name}, which does not exist")


def command(options) -> str:
    return (f"python -m benchmarks.optimizer_memory --nproc {NPROC} --expert-model-parallel-size {options['ep']} "
            f"--hidden-size {options['hidden']} --num-layers {options['layers']} --num-experts {options['experts']}"
            + (" --bf16" if options["bf16"] else ""))


def write_doc(measured) -> str:
    check_tests_exist()
    lines = [LAYOUTS, "## What the tests check (4 CPU ranks)", "", "| layout | check | tests |", "|---|---|---|"]
    for layout, check, tests in TESTS:
        lines.append(f"| {layout} | {check} | {', '.join(f'`{t}`' for t in tests)} |")
    ratios = {}
    lines += [
        "", "## Optimizer memory per rank", "",
        "Adam's moments and fp32 master weights held by each rank, the replicated optimizer against",
        f"`--use-distributed-optimizer` in the same run on the same model (GPT-MoE, hidden {MODEL['hidden']}, "
        f"{MODEL['layers']} layers,",
        f"{MODEL['experts']} experts, bf16 with fp32 master weights, {NPROC} CPU ranks). Step times are the median "
        f"of {MODEL['repeats']} optimizer",
        "steps (the first allocates Adam's state, hence the spread); the sharded step includes the",
        "all-gather of the owners' values.",
    ]
    for entry in measured:
        options, results = entry["options"], entry["results"]
        ratios[options["ep"]] = statistics.mean(r["distributed"]["bytes"] / r["replicated"]["bytes"] for r in results)
        title = (f"Expert parallel {options['ep']} (dense state shared over {NPROC} replicas, expert state over "
                 f"{NPROC // options['ep']}):" if options["ep"] > 1 else
                 f"Expert parallel 1 (all state shared over {NPROC} replicas):")
        lines += ["", "```bash", command(options), "```", "", title, "", report(results, options)]
    lines += [
        "",
        f"The state per rank falls to {ratios[1]:.3f} of the replicated optimizer's (mean over ranks) when every "
        f"parameter has {NPROC} replicas (1/{NPROC} = {1 / NPROC:.3f} would be an exact split), and to {ratios[2]:.3f} "
        f"when the experts, most of the parameters, have only {NPROC // 2}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report-only", action="store_true", help=f"the doc from {RESULTS.relative_to(REPO)}")
    args = parser.parse_args()
    if args.report_only:
        if not RESULTS.exists():
            sys.exit(f"error: {RESULTS} not found; run the measurement first (without --report-only)")
        measured = json.loads(RESULTS.read_text())
    else:
        check_tests_exist()
        measured = []
        for ep in (2, 1):
            options = dict(MODEL, ep=ep)
            print(f"measuring: {command(options)}", flush=True)
            measured.append({"options": options, "results": run(NPROC, options)})
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(measured, indent=1))
    (DOCS / "parallelism.md").write_text(write_doc(measured))
    print(f"wrote {DOCS / 'parallelism.md'}")


if __name__ == "__main__":
    main()
