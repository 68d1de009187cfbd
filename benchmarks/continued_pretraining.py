"""LSH on a trained start: continue pretraining an imported model on text it has not trained on.

    python benchmarks/continued_pretraining.py                 # ~25 minutes on 2 cores
    python benchmarks/continued_pretraining.py --report-only   # docs/ again from the saved summaries

The start is the path a user with an open model takes: the quality study's stock quickstart model
(verse, 600 iterations to the end of its cosine schedule; ``quality_study.py --only
quickstart-ablation-stock`` makes it when missing), converted to Hugging Face and imported back with
``megatron_lsh.tools.import_hf``. It then continues on Python source (the quality study's code
corpus, preprocessed with the model's own Hugging Face tokenizer), expert parallel 2, the same seed
and data for every run: stock, 8-bit payloads alone (the peer), the LSH default and a tighter bound.
Output: docs/continued_pretraining.md and its plot, beside the from-scratch numbers of
docs/quality_study.md on the same corpus; each run's summary in docs/data/continued_pretraining/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from quality_study import MXFP8_ALL, summarize  # run from benchmarks/
from quality_study import SUMMARIES as QUALITY_SUMMARIES
from quickstart_data import prepare_data

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SUMMARIES = DOCS / "data" / "continued_pretraining"
START_RUN = "quickstart-ablation-stock"

BOUND_02 = ["--lsh", "--lsh-hash-type", "cross_polytope", "--lsh-num-hashes", "16", "--lsh-num-buckets", "4",
            "--lsh-compensation", "none", "--lsh-target-compression", "off", "--lsh-error-bound", "0.2",
            "--lsh-redraw-interval", "0", *MXFP8_ALL]
RUNS = {
    "stock": ["--no-lsh"],
    "mxfp8": ["--no-lsh", *MXFP8_ALL],
    "default": ["--lsh"],
    "bound 0.2 h16 + mxfp8": BOUND_02,
}
# The quickstart's schedule at a continued-pretraining learning rate (a tenth of from scratch's).
TRAINING = ["--seq-length", "256", "--micro-batch-size", "8", "--global-batch-size", "16", "--lr", "3e-4",
            "--min-lr", "3e-5", "--lr-decay-style", "cosine", "--lr-warmup-iters", "20", "--weight-decay", "0.1",
            "--clip-grad", "1.0", "--seed", "1234", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
            "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall", "--num-workers", "0",
            "--log-interval", "50", "--eval-iters", "8"]


def run(command: List[str], log: Path) -> None:
    with open(log, "w") as out:
        process = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{log.read_text()[-3000:]}")


def imported_start(work: Path) -> Dict:
    """The trained model through Hugging Face and back: (import directory, model flags, data)."""
    start = REPO / "runs" / "quality_study" / "runs" / START_RUN / "checkpoint"
    if not start.exists():
        print(f"  training the start ({START_RUN})", flush=True)
        subprocess.run([sys.executable, "quality_study.py", "--only", START_RUN, "--fresh"], cwd=REPO / "benchmarks",
                       check=True)
    hf, imported = work / "hf", work / "imported"
    shutil.rmtree(hf, ignore_errors=True)
    shutil.rmtree(imported, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "megatron_lsh.tools.convert", "--load", str(start), "--output", str(hf)],
        work / "convert.log")
    run([sys.executable, "-m", "megatron_lsh.tools.import_hf", "--hf-model", str(hf), "--save", str(imported)],
        work / "import.log")
    said = (work / "import.log").read_text().splitlines()
    flags = said[next(i for i, line in enumerate(said) if "continue it with" in line) + 1].replace("'", "").split()
    corpus = Path(prepare_data(REPO / "runs" / "quality_study", "code")["train"]).parent.parent / "corpus"
    data = {}
    for split in ("train", "valid"):
        prefix = work / "data" / split
        run([sys.executable, "data_tools/preprocess_data.py", "--input", str(corpus / f"{split}.jsonl"),
             "--output-prefix", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(hf),
             "--append-eod", "--workers", "2", "--no-progress"], work / f"preprocess-{split}.log")
        data[split] = f"{prefix}_text_document"
    return {"imported": str(imported), "flags": flags, "data": data}


def continue_run(name: str, flags: List[str], start: Dict, iters: int, work: Path, port: int) -> Dict:
    out = work / "runs" / name.replace(" ", "_").replace("+", "")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "pretrain_gpt_moe.py", *start["flags"], *TRAINING, "--train-iters", str(iters),
               "--eval-interval", str(max(iters // 15, 10)), "--load", start["imported"], "--finetune",
               "--train-data-path", start["data"]["train"], "--valid-data-path", start["data"]["valid"],
               "--tensorboard-dir", str(out / "tensorboard"), *flags]
    started = time.time()
    run(command, out / "train.log")
    summary = summarize(out / "tensorboard", iters)
    summary.update(name=name, flags=flags, iters=iters, wall_s=time.time() - started)
    SUMMARIES.mkdir(parents=True, exist_ok=True)
    file_name = name.replace(" ", "_").replace("+", "").replace(".", "")
    (SUMMARIES / f"{file_name}.json").write_text(json.dumps(summary, indent=1))
    return summary


def _from_scratch() -> Dict[str, Dict]:
    """The quality study's code-corpus ablations of the same settings, if committed."""
    names = {"stock": "code-ablation-stock", "mxfp8": "code-ablation-mxfp8",
             "default": "code-ablation-bound_03_h16+mxfp8", "bound 0.2 h16 + mxfp8": "code-ablation-bound_02_h16+mxfp8"}
    found = {}
    for name, key in names.items():
        path = QUALITY_SUMMARIES / f"{key}.json"
        if path.exists():
            found[name] = json.loads(path.read_text())
    return found


