"""What LSH-MoE would gain on a cluster: predicted step time with and without LSH.

    python -m megatron_lsh.projection --num-layers 24 --hidden-size 2048 --num-experts 16 \\
        --moe-router-topk 2 --moe-layer-freq 2 --seq-length 2048 --global-batch-size 512 \\
        --nodes 4 --gpus-per-node 8 --intra-node-gbps 2400 --inter-node-gbps 200 \\
        --gpu-tflops 150 --compression 0.25
    python -m megatron_lsh.projection --load runs/quickstart/checkpoints-gpt \\
        --compression-from runs/quickstart/checkpoints-gpt/tensorboard --nodes 2 --gpus-per-node 8 ...

A step is modelled as compute plus the time of the communication that does not overlap it:
  * compute: the model's FLOPs per GPU (forward and backward, 3x the forward's) at the GPU's
    achieved throughput; with LSH the experts run on centroids only, and hashing adds a share of
    the expert time (``--lsh-overhead``);
  * expert-parallel all-to-alls: four per MoE layer and micro-batch (dispatch and combine, forward
    and backward), routing balanced over the experts; rows to peers on the same node cross the
    intra-node links, the others the node's inter-node link, which all its GPUs share; an
    all-to-all lasts as long as the slower of the two, plus a fixed latency per collective. Each
    direction's rows travel in its payload format (``--moe-dispatch-fwd-dtype`` and the other
    three, as training takes them: 8-bit with ``--lsh`` unless given); stock sends bf16;
  * gradient all-reduce: dense parameters over all ranks, experts over their expert-data-parallel
    ranks; with ``--overlap-grad-reduce`` it hides behind the backward pass.
Tensor and pipeline parallelism are not modelled (both 1). Pure arithmetic: no GPU, no torch.
The command line that reads a run's flags and logs into it is projection/cli.py.
"""


from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

from megatron_lsh.moe.config import PAYLOAD_SETTINGS, flag_named_after
from megatron_lsh.moe.payload import PAYLOAD_FORMATS, PayloadFormatError, check_payload_format, row_bytes

# Bytes of a routing probability megatron-core's dispatcher sends with each row (fp32).
PROB_BYTES = 4
# Collectives per MoE layer and micro-batch (dispatch and combine all-to-alls, forward and
# backward, and megatron-core's all-gather of token counts), and per step outside the layers
# (gradient buckets, loss and statistics reductions).
COLLECTIVES_PER_MOE_LAYER = 5
COLLECTIVES_PER_STEP = 4


class ProjectionError(ValueError):
    """Input the projection cannot use; the message names the flag."""


@dataclass
class ModelShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    topk: int
    seq_length: int
    global_batch_size: int
    micro_batch_size: int = 1
    moe_ffn_hidden_size: Optional[int] = None
    moe_layer_pattern: Optional[List[int]] = None  # 1 per MoE layer, 0 per dense; None: every layer
    vocab_size: int = 32000
    swiglu: bool = False
    bytes_per_value: int = 2  # activations on the wire: bf16
    grad_bytes: int = 4  # gradients are reduced in fp32

    def __post_init__(self):
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        if self.moe_layer_pattern is None:
            self.moe_layer_pattern = [1] * self.num_layers
        if len(self.moe_layer_pattern) != self.num_layers:
            raise ProjectionError(f"--moe-layer-freq gives {len(self.moe_layer_pattern)} layers, "
                                  f"--num-layers {self.num_layers}")

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layer_pattern)

    def mlp_params(self, ffn: int) -> int:
        return (3 if self.swiglu else 2) * self.hidden_size * ffn

    @property
    def expert_params(self) -> int:
        """All experts of all MoE layers."""
        return self.num_moe_layers * self.num_experts * self.mlp_params(self.moe_ffn_hidden_size)

    @property
    def dense_params(self) -> int:
        """Everything else: attention, dense MLPs, routers, norms, embedding and output layer."""
        h = self.hidden_size
        attention = self.num_layers * (4 * h * h + 4 * h)
        dense_mlps = (self.num_layers - self.num_moe_layers) * self.mlp_params(self.ffn_hidden_size)
        routers = self.num_moe_layers * h * self.num_experts
        return attention + dense_mlps + routers + 2 * self.vocab_size * h

    def forward_flops_per_token(self) -> Dict[str, float]:
        """Forward FLOPs of one token, split into the experts' and the rest (2 per multiply-add)."""
        h, s = self.hidden_size, self.seq_length
        dense = self.num_layers * (2 * 4 * h * h + 2 * 2 * s * h)  # projections; scores and values
        dense += (self.num_layers - self.num_moe_layers) * 2 * self.mlp_params(self.ffn_hidden_size)
        dense += self.num_moe_layers * 2 * h * self.num_experts  # routers
        dense += 2 * h * self.vocab_size  # output layer
        experts = self.num_moe_layers * self.topk * 2 * self.mlp_params(self.moe_ffn_hidden_size)
        return {"dense": float(dense), "experts": float(experts)}


