"""Time to perplexity on an emulated 2-node cluster: stock megatron-core, 8-bit payloads alone, LSH's default.

    sudo python benchmarks/speed_study.py            # about an hour on 2 cores; writes docs/
    sudo python benchmarks/speed_study.py --quick    # a smoke test of a few minutes (docs untouched)
    python benchmarks/speed_study.py --report-only   # docs/ again from docs/data/speed_study.json

Each run trains the same small GPT-MoE on the embedded corpus with scripts/pretrain_gpt_moe_distributed.sh,
one torchrun per node, each node a network namespace whose link is rate-limited with tc. Three
settings: stock (`--no-lsh`, bf16 payloads), the low-precision peer (`--no-lsh`, mxfp8 payloads in all
four all-to-alls) and training's default (plain `--lsh`). Every run shares one learning-rate schedule
(cosine over --iters); stock stops there and its final validation perplexity is the target, the
others train a quarter longer at the schedule's floor, so that a setting which needs more steps
than stock can still reach stock's final perplexity and its wall time to it is measured rather than
"not reached". Per run: step time, the all-to-all share of it, all-to-all bytes against a bf16 stock
payload, the bytes the kernel counted on the nodes' links, validation perplexity at stock's length
and at the end, and the wall time to 1.1x, 1.05x and 1.0x of stock's final perplexity. Runs repeat
(--repeats at 1 Gbit/s, --slow-repeats at 0.1 Gbit/s, interleaved so that the machine's noise falls
on every setting alike); the doc shows medians and min-max. A run whose results exist under --work
with the same flags is not run again (--fresh runs everything anew), so the study may be run in parts.
Output: docs/speed_study.md, docs/ppl_vs_time.png, docs/step_time_vs_bandwidth.png and the summary
docs/data/speed_study.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from emulated_cluster import ClusterUnavailable, EmulatedCluster  # run as a script from benchmarks/
from quickstart_data import prepare_data

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from megatron_lsh.training.arguments import lsh_settings_of_flags  # noqa: E402

DOCS = REPO / "docs"
# The last study's results, committed beside the doc so that --report-only works from a fresh clone.
RESULTS = DOCS / "data" / "speed_study.json"

# Targets for "wall time to reach a perplexity", as multiples of the stock run's final perplexity.
TARGET_LEVELS = (1.1, 1.05, 1.0)
# The bar: the default reaches stock's final perplexity this much sooner than stock, at 1 Gbit/s.
TARGET_SPEEDUP = 1.3
# Steps the compressed settings train beyond stock's schedule, as a fraction of it (at the floor LR).
EXTRA_FRACTION = 0.25
LINKS = {1000: "1 Gbit/s", 100: "0.1 Gbit/s"}

MODEL_FLAGS = [
    "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "256", "--num-attention-heads", "4",
    "--seq-length", "128", "--max-position-embeddings", "128", "--normalization", "LayerNorm",
    "--num-experts", "8", "--moe-router-topk", "2", "--moe-layer-freq", "1",
    "--micro-batch-size", "16", "--global-batch-size", "32", "--lr", "2e-3", "--min-lr", "2e-4",
    "--lr-decay-style", "cosine", "--position-embedding-type", "rope",
    "--lr-warmup-iters", "20", "--weight-decay", "0.1", "--log-interval", "25", "--eval-interval", "25",
    "--eval-iters", "4", "--num-workers", "0", "--save-interval", "100000",
    "--timing-log-level", "1",  # the all-to-all share of step time
]
MXFP8 = [flag for direction in ("dispatch-fwd", "dispatch-bwd", "combine-fwd", "combine-bwd")
         for flag in (f"--moe-{direction}-dtype", "mxfp8")]
SETTINGS: Dict[str, List[str]] = {
    "stock": ["--no-lsh"],
    "mxfp8": ["--no-lsh", *MXFP8],
    "default": ["--lsh"],
    # The candidate that sends fewest bytes for the same bound (docs/quality_study.md).
    "bisect": ["--lsh", "--lsh-split", "bisect"],
    # Bisection at a tighter bound: does a smaller error budget keep its bytes and lose its gap?
    "bisect-0.2": ["--lsh", "--lsh-split", "bisect", "--lsh-error-bound", "0.2"],
}
DESCRIPTIONS = {
    "stock": "megatron-core's dispatch, bf16 payloads (`--no-lsh`)",
    "mxfp8": "the low-precision peer: mxfp8 payloads in all four all-to-alls, no LSH",
    "default": "training's default, plain `--lsh` (error bound 0.3, 16 levels of hashes, mxfp8 payloads)",
    "bisect": "the default's bound with clusters halved across their widest spread instead of hash levels "
              "(`--lsh --lsh-split bisect`)",
    "bisect-0.2": "bisection at a tighter bound (`--lsh --lsh-split bisect --lsh-error-bound 0.2`)",
}


@dataclass
class Run:
    setting: str
    rate_mbit: int
    repeat: int
    iters: int
    schedule_iters: int
    results: Dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.setting}-{self.rate_mbit}mbit-{self.repeat}"

    def flags(self) -> List[str]:
        return [*MODEL_FLAGS, "--train-iters", str(self.iters), "--lr-decay-iters", str(self.schedule_iters),
                *SETTINGS[self.setting]]

    def lsh_settings(self) -> Dict:
        """What its flags run today: the same flags mean another run once a default changes."""
        return lsh_settings_of_flags(SETTINGS[self.setting])

    def to_json(self) -> Dict:
        return {"setting": self.setting, "rate_mbit": self.rate_mbit, "repeat": self.repeat, "iters": self.iters,
                "schedule_iters": self.schedule_iters, "flags": SETTINGS[self.setting],
                "command_flags": self.flags(), "lsh_settings": self.lsh_settings(), "results": self.results}


def plan(schedule_iters: int, repeats: int, slow_repeats: int) -> List[Run]:
    extended = schedule_iters + math.ceil(EXTRA_FRACTION * schedule_iters)
    runs = []
    for repeat in range(max(repeats, slow_repeats)):
        for rate, count in ((1000, repeats), (100, slow_repeats)):
            if repeat < count:
                runs += [Run(setting, rate, repeat, schedule_iters if setting == "stock" else extended, schedule_iters)
                         for setting in SETTINGS]
    return runs


def execute(run: Run, index: int, data: Dict[str, str], work: Path, invocation: str) -> None:
    out = work / "runs" / run.key
    # A fresh directory: a previous study's checkpoint would be resumed and its events read again.
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env_common = dict(
        OMP_NUM_THREADS="1", NNODES="2", GPUS_PER_NODE="1", MASTER_ADDR="10.213.0.1",
        MASTER_PORT=str(29400 + index % 500), PRECISION="fp32", EXPERT_PARALLEL="2", DATA_PATH=data["train"],
        VALID_DATA_PATH=data["valid"], TOKENIZER_MODEL=data["tokenizer"], CHECKPOINT_DIR=str(out / "checkpoints"),
        TENSORBOARD_DIR=str(out / "tensorboard"), PATH=__import__("os").environ["PATH"], PYTHONPATH=str(REPO),
    )
    with EmulatedCluster(num_nodes=2, rate_mbit=run.rate_mbit) as cluster:
        before = [cluster.interface_bytes(i)["tx_bytes"] for i in range(2)]
        start = time.time()
        processes = []
        for node in range(2):
            log = open(out / f"node{node}.log", "w")
            processes.append((cluster.popen(node, ["bash", "scripts/pretrain_gpt_moe_distributed.sh", *run.flags()],
                                            env={**env_common, "NODE_RANK": str(node)}, cwd=REPO,
                                            stdout=log, stderr=subprocess.STDOUT), log))
        try:
            for process, log in processes:
                process.wait(timeout=3600)
        finally:
            for process, log in processes:
                if process.poll() is None:
                    process.kill()
                log.close()
        wall = time.time() - start
        wire = sum(cluster.interface_bytes(i)["tx_bytes"] for i in range(2)) - sum(before)
    if any(process.returncode != 0 for process, _ in processes):
        tail = (out / "node0.log").read_text()[-3000:]
        raise RuntimeError(f"run {run.key} failed:\n{tail}")
    run.results = summarize(out / "tensorboard", run, wire, wall)
    run.results["invocation"] = invocation
    (out / "results.json").write_text(json.dumps(run.to_json(), indent=1))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # 10s of MB each; the study needs only the events


def invocations_note(runs: List[Run]) -> str:
    """Which settings' runs an earlier invocation measured, when not all were measured together
    (then they were not interleaved with the others)."""
    started = {run.setting: run.results.get("invocation", "an earlier invocation") for run in runs if run.results}
    if len(set(started.values())) <= 1:
        return ""
    by_start: Dict[str, List[str]] = {}
    for setting, start in started.items():
        by_start.setdefault(start, []).append(setting)
    return (" Measured in separate invocations, one after the other on the same machine: "
            + "; ".join(f"{', '.join(settings)} ({start})" for start, settings in by_start.items())
            + "; a run is taken from an earlier invocation only when it trained with the same flags and LSH "
              "settings.")


def reuse(run: Run, work: Path, committed: Optional[Dict[str, Dict]] = None) -> bool:
    """Take a finished run's results from an earlier invocation when it trained with the same flags
    (model, lengths and setting alike) and they meant the same LSH settings as today. Results saved
    before the settings were kept are taken only for runs without LSH, which no LSH default changes.
    The run's own directory under ``work`` comes first, then ``committed`` (the last study's records
    by run key: a fresh clone adds a setting without measuring the others again)."""
    saved = work / "runs" / run.key / "results.json"
    candidates = [json.loads(saved.read_text())] if saved.exists() else []
    candidates += [committed[run.key]] if committed and run.key in committed else []
    settings = run.lsh_settings()
    for previous in candidates:
        if previous.get("command_flags") != run.flags() or not previous.get("results"):
            continue
        if previous.get("lsh_settings", None if settings["lsh_enabled"] else settings) != settings:
            continue
        run.results = previous["results"]
        return True
    return False


def committed_runs() -> Dict[str, Dict]:
    """The last study's records (docs/data/speed_study.json) by run key; none from an older version."""
    if not RESULTS.exists():
        return {}
    saved = json.loads(RESULTS.read_text())
    if saved.get("version") != 2:
        return {}
    return {Run(r["setting"], r["rate_mbit"], r["repeat"], r["iters"], r["schedule_iters"]).key: r
            for r in saved["runs"]}


