"""LSH cost against the expert MLP it saves traffic for, both measured in the same run.

For each hidden size and number of tokens per rank: route tokens top-k over the experts
(uniformly at random), permute them by expert as megatron-core does, then time
  * megatron-core's expert MLPs (SequentialMLP, ffn = 4 x hidden), forward + backward, on all
    token rows: the stock path;
  * the LSH work on the same rows, forward + backward: hashing, clustering into centroids,
    quantising them to the payload formats and back (both all-to-alls, both directions, on one
    rank: the formats' cost without the wire), and expanding centroid outputs back to tokens
    (with the residual correction under ``--lsh-compensation residual``);
  * the expert MLPs on the centroids only: what the experts cost under LSH.
and print the compression rate and the bytes ratio of all four all-to-alls against bf16 stock
(every row counted as remote).

    python benchmarks/lsh_overhead.py                     # CPU, fp32, hidden 256-1024, training's `--lsh` settings
    python benchmarks/lsh_overhead.py --device cuda --dtype bf16 --hidden-sizes 4096
    python benchmarks/lsh_overhead.py --threads 1 --hidden-sizes 1024 --tokens-per-rank 2048 8192 --write-doc
    python benchmarks/lsh_overhead.py --report-only      # docs/lsh_overhead.md from docs/data/lsh_overhead/

Each repeat times the experts and the LSH work back to back, so the overhead's spread over
repeats is that of ratios measured under the same load. ``--write-doc`` keeps the run's summary
(one json per device, dtype, data and split) and regenerates docs/lsh_overhead.md from every
summary kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import MISSING
from pathlib import Path

import torch
from megatron.core.transformer.moe.moe_utils import permute
from megatron.core.transformer.spec_utils import build_module

import megatron_lsh  # noqa: F401  (CPU workarounds)
from megatron_lsh.data.synthetic import clustered_hidden_states
from megatron_lsh.lsh import build_hash_family, expand_to_tokens, hash_and_cluster
from megatron_lsh.moe import LSHTransformerConfig, get_lsh_moe_module_spec
from megatron_lsh.moe.config import PAYLOAD_SETTINGS, WithAndWithoutLSH, added_settings
from megatron_lsh.moe.payload import BF16_BYTES, payload_all_to_all, row_bytes
from megatron_lsh.training.arguments import add_setting_flag
from megatron_lsh.training.initialize import free_port, initialize_distributed

REPO = Path(__file__).resolve().parent.parent
SUMMARIES = REPO / "docs" / "data" / "lsh_overhead"
DOC = REPO / "docs" / "lsh_overhead.md"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--tokens-per-rank", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--moe-router-topk", type=int, default=2)
    # The LSH settings' flags as training has them, with the defaults a plain `--lsh` run takes.
    settings = {f.name: f for f in added_settings()}
    for name in ("lsh_hash_type", "lsh_num_hashes", "lsh_num_buckets", "lsh_error_bound", "lsh_split",
                 "lsh_compensation", *PAYLOAD_SETTINGS):
        flag_default = settings[name].metadata["flag_default"]  # one for --lsh and one for --no-lsh: take --lsh's
        add_setting_flag(p, settings[name], default=flag_default.value(lsh_enabled=True)
                         if isinstance(flag_default, WithAndWithoutLSH) else MISSING)
    p.add_argument("--lsh-merge-threshold", type=float, default=None,
                   help="Coarse-to-fine clustering at this merge threshold, as the compression controller "
                        "runs it (--lsh-target-compression); default: plain buckets of all hashes.")
    p.add_argument("--data", choices=["clustered", "gaussian"], default="clustered")
    p.add_argument("--prototypes", type=int, default=64, help="Clustered data: cluster count.")
    p.add_argument("--relative-noise", type=float, default=0.1, help="Clustered data: spread.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); default: torch's. One thread keeps the ratios "
                        "steady on a machine that something else is using.")
    p.add_argument("--write-doc", action="store_true",
                   help=f"Keep this run's summary under {SUMMARIES.relative_to(REPO)}/ and regenerate "
                        f"{DOC.relative_to(REPO)}.")
    p.add_argument("--note", default="", help="With --write-doc: what the doc should say about the conditions "
                                               "(e.g. other work on the machine).")
    p.add_argument("--report-only", action="store_true",
                   help=f"Regenerate {DOC.relative_to(REPO)} from the summaries kept; measure nothing.")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.lsh_compensation == "expert_gain":
        p.error("--lsh-compensation expert_gain: this benchmark does not time the gains' fit; "
                "use none or residual")
    return args


def timed_together(fns, repeats, device):
    """Wall times of each of ``fns`` (a dict of callables) over ``repeats`` rounds, after one
    warm-up call each; a round calls each once, so ratios within a round share the load."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def experts_for(hidden, args, dtype):
    config = LSHTransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=max(1, hidden // 64),
        ffn_hidden_size=4 * hidden,
        moe_ffn_hidden_size=4 * hidden,
        num_moe_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk,
        add_bias_linear=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
    )
    spec = get_lsh_moe_module_spec(args.num_experts).submodules.experts
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return build_module(spec, args.num_experts, config, pg_collection=get_default_pg_collection())


