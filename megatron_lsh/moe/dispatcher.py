"""LSHAlltoAllTokenDispatcher: megatron-core's all-to-all dispatcher, sending centroids.

Per MoE layer and rank, after routing and the first permutation (rows grouped by destination
expert), rows bound for the same expert are hashed and averaged per bucket. The dispatch
all-to-all carries one centroid per cluster, experts run on centroids, and the combine
all-to-all returns one output per centroid. Each token then gets its cluster's output, plus its
own residual x - c when error compensation is on, times its own routing probability.

Routing probabilities never cross the wire: megatron-core applies them inside the experts per
row, which is wrong for a centroid standing for tokens with different probabilities, so the
experts get ones and each token's probability is applied here, on its source rank.

Everything between the two all-to-alls (sorting by local expert, expert tensor parallelism,
the expert computation) is megatron-core's, unchanged: it sees fewer rows.

Shapes, as megatron-core's token_dispatcher.py writes them:
    S, B   sequence length (per tensor-parallel rank with sequence parallelism), micro-batch
    T      tokens of this rank, S x B;  K  --moe-router-topk;  H  hidden size
    R      token rows, one per (token, expert) pair: T x K without dropped tokens
    C      centroids (clusters) of those rows, C <= R;  E  experts;  E_local  this rank's
    hidden_states [S, B, H] -> token rows [R, H] (by expert) -> centroids [C, H] -> all-to-all
    -> expert outputs [C, H] -> all-to-all back -> token rows [R, H] -> [S, B, H]
Every host sync on this path is marked ``# NOTE: device-to-host sync`` (tests/test_lsh.py and
tests/test_dispatcher_multirank.py fail on an unmarked one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from megatron.core import utils
from megatron.core.tensor_parallel import all_to_all, gather_from_sequence_parallel_region
from megatron.core.transformer.moe.moe_utils import ProcessGroupCollection, permute
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lsh.lsh import (
    GroupedClusters,
    build_hash_family,
    expand_to_tokens,
    fit_expert_gains,
    hash_and_cluster,
)
from megatron_lsh.lsh.hashing import LSHFamily, derive_seed
from megatron_lsh.moe.config import LSHConfigError, added_settings
from megatron_lsh.moe.payload import BF16_BYTES, payload_all_to_all, row_bytes
from megatron_lsh.moe.stats import CompressionStats, get_compression_tracker
from megatron_lsh.moe.topology import nodes_of_group, ranks_per_node

# Where the controller starts each layer's merge threshold (a cluster's relative squared error).
INITIAL_MERGE_THRESHOLD = 1.0


def initial_merge_threshold(config) -> Optional[float]:
    """The merge threshold at the first step: the controller's start with a target, else None."""
    return INITIAL_MERGE_THRESHOLD if config.lsh_target_compression is not None else None


class PayloadAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron-core's all-to-all dispatcher, its all-to-alls sending rows in the payload formats
    of the config (``moe_dispatch_fwd_dtype`` and the others) and counting what they send.

    The counts of every dispatch go to ``last_stats`` and to the process-wide tracker
    (``megatron_lsh.moe.get_compression_tracker()``), in bytes a bf16 run would send.
    """

    # Routing probabilities travel with the rows, as in megatron-core (LSH keeps them home).
    sends_probs = True

    def __init__(
        self,
        num_local_experts: int,
        local_expert_indices: List[int],
        config: TransformerConfig,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ) -> None:
        missing = [f.name for f in added_settings() if not hasattr(config, f.name)]
        if missing:
            raise LSHConfigError(
                f"{type(self).__name__} needs an LSHTransformerConfig; the config lacks {', '.join(missing)}"
            )
        super().__init__(num_local_experts, local_expert_indices, config, pg_collection)
        self.ep_rank = utils.get_pg_rank(self.ep_group)
        # Which peers share this rank's node: rows to the others cross the slow links.
        nodes = nodes_of_group(self.ep_group, ranks_per_node(getattr(config, "lsh_ranks_per_node", None)))
        self._off_node_ranks = torch.tensor([node != nodes[self.ep_rank] for node in nodes])
        self.layer_number: Optional[int] = None
        self.layer_name = "moe"
        self._last_stats: Optional[torch.Tensor] = None
        self._token_rows_per_expert: Optional[torch.Tensor] = None

    @property
    def last_stats(self) -> Optional[CompressionStats]:
        """The statistics of the last dispatch (reading them waits for the device)."""
        return None if self._last_stats is None else CompressionStats.from_vector(self._last_stats)

    def set_layer_number(self, layer_number: int, layer_name: Optional[str] = None) -> None:
        """Each layer records stats under its own name (and, with LSH, hashes with its own
        projections)."""
        self.layer_number = layer_number
        self.layer_name = layer_name or f"layer_{layer_number}"

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        self._token_rows_per_expert = routing_map.sum(dim=0)
        return super().dispatch_preprocess(hidden_states, routing_map, probs)

    def token_dispatch(self, rows, probs):
        """Send rows to their experts' ranks in the dispatch formats; probs as megatron-core does."""
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize("before_ep_alltoall", self.tokens_per_expert)
        global_rows = payload_all_to_all(
            self.ep_group, rows, self.output_splits, self.input_splits,
            self.config.moe_dispatch_fwd_dtype, self.config.moe_dispatch_bwd_dtype,
            self.config.moe_payload_bwd_rounding,
        )
        return global_rows, self._dispatch_probs(probs, global_rows.size(0))

    def _dispatch_probs(self, probs, num_global_rows: int):
        return all_to_all(self.ep_group, probs, self.output_splits, self.input_splits)

    def dispatch_postprocess(self, global_rows, global_probs):
        self._record_stats(global_rows.size(-1), backward=global_rows.requires_grad)
        return super().dispatch_postprocess(global_rows, global_probs)

    def token_combine(self, hidden_states, *args, **kwargs):
        """Return the experts' outputs to their tokens' ranks in the combine formats."""
        return payload_all_to_all(
            self.ep_group, hidden_states, self.input_splits, self.output_splits,
            self.config.moe_combine_fwd_dtype, self.config.moe_combine_bwd_dtype,
            self.config.moe_payload_bwd_rounding,
        )

    def _sent_rows_per_expert(self) -> torch.Tensor:
        """Rows this rank sends each expert (all of them, here: every token row)."""
        return self._token_rows_per_expert

    def _rows_per_tp_peer(self):
        """Rows each expert-tensor-parallel peer holds for this rank's experts: as sent, and as
        megatron-core's dispatch would have them."""
        sent = torch.tensor([int(r) for r in self.output_splits_tp], dtype=torch.float64)  # host list
        return sent, sent

    def _compression_counts(self) -> dict:
        """What the compression rate and error are counts of (nothing without LSH)."""
        return {}

    def _record_stats(self, row_width: int, backward: bool) -> None:
        """What this rank sends over expert parallel (the all-to-alls) and, with expert tensor
        parallelism, over its peers (the gather before the experts, the reduce-scatter after),
        in the forward and, when ``backward`` (gradients will flow), in the backward.

        Bytes as a bf16 run sends them, whatever this run computes in: rows in their payload
        format (bf16: 2 bytes an element; scales included), probabilities 2 bytes each, against
        megatron-core's dispatch with bf16 payloads. Counted on the device: a dispatch never
        waits for the host for its statistics."""
        formats = self.config.payload_formats()
        bytes_of = {name: row_bytes(payload_format, row_width) for name, payload_format in formats.items()}
        stock_row = row_bytes("bf16", row_width)
        prob = BF16_BYTES if self.sends_probs else 0
        dispatch_row = bytes_of["moe_dispatch_fwd_dtype"] + prob
        combine_row = bytes_of["moe_combine_fwd_dtype"]
        backward_row = bytes_of["moe_combine_bwd_dtype"] + bytes_of["moe_dispatch_bwd_dtype"] + prob
        stock_dispatch_row, stock_backward_row = stock_row + BF16_BYTES, 2 * stock_row + BF16_BYTES
        if not backward:
            backward_row = stock_backward_row = 0
        counts = self._compression_counts()
        if self.ep_size > 1:
            token_rows_per_rank = self._token_rows_per_expert.view(self.ep_size, self.num_local_experts).sum(dim=1)
            sent_rows_per_rank = self._sent_rows_per_expert().view(self.ep_size, self.num_local_experts).sum(dim=1)
            if self._off_node_ranks.device != token_rows_per_rank.device:
                self._off_node_ranks = self._off_node_ranks.to(token_rows_per_rank.device)  # once
            off_node = self._off_node_ranks
            remote_token_rows = token_rows_per_rank.sum() - token_rows_per_rank[self.ep_rank]
            remote_sent_rows = sent_rows_per_rank.sum() - sent_rows_per_rank[self.ep_rank]
            counts.update(
                dispatch_bytes=remote_sent_rows * dispatch_row,
                dispatch_bytes_stock=remote_token_rows * stock_dispatch_row,
                combine_bytes=remote_sent_rows * combine_row,
                combine_bytes_stock=remote_token_rows * stock_row,
                backward_bytes=remote_sent_rows * backward_row,
                backward_bytes_stock=remote_token_rows * stock_backward_row,
                inter_node_bytes=(sent_rows_per_rank * off_node).sum() * (dispatch_row + combine_row + backward_row),
                inter_node_bytes_stock=(token_rows_per_rank * off_node).sum()
                * (stock_dispatch_row + stock_row + stock_backward_row),
            )
        stats = CompressionStats.vector_of(**counts)
        if self.tp_size > 1:
            # The gather sends this rank's rows (and their probs) to every peer, the reduce-scatter
            # each peer its own rows' partial outputs; in bf16, and again in the backward.
            sent_per_peer, stock_per_peer = self._rows_per_tp_peer()
            own_sent, own_stock = sent_per_peer[self.tp_rank], stock_per_peer[self.tp_rank]
            gather, gather_stock = (own * (self.tp_size - 1) * (stock_row + BF16_BYTES)
                                    for own in (own_sent, own_stock))
            scatter = (sent_per_peer.sum() - own_sent) * stock_row
            scatter_stock = (stock_per_peer.sum() - own_stock) * stock_row
            stats = stats + CompressionStats.vector_of(
                dispatch_bytes=gather, dispatch_bytes_stock=gather_stock,
                combine_bytes=scatter, combine_bytes_stock=scatter_stock,
                backward_bytes=(gather + scatter) if backward else 0,
                backward_bytes_stock=(gather_stock + scatter_stock) if backward else 0,
            )
        self._token_rows_per_expert = None
        self._last_stats = stats
        get_compression_tracker().record(self.layer_name, stats)