def summarize(tensorboard: Path, run: Run, wire_bytes: int, wall: float) -> Dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])

    def series(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)] if tag in tags else []

    steps = [v for _, v in series("iteration time ms")][1:]  # the first interval includes warm-up
    ppl = series("validation lm loss PPL")
    at_schedule = [value for step, value in ppl if step <= run.schedule_iters]
    sent = sum(v for _, v in series("a2a bytes sent"))
    stock = sum(v for _, v in series("a2a bytes stock"))
    return {
        "step_ms": statistics.median(steps) if steps else float("nan"),
        "a2a_share": statistics.median([v for _, v in series("a2a share of step time")][1:] or [float("nan")]),
        # All four all-to-alls against megatron-core's dispatch of the same rows in bf16.
        "a2a_bytes_ratio": sent / stock if stock else 1.0,
        "wire_mb_per_iter": wire_bytes / run.iters / 1e6,
        "ppl_at_schedule": at_schedule[-1] if at_schedule else float("nan"),
        "final_ppl": ppl[-1][1] if ppl else float("nan"),
        # (seconds since the training loop started, validation perplexity) at every evaluation
        "ppl_curve": series("validation lm loss PPL vs time"),
        "wall_s": wall,
    }


def time_to_reach(curve, target: float) -> Optional[float]:
    """Wall seconds at which validation perplexity first reaches target (linear between evals)."""
    previous = None
    for seconds, value in curve:
        if value <= target:
            if previous is None:
                return float(seconds)
            (s0, v0) = previous
            return s0 + (seconds - s0) * (v0 - target) / max(v0 - value, 1e-9)
        previous = (seconds, value)
    return None


