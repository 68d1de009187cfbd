"""docs/quality_study.md and its plots from the quality study's run summaries (quality_study.py).

Every sentence that states a result is computed from the summaries, so a rerun rewrites it; a
section whose runs have not been made yet says which command makes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

# Targets of the study (issue 19).
BYTES_TARGET = 0.25
PPL_TARGET = {"quickstart": 1.01, "code": 1.02}
CORPUS_TITLES = {"quickstart": "the quickstart corpus (Shakespeare and Milton)",
                 "code": "Python code (the standard library's source)"}


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mean(summary: Dict, key: str) -> Optional[float]:
    values = [v for _, v in summary.get(key, [])]
    return sum(values) / len(values) if values else None


def pareto_front(points: List[tuple]) -> List[tuple]:
    """The (bytes ratio, ppl ratio, name) points no other point beats on both (lower is better)."""
    front = []
    for point in sorted(points):
        if not front or point[1] < front[-1][1]:
            front.append(point)
    return front


def _group(summaries: Dict[str, Dict], corpus: str, group: str) -> Dict[str, Dict]:
    """The runs of a corpus and group, most bytes first."""
    runs = [s for s in summaries.values() if s.get("corpus") == corpus and s.get("group") == group]
    return {s["name"]: s for s in sorted(runs, key=lambda s: (-s["bytes_ratio_run"], s["name"]))}


def _lsh_settings_of(flags: List[str]) -> Dict:
    """The LSH and payload settings a run's flags give, with today's training defaults for the rest."""
    from megatron_lsh.training.arguments import lsh_settings_of_flags

    return lsh_settings_of_flags(flags)


def _runs_of_the_default(ablations: Dict[str, Dict]) -> List[str]:
    """The ablations that ran what plain --lsh runs today."""
    default = _lsh_settings_of(["--lsh"])
    ignored = {"lsh_seed"}
    same = lambda settings: {k: v for k, v in settings.items() if k not in ignored} == \
        {k: v for k, v in default.items() if k not in ignored}  # noqa: E731
    return [name for name, s in ablations.items() if same(_lsh_settings_of(s["flags"]))]


def _ratio(s: Dict, reference: Dict) -> float:
    return s["final_ppl"] / reference["final_ppl"]


def write_report(summaries: Dict[str, Dict], docs: Path) -> None:
    lines = [
        "# Quality against bytes: LSH-MoE, 8- and 4-bit payloads and stock megatron-core",
        "",
        "Regenerate with `python benchmarks/quality_study.py` (hours on 2 cores; it runs in parts, e.g.",
        "`--corpus quickstart --groups ablation`, and `--report-only` rewrites this page from the summaries",
        "committed under docs/data/quality_study/). Every run trains the quickstart's GPT-MoE",
        "(scripts/quickstart_cpu.sh: Qwen3-MoE layout, hidden 128, 4 layers, 8 experts top-2 in every other",
        "layer, sequences of 256, 16 per step, cosine LR 1e-3 to 1e-4), expert parallel 2 on 2 CPU processes,",
        "same seed (1234) and same data order, on one of two corpora, each with its own 8000-piece tokenizer.",
        "",
        "Bytes: all four all-to-alls (dispatch and combine, forward and backward) as a bf16 run sends them",
        "(2 bytes an element; mxfp8 1 byte an element and a 1-byte scale per 32; mxfp4 half a byte an",
        "element and a 1-byte scale per 32; nvfp4 half a byte an element, a 1-byte scale per 16 and 4 bytes a",
        "row; routing probabilities 2 bytes, sent by stock and by payloads alone, kept home by LSH) against "
        "megatron-core's",
        "dispatch of the same rows in bf16, whatever the CPU computes in. Compression rate: centroids / token",
        "rows; relative error: mean ||x - c|| / ||x|| of token rows against the centroid that replaced them.",
        "Perplexity ratios are against the stock run of the same length and corpus. The peer: 8-bit (mxfp8)",
        "payloads without LSH, as DeepSeek-V3 and newer Megatron-LM send them; the 4-bit peers (mxfp4, nvfp4)",
        "are the next step down the field is taking.",
        "",
    ]
    points_by_corpus = {}
    for corpus, title in CORPUS_TITLES.items():
        lines += [f"## {title[0].upper() + title[1:]}", ""]
        ablations = _group(summaries, corpus, "ablation")
        main, scale = _group(summaries, corpus, "main"), _group(summaries, corpus, "scale")
        if not (ablations or main or scale):
            lines += [f"Not run yet: `python benchmarks/quality_study.py --corpus {corpus}`.", ""]
            continue
        lines += _ablation_section(corpus, ablations)
        points_by_corpus[corpus] = _pareto_points(ablations)
        lines += _frontier_section(corpus, ablations, points_by_corpus[corpus])
        lines += _gradient_section(corpus, ablations, _group(summaries, corpus, "gradient"))
        lines += _bound_at_scale(corpus, summaries.get(f"{corpus}-bound_at_scale"))
        lines += _axis_forward(corpus, summaries.get(f"{corpus}-axis_forward"))
        spread = _seed_spread(ablations, ablations["stock"]) if "stock" in ablations else None
        lines += _main_section(corpus, main, "main", "Main runs", spread)
        lines += _main_section(corpus, scale, "scale", "The same tokens in steps four times larger "
                               "(8192 tokens per rank and micro-batch)", spread)
        lines += _scale_findings(main, scale)
        lines += _warnings(corpus, summaries)
    lines += _merged_gradients_verdict(summaries)
    lines += ["## Curves", ""]
    for corpus in points_by_corpus:
        lines += [f"![{corpus}: validation perplexity against tokens and against bytes](quality_curves_{corpus}.png)",
                  "",
                  f"![{corpus}: perplexity ratio against bytes ratio](quality_pareto_{corpus}.png)", ""]
    docs.mkdir(exist_ok=True)
    (docs / "quality_study.md").write_text("\n".join(lines) + "\n")
    for corpus, points in points_by_corpus.items():
        _plots(corpus, summaries, points, docs)


def _table(runs: Dict[str, Dict], reference: Dict, with_question: bool) -> List[str]:
    head = "| run | " + ("question | " if with_question else "") + \
        "final val PPL | vs stock | a2a bytes vs stock (run) | last 10% | mean compression | relative error |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in runs.items():
        lines.append(f"| {name} | " + (f"{s.get('question', '')} | " if with_question else "") +
                     f"{s['final_ppl']:.2f} | {_ratio(s, reference):.3f}x | {s['bytes_ratio_run']:.3f} | "
                     f"{s['bytes_ratio_last_10pct']:.3f} | {_fmt(_mean(s, 'compression'))} | "
                     f"{_fmt(_mean(s, 'relative_error'))} |")
    return lines + ["", "Flags: " + "; ".join(f"{name}: `{' '.join(s['flags'])}`" for name, s in runs.items()), ""]


def _seed_group(ablations: Dict[str, Dict]) -> List[str]:
    """The most ablations (two or more) that ran one LSH setting at different hash seeds."""
    groups: Dict[str, List[str]] = {}
    for name, s in ablations.items():
        settings = _lsh_settings_of(s["flags"])
        if settings["lsh_enabled"]:
            groups.setdefault(repr(sorted((k, v) for k, v in settings.items() if k != "lsh_seed")), []).append(name)
    largest = max(groups.values(), key=len, default=[])
    return largest if len(largest) >= 2 else []


def _seed_spread(ablations: Dict[str, Dict], reference: Dict) -> Optional[tuple]:
    """Lowest and highest perplexity ratio of one setting at different hash seeds, and how many."""
    ratios = [_ratio(ablations[name], reference) for name in _seed_group(ablations)]
    return (min(ratios), max(ratios), len(ratios)) if ratios else None


def _ablation_section(corpus: str, ablations: Dict[str, Dict]) -> List[str]:
    reference = ablations.get("stock")
    if reference is None:
        return [f"Ablations not run yet: `python benchmarks/quality_study.py --corpus {corpus} --groups ablation`.", ""]
    lines = [f"### Ablations ({reference['iters']} iterations)", "",
             "`cp6`: cross-polytope, 6 hashes x 4 buckets, fixed (the paper's). `default`: plain `--lsh`, the code's "
             "defaults when the run was made.", ""]
    lines += _table(ablations, reference, with_question=True)
    defaults = _runs_of_the_default(ablations)
    if defaults:
        lines += [f"Training's default today (plain `--lsh`) is what {', '.join(defaults)} ran.", ""]
    spread = _seed_spread(ablations, reference)
    if spread:
        low, high, count = spread
        lines += [f"One setting at {count} hash seeds (`--lsh-seed`: {', '.join(_seed_group(ablations))}) ends between "
                  f"{low:.3f}x and {high:.3f}x stock: differences within {100 * (high - low):.1f} points of perplexity "
                  "ratio are ties here.", ""]
    return lines


def _pareto_points(ablations: Dict[str, Dict]) -> List[tuple]:
    reference = ablations.get("stock")
    if reference is None:
        return []
    return [(s["bytes_ratio_run"], _ratio(s, reference), name) for name, s in ablations.items() if name != "stock"]


def _frontier_section(corpus: str, ablations: Dict[str, Dict], points: List[tuple]) -> List[str]:
    if not points:
        return []
    lines = ["Runs on the frontier (no other run has both fewer bytes and lower perplexity):", ""]
    lines += [f"- {name}: bytes {b:.3f}x, perplexity {p:.3f}x" for b, p, name in pareto_front(points)]
    peers = [(b, p, n) for b, p, n in points if ablations[n].get("peer")]
    lsh = [(b, p, n) for b, p, n in points if not ablations[n].get("peer")]
    lines.append("")
    for peer_bytes, peer_ppl, peer in peers:
        cheaper = [(b, p, n) for b, p, n in lsh if b <= peer_bytes * 1.02 and p < peer_ppl]
        fewer = [(b, p, n) for b, p, n in lsh if b < peer_bytes and p <= peer_ppl * 1.002]
        if cheaper or fewer:
            best = min(cheaper or fewer, key=lambda point: (point[1], point[0]))
            lines.append(f"- Ahead of {peer} ({peer_bytes:.3f}x bytes, {peer_ppl:.3f}x): {best[2]} "
                         f"({best[0]:.3f}x bytes, {best[1]:.3f}x).")
        else:
            lines.append(f"- Nothing with LSH is ahead of {peer} ({peer_bytes:.3f}x bytes, {peer_ppl:.3f}x): "
                         "no LSH run has lower perplexity at its bytes or fewer bytes at its perplexity.")
    return lines + [""]


def _gradient_section(corpus: str, ablations: Dict[str, Dict], runs: Dict[str, Dict]) -> List[str]:
    """Merged tokens' gradients: each run's share of fixed cp6's gap to stock (same length)."""
    stock, cp6 = ablations.get("stock"), ablations.get("cp6")
    if not runs:
        return [f"Merged tokens' gradients: not run yet (`python benchmarks/quality_study.py --corpus {corpus} "
                "--groups gradient`).", ""]
    if stock is None or cp6 is None or _ratio(cp6, stock) <= 1:
        return ["Merged tokens' gradients: the ablations' stock and cp6 runs are missing (or cp6 has no gap).", ""]
    gap = cp6["final_ppl"] - stock["final_ppl"]
    lines = [f"### Merged tokens' gradients ({stock['iters']} iterations, fixed cp6, against its gap to stock)", "",
             f"cp6 ends at {_ratio(cp6, stock):.3f}x stock ({cp6['final_ppl']:.2f} against {stock['final_ppl']:.2f}). "
             "A backward rule (`--lsh-gradient-rule`, removed since: each member's input gradient from its "
             "centroid's other than the mean's equal part, at cp6's bytes) is recorded as it ran; a study mode "
             "(`--lsh-gradient-study`) trains on exact values with some of LSH's "
             "gradients, which says where the gap comes from. The experts' side: axis rows (`--lsh-cluster-axis`, "
             f"removed since; the code is at commit {AXIS_COMMIT}) sent a second row per cluster, c + sigma u along "
             "the members' principal direction u (sigma their RMS spread along it), and gave each member the secant "
             "E(c) + t (E(a) - E(c)) by its coordinate t along u, so experts ran and learnt at two points of a "
             "cluster, "
             "at one more row per cluster in every all-to-all. Gap closed: (cp6 - run) / (cp6 - stock) in perplexity; "
             "a study mode's 'gap left' is the part of cp6's gap its gradients alone cost.", "",
             "| run | question | final val PPL | vs stock | a2a bytes vs stock | gap closed | gap left |",
             "|---|---|---|---|---|---|---|"]
    for name, s in runs.items():
        closed = (cp6["final_ppl"] - s["final_ppl"]) / gap
        flags = s["flags"]
        rule = flags[flags.index("--lsh-gradient-rule") + 1] if "--lsh-gradient-rule" in flags else None
        # Every rule measured here lost to the mean (autograd's own rule, the only one left), and
        # axis rows helped on one corpus only.
        removed = " (removed from the code after this run)" if rule not in (None, "mean") or \
            "--lsh-cluster-axis" in flags else ""
        left = f"{100 * (1 - closed):.0f}%" if "--lsh-gradient-study" in flags else "-"
        lines.append(f"| {name}{removed} | {s.get('question', '')} | {s['final_ppl']:.2f} | {_ratio(s, stock):.3f}x | "
                     f"{s['bytes_ratio_run']:.3f} | {100 * closed:.0f}% | {left} |")
    lines += _gradient_split(runs, stock, gap)
    spread = _seed_spread(ablations, stock)
    if spread:
        low, high, count = spread
        lines += ["", f"For scale: one setting at {count} hash seeds spans {100 * (high - low):.1f} points of "
                      "perplexity "
                  f"ratio on this corpus, against cp6's gap of {100 * (_ratio(cp6, stock) - 1):.1f}; a run within that "
                  "spread of cp6 is a tie."]
    return lines + ["", "Flags: " + "; ".join(f"{name}: `{' '.join(s['flags'])}`" for name, s in runs.items()), ""]