def write_report(summaries: Dict[str, Dict]) -> None:
    lines = ["# LSH on a trained start: continued pretraining of an imported model", "",
             "Regenerate with `python benchmarks/continued_pretraining.py` (about 25 minutes on 2 cores;",
             "`--report-only` rewrites this page from docs/data/continued_pretraining/). The start: the quality",
             "study's stock quickstart model (verse; 600 iterations, the end of its cosine schedule), converted to",
             "Hugging Face and imported back with `megatron_lsh.tools.import_hf`. Continued on Python source",
             "(the quality study's code corpus, preprocessed with the model's own Hugging Face tokenizer), expert",
             "parallel 2, learning rate 3e-4 cosine to 3e-5, same seed and data for every run. Bytes: all four",
             "all-to-alls against bf16 stock, as in docs/quality_study.md.", ""]
    stock = summaries.get("stock")
    if stock is None:
        lines += ["Not run yet.", ""]
    else:
        first = stock["ppl_by_iteration"][0][1] if stock["ppl_by_iteration"] else float("nan")
        lines += [f"Validation perplexity on the new text before any step: {first:.1f}.", "",
                  "| run | final val PPL | vs stock | a2a bytes vs stock | last 10% | mean compression | relative "
                  "error |"
                  " from scratch, same corpus and setting (600 it.): vs stock, bytes |",
                  "|---|---|---|---|---|---|---|---|"]
        scratch = _from_scratch()
        reference = scratch.get("stock")

        def mean(s, key):
            values = [v for _, v in s.get(key, [])]
            return f"{sum(values) / len(values):.3f}" if values else "-"

        for name in RUNS:
            s = summaries.get(name)
            if s is None:
                continue
            before = scratch.get(name)
            then = (f"{before['final_ppl'] / reference['final_ppl']:.3f}x, {before['bytes_ratio_run']:.3f}"
                    if before and reference else "-")
            lines.append(f"| {name} | {s['final_ppl']:.2f} | {s['final_ppl'] / stock['final_ppl']:.3f}x | "
                         f"{s['bytes_ratio_run']:.3f} | {s['bytes_ratio_last_10pct']:.3f} | {mean(s, 'compression')} | "
                         f"{mean(s, 'relative_error')} | {then} |")
        lines += ["", "Flags: " + "; ".join(f"{n}: `{' '.join(f)}`" for n, f in RUNS.items()), "",
                  "![perplexity against tokens and against bytes](continued_pretraining.png)", ""]
    DOCS.mkdir(exist_ok=True)
    (DOCS / "continued_pretraining.md").write_text("\n".join(lines) + "\n")
    if stock is not None:
        _plot(summaries)


def _plot(summaries: Dict[str, Dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_tokens, by_bytes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, s in summaries.items():
        curve = [(tokens / 1e6, ppl) for tokens, ppl in s["ppl_by_tokens"] if tokens > 0]
        if curve:
            by_tokens.plot(*zip(*curve), marker=".", label=name)
        ppl = dict(s["ppl_by_iteration"])
        spent = [(fraction, ppl[step]) for step, fraction in s["bytes_fraction_by_iteration"] if step in ppl]
        if spent:
            by_bytes.plot(*zip(*spent), marker=".", label=name)
    by_tokens.set(xlabel="training tokens (millions)", ylabel="validation perplexity", yscale="log",
                  title="continued pretraining: perplexity against tokens")
    by_bytes.set(xlabel="a2a bytes sent / stock's over its whole run", ylabel="validation perplexity", yscale="log",
                 title="perplexity against bytes")
    by_bytes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(DOCS / "continued_pretraining.png", dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300, help="iterations of each continued run")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "continued_pretraining")
    parser.add_argument("--report-only", action="store_true", help="rewrite docs/ from the saved summaries")
    args = parser.parse_args()
    summaries = {}
    for path in sorted(SUMMARIES.glob("*.json")):
        summary = json.loads(path.read_text())
        summaries[summary["name"]] = summary
    if not args.report_only:
        started = time.time()
        start = imported_start(args.work)
        for index, (name, flags) in enumerate(RUNS.items()):
            print(f"[{time.time() - started:6.0f}s] {name}: {args.iters} iterations", flush=True)
            summaries[name] = continue_run(name, flags, start, args.iters, args.work, 29700 + index)
            print(f"    final PPL {summaries[name]['final_ppl']:.2f}, bytes {summaries[name]['bytes_ratio_run']:.3f}x",
                  flush=True)
            write_report(summaries)
    write_report(summaries)
    print(f"wrote {DOCS / 'continued_pretraining.md'}")


if __name__ == "__main__":
    main()
