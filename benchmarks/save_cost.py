"""What a checkpoint save costs: the first of a run and the later ones, for the quickstart's model
and a larger one, measured as a user's run logs them ("saved checkpoint DIR (S s)": every rank's
shards, RNG files, the marker, fsyncs and the rename).

Each size trains on mock data under torchrun (2 CPU processes, expert parallel 2) with
--save-interval 2, so a run saves at iterations 2, 4 and 6; --repeats runs per size. A stop-save
(SIGTERM, --exit-duration-in-mins) is a later save like these. Prints and writes the median and
the min-max over repeats of the first save, of the later ones, and the checkpoint's size.

    python benchmarks/save_cost.py --write-doc      # measure, keep the summary, write docs/save_cost.md
    python benchmarks/save_cost.py --report-only    # docs/save_cost.md from docs/data/save_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUMMARY = REPO / "docs" / "data" / "save_cost.json"
DOC = REPO / "docs" / "save_cost.md"
SAVED = re.compile(r"saved checkpoint (\S+) \(([0-9.]+)s\)")

SIZES = {
    # scripts/quickstart_cpu.sh's GPT-MoE (vocabulary 8000 as its tokenizer's)
    "quickstart": ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "256",
                   "--num-experts", "8", "--moe-layer-freq", "2", "--micro-batch-size", "8",
                   "--vocab-size", "8000"],
    # MoE in every layer, 8 experts of 2048: about 0.15 billion parameters
    "larger": ["--num-layers", "8", "--hidden-size", "512", "--num-attention-heads", "8", "--seq-length", "64",
               "--num-experts", "8", "--moe-layer-freq", "1", "--micro-batch-size", "1", "--vocab-size", "32000"],
}
COMMON = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--moe-router-topk", "2", "--expert-model-parallel-size",
          "2", "--lsh", "--lr", "1e-4", "--lr-decay-style", "cosine", "--position-embedding-type", "rope",
          "--train-iters", "6", "--save-interval", "2", "--log-interval", "2",
          "--eval-iters", "0", "--num-workers", "0"]


def measure(size: str, work: Path) -> dict:
    save = work / size
    shutil.rmtree(save, ignore_errors=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(REPO / "pretrain_gpt_moe.py"), *SIZES[size], *COMMON, "--save", str(save)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"{size}: training failed (exit {finished.returncode}):\n{finished.stderr[-3000:]}")
    saves = [float(seconds) for _, seconds in SAVED.findall(finished.stdout)]
    if len(saves) != 3:
        raise RuntimeError(f"{size}: expected 3 saves, the log has {len(saves)}")
    newest = save / "iter_0000006"
    size_bytes = sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())
    parameters = re.search(r"([0-9.]+)M parameters on rank 0", finished.stdout)[1]
    shutil.rmtree(save, ignore_errors=True)
    return {"first_s": saves[0], "later_s": saves[1:], "checkpoint_mb": size_bytes / 2**20,
            "parameters_rank0_m": float(parameters)}


def _free_port() -> int:
    sys.path.insert(0, str(REPO))
    from megatron_lsh.training.initialize import free_port

    return free_port()


def summarise(runs: list) -> dict:
    firsts = [run["first_s"] for run in runs]
    laters = [seconds for run in runs for seconds in run["later_s"]]
    return {
        "first_s": {"median": statistics.median(firsts), "min": min(firsts), "max": max(firsts)},
        "later_s": {"median": statistics.median(laters), "min": min(laters), "max": max(laters)},
        "checkpoint_mb": runs[-1]["checkpoint_mb"],
        "parameters_rank0_m": runs[-1]["parameters_rank0_m"],
        "repeats": len(runs),
    }


def report(summary: dict) -> str:
    lines = [
        "# What a checkpoint save costs",
        "",
        "Written by `python benchmarks/save_cost.py --write-doc` (regenerate: `--report-only`), from",
        "`docs/data/save_cost.json`. " + summary["environment"] + ".",
        "",
        "Each run trains on mock data with `--save-interval 2` and saves at iterations 2, 4 and 6; the",
        "seconds are the run's own log line (`saved checkpoint DIR (S s)`: every rank's shards and RNG",
        "files, fsyncs, the `complete` marker, the rename and the tracker). A stop-save (SIGTERM with",
        "`--exit-signal-handler`, `--exit-duration-in-mins`) is a later save. Median (min-max) over",
        f"{summary['sizes'][next(iter(summary['sizes']))]['repeats']} runs.",
        "",
        "| model | parameters on rank 0 | checkpoint | first save | later saves |",
        "|---|---|---|---|---|",
    ]
    for size, row in summary["sizes"].items():
        first, later = row["first_s"], row["later_s"]
        lines.append(f"| {size} (`{' '.join(SIZES[size][:8])} ...`) | {row['parameters_rank0_m']:.1f}M | "
                     f"{row['checkpoint_mb']:.0f} MiB | {first['median']:.2f} s "
                     f"({first['min']:.2f}-{first['max']:.2f}) "
                     f"| {later['median']:.2f} s ({later['min']:.2f}-{later['max']:.2f}) |")
    lines += [
        "",
        "megatron-core's torch_dist writer hands its write results over a queue kept in a helper process",
        "meant for asynchronous saves: starting it (a fresh interpreter importing torch) added seconds to",
        "the first save of a run, and a SIGTERM to the whole job killed it, so the stop-save failed. Saves",
        "here are synchronous and keep those results in process (`megatron_lsh/training/checkpointing.py`):",
        "the first save costs what a later one does, plus the tokenizer copy beside the checkpoints.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "save_cost")
    parser.add_argument("--write-doc", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.report_only:
        DOC.write_text(report(json.loads(SUMMARY.read_text())))
        print(f"wrote {DOC}")
        return
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: at least 1")
    import megatron.core
    import torch

    runs = {size: [] for size in args.sizes}
    for repeat in range(args.repeats):  # interleaved, so the machine's noise falls on every size alike
        for size in args.sizes:
            runs[size].append(measure(size, args.work))
            run = runs[size][-1]
            print(f"[{repeat + 1}/{args.repeats}] {size}: first save {run['first_s']:.2f}s, later "
                  f"{', '.join(f'{s:.2f}s' for s in run['later_s'])}, checkpoint {run['checkpoint_mb']:.0f} MiB",
                  flush=True)
    summary = {
        "environment": f"2 CPU processes (expert parallel 2) | torch {torch.__version__} | megatron-core "
                       f"{megatron.core.__version__}",
        "sizes": {size: summarise(size_runs) for size, size_runs in runs.items()},
    }
    text = report(summary)
    print(text)
    if args.write_doc:
        SUMMARY.parent.mkdir(parents=True, exist_ok=True)
        SUMMARY.write_text(json.dumps(summary, indent=2) + "\n")
        DOC.write_text(text)
        print(f"wrote {SUMMARY} and {DOC}")


if __name__ == "__main__":
    main()