def measure(hidden, tokens, args, device, dtype):
    generator = torch.Generator().manual_seed(hidden * 100003 + tokens)
    if args.data == "clustered":
        x = clustered_hidden_states(tokens, hidden, args.prototypes, args.relative_noise, generator)
    else:
        x = torch.randn(tokens, hidden, generator=generator)
    x = x.to(device=device, dtype=dtype)
    scores = torch.rand(tokens, args.num_experts, generator=generator).to(device)
    chosen = scores.topk(args.moe_router_topk, dim=1).indices
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, chosen, True)
    rows, _, _ = permute(x, routing_map, num_out_tokens=tokens * args.moe_router_topk)
    rows_per_expert = routing_map.sum(dim=0)
    expert_of_row = torch.repeat_interleave(torch.arange(args.num_experts, device=device), rows_per_expert)
    experts = experts_for(hidden, args, dtype).to(device)
    family = build_hash_family(args.lsh_hash_type, hidden, args.lsh_num_hashes, args.lsh_num_buckets, seed=1)

    def cluster(r):
        return hash_and_cluster(r, family, expert_of_row, args.num_experts, args.lsh_merge_threshold,
                                args.lsh_error_bound, split=args.lsh_split)[0]

    clusters = cluster(rows)
    centroids_per_expert = clusters.clusters_per_group.cpu()
    grad_rows = torch.randn_like(rows)
    grad_centroids = torch.randn_like(clusters.centroids)

    def expert_pass(inputs, per_expert, grad):
        inputs = inputs.detach().requires_grad_(True)
        out, _ = experts(inputs, per_expert, torch.ones(inputs.size(0), device=device))
        out.backward(grad)

    group = torch.distributed.group.WORLD  # one rank: the formats act, nothing is sent

    def lsh_pass():
        r = rows.detach().requires_grad_(True)
        c = cluster(r)
        n = [c.num_clusters]
        # An identity expert in between: every LSH and payload op, forward and backward, and
        # nothing else.
        sent = payload_all_to_all(group, c.centroids, n, n, args.moe_dispatch_fwd_dtype, args.moe_dispatch_bwd_dtype)
        back = payload_all_to_all(group, sent, n, n, args.moe_combine_fwd_dtype, args.moe_combine_bwd_dtype)
        expand_to_tokens(back, c, r if args.lsh_compensation == "residual" else None).backward(grad_rows)

    times = timed_together({
        "expert": lambda: expert_pass(rows, rows_per_expert.cpu(), grad_rows),
        "lsh": lsh_pass,
        "expert_centroids": lambda: expert_pass(clusters.centroids, centroids_per_expert, grad_centroids),
    }, args.repeats, device)
    overheads = [lsh / expert for lsh, expert in zip(times["lsh"], times["expert"])]
    centroid_bytes = sum(row_bytes(getattr(args, name), hidden) for name in PAYLOAD_SETTINGS)
    stock_bytes = 4 * row_bytes("bf16", hidden) + 2 * BF16_BYTES  # and a prob each way
    return {
        "hidden": hidden,
        "tokens": tokens,
        "rows": rows.size(0),
        "centroids": clusters.num_clusters,
        "rate": clusters.num_clusters / rows.size(0),
        "bytes_ratio": clusters.num_clusters * centroid_bytes / (rows.size(0) * stock_bytes),
        "t_expert": statistics.median(times["expert"]),
        "t_lsh": statistics.median(times["lsh"]),
        "overhead": statistics.median(overheads),
        "overhead_min": min(overheads),
        "overhead_max": max(overheads),
        "expert_on_centroids": statistics.median(times["expert_centroids"]) / statistics.median(times["expert"]),
    }


def lsh_part(settings: str) -> str:
    """The LSH and payload part of a settings line (what a run's default decides)."""
    return settings.split(" | LSH ", 1)[-1].split(" | data ", 1)[0]


def settings_line(args, device) -> str:
    data = (
        f"clustered ({args.prototypes} prototypes, relative noise {args.relative_noise})"
        if args.data == "clustered"
        else "Gaussian (no structure: worst case)"
    )
    where = (f"cpu ({torch.get_num_threads()} threads)" if device.type == "cpu"
             else torch.cuda.get_device_name())
    return (
        f"{where} | {args.dtype} | {args.num_experts} experts, top-{args.moe_router_topk}, ffn 4h | "
        f"LSH {args.lsh_hash_type}, {args.lsh_num_hashes} hashes x {args.lsh_num_buckets} buckets, merge threshold "
        f"{args.lsh_merge_threshold or 'none'}, error bound {args.lsh_error_bound or 'none'}, split "
        f"{args.lsh_split}, compensation "
        f"{args.lsh_compensation} | payloads "
        + ", ".join(f"{name[4:-6]} {getattr(args, name)}" for name in PAYLOAD_SETTINGS) + f" | data {data}"
        + f" | {args.repeats} repeats"
    )