def _merged_gradients_verdict(summaries: Dict[str, Dict]) -> List[str]:
    """Across both corpora: which measured alternative to LSH's own gradients (a backward rule or
    axis rows) closed part of cp6's gap on both, i.e. which could have replaced the mean."""
    closed_by_run: Dict[str, Dict[str, float]] = {}
    for corpus in CORPUS_TITLES:
        ablations = _group(summaries, corpus, "ablation")
        stock, cp6 = ablations.get("stock"), ablations.get("cp6")
        if stock is None or cp6 is None or _ratio(cp6, stock) <= 1:
            return []
        gap = cp6["final_ppl"] - stock["final_ppl"]
        for name, s in _group(summaries, corpus, "gradient").items():
            if "--lsh-gradient-study" in s["flags"] or s.get("superseded"):  # a study mode, or a replaced version
                continue
            closed_by_run.setdefault(name, {})[corpus] = 100 * (cp6["final_ppl"] - s["final_ppl"]) / gap
    measured = {name: by_corpus for name, by_corpus in closed_by_run.items() if len(by_corpus) == len(CORPUS_TITLES)}
    if not measured:
        return []
    on_both = [name for name, by_corpus in measured.items() if min(by_corpus.values()) > 0]
    each = "; ".join(f"{name}: " + ", ".join(f"{closed:.0f}% on {corpus}" for corpus, closed in by_corpus.items())
                     for name, by_corpus in measured.items())
    verdict = (f"closed part of it on both corpora: {', '.join(on_both)}" if on_both else
               "closed any of it on both corpora, so merged tokens keep LSH's own gradients (the mean rule: autograd's "
               "gradient of the centroid forward that runs)")
    return ["## Merged tokens' gradients, both corpora", "",
            f"Of the alternatives measured on both corpora, against cp6's gap ({each}), "
            f"{'these' if on_both else 'none'} {verdict}.", ""]