@dataclass
class Cluster:
    nodes: int
    gpus_per_node: int
    intra_node_gbps: float  # per GPU, each direction (NVLink; loopback when emulated)
    inter_node_gbps: float  # per node, each direction: all its NICs together
    gpu_tflops: float  # achieved, not peak
    latency_us: float = 20.0  # fixed cost of one collective
    expert_parallel: Optional[int] = None  # default: every GPU
    overlap_grad_reduce: bool = False

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def __post_init__(self):
        if self.expert_parallel is None:
            self.expert_parallel = self.world
        for name in ("nodes", "gpus_per_node", "expert_parallel"):
            if getattr(self, name) < 1:
                raise ProjectionError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("intra_node_gbps", "inter_node_gbps", "gpu_tflops"):
            if not getattr(self, name) > 0:
                raise ProjectionError(f"--{name.replace('_', '-')} must be positive")
        if self.world % self.expert_parallel:
            raise ProjectionError(f"--expert-model-parallel-size {self.expert_parallel} must divide the "
                                  f"{self.world} GPUs (--nodes x --gpus-per-node)")


# Every direction as megatron-core sends it.
STOCK_PAYLOADS = {name: "bf16" for name in PAYLOAD_SETTINGS}


def check_payloads(payloads: Dict[str, str], hidden_size: int) -> Dict[str, str]:
    """``payloads`` (a format per PAYLOAD_SETTINGS name; missing ones bf16), checked, in flag terms."""
    unknown = set(payloads) - set(PAYLOAD_SETTINGS)
    if unknown:
        raise ProjectionError(f"payload formats are given for {sorted(PAYLOAD_SETTINGS)}, not {sorted(unknown)}")
    formats = {**STOCK_PAYLOADS, **payloads}
    for name, payload_format in formats.items():
        if payload_format not in PAYLOAD_FORMATS:
            raise ProjectionError(f"{flag_named_after(name)} {payload_format}: use one of {', '.join(PAYLOAD_FORMATS)}")
        try:
            check_payload_format(payload_format, hidden_size)
        except PayloadFormatError as error:
            reason = str(error).replace("the hidden size", "--hidden-size")
            raise ProjectionError(f"{flag_named_after(name)} {payload_format}: {reason}") from None
    return formats


@dataclass
class StepTime:
    compute_s: float
    a2a_s: float
    grad_reduce_s: float
    a2a_intra_bytes: float  # per GPU per step, sent
    a2a_inter_bytes: float  # per node per step, sent
    grad_inter_bytes: float  # per node per step, sent

    @property
    def step_s(self) -> float:
        return self.compute_s + self.a2a_s + self.grad_reduce_s

    @property
    def a2a_share(self) -> float:
        return self.a2a_s / self.step_s