COLUMNS = ("| hidden | tokens per rank | rows | centroids | rate | bytes | expert ms | LSH ms "
           "| overhead (median, min-max) | experts on centroids |")
LEGEND = ("rate: centroids / token rows. bytes: all four all-to-alls against bf16 stock (token rows and bf16 "
          "probs). overhead: LSH and payload formats forward+backward against the expert MLPs forward+backward "
          "on all rows, per repeat. experts on centroids: their time against all rows'.")


def table_row(r) -> str:
    return (f"| {r['hidden']} | {r['tokens']} | {r['rows']} | {r['centroids']} | {r['rate']:.3f} | "
            f"{r['bytes_ratio']:.3f} | {1000 * r['t_expert']:.1f} | {1000 * r['t_lsh']:.1f} | "
            f"{r['overhead']:.1%} ({r['overhead_min']:.1%}-{r['overhead_max']:.1%}) | "
            f"{r['expert_on_centroids']:.2f}x |")


def write_doc(summaries_dir: Path = SUMMARIES, doc: Path = DOC) -> None:
    """docs/lsh_overhead.md from every summary kept under docs/data/lsh_overhead/."""
    lines = [
        "# LSH overhead against the expert MLPs",
        "",
        "Regenerate with `python benchmarks/lsh_overhead.py --report-only` (from the summaries under",
        "docs/data/lsh_overhead/); each section's command measures it again (`--write-doc` keeps the result).",
        "One process, no network: megatron-core's expert MLPs (SequentialMLP, ffn 4 x hidden) forward and",
        "backward on all token rows, against hashing, bounded clustering, quantising to the payload formats and",
        "back in all four directions, and the expansion back to tokens, forward and backward (the settings",
        "line of each section says which).",
        "Tokens are routed top-k uniformly at random. Target: at most 5% at hidden 1024. On a machine that",
        "other work shares, each repeat times the two back to back and the overhead is their ratio; min-max is",
        "its spread over repeats.",
    ]
    summaries = sorted(summaries_dir.glob("*.json"))
    default = lsh_part(settings_line(parse_args([]), torch.device("cpu")))  # what plain --lsh runs
    if not summaries:
        lines += ["", "Nothing measured yet: run `python benchmarks/lsh_overhead.py --write-doc`."]
    for path in summaries:
        summary = json.loads(path.read_text())
        note = [summary["note"], ""] if summary.get("note") else []
        is_default = lsh_part(summary["settings"]) == default
        lines += ["", f"## {path.stem}" + (" (training's default)" if is_default else ""), "",
                  f"`{summary['command']}`", "", summary["settings"], "", *note,
                  COLUMNS, "|---" * (COLUMNS.count("|") - 1) + "|",
                  *(table_row(r) for r in summary["rows"])]
        at_1024 = [r for r in summary["rows"] if r["hidden"] == 1024]
        if at_1024:
            worst = max(r["overhead"] for r in at_1024)
            lines += ["", f"- Hidden 1024: overhead at most {worst:.1%} (medians), target 5% "
                          f"{'**met**' if worst <= 0.05 else '**not met**'}."]
        lines += ["", LEGEND]
    doc.write_text("\n".join(lines) + "\n")
    print(f"wrote {doc}")


def main():
    args = parse_args()
    if args.report_only:
        write_doc()
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # A port of its own: two benchmarks at once on one machine must not collide.
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1").items():
        os.environ.setdefault(key, value)
    initialize_distributed(seed=1)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    settings = settings_line(args, device)
    print(settings)
    print(COLUMNS)
    rows = []
    for hidden in args.hidden_sizes:
        for tokens in args.tokens_per_rank:
            rows.append(measure(hidden, tokens, args, device, dtype))
            print(table_row(rows[-1]), flush=True)
    print(LEGEND)
    if args.write_doc:
        SUMMARIES.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/lsh_overhead.py " + shlex.join(sys.argv[1:])  # quoted: it can be pasted
        summary = {"command": command, "settings": settings, "note": args.note, "rows": rows}
        (SUMMARIES / f"{summary_name(args, device)}.json").write_text(json.dumps(summary, indent=1))
        write_doc()


def summary_name(args, device) -> str:
    """One summary per device, dtype, data and split, and per bound and payload formats where they
    are not a plain `--lsh` run's (so a 4-bit run sits beside the default's, not over it)."""
    name = f"{device.type}-{args.dtype}-{args.data}-{args.lsh_split}"
    defaults = parse_args([])
    if args.lsh_error_bound != defaults.lsh_error_bound:
        name += f"-bound{args.lsh_error_bound}"
    formats = sorted({getattr(args, setting) for setting in PAYLOAD_SETTINGS})
    if formats != sorted({getattr(defaults, setting) for setting in PAYLOAD_SETTINGS}):
        name += "-" + "+".join(formats)
    return name


if __name__ == "__main__":
    main()