def _gradient_split(runs: Dict[str, Dict], stock: Dict, gap: float) -> List[str]:
    """One sentence from the three study modes, once all three have run: where cp6's gap comes from."""
    by_mode = {}
    for s in runs.values():
        if "--lsh-gradient-study" in s["flags"]:
            by_mode[s["flags"][s["flags"].index("--lsh-gradient-study") + 1]] = s
    if not {"exact_values", "lsh_input_gradients", "lsh_expert_gradients"} <= set(by_mode):
        return []

    def cost(mode):
        return 100 * (by_mode[mode]["final_ppl"] - stock["final_ppl"]) / gap

    inputs, experts, both = cost("lsh_input_gradients"), cost("lsh_expert_gradients"), cost("exact_values")
    larger = "the members' input gradients" if inputs > experts else "the experts' weight gradients"
    return ["", f"Split: on exact values, LSH's gradients cost {both:.0f}% of cp6's gap when on everything, "
                f"{inputs:.0f}% on the layer's input alone and {experts:.0f}% on the experts' weights alone: "
                f"{larger} cost more here."]


def _bound_at_scale(corpus: str, summary: Optional[Dict]) -> List[str]:
    if summary is None:
        return [f"The bound at scale: not measured yet (`python benchmarks/quality_study.py --corpus {corpus} "
                "--groups bound_at_scale`).", ""]
    lines = ["### The error bound as tokens per micro-batch grow", "",
             f"`evaluate --lsh --lsh-error-bound {summary['bound']}` on the stock ablation run's model "
             f"({summary['checkpoint_iters']} iterations), one process, every expert's rows together (as many rows per "
             "expert as a rank dispatches in training at that micro-batch), against the exact model on the same "
             "windows.",
             "`hash`: clusters split by the next hash function (levels of coarse-to-fine LSH); `bisect` "
             "(`--lsh-split bisect`): in two at the centroid across the widest spread, up to that many times.",
             "", "| tokens per micro-batch | split | hashes or halvings | compression rate | perplexity vs exact |",
             "|---|---|---|---|---|"]
    for row in summary["rows"]:
        lines.append(f"| {row['tokens_per_micro_batch']} | {row.get('split', 'hash')} | {row['hashes']} | "
                     f"{row['rate']:.3f} | {row['ppl'] / row['exact_ppl']:.4f}x |")
    by_setting = {}
    for row in summary["rows"]:
        by_setting.setdefault((row.get("split", "hash"), row["hashes"]), []).append(row)
    lines.append("")
    for (split, hashes), rows in sorted(by_setting.items()):
        first, last = rows[0], rows[-1]
        lines.append(f"- {split} {hashes}: rate {first['rate']:.3f} at {first['tokens_per_micro_batch']} tokens, "
                     f"{last['rate']:.3f} at {last['tokens_per_micro_batch']}.")
    for bisect in by_setting.get(("bisect", 16), []):
        hashed = next((r for r in by_setting.get(("hash", 16), [])
                       if r["tokens_per_micro_batch"] == bisect["tokens_per_micro_batch"]), None)
        if hashed:
            lines.append(f"- At {bisect['tokens_per_micro_batch']} tokens, bisection sends "
                         f"{bisect['rate'] / hashed['rate']:.2f}x "
                         f"the rows of 16 hash levels at the same bound, at {bisect['ppl'] / hashed['ppl']:.4f}x their "
                         "perplexity.")
    return lines + [""]