@dataclass
class Projection:
    """Stock against the projected run: LSH at ``compression`` (None: no LSH) with ``payloads``."""

    stock: StepTime
    projected: StepTime
    compression: Optional[List[float]]
    payloads: Dict[str, str]
    assumptions: List[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.stock.step_s / self.projected.step_s


def _per_layer(compression: Union[float, Sequence[float]], moe_layers: int) -> List[float]:
    if isinstance(compression, (int, float)):
        rates = [float(compression)] * moe_layers
    else:
        rates = [float(r) for r in compression]
        if len(rates) != moe_layers:
            raise ProjectionError(f"{len(rates)} per-layer compression rates for {moe_layers} MoE layers")
    if not all(0 < r <= 1 for r in rates):
        raise ProjectionError(f"compression rates must be in (0, 1], got {rates}")
    return rates


def step_time(model: ModelShape, cluster: Cluster, compression: Optional[List[float]] = None,
              scope: str = "all", lsh_overhead: float = 0.05,
              payloads: Optional[Dict[str, str]] = None) -> StepTime:
    """One training step on ``cluster``: without LSH (``compression`` None) or with LSH at the
    given per-MoE-layer rates (centroids per row in scope); rows in ``payloads``' formats (a
    format per PAYLOAD_SETTINGS name, default bf16: stock)."""
    formats = check_payloads(payloads or {}, model.hidden_size)
    world, ep, per_node = cluster.world, cluster.expert_parallel, cluster.gpus_per_node
    if model.global_batch_size % (world * model.micro_batch_size):
        raise ProjectionError(f"--global-batch-size {model.global_batch_size} is not a multiple of "
                              f"--micro-batch-size {model.micro_batch_size} x {world} GPUs")
    micro_batches = model.global_batch_size // (world * model.micro_batch_size)
    tokens = model.global_batch_size * model.seq_length / world  # per GPU per step
    # Expert-parallel groups are consecutive ranks (megatron-core's order): a group's ranks on one
    # node are min(EP, GPUs per node); the rest of the group is on other nodes.
    ep_peers_on_node = min(ep, per_node)
    to_same_node = (ep_peers_on_node - 1) / ep
    to_other_nodes = (ep - ep_peers_on_node) / ep
    rates = compression or [1.0] * model.num_moe_layers
    same_node_rate = [r if scope == "all" else 1.0 for r in rates]

    flops = model.forward_flops_per_token()
    # Experts compute on the rows they receive: with LSH, one per centroid.
    expert_rows = sum(to_other_nodes * r + (1 - to_other_nodes) * q for r, q in zip(rates, same_node_rate))
    expert_share = expert_rows / model.num_moe_layers if model.num_moe_layers else 1.0
    expert_flops = flops["experts"] * expert_share
    if compression is not None:
        expert_flops += flops["experts"] * lsh_overhead
    compute_s = 3 * tokens * (flops["dense"] + expert_flops) / (cluster.gpu_tflops * 1e12)

    # Rows each GPU sends per MoE layer, over the four all-to-alls: each direction in its format
    # (bf16 as the model computes: --fp32 sends 4 bytes), scales included; without LSH the
    # dispatch carries a prob both ways. Rows are encoded whoever receives them, as training does.
    rows = tokens * model.topk

    def direction_bytes(name: str) -> float:
        payload_format = formats[name]
        if payload_format == "bf16":
            return model.hidden_size * model.bytes_per_value
        return row_bytes(payload_format, model.hidden_size)

    row_bytes_all_four = sum(direction_bytes(name) for name in PAYLOAD_SETTINGS)
    row_bytes_all_four += 2 * PROB_BYTES if compression is None else 0
    intra_bytes = inter_bytes = 0.0
    a2a_s = 0.0
    for rate, same_rate in zip(rates, same_node_rate):
        layer_intra = rows * to_same_node * same_rate * row_bytes_all_four
        layer_inter = rows * to_other_nodes * rate * row_bytes_all_four * per_node if to_other_nodes else 0.0
        intra_bytes += layer_intra
        inter_bytes += layer_inter
        a2a_s += max(layer_intra / (cluster.intra_node_gbps * 1e9 / 8),
                     layer_inter / (cluster.inter_node_gbps * 1e9 / 8))
    a2a_s += COLLECTIVES_PER_MOE_LAYER * model.num_moe_layers * micro_batches * cluster.latency_us * 1e-6

    # All-reduce as NCCL (and gloo) do it across nodes: each rank sends 2 (n-1)/n of the buffer
    # over its fast links, and a node's link carries 2 (N-1)/N of it for each group through it,
    # N the nodes the group spans.
    def all_reduce(size: float, ranks: int, groups_per_node: int, nodes_spanned: int):
        if ranks <= 1:
            return 0.0, 0.0
        intra_s = 2 * (ranks - 1) / ranks * size / (cluster.intra_node_gbps * 1e9 / 8)
        if nodes_spanned <= 1:
            return intra_s, 0.0
        node_bytes = groups_per_node * 2 * (nodes_spanned - 1) / nodes_spanned * size
        return max(intra_s, node_bytes / (cluster.inter_node_gbps * 1e9 / 8)), node_bytes

    dense_s, dense_inter = all_reduce(model.dense_params * model.grad_bytes, world, 1, cluster.nodes)
    # Expert-data-parallel groups take every EP-th rank: a node's GPUs sit in min(GPUs, EP) of them.
    expert_dp = world // ep
    expert_s, expert_inter = all_reduce(model.expert_params / ep * model.grad_bytes, expert_dp,
                                        min(per_node, ep), min(cluster.nodes, expert_dp))
    grad_s = dense_s + expert_s + COLLECTIVES_PER_STEP * cluster.latency_us * 1e-6
    if cluster.overlap_grad_reduce:
        grad_s = max(0.0, grad_s - compute_s * 2 / 3)  # the backward pass is 2/3 of compute
    return StepTime(compute_s, a2a_s, grad_s, intra_bytes, inter_bytes, dense_inter + expert_inter)


def project(model: ModelShape, cluster: Cluster, compression: Union[None, float, Sequence[float]],
            scope: str = "all", lsh_overhead: float = 0.05, payloads: Optional[Dict[str, str]] = None) -> Projection:
    """Stock (megatron-core, bf16) against a run with LSH at ``compression`` (None: without LSH)
    and its rows in ``payloads``' formats (default bf16 in every direction)."""
    rates = None if compression is None else _per_layer(compression, model.num_moe_layers)
    formats = check_payloads(payloads or {}, model.hidden_size)
    ep = cluster.expert_parallel
    assumptions = [
        f"{cluster.world} GPUs ({cluster.nodes} nodes x {cluster.gpus_per_node}), expert parallel {ep}, "
        f"data parallel {cluster.world}; tensor and pipeline parallel 1",
        f"achieved {cluster.gpu_tflops:g} TFLOP/s per GPU; forward + backward = 3x forward FLOPs",
        "routing balanced: every expert gets top-k / experts of each GPU's rows",
        f"intra-node {cluster.intra_node_gbps:g} Gbit/s per GPU, inter-node {cluster.inter_node_gbps:g} Gbit/s "
        "per node (shared by its GPUs), each direction; an all-to-all takes the slower of the two",
        f"{cluster.latency_us:g} us per collective, waiting for the slowest rank included (4 all-to-alls + 1 "
        f"count exchange per MoE layer and micro-batch, {COLLECTIVES_PER_STEP} more per step)",
        ("no LSH" if rates is None else
         f"LSH: experts run on centroids; hashing, clustering and quantisation cost {100 * lsh_overhead:g}% of "
         f"the exact experts' time; scope {scope}"),
        "payloads: " + ", ".join(f"{flag_named_after(name)} {f}" for name, f in formats.items())
        + ("; 8-bit encoding without LSH not timed (a pass over the rows)"
           if rates is None and set(formats.values()) != {"bf16"} else ""),
        "gradients reduced in fp32 (2 (n-1)/n of them per GPU, 2 (N-1)/N per node link over N nodes)"
        + (", hidden behind the backward pass where it fits" if cluster.overlap_grad_reduce else ", not overlapped"),
    ]
    return Projection(step_time(model, cluster), step_time(model, cluster, rates, scope, lsh_overhead, formats),
                      rates, formats, assumptions)


# -- command line ---------------------------------------------------------------------------------

