"""The metrics a log interval or an evaluation reports, assembled from megatron-core's router
loss tracker and megatron-lsh's compression statistics (MetricsLogger writes them out)."""

from __future__ import annotations

from typing import Dict, Optional

from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)

from megatron_lsh.moe import CompressionStats


def moe_aux_loss_metrics(num_microbatches: int, groups: Optional[Dict[str, range]] = None) -> Dict[str, float]:
    """megatron-core's per-layer router losses (load balancing, z-loss), averaged over the MoE
    layers, and over each group of layers (e.g. T5's encoder and decoder) when given."""
    tracker = get_moe_layer_wise_logging_tracker()
    if not tracker:
        return {}
    reduce_aux_losses_tracker_across_ranks()
    metrics = {}
    for name, entry in tracker.items():
        values = entry["values"].float() / num_microbatches
        moe_layers = values[values != 0]
        if not moe_layers.numel():
            continue
        metrics[name] = moe_layers.mean().item()
        for group, slots in (groups or {}).items():
            in_group = values[list(slots)]
            in_group = in_group[in_group != 0]
            if in_group.numel():
                metrics[f"{name}/{group}"] = in_group.mean().item()
    clear_aux_losses_tracker()
    return metrics


def compression_metrics(stats: Dict[str, CompressionStats], prefix: str = "") -> Dict[str, float]:
    if not stats:
        return {}
    total = sum(stats.values(), CompressionStats())
    metrics = {
        f"{prefix}a2a bytes ratio": total.bytes_ratio,
        f"{prefix}a2a dispatch bytes ratio": total.dispatch_bytes_ratio,
        f"{prefix}a2a combine bytes ratio": total.combine_bytes_ratio,
        f"{prefix}a2a bytes sent": float(total.bytes_sent),
        f"{prefix}a2a bytes stock": float(total.bytes_stock),
    }
    if total.inter_node_bytes_stock:
        metrics[f"{prefix}a2a inter-node bytes sent"] = float(total.inter_node_bytes)
        metrics[f"{prefix}a2a inter-node bytes stock"] = float(total.inter_node_bytes_stock)
    for layer, s in sorted(stats.items()):
        metrics[f"{prefix}a2a bytes sent/{layer}"] = float(s.bytes_sent)
    if not total.lsh_dispatches:  # low-precision payloads alone
        return metrics
    metrics[f"{prefix}lsh compression rate"] = total.compression_rate
    metrics[f"{prefix}lsh relative error"] = total.mean_relative_error
    metrics[f"{prefix}lsh exact rows"] = float(total.exact_rows)
    for layer, s in sorted(stats.items()):
        metrics[f"{prefix}lsh compression rate/{layer}"] = s.compression_rate
        metrics[f"{prefix}lsh relative error/{layer}"] = s.mean_relative_error
    return metrics