# Where the removed axis rows (--lsh-cluster-axis) can still be run.
AXIS_COMMIT = "08471ee"
AXIS_TIE = 0.005


def _interpolated(points: List[tuple], rate: float) -> Optional[float]:
    """The value at ``rate`` on the line through (rate, value) points, None outside their range."""
    points = sorted(points)
    for (low_rate, low), (high_rate, high) in zip(points, points[1:]):
        if low_rate <= rate <= high_rate:
            return low if high_rate == low_rate else low + (high - low) * (rate - low_rate) / (high_rate - low_rate)
    return None


def _axis_forward(corpus: str, summary: Optional[Dict]) -> List[str]:
    if summary is None:  # measured before the axis rows were removed, or never
        return []
    exact = summary["exact_ppl"]
    lines = ["### Axis rows against finer hashing, the forward alone", "",
             f"`evaluate` on the stock ablation run's model ({summary['checkpoint_iters']} iterations, exact "
             "perplexity "
             f"{exact:.2f}), micro-batch {summary['micro_batch']} on one process, fixed cross-polytope hashing "
             "(4 buckets, no compensation, no bound) with and without `--lsh-cluster-axis` (removed since; "
             f"`git checkout {AXIS_COMMIT}` runs it). The rate counts the axis rows.",
             "", "| hashes | axis rows | compression rate | perplexity vs exact |", "|---|---|---|---|"]
    for row in summary["rows"]:
        lines.append(f"| {row['hashes']} | {'yes' if row['axis'] else 'no'} | {row['rate']:.3f} | "
                     f"{row['ppl'] / exact:.4f}x |")
    line = [(row["rate"], row["ppl"] / exact) for row in summary["rows"] if not row["axis"]]
    verdicts = []
    lines.append("")
    for row in summary["rows"]:
        if not row["axis"]:
            continue
        same_rate = _interpolated(line, row["rate"])
        if same_rate is None:
            continue
        difference = row["ppl"] / exact - same_rate
        # Within half a point of perplexity ratio (one model, one hash seed): too close to call.
        verdict = ("as good a use" if abs(difference) < AXIS_TIE
                   else "the better use" if difference < 0 else "the worse use")
        verdicts.append(verdict)
        lines.append(f"- {row['hashes']} hashes + axis: {row['ppl'] / exact:.4f}x at rate {row['rate']:.3f}; finer "
                     "hashing "
                     f"alone at that rate: {same_rate:.4f}x (interpolated): the axis row is {verdict} of those rows.")
    if verdicts:
        lines += ["", f"Axis rows beat finer hashing at equal rate at {verdicts.count('the better use')} of "
                  f"{len(verdicts)} settings, tie at {verdicts.count('as good a use')}."]
    return lines + [""]