def spread_text(values: Sequence[float], unit: str = "", fmt: str = "{:.0f}") -> str:
    """The median, and the min-max in brackets when there are repeats."""
    middle = fmt.format(statistics.median(values)) + unit
    return middle if len(values) == 1 else f"{middle} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def of(runs: List[Run], setting: str, rate: int) -> List[Run]:
    return [run for run in runs if run.setting == setting and run.rate_mbit == rate]


def stock_target(runs: List[Run], rate: int) -> float:
    """Stock's final validation perplexity on that link (the median over its repeats; they agree to
    the last digit when the runs are deterministic, as on CPU)."""
    return statistics.median(run.results["final_ppl"] for run in of(runs, "stock", rate))


def reach_times(runs: List[Run], setting: str, rate: int, target: float) -> List[Optional[float]]:
    return [time_to_reach(run.results["ppl_curve"], target) for run in of(runs, setting, rate)]


def reach_cell(times: List[Optional[float]], stock_times: List[Optional[float]], is_stock: bool) -> str:
    reached = [t for t in times if t is not None]
    if not reached:
        return "not reached"
    text = spread_text(reached, unit=" s")
    if len(reached) < len(times):
        text += f" ({len(reached)} of {len(times)} runs reached it)"
    stock_reached = [t for t in stock_times if t is not None]
    if not is_stock and stock_reached and len(reached) == len(times):
        text += f", **{statistics.median(stock_reached) / statistics.median(reached):.2f}x**"
    return text


