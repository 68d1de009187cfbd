"""Training step time with LSH against stock megatron-core, both measured in the same run.

Trains one GPT-MoE (mock data, so no files are needed) for --train-iters steps with each setting,
--repeats times interleaved so that the machine's noise falls on every setting alike, one torchrun
per run on this machine's processes (default: one per GPU, else 2 CPU processes; expert parallel
across all of them). For each setting it prints the median step time (Megatron-LM's "elapsed time
per iteration", the first --log-interval steps left out as warm-up), its min-max over repeats, the
ratio to stock, tokens per second, the compression rate, the all-to-all bytes against bf16 stock
and the final training loss.

On one process there is no all-to-all: the ratio is then what LSH's hashing, clustering and
payload encoding cost a real training step, with nothing to gain.

    python benchmarks/training_steps.py                        # GPUs: bf16, hidden 1024, 50 steps, 3 repeats
    python benchmarks/training_steps.py --settings stock mxfp8 default --write-doc  # CPU: the quickstart's size
    python benchmarks/training_steps.py --size tiny            # a rehearsal on CPU: hidden 64, 10 steps
    python benchmarks/training_steps.py --write-doc            # keep the summary, regenerate docs/training_steps.md
    python benchmarks/training_steps.py --report-only          # docs/training_steps.md from docs/data/training_steps/
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from tensorboard_scalars import logged_series  # run as a script from benchmarks/

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from megatron_lsh.moe.config import PAYLOAD_SETTINGS, flag_named_after  # noqa: E402
from megatron_lsh.training.initialize import free_port  # noqa: E402

SUMMARIES = REPO / "docs" / "data" / "training_steps"
DOC = REPO / "docs" / "training_steps.md"
MXFP8_EVERYWHERE = [item for name in PAYLOAD_SETTINGS for item in (flag_named_after(name), "mxfp8")]
SETTINGS = {
    "stock": ["--no-lsh"],
    "mxfp8": ["--no-lsh", *MXFP8_EVERYWHERE],
    "default": ["--lsh"],
}
# Model sizes: "gpu" is a small real model (8192 tokens per rank and micro-batch); "cpu" the
# quickstart's width and tokens per rank (2048); "tiny" rehearses the benchmark in a minute.
SIZES = {
    "gpu": {"--num-layers": 8, "--hidden-size": 1024, "--ffn-hidden-size": 4096, "--num-attention-heads": 16,
            "--seq-length": 2048, "--micro-batch-size": 4, "--train-iters": 50, "--log-interval": 10},
    "cpu": {"--num-layers": 4, "--hidden-size": 128, "--ffn-hidden-size": 512, "--num-attention-heads": 4,
            "--seq-length": 256, "--micro-batch-size": 8, "--train-iters": 50, "--log-interval": 10},
    "tiny": {"--num-layers": 2, "--hidden-size": 64, "--ffn-hidden-size": 256, "--num-attention-heads": 4,
             "--seq-length": 128, "--micro-batch-size": 4, "--train-iters": 10, "--log-interval": 2},
}
COMMON = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
          "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--num-experts", "8", "--moe-router-topk", "2",
          "--moe-layer-freq", "1", "--moe-aux-loss-coeff", "1e-2", "--moe-token-dispatcher-type", "alltoall",
          "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "cosine", "--lr-warmup-iters", "5",
          "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "32000", "--eval-iters", "1",
          "--seed", "1234"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default=None, help="default: gpu with CUDA, else cpu")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["stock", "default"],
                   help="stock (--no-lsh) is always measured: the ratios are against it")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes (default: one per GPU, or 2 on a machine without one)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPUs, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-iters", type=int, default=None, help="default: the size's")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "training_steps")
    p.add_argument("--write-doc", action="store_true")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: at least 1")
    args.settings = ["stock"] + [s for s in args.settings if s != "stock"]
    args.size = args.size or ("gpu" if torch.cuda.is_available() else "cpu")
    return args


def run_flags(args, nproc: int, dtype: str) -> List[str]:
    size = dict(SIZES[args.size])
    if args.train_iters is not None:
        size["--train-iters"] = args.train_iters
    size["--max-position-embeddings"] = size["--seq-length"]
    size["--global-batch-size"] = size["--micro-batch-size"] * nproc
    size["--eval-interval"] = size["--train-iters"] + 1  # the final evaluation only
    flags = [str(item) for pair in size.items() for item in pair] + COMMON
    flags += ["--expert-model-parallel-size", str(nproc)]
    return flags + (["--bf16"] if dtype == "bf16" else [])


def train(flags: List[str], nproc: int, out: Path) -> Dict:
    """One torchrun; its median step time after warm-up and what it logged."""
    shutil.rmtree(out, ignore_errors=True)  # an earlier run's events would be read as this one's
    out.mkdir(parents=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), str(REPO / "pretrain_gpt_moe.py"), *flags,
               "--tensorboard-dir", str(out / "tensorboard")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(out / "log", "w") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if finished.returncode != 0:
        raise RuntimeError(f"training failed (exit {finished.returncode}); its log {out / 'log'} ends:\n"
                           + (out / "log").read_text()[-3000:])
    series = logged_series(out / "tensorboard")
    steps = series("iteration time ms")[1:]  # the first interval holds the warm-up
    if not steps:
        raise RuntimeError(f"{out / 'log'}: fewer than two logging intervals; raise --train-iters")
    sent, stock = sum(series("a2a bytes sent")), sum(series("a2a bytes stock"))
    return {
        "step_ms": statistics.median(steps),
        "tokens_per_s": statistics.median(series("tokens per second")[1:]),
        "compression": statistics.mean(series("lsh compression rate") or [1.0]),
        "a2a_bytes_ratio": sent / stock if stock else None,  # None: nothing crossed between ranks
        "final_loss": series("lm loss")[-1],
    }


def environment(nproc: int, dtype: str) -> str:
    if torch.cuda.is_available():
        where = f"{nproc} x {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    else:
        where = f"{nproc} CPU processes"
    import megatron.core

    return f"{where} | torch {torch.__version__} | megatron-core {megatron.core.__version__} | {dtype}"


def measure(args) -> Dict:
    on_gpu = torch.cuda.is_available()
    nproc = args.nproc_per_node or (torch.cuda.device_count() if on_gpu else 2)
    dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    flags = run_flags(args, nproc, dtype)
    runs: Dict[str, List[Dict]] = {setting: [] for setting in args.settings}
    where = environment(nproc, dtype)
    print(where, flush=True)
    for repeat in range(args.repeats):
        for setting in args.settings:
            started = time.time()
            result = train(flags + SETTINGS[setting], nproc, args.work / f"{setting}-{repeat}")
            runs[setting].append(result)
            print(f"  {setting} repeat {repeat + 1}/{args.repeats}: {result['step_ms']:.1f} ms a step "
                  f"({time.time() - started:.0f} s with start-up)", flush=True)
    return {
        "command": "python benchmarks/training_steps.py " + shlex.join(sys.argv[1:]),
        "environment": where,
        "device": "cuda" if on_gpu else "cpu", "dtype": dtype, "nproc": nproc,
        "flags": shlex.join(flags),
        "tokens_per_rank_micro_batch": SIZES[args.size]["--micro-batch-size"] * SIZES[args.size]["--seq-length"],
        "settings": {setting: shlex.join(SETTINGS[setting]) for setting in args.settings},
        "runs": runs,
    }


def table(summary: Dict) -> List[str]:
    runs = summary["runs"]
    stock = statistics.median(r["step_ms"] for r in runs["stock"])
    lines = ["| setting | step ms, median (min-max) | vs stock | tokens/s | compression | a2a bytes vs stock "
             "| final loss |", "|---|---|---|---|---|---|---|"]
    for setting, results in runs.items():
        steps = [r["step_ms"] for r in results]
        median = statistics.median(steps)
        ratio = results[0]["a2a_bytes_ratio"]
        if setting == "stock" and summary["nproc"] > 1:
            ratio = 1.0  # megatron-core's own dispatch: the reference, not counted as it runs
        lines.append(
            f"| {setting} | {median:.1f} ({min(steps):.1f}-{max(steps):.1f}) | {median / stock:.3f}x "
            f"| {statistics.median(r['tokens_per_s'] for r in results):.0f} "
            f"| {statistics.median(r['compression'] for r in results):.3f} "
            f"| {'-' if ratio is None else f'{ratio:.3f}'} | {results[-1]['final_loss']:.3f} |")
    return lines


def write_doc(summaries_dir: Path = SUMMARIES, doc: Path = DOC) -> None:
    lines = ["# Training step time: LSH against stock megatron-core", "",
             "Regenerate with `python benchmarks/training_steps.py --write-doc` (one section per device and dtype; "
             "`--report-only` rewrites this page from docs/data/training_steps/). One GPT-MoE on mock data "
             "(random tokens, whose hidden states cluster less than text's: LSH merges fewer rows than it would "
             "in a real run), every setting trained for the same steps and repeated interleaved; step time is "
             "Megatron-LM's "
             "elapsed time per iteration after the first logging interval, median over repeats with min-max. "
             "On one process nothing crosses between ranks (a2a bytes '-'): the ratio is then LSH's cost in a "
             "training step, with nothing to gain.", ""]
    summaries = sorted(summaries_dir.glob("*.json")) if summaries_dir.exists() else []
    if not summaries:
        lines.append("Nothing measured yet: run `python benchmarks/training_steps.py --write-doc`.")
    for path in summaries:
        summary = json.loads(path.read_text())
        lines += [f"## {path.stem}", "", f"`{summary['command']}`", "", summary["environment"] + ", "
                  f"{summary['tokens_per_rank_micro_batch']} tokens per rank and micro-batch.", "",
                  *table(summary), "",
                  "Flags: " + "; ".join(f"{name}: `{flags}`" for name, flags in summary["settings"].items())
                  + f"; every run: `{summary['flags']}`", ""]
    doc.write_text("\n".join(lines).rstrip("\n") + "\n")
    print(f"wrote {doc}")


def main() -> None:
    args = parse_args()
    if args.report_only:
        write_doc()
        return
    summary = measure(args)
    print("\n".join(table(summary)))
    if args.write_doc:
        SUMMARIES.mkdir(parents=True, exist_ok=True)
        (SUMMARIES / f"{summary['device']}-{summary['dtype']}-{summary['nproc']}proc-{args.size}.json").write_text(
            json.dumps(summary, indent=1))
        write_doc()


if __name__ == "__main__":
    main()