def _lsh_runs(runs: Dict[str, Dict]) -> List[str]:
    """Names of the runs with LSH on: the default first, then candidates."""
    names = [name for name, run in runs.items() if name == "default" or "--lsh" in run.get("flags", [])]
    return sorted(names, key=lambda name: name != "default")


def _against_the_peer(runs: Dict[str, Dict], reference: Dict, spread: Optional[tuple]) -> List[str]:
    """Each LSH run against 8-bit payloads alone, with the hash-seed spread as the width of a tie."""
    peer = runs.get("mxfp8")
    if peer is None:
        return []
    lines = []
    for name in _lsh_runs(runs):
        run = runs[name]
        gap = 100 * (_ratio(run, reference) - _ratio(peer, reference))  # points of perplexity ratio
        width = 100 * (spread[1] - spread[0]) if spread else 0.0
        bytes_text = f"{run['bytes_ratio_run']:.3f}x bytes against mxfp8's {peer['bytes_ratio_run']:.3f}x"
        if run["bytes_ratio_run"] >= peer["bytes_ratio_run"]:
            verdict = f"no fewer bytes than mxfp8 ({gap:+.1f} points of perplexity ratio)"
        elif gap <= 0:
            verdict = "ahead: lower perplexity at fewer bytes"
        elif gap <= width:
            verdict = (f"a tie in perplexity ({gap:.1f} points behind, inside the hash-seed spread of "
                       f"{width:.1f}) at fewer bytes")
        else:
            verdict = f"behind: {gap:.1f} points of perplexity ratio, outside the hash-seed spread of {width:.1f}"
        who = "the default" if name == "default" else name
        lines.append(f"- Against the peer (mxfp8 alone): {who} at {bytes_text}, {verdict}.")
    return lines


