"""docs/projections.md: megatron_lsh.projection on the paper's setups and on current clusters.

    python benchmarks/projection_table.py      # seconds; pure arithmetic, no GPU

Every input is listed in the output with where it comes from; change them here, not in the doc.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from megatron_lsh.moe.config import PAYLOAD_SETTINGS  # noqa: E402
from megatron_lsh.projection import Cluster, ModelShape, project  # noqa: E402
from megatron_lsh.training.arguments import lsh_settings_of_flags  # noqa: E402

QUALITY_DATA = REPO / "docs" / "data" / "quality_study"
MXFP8_ALL = {name: "mxfp8" for name in PAYLOAD_SETTINGS}
# What plain --lsh runs, in words.
DEFAULT = lsh_settings_of_flags(["--lsh"])
DEFAULT_SPLIT = DEFAULT["lsh_split"]
DEFAULT_IN_WORDS = (f"error bound {DEFAULT['lsh_error_bound']}, "
                    + (f"{DEFAULT['lsh_num_hashes']} levels of hashes" if DEFAULT_SPLIT == "hash"
                       else f"clusters halved up to {DEFAULT['lsh_num_hashes']} times")
                    + f", {DEFAULT['moe_dispatch_fwd_dtype']} payloads")
# The paper's rate at matched quality for its models, with its payloads (bf16, no 8-bit).
PAPER_RATE = 0.2


@dataclass
class MeasuredRate:
    corpus: str
    rate: float  # centroids per row, all MoE layers, over the run's last 10%
    source: str


def default_rate(corpus: str) -> MeasuredRate:
    """The default's compression rate over the last 10% of its scale run (8192 tokens per rank and
    micro-batch, the nearest of our runs to a real run's 4-16k), from the quality study's summary."""
    path = QUALITY_DATA / f"{corpus}-scale-default.json"
    summary = json.loads(path.read_text())
    last = [rate for iteration, rate in summary["compression"] if iteration > 0.9 * summary["iters"]]
    return MeasuredRate(corpus, sum(last) / len(last),
                        f"training's default (plain `--lsh`: {DEFAULT_IN_WORDS}) on the "
                        f"{corpus} corpus, mean compression over the last 10% of its {summary['iters']}-iteration "
                        "scale run "
                        f"(8192 tokens per rank and micro-batch; {path.relative_to(REPO)}), which ended "
                        f"at {summary['bytes_ratio_last_10pct']:.3f}x stock's all-to-all bytes there")


def gpt_moe_paper_like(experts: int) -> ModelShape:
    # GPT-medium-sized MoE with MoE in every other layer and top-2 gating, as the paper describes
    # its GPT-MoE; layer count, width and batch are our assumptions.
    return ModelShape(num_layers=24, hidden_size=1024, ffn_hidden_size=4096, num_experts=experts, topk=2,
                      seq_length=1024, global_batch_size=experts * 8, micro_batch_size=4,
                      moe_layer_pattern=[1 if i % 2 == 0 else 0 for i in range(24)], vocab_size=50304)


def t5_moe_paper_like(experts: int) -> ModelShape:
    # T5-base-sized (12 encoder + 12 decoder layers, modelled as 24 layers of one stack, cross-attention
    # left out), MoE in every other layer, top-2; our assumptions as above.
    return ModelShape(num_layers=24, hidden_size=768, ffn_hidden_size=3072, num_experts=experts, topk=2,
                      seq_length=512, global_batch_size=experts * 16, micro_batch_size=8,
                      moe_layer_pattern=[1 if i % 2 == 0 else 0 for i in range(24)], vocab_size=32128)


def fine_grained_moe(gpus: int) -> ModelShape:
    # The shape of Qwen3-30B-A3B (48 layers, hidden 2048, 128 experts of width 768, top-8, SwiGLU,
    # every layer MoE), 4 sequences of 4096 tokens per GPU and step.
    return ModelShape(num_layers=48, hidden_size=2048, ffn_hidden_size=6144, moe_ffn_hidden_size=768,
                      num_experts=128, topk=8, seq_length=4096, global_batch_size=gpus * 4, micro_batch_size=1,
                      swiglu=True, vocab_size=151936)


@dataclass
class Setup:
    name: str
    model_name: str
    model: ModelShape
    cluster: Cluster
    source: str


# Achieved (not peak) dense bf16 throughput per GPU: about 45% of peak for A100 (312) and 40% of
# peak for H100/H200 (989), typical of Megatron-LM MoE runs; NVLink per GPU and direction.
A100, H100 = 140.0, 400.0
NVLINK3, NVLINK4 = 2400.0, 3600.0  # Gbit/s per GPU and direction: 300 and 450 GB/s


def setups() -> List[Setup]:
    paper_cluster = "8 x A100 per node, NVLink 3, 100 Gbit/s per node (assumed)"
    rows = []
    for gpus in (16, 32):
        for name, model in (("GPT-MoE (paper-like)", gpt_moe_paper_like(gpus)),
                            ("T5-MoE (paper-like)", t5_moe_paper_like(gpus))):
            rows.append(Setup(f"{gpus // 8} x 8 A100, 100 Gbit/s", name, model,
                              Cluster(gpus // 8, 8, NVLINK3, 100.0, A100, latency_us=30.0), paper_cluster))
    rows += [
        Setup("4 x 8 A100, 200 Gbit/s", "Qwen3-30B-A3B shape", fine_grained_moe(32),
              Cluster(4, 8, NVLINK3, 200.0, A100, latency_us=30.0), "one HDR NIC per node"),
        Setup("16 x 8 H100, 400 Gbit/s per node", "Qwen3-30B-A3B shape", fine_grained_moe(128),
              Cluster(16, 8, NVLINK4, 400.0, H100, latency_us=30.0), "one NDR NIC per node"),
        Setup("16 x 8 H100, 8 x 400 Gbit/s per node", "Qwen3-30B-A3B shape", fine_grained_moe(128),
              Cluster(16, 8, NVLINK4, 3200.0, H100, latency_us=30.0), "DGX H100: one NDR NIC per GPU"),
        Setup("1 x 8 H200", "Qwen3-30B-A3B shape", fine_grained_moe(8),
              Cluster(1, 8, NVLINK4, 1.0, H100, latency_us=20.0), "NVLink only (the inter-node rate is unused)"),
    ]
    return rows


def measured_overhead() -> str:
    """What benchmarks/lsh_overhead.py measured at hidden 1024 for training's default split, from the
    summaries it keeps."""
    found = []
    for data in ("clustered", "gaussian"):
        path = REPO / "docs" / "data" / "lsh_overhead" / f"cpu-fp32-{data}-{DEFAULT_SPLIT}.json"
        if path.exists():
            rows = [r for r in json.loads(path.read_text())["rows"] if r["hidden"] == 1024]
            found += [f"{r['overhead']:.1%} at {r['tokens']} tokens per rank on {data} data" for r in rows]
    if not found:
        return "not measured yet on this machine"
    return "measured " + ", ".join(found) + " (CPU, fp32, docs/lsh_overhead.md)"


def main() -> None:
    rates = [default_rate(corpus) for corpus in ("quickstart", "code")]
    lines = [
        "# Projected speedups on real clusters",
        "",
        "Regenerate with `python benchmarks/projection_table.py` (arithmetic only). Each row is",
        "`python -m megatron_lsh.projection` for the model and cluster named, against megatron-core's bf16 dispatch:",
        "8-bit payloads alone (the low-precision peer: `--no-lsh` with mxfp8 in all four all-to-alls), and",
        "training's default at the compression rates it reached in this repository, with its mxfp8 payloads;",
        "docs/cluster_study.md checks the same model against measured step times on an emulated cluster.",
        "Projections, not measurements: no GPU cluster was available to this project.",
        "",
        "Compression rates used (centroids per row LSH may merge):",
        "",
        *(f"- {r.rate:.3f}: {r.source}" for r in rates),
        f"- {PAPER_RATE:.3f}: about what the paper reports at matched quality for its models, with bf16 payloads as "
        "it sends them",
        "",
        "Our rates come from small models (hidden 128) on small corpora, and they rise as a model trains (its MoE",
        "inputs cluster less); quality at these rates is not part of a projection: docs/quality_study.md has what",
        "each setting cost in perplexity here.",
        "",
        f"| cluster | model | stock step ms | a2a share (stock) | mxfp8 alone | default at {rates[0].rate:.3f} "
        f"({rates[0].corpus}) | default at {rates[1].rate:.3f} ({rates[1].corpus}) | default at {rates[0].rate:.3f}, "
        f"`--lsh-scope inter-node` | {PAPER_RATE:.3f}, bf16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    paper_shares, single_node_inter = [], None
    for setup in setups():
        peer = project(setup.model, setup.cluster, None, payloads=MXFP8_ALL)
        defaults = [project(setup.model, setup.cluster, r.rate, payloads=MXFP8_ALL) for r in rates]
        inter = project(setup.model, setup.cluster, rates[0].rate, scope="inter-node", payloads=MXFP8_ALL)
        paper = project(setup.model, setup.cluster, PAPER_RATE)
        stock = peer.stock
        lines.append(f"| {setup.name} | {setup.model_name} | {stock.step_s * 1e3:.0f} | {100 * stock.a2a_share:.0f}% | "
                     + " | ".join(f"{p.speedup:.2f}x" for p in (peer, *defaults, inter, paper)) + " |")
        if "paper-like" in setup.model_name:
            paper_shares.append(100 * stock.a2a_share)
        if setup.cluster.nodes == 1:
            single_node_inter = inter.speedup
    paper_low, paper_high = min(paper_shares), max(paper_shares)
    paper_versus = "within" if 30 <= paper_low and paper_high <= 70 else "partly above" if paper_low <= 70 else "above"
    flops = fine_grained_moe(8).forward_flops_per_token()
    fine_expert_share = flops["experts"] / (flops["experts"] + flops["dense"])
    lines += [
        "",
        "## Inputs and where they come from",
        "",
        "- Models. GPT-MoE and T5-MoE (paper-like): the paper's GPT-MoE and T5-MoE were trained with MoE in every",
        "  other layer and top-2 gating on 16 and 32 GPUs; their exact widths, depths and batches were not available",
        "  to us, so these rows use GPT-medium (24 x 1024) and T5-base (12 + 12 x 768) shapes with one expert per GPU,",
        "  8 and 16 sequences per GPU of 1024 and 512 tokens. Qwen3-30B-A3B shape: 48 layers, hidden 2048, 128",
        "  experts of width 768, top-8, SwiGLU, 4 sequences of 4096 tokens per GPU; expert parallel = min(GPUs, 128).",
        "- GPUs: achieved dense bf16 throughput 140 TFLOP/s (A100, ~45% of peak) and 400 TFLOP/s (H100 and H200,",
        "  ~40% of peak), typical of Megatron-LM MoE training, assumed; the H200's extra memory bandwidth is not",
        "  modelled.",
        "- Links: NVLink 3 at 300 GB/s and NVLink 4 at 450 GB/s per GPU and direction (nominal); InfiniBand at its",
        "  nominal rate per node (one NIC, or eight on DGX-style nodes); 30 us per collective across nodes, 20 us",
        "  within one. Nominal rates flatter both stock and LSH; nccl-tests' alltoall_perf on the real cluster is",
        "  the number to give `--inter-node-gbps` (the emulated study shows how far measured and nominal can differ).",
        "- Paper setups: the cluster (8 x A100 per node, 100 Gbit/s between nodes) is assumed too; with it the stock",
        f"  all-to-all share is {paper_low:.0f}-{paper_high:.0f}% of the step ({paper_versus} the 30-70% the paper "
        "measured).",
        "- Experts run on centroids, so part of every speedup is compute: at rate r the experts' FLOPs fall to r",
        "  of stock's. The 1 x 8 H200 row is that and the 8-bit payloads on NVLink (one node: nothing crosses a slow",
        f"  link); with `--lsh-scope inter-node` only the payloads are left ({single_node_inter:.2f}x, the hashing's "
        "cost",
        "  included). In the fine-grained",
        f"  model the experts are {100 * fine_expert_share:.0f}% of the forward FLOPs (the projection's count: "
        "attention",
        "  and the output layer are the rest); whether a GPU keeps its efficiency on the smaller expert batches is not",
        "  modelled.",
        "- 8-bit payloads: e4m3 elements and a scale per 32 (1.03 bytes an element against bf16's 2) in every",
        "  direction, intra-node rows included (training encodes whoever receives them); their encoding is not",
        "  timed for the peer (a pass over the rows, small next to the experts' GEMMs) and is part of the LSH "
        "overhead.",
        "- LSH overhead: hashing and clustering at 5% of the exact experts' time (benchmarks/lsh_overhead.py, for",
        f"  training's default ({DEFAULT_SPLIT} split, bound and 8-bit quantisation) at hidden 1024: "
        f"{measured_overhead()};",
        "  the GPU figure is still to be measured).",
        "- Gradient all-reduce not overlapped with the backward pass (Megatron-LM's `--overlap-grad-reduce` would",
        "  hide part of it and raise every speedup a little).",
    ]
    out = REPO / "docs" / "projections.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