def targets(runs: List[Run]) -> List[Tuple[str, str, bool]]:
    """The issue's bar at 1 Gbit/s: the default reaches stock's final perplexity, at least
    TARGET_SPEEDUP times sooner than stock and sooner than 8-bit payloads alone (medians)."""
    if not of(runs, "stock", 1000) or not of(runs, "default", 1000):
        return []
    target = stock_target(runs, 1000)

    def median_time(setting):
        times = reach_times(runs, setting, 1000, target)
        return statistics.median(times) if times and all(t is not None for t in times) else None

    stock, default, mxfp8 = median_time("stock"), median_time("default"), median_time("mxfp8")
    checks = [("the default reaches stock's final perplexity at 1 Gbit/s",
               f"{default:.0f} s" if default is not None else "not in every run", default is not None)]
    if default is not None and stock:
        checks.append((f"... at least {TARGET_SPEEDUP:g}x sooner than stock",
                       f"{stock / default:.2f}x (stock {stock:.0f} s, default {default:.0f} s)",
                       stock / default >= TARGET_SPEEDUP))
    if default is not None and of(runs, "mxfp8", 1000):
        checks.append(("... and sooner than 8-bit payloads alone",
                       f"default {default:.0f} s, mxfp8 " + (f"{mxfp8:.0f} s" if mxfp8 is not None else "not reached"),
                       mxfp8 is None or default < mxfp8))
    return checks