def _main_section(corpus: str, runs: Dict[str, Dict], group: str, title: str,
                  spread: Optional[tuple] = None) -> List[str]:
    reference = runs.get("stock")
    if reference is None:
        return [f"{title}: not run yet (`python benchmarks/quality_study.py --corpus {corpus} --groups {group}`).", ""]
    lines = [f"### {title} ({reference['iters']} iterations)", ""]
    lines += _table(runs, reference, with_question=False)
    candidates = [name for name in _lsh_runs(runs) if name != "default"]
    if candidates:
        lines += ["Other LSH settings beside the default: " + "; ".join(
            f"{name}, `{' '.join(runs[name]['flags'])}`" for name in candidates) + ".", ""]
    target = PPL_TARGET[corpus]
    bullets = []
    for name in _lsh_runs(runs) if group == "main" else []:
        run = runs[name]
        ratio = _ratio(run, reference)
        met_ppl = ratio <= target
        met_bytes = run["bytes_ratio_run"] <= BYTES_TARGET and run["bytes_ratio_last_10pct"] <= BYTES_TARGET
        whose = "" if name == "default" else f" ({name})"
        bullets.append(f"- Target{whose}, final perplexity at most {target}x stock's: {ratio:.3f}x, "
                       f"**{'met' if met_ppl else 'not met'}**.")
        if corpus == "quickstart":
            bullets.append(f"- Target{whose}, bytes at most {BYTES_TARGET}x over the run and its last 10%: "
                           f"{run['bytes_ratio_run']:.3f}x, {run['bytes_ratio_last_10pct']:.3f}x, "
                           f"**{'met' if met_bytes else 'not met'}**.")
    bullets += _against_the_peer(runs, reference, spread)
    return lines + (bullets + [""] if bullets else [])