@dataclass
class LSHForward:
    """What one forward carries from dispatch_preprocess (which sets it) to combine_postprocess
    (which clears it); the statistics read it in between."""

    clusters: GroupedClusters  # R token rows -> C centroids, grouped by expert
    token_rows: Optional[torch.Tensor]  # [R, H], kept for the residual x - c (compensation only)
    token_row_probs: torch.Tensor  # [R] each row's routing probability, applied at the combine
    # On the device: sum of relative errors, rows sent exact, rows LSH may merge, their centroids.
    error_stats: Tuple[torch.Tensor, ...]
    stock_rows_per_tp_peer: Optional[torch.Tensor] = None  # [ETP] rows per peer in stock's dispatch
    expert_inputs: Optional[tuple] = None  # expert_gain: ([C_local, H] rows, rows per local expert)
    expert_gains: Optional[torch.Tensor] = None  # expert_gain: [E] each expert's gain


class LSHAlltoAllTokenDispatcher(PayloadAlltoAllTokenDispatcher):
    """All-to-all token dispatcher whose both all-to-alls carry LSH centroids.

    Same constructor as MoEAlltoAllTokenDispatcher; the LSH settings come from the config
    (an LSHTransformerConfig). Statistics of every dispatch go to ``last_stats`` and to the
    process-wide tracker (``megatron_lsh.moe.get_compression_tracker()``).
    """

    sends_probs = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = self.config
        # With lsh_scope 'inter-node', the experts whose rows travel exact: those on this node.
        self._exact_experts: Optional[torch.Tensor] = None
        if config.lsh_scope == "inter-node":
            self._exact_experts = ~self._off_node_ranks.repeat_interleave(self.num_local_experts)
        self.iteration = 0
        self._hash_family: Optional[LSHFamily] = None
        self._hash_family_key = None
        self._forward: Optional[LSHForward] = None  # one forward's state, dispatch to combine
        # The merge threshold in force (None: no controller), which the compression controller
        # steers towards the target rate.
        self.merge_threshold: Optional[float] = initial_merge_threshold(config)
        # Counts of training forwards since the controller last looked: rows, centroids, and
        # whether the threshold still acts (clusters it split, clusters it kept whole).
        self.training = True
        self.window_rows = self.window_centroids = 0
        self.window_threshold_splits = self.window_threshold_kept = 0

    def set_iteration(self, iteration: int) -> None:
        """The training iteration, which picks the projections when they are redrawn."""
        self.iteration = iteration

    def hash_family(self, dim: int) -> LSHFamily:
        """The projections in force: a function of seed, layer name and draw only, equal on all
        ranks."""
        interval = self.config.lsh_redraw_interval
        draw = self.iteration // interval if interval else 0
        key = (dim, self.layer_name, draw)
        if self._hash_family_key != key:
            self._hash_family = build_hash_family(
                self.config.lsh_hash_type,
                dim,
                self.config.lsh_num_hashes,
                self.config.lsh_num_buckets,
                seed=derive_seed(self.config.lsh_seed, self.layer_name, draw),
            )
            self._hash_family_key = key
        return self._hash_family

    def dispatch_preprocess(
        self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor
    ):
        """Permute tokens by expert, cluster them, and compute splits from centroid counts.

        Returns the centroids (grouped by destination expert) and a probs tensor of ones:
        probabilities are applied per token in ``combine_postprocess``.
        """
        assert probs.dim() == 2, "Expected 2D tensor for probs"
        assert routing_map.dim() == 2, "Expected 2D tensor for token2expert mask"
        assert routing_map.dtype == torch.bool, "Expected bool tensor for mask"
        self.hidden_shape = hidden_states.shape
        self.probs = probs
        self.routing_map = routing_map
        hidden_states = hidden_states.view(-1, self.hidden_shape[-1])
        self.hidden_shape_before_permute = hidden_states.shape
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(hidden_states.view(self.hidden_shape))

        token_rows, token_row_probs, rows_per_expert, num_rows = self._rows_by_expert(hidden_states, routing_map, probs)
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_experts, device=token_rows.device),
            rows_per_expert,
            output_size=num_rows,
        )
        family = self.hash_family(token_rows.size(-1))
        exact_experts = self._exact_experts
        if exact_experts is not None and exact_experts.device != token_rows.device:
            exact_experts = self._exact_experts = exact_experts.to(token_rows.device)  # once
        clusters, errors, cluster_counts = hash_and_cluster(
            token_rows, family, expert_of_row, self.num_experts, self.merge_threshold,
            self.config.lsh_error_bound, exact_experts, self.config.lsh_split,
        )
        self._forward = LSHForward(
            clusters=clusters,
            token_rows=token_rows if self.config.lsh_compensation != "none" else None,
            token_row_probs=token_row_probs,
            error_stats=self._count_merges(clusters, errors, cluster_counts, rows_per_expert, exact_experts),
        )
        self._token_rows_per_expert = rows_per_expert
        if self.tp_size > 1:
            # Rows each expert-tensor-parallel peer will hold for this rank's experts had every
            # token been sent: the stock side of the statistics of the gather over those peers.
            token_counts = gather_from_sequence_parallel_region(
                rows_per_expert, group=self.tp_ep_group
            ).reshape(self.ep_size, self.tp_size, self.num_experts)
            first, last = self.local_expert_indices[0], self.local_expert_indices[-1] + 1
            self._forward.stock_rows_per_tp_peer = token_counts[:, :, first:last].sum(dim=(0, 2))

        # megatron-core's own metadata step (splits, per-expert counts, the count all-gather),
        # fed a routing map with one row per centroid.
        centroid_routing_map = torch.nn.functional.one_hot(
            clusters.cluster_groups, self.num_experts
        ).bool()
        self.tokens_per_expert = self.preprocess(centroid_routing_map)
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize(
            "before_permutation_1", self.tokens_per_expert
        )
        centroid_probs = torch.ones(
            clusters.num_clusters, dtype=probs.dtype, device=clusters.centroids.device
        )
        return clusters.centroids, centroid_probs

    def _rows_by_expert(self, hidden_states, routing_map, probs):
        """megatron-core's permutation: one row per (token, expert) pair, grouped by expert; with
        the routing probabilities on the input if the config applies them there."""
        rows_per_expert = routing_map.sum(dim=0)
        if self.config.moe_expert_capacity_factor is None:
            num_rows = routing_map.size(0) * self.config.moe_router_topk
        else:  # dropped tokens make the row count data-dependent
            num_rows = int(rows_per_expert.sum())  # NOTE: device-to-host sync (capacity factor only)
        token_rows, token_row_probs, self.reversed_local_input_permutation_mapping = permute(
            hidden_states,
            routing_map,
            probs=probs,
            num_out_tokens=num_rows,
            fused=self.config.moe_permute_fusion,
        )
        if self.config.moe_apply_probs_on_input:
            token_rows = (token_row_probs.unsqueeze(-1) * token_rows).to(token_rows.dtype)
            token_row_probs = torch.ones_like(token_row_probs)
        return token_rows, token_row_probs, rows_per_expert, num_rows

    def _count_merges(self, clusters, errors, cluster_counts, rows_per_expert, exact_experts) -> tuple:
        """Rows LSH may merge and their centroids (what the compression rate is a rate of), the
        merge errors, and the controller's window. Kept on the device, as every count here: the
        host reads them when the loop logs."""
        if exact_experts is None:  # sizes the host already knows
            rows_in_scope, centroids_in_scope = clusters.num_tokens, clusters.num_clusters
        else:
            in_scope = ~exact_experts
            rows_in_scope = (rows_per_expert * in_scope).sum()
            centroids_in_scope = (clusters.clusters_per_group * in_scope).sum()
        if self.training:
            self.window_rows = self.window_rows + rows_in_scope
            self.window_centroids = self.window_centroids + centroids_in_scope
            self.window_threshold_splits = self.window_threshold_splits + cluster_counts.threshold_splits
            self.window_threshold_kept = self.window_threshold_kept + cluster_counts.threshold_kept
        return errors.sum(), cluster_counts.exact_rows, rows_in_scope, centroids_in_scope

    def _dispatch_probs(self, centroid_probs, num_global_rows: int):
        """Probs stay home: the experts get ones."""
        return torch.ones(num_global_rows, dtype=centroid_probs.dtype, device=centroid_probs.device)

    def dispatch_postprocess(self, global_centroids, global_probs):
        dispatched, tokens_per_expert, probs = super().dispatch_postprocess(global_centroids, global_probs)
        if self.config.lsh_compensation == "expert_gain":
            rows = torch.as_tensor(tokens_per_expert).tolist()  # NOTE: device-to-host sync (expert_gain)
            self._forward.expert_inputs = (dispatched.detach(), rows)
        return dispatched, tokens_per_expert, probs

    def combine_preprocess(self, expert_outputs):
        """With expert-gain compensation, fit each local expert's gain on the rows it just
        computed (still sorted by local expert) and share the gains over expert parallel."""
        forward = self._forward
        if forward.expert_inputs is not None:
            inputs, rows_per_local_expert = forward.expert_inputs
            local_gains = fit_expert_gains(
                inputs, expert_outputs, torch.tensor(rows_per_local_expert, device=expert_outputs.device)
            )
            forward.expert_inputs = None
            if self.ep_size > 1:
                gathered = [torch.empty_like(local_gains) for _ in range(self.ep_size)]
                torch.distributed.all_gather(gathered, local_gains, group=self.ep_group)
                local_gains = torch.cat(gathered)
            forward.expert_gains = local_gains
        return super().combine_preprocess(expert_outputs)

    def combine_postprocess(self, centroid_outputs):
        """One output per token row from its centroid's output, weighted by its own prob."""
        forward, self._forward = self._forward, None
        residual_scale = None
        if self.config.lsh_compensation == "expert_gain":
            residual_scale = forward.expert_gains.to(centroid_outputs.device).index_select(
                0, forward.clusters.cluster_groups
            )
        row_outputs = expand_to_tokens(centroid_outputs, forward.clusters, forward.token_rows, residual_scale)
        row_outputs = (row_outputs * forward.token_row_probs.unsqueeze(-1)).to(centroid_outputs.dtype)
        return super().combine_postprocess(row_outputs)

    def _sent_rows_per_expert(self) -> torch.Tensor:
        return self._forward.clusters.clusters_per_group

    def _rows_per_tp_peer(self):
        sent, _ = super()._rows_per_tp_peer()  # centroids; stock would have sent every token row
        stock = self._forward.stock_rows_per_tp_peer
        return sent.to(stock.device), stock

    def _compression_counts(self) -> dict:
        relative_error_sum, exact_rows, rows_in_scope, centroids_in_scope = self._forward.error_stats
        return dict(lsh_dispatches=1, tokens=rows_in_scope, centroids=centroids_in_scope, exact_rows=exact_rows,
                    relative_error_sum=relative_error_sum)
