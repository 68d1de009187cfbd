"""Long-horizon quality of LSH-MoE against stock megatron-core: one command, docs/quality_study.md.

    python benchmarks/quality_study.py                 # about 2.5 hours on 2 cores
    python benchmarks/quality_study.py --only stock    # some variants only (others are kept)
    python benchmarks/quality_study.py --report-only   # docs/ again from the saved run summaries

Every run trains the quickstart's GPT-MoE (hidden 128, 4 layers, 8 experts top-2 in every other
layer, expert parallel 2 on 2 CPU processes) on the embedded corpus, same seed and same data.
Three main runs go the full length (--iters, at least 1500): stock, the old default (fixed
cross-polytope 6 x 4 hashes, no bound, no controller) and the new default (plain --lsh). The
ablations, which find out where quality goes, run --ablation-iters against a stock run of the
same length (the cosine schedule makes runs of different lengths incomparable mid-way).

Per run, from its tensorboard events: validation perplexity against tokens, compression rate per
layer against iteration, all-to-all bytes against stock's over the whole run and its last 10%,
and the median step time. A run whose summary exists with the same flags and length is not run
again (--fresh runs everything anew).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from quickstart_data import prepare_data  # run as a script from benchmarks/

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
# Each run's summary, committed beside the doc so that --report-only works from a fresh clone.
SUMMARIES = DOCS / "data" / "quality_study"

# The quickstart's GPT-MoE as it was when docs/quality_study.md was measured (LayerNorm, GeLU MLPs
# with biases, tied embeddings; scripts/quickstart_cpu.sh now trains the Qwen3-MoE layout so that
# its checkpoints export), evaluated more often for the curves.
MODEL_FLAGS = [
    "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "256",
    "--position-embedding-type", "rope", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
    "--num-experts", "8", "--moe-router-topk", "2", "--moe-layer-freq", "2", "--moe-aux-loss-coeff", "1e-2",
    "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
    "--micro-batch-size", "8", "--global-batch-size", "16",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "50",
    "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "1234",
    "--num-workers", "0", "--log-interval", "50", "--eval-interval", "100", "--eval-iters", "8",
]
# The behaviour before the controller and the bound: explicit, so it holds whatever the defaults.
OLD_DEFAULT = ["--lsh", "--lsh-hash-type", "cross_polytope", "--lsh-num-hashes", "6", "--lsh-num-buckets", "4",
               "--lsh-compensation", "none", "--lsh-target-compression", "off", "--lsh-error-bound", "off",
               "--lsh-redraw-interval", "0"]


@dataclass
class Variant:
    name: str
    flags: List[str]
    main: bool  # full length (else ablation length)
    question: str = ""


def with_flags(base: List[str], **overrides: str) -> List[str]:
    """base with --NAME VALUE replaced (NAME with underscores) or appended."""
    flags = list(base)
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        if flag in flags:
            flags[flags.index(flag) + 1] = value
        else:
            flags += [flag, value]
    return flags


def plan() -> List[Variant]:
    old = OLD_DEFAULT
    return [
        Variant("stock", ["--no-lsh"], True),
        Variant("old default", old, True),
        Variant("new default", ["--lsh"], True),
        Variant("stock", ["--no-lsh"], False, "reference"),
        Variant("cp6 fixed", old, False, "the old default"),
        Variant("target 0.2", with_flags(old, lsh_target_compression="0.2"), False, "the controller alone"),
        Variant("target 0.3", with_flags(old, lsh_target_compression="0.3"), False, "the controller alone"),
        Variant("cp6 bound 0.3", with_flags(old, lsh_error_bound="0.3"), False, "the error bound"),
        Variant("cp6 exact gradients", with_flags(old, lsh_gradient_study="exact_gradients"), False,
                "LSH forward values, stock gradients: the forward error alone"),
        Variant("cp6 exact values", with_flags(old, lsh_gradient_study="exact_values"), False,
                "stock forward values, LSH gradients: the gradient error alone"),
        Variant("cp6 residual compensation", with_flags(old, lsh_compensation="residual"), False,
                "the paper's E(c) + (x - c)"),
        Variant("cp6 expert-gain compensation", with_flags(old, lsh_compensation="expert_gain"), False,
                "E(c) + g_e (x - c), g_e fitted on the expert's own (c, E(c)) pairs"),
        Variant("cp6 redrawn every 100", with_flags(old, lsh_redraw_interval="100"), False,
                "fixed against redrawn projections"),
    ]


def run_key(variant: Variant) -> str:
    return ("main" if variant.main else "ablation") + "-" + variant.name.replace(" ", "_").replace(".", "")


def execute(variant: Variant, iters: int, data: Dict[str, str], work: Path, port: int) -> Dict:
    out = work / "runs" / run_key(variant)
    shutil.rmtree(out, ignore_errors=True)  # a stale run's events would be read again
    out.mkdir(parents=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        "pretrain_gpt_moe.py", *MODEL_FLAGS, "--train-iters", str(iters),
        "--train-data-path", data["train"], "--valid-data-path", data["valid"],
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", data["tokenizer"],
        "--tensorboard-dir", str(out / "tensorboard"), *variant.flags,
    ]
    start = time.time()
    with open(out / "train.log", "w") as log:
        process = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    if process.returncode != 0:
        tail = (out / "train.log").read_text()[-3000:]
        raise RuntimeError(f"run {variant.name!r} failed:\n{tail}")
    summary = summarize(out / "tensorboard", iters)
    summary.update(name=variant.name, main=variant.main, flags=variant.flags, iters=iters,
                   question=variant.question, wall_s=time.time() - start)
    SUMMARIES.mkdir(parents=True, exist_ok=True)
    (SUMMARIES / f"{run_key(variant)}.json").write_text(json.dumps(summary, indent=1))
    return summary


def summarize(tensorboard: Path, iters: int) -> Dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])

    def series(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)] if tag in tags else []

    sent, stock = series("a2a bytes sent"), series("a2a bytes stock")
    tail_from = iters - iters // 10

    def bytes_ratio(first_iteration: int) -> float:
        s = sum(v for step, v in sent if step > first_iteration)
        t = sum(v for step, v in stock if step > first_iteration)
        return s / t if t else 1.0

    layers = sorted(t.split("/", 1)[1] for t in tags
                    if t.startswith("lsh compression rate/") and " vs " not in t)
    ppl = series("validation lm loss PPL")
    return {
        "final_ppl": ppl[-1][1] if ppl else float("nan"),
        "ppl_by_iteration": ppl,
        "ppl_by_tokens": series("validation lm loss PPL vs tokens"),
        "compression_by_layer": {layer: series(f"lsh compression rate/{layer}") for layer in layers},
        "compression": series("lsh compression rate"),
        "relative_error": series("lsh relative error"),
        "merge_radius_by_layer": {layer: series(f"lsh merge radius/{layer}") for layer in layers},
        "bytes_ratio_run": bytes_ratio(0),
        "bytes_ratio_last_10pct": bytes_ratio(tail_from),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=1500, help="length of the main runs")
    parser.add_argument("--ablation-iters", type=int, default=400, help="length of the ablation runs")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "quality_study")
    parser.add_argument("--only", default="", help="comma-separated run keys or names to run (others are kept)")
    parser.add_argument("--skip-ablations", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="run every variant even if its summary exists")
    parser.add_argument("--report-only", action="store_true", help="rewrite docs/ from the saved summaries")
    args = parser.parse_args()

    variants = [v for v in plan() if v.main or not args.skip_ablations]
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    summaries: Dict[str, Dict] = {}
    data = None if args.report_only else prepare_data(args.work)
    study_start = time.time()
    for index, variant in enumerate(variants):
        iters = args.iters if variant.main else args.ablation_iters
        saved = SUMMARIES / f"{run_key(variant)}.json"
        previous = json.loads(saved.read_text()) if saved.exists() else None
        reusable = previous is not None and previous["flags"] == variant.flags and previous["iters"] == iters
        chosen = not wanted or run_key(variant) in wanted or variant.name in wanted
        if args.report_only or (reusable and not args.fresh) or not chosen:
            if previous is not None:
                # Read the events again: a newer summary may take more from them.
                events = args.work / "runs" / run_key(variant) / "tensorboard"
                if events.exists():
                    previous.update(summarize(events, previous["iters"]))
                summaries[run_key(variant)] = previous
            continue
        print(f"[{time.time() - study_start:6.0f}s] {run_key(variant)}: {iters} iterations", flush=True)
        summary = execute(variant, iters, data, args.work, port=29600 + index)
        summaries[run_key(variant)] = summary
        print(f"    final PPL {summary['final_ppl']:.2f}, bytes {summary['bytes_ratio_run']:.3f}x stock "
              f"(last 10%: {summary['bytes_ratio_last_10pct']:.3f}x), {summary['wall_s']:.0f}s", flush=True)
    write_docs(summaries, args)


def write_docs(summaries: Dict[str, Dict], args) -> None:
    from quality_report import write_report

    write_report(summaries, DOCS)
    print(f"wrote {DOCS / 'quality_study.md'}")


if __name__ == "__main__":
    main()