def _scale_findings(main: Dict[str, Dict], scale: Dict[str, Dict]) -> List[str]:
    lines = []
    for name in ["mxfp8", *_lsh_runs(main)]:
        if all(name in runs and "stock" in runs for runs in (main, scale)):
            small, large = _ratio(main[name], main["stock"]), _ratio(scale[name], scale["stock"])
            lines.append(f"- {name}: {small:.3f}x stock at 2048 tokens per rank and micro-batch, {large:.3f}x at 8192 "
                         f"(bytes {main[name]['bytes_ratio_run']:.3f}x and {scale[name]['bytes_ratio_run']:.3f}x).")
    return lines + [""] if lines else []


def _warnings(corpus: str, summaries: Dict[str, Dict]) -> List[str]:
    said = [(s["name"], s["group"], w) for s in summaries.values() if s.get("corpus") == corpus
            for w in s.get("warnings", [])]
    if not said:
        return []
    lines = ["What the runs warned:", ""]
    lines += [f"- {name} ({group}): {warning.split('] ', 1)[-1]}" for name, group, warning in said]
    return lines + [""]


def _plots(corpus: str, summaries: Dict[str, Dict], points: List[tuple], docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {f"{s['name']} ({s['group']})": s for s in summaries.values()
            if s.get("corpus") == corpus and (s["group"] in ("main", "scale") or s.get("name") in
                                              ("stock", "mxfp8", "bound 0.3 + mxfp8", "cp6", "target 0.3"))}
    figure, (by_tokens, by_bytes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, s in sorted(runs.items()):
        curve = [(tokens / 1e6, ppl) for tokens, ppl in s["ppl_by_tokens"] if tokens > 0]
        if curve:
            by_tokens.plot(*zip(*curve), marker=".", label=label)
        ppl = dict(s["ppl_by_iteration"])
        spent = [(fraction, ppl[step]) for step, fraction in s.get("bytes_fraction_by_iteration", []) if step in ppl]
        if spent:
            by_bytes.plot(*zip(*spent), marker=".", label=label)
    by_tokens.set(xlabel="training tokens (millions)", ylabel="validation perplexity", yscale="log",
                  title=f"{corpus}: perplexity against tokens")
    by_bytes.set(xlabel="a2a bytes sent / stock's over its whole run", ylabel="validation perplexity", yscale="log",
                 title=f"{corpus}: perplexity against bytes")
    by_bytes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(docs / f"quality_curves_{corpus}.png", dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 5))
    ablations = _group(summaries, corpus, "ablation")
    for bytes_ratio, ppl_ratio, name in points:
        peer = ablations[name].get("peer")
        axis.scatter(bytes_ratio, ppl_ratio, marker="s" if peer else "o", color="tab:red" if peer else "tab:blue")
        axis.annotate(name, (bytes_ratio, ppl_ratio), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(points)
    if front:
        axis.plot([p[0] for p in front], [p[1] for p in front], color="black", linewidth=0.8, label="frontier")
    axis.axhline(PPL_TARGET[corpus], color="grey", linestyle=":")
    axis.axvline(BYTES_TARGET, color="grey", linestyle=":")
    axis.set(xlabel="a2a bytes / bf16 stock (whole run)", ylabel="final perplexity / stock",
             title=f"{corpus}: ablations (squares: low-precision payloads alone, the peers)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(docs / f"quality_pareto_{corpus}.png", dpi=110)
    plt.close(figure)