def report(runs: List[Run], elapsed: float) -> str:
    rates = [rate for rate in LINKS if of(runs, "stock", rate)]
    schedule = runs[0].schedule_iters
    extended = max(run.iters for run in runs)
    repeats = {rate: len(of(runs, "stock", rate)) for rate in rates}
    apart = invocations_note(runs)  # "" when every run was measured in one invocation
    lines = [
        "# Time to perplexity on an emulated 2-node cluster: stock, 8-bit payloads, LSH's default",
        "",
        f"Regenerate with `sudo python benchmarks/speed_study.py` ({elapsed / 60:.0f} minutes of measuring for this",
        "study). Two network namespaces joined by veth pairs through a bridge, every link shaped with tc (token",
        "bucket, both directions); one torchrun per node (gloo), expert parallel 2. GPT-MoE: 4 layers, hidden 64,",
        "8 experts, top-2, MoE in every layer; 32 sequences of 128 tokens per step (2048 tokens per rank and",
        "micro-batch) on the embedded Shakespeare/Milton corpus; validation on held-out works every 25",
        f"iterations. One cosine schedule over {schedule} iterations for every run: stock stops there, and its final",
        f"validation perplexity is the target; the other settings go on to {extended} iterations at the schedule's",
        "floor, so that a setting which needs more steps than stock can still reach the target. Both processes",
        "share this machine's 2 CPU cores, so compute is slow next to the emulated network: the all-to-all share",
        "below is what these links cost at this model's size, not a GPU cluster's.",
        "",
        "Settings: " + "; ".join(f"{name}: {DESCRIPTIONS[name]}" for name in SETTINGS) + ".",
        "",
        "Repeats: " + ", ".join(f"{repeats[rate]} at {LINKS[rate]}" for rate in rates) + " per setting, "
        + ("interleaved within each invocation;" if apart else "interleaved;") +
        " times are medians with min-max in brackets. Perplexities repeat exactly between repeats (same seed and"
        " data order, deterministic on CPU); times do not, since the machine is shared." + apart,
        "",
        "a2a bytes: all four all-to-alls (dispatch and combine, forward and backward) against megatron-core's",
        "dispatch of the same rows in bf16, as a GPU run would send them. wire MB/iter: every byte the kernel",
        "counted on the nodes' links (all-to-alls, the dense gradients' all-reduce, evaluation).",
        "",
        f"| run | link | step ms | vs stock | a2a share | a2a bytes vs stock | wire MB/iter | val PPL at {schedule} it "
        "| vs stock | val PPL at the end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rate in rates:
        base_step = statistics.median(run.results["step_ms"] for run in of(runs, "stock", rate))
        base_ppl = stock_target(runs, rate)
        for setting in SETTINGS:
            group = of(runs, setting, rate)
            if not group:
                continue
            r = group[0].results
            step = [run.results["step_ms"] for run in group]
            lines.append(
                f"| {setting} | {LINKS[rate]} | {spread_text(step)} | {statistics.median(step) / base_step:.2f}x | "
                f"{100 * statistics.median(run.results['a2a_share'] for run in group):.0f}% | "
                f"{r['a2a_bytes_ratio']:.3f} | "
                f"{statistics.median(run.results['wire_mb_per_iter'] for run in group):.2f} | "
                f"{r['ppl_at_schedule']:.1f} | {r['ppl_at_schedule'] / base_ppl:.3f}x | "
                f"{r['final_ppl']:.1f} ({group[0].iters} it) |")
    for rate in rates:
        target = stock_target(runs, rate)
        lines += ["", f"## Wall time to stock's final perplexity, {LINKS[rate]}", "",
                  "Seconds from the start of the training loop (evaluations included, as on the "
                  "perplexity-against-time",
                  "charts in tensorboard and wandb) until validation perplexity first falls to the target (linear "
                  "between",
                  "evaluations), and the speedup over stock (medians). Targets: multiples of stock's final "
                  f"{target:.1f}.", "",
                  "| run | " + " | ".join(f"PPL {level * target:.1f} ({level:g}x)" for level in TARGET_LEVELS) + " |",
                  "|---|" + "---|" * len(TARGET_LEVELS)]
        for setting in SETTINGS:
            if not of(runs, setting, rate):
                continue
            cells = [reach_cell(reach_times(runs, setting, rate, level * target),
                                reach_times(runs, "stock", rate, level * target), setting == "stock")
                     for level in TARGET_LEVELS]
            lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    checks = targets(runs)
    if checks:
        lines += ["", "## Target (measured here, met or not)", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {name} | {value} | {'yes' if met else 'no'} |" for name, value, met in checks]
    lines += ["", "![perplexity against wall-clock time](ppl_vs_time.png)",
              "![step time against bandwidth](step_time_vs_bandwidth.png)", ""]
    return "\n".join(lines)


def plots(runs: List[Run]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [rate for rate in LINKS if of(runs, "stock", rate)]
    colours = {"stock": "black", "mxfp8": "tab:orange", "default": "tab:blue", "bisect": "tab:green",
               "bisect-0.2": "tab:red"}
    figure, axes = plt.subplots(1, len(rates), figsize=(6.5 * len(rates), 4.5), squeeze=False)
    for axis, rate in zip(axes[0], rates):
        for setting in SETTINGS:
            for run in of(runs, setting, rate):
                if run.results["ppl_curve"]:
                    seconds, values = zip(*run.results["ppl_curve"])
                    axis.plot(seconds, values, color=colours[setting], alpha=0.8, linewidth=1.2,
                              label=setting if run.repeat == 0 else None)
        axis.axhline(stock_target(runs, rate), color="grey", linestyle="--", linewidth=0.8, label="stock's final")
        axis.set(xlabel="wall-clock seconds", ylabel="validation perplexity", yscale="log",
                 title=f"Validation perplexity against wall time, {LINKS[rate]}")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(DOCS / "ppl_vs_time.png", dpi=120)

    figure, axis = plt.subplots(figsize=(6, 4))
    for setting in SETTINGS:
        points = sorted((rate / 1000, statistics.median(run.results["step_ms"] for run in of(runs, setting, rate)))
                        for rate in rates if of(runs, setting, rate))
        if points:
            axis.plot(*zip(*points), marker="o", color=colours[setting], label=setting)
    axis.set(xlabel="link bandwidth (Gbit/s)", ylabel="step time (ms, median)", xscale="log",
             title="Step time against bandwidth")
    axis.legend()
    figure.tight_layout()
    figure.savefig(DOCS / "step_time_vs_bandwidth.png", dpi=120)


def write_docs(runs: List[Run], elapsed: float) -> None:
    DOCS.mkdir(exist_ok=True)
    plots(runs)
    (DOCS / "speed_study.md").write_text(report(runs, elapsed))
    print(f"wrote {DOCS / 'speed_study.md'} and plots ({elapsed / 60:.0f} minutes of measuring)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300,
                        help="the learning-rate schedule's length, and stock's; the others train 25%% longer")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting at 1 Gbit/s")
    parser.add_argument("--slow-repeats", type=int, default=1, help="runs per setting at 0.1 Gbit/s (0: none)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 40 iterations, one run per setting and link; docs/ left alone")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "speed_study")
    parser.add_argument("--fresh", action="store_true", help="run everything again, even runs with results under "
                                                             "--work or in the committed summary")
    parser.add_argument("--report-only", action="store_true",
                        help=f"rewrite docs/ from the last study's {RESULTS.relative_to(REPO)}, without running "
                             "anything")
    args = parser.parse_args()
    if args.report_only:
        if not RESULTS.exists():
            sys.exit(f"error: {RESULTS} not found; run the study first (without --report-only)")
        saved = json.loads(RESULTS.read_text())
        if saved.get("version") != 2:
            sys.exit(f"error: {RESULTS} is from an older version of this script; run the study again")
        runs = [Run(r["setting"], r["rate_mbit"], r["repeat"], r["iters"], r["schedule_iters"], r["results"])
                for r in saved["runs"]]
        write_docs(runs, saved["elapsed_s"])
        return
    if args.iters < 50 or args.repeats < 1 or args.slow_repeats < 0:
        sys.exit("error: --iters must be at least 50, --repeats at least 1 and --slow-repeats at least 0")
    if args.quick:
        args.iters, args.repeats, args.slow_repeats = 50, 1, 1
        args.work = args.work / "quick"
    runs = plan(args.iters, args.repeats, args.slow_repeats)
    print(f"speed study: {len(runs)} runs on 2 emulated nodes (stock {args.iters} iterations, the others "
          f"{max(run.iters for run in runs)})", flush=True)
    start, measuring = time.time(), 0.0
    invocation = "the invocation of " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start))
    committed = {} if args.quick else committed_runs()
    try:
        data = prepare_data(args.work)
        for index, run in enumerate(runs):
            if not args.fresh and reuse(run, args.work, committed):
                print(f"  [{index + 1}/{len(runs)}] {run.key}: results from an earlier invocation", flush=True)
                measuring += run.results["wall_s"]
                continue
            t = time.time()
            execute(run, index, data, args.work, invocation)
            measuring += run.results["wall_s"]
            r = run.results
            print(f"  [{index + 1}/{len(runs)}] {run.key}: {r['step_ms']:.0f} ms/step, "
                  f"a2a {100 * r['a2a_share']:.0f}%, "
                  f"bytes {r['a2a_bytes_ratio']:.3f}x, PPL {r['ppl_at_schedule']:.1f} at {run.schedule_iters} it, "
                  f"{r['final_ppl']:.1f} at the end ({time.time() - t:.0f}s; study {(time.time() - start) / 60:.0f} "
                  "min)",
                  flush=True)
    except ClusterUnavailable as error:
        sys.exit(f"error: cannot emulate a cluster here: {error}")
    if args.quick:
        print(report(runs, measuring))
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"version": 2, "elapsed_s": measuring, "runs": [run.to_json() for run in runs]},
                                  indent=1))
    write_docs(runs, measuring)


if __name__ == "__main__":
    main()
