"""LSH-compressed expert-parallel dispatch for megatron-core MoE layers."""

from megatron_lsh.moe.config import LSH_DISPATCHER_TYPES, LSHConfigError, LSHTransformerConfig
from megatron_lsh.moe.controller import CompressionController
from megatron_lsh.moe.dispatcher import LSHAlltoAllTokenDispatcher, PayloadAlltoAllTokenDispatcher
from megatron_lsh.moe.layer import LSHMoELayer, lsh_moe_layers, set_lsh_iteration
from megatron_lsh.moe.specs import get_gpt_lsh_layer_local_spec, get_lsh_moe_module_spec, with_lsh_moe
from megatron_lsh.moe.stats import (
    CompressionStats,
    CompressionStatsTracker,
    get_compression_tracker,
)

__all__ = [
    "LSH_DISPATCHER_TYPES",
    "CompressionController",
    "CompressionStats",
    "CompressionStatsTracker",
    "LSHAlltoAllTokenDispatcher",
    "LSHConfigError",
    "LSHMoELayer",
    "LSHTransformerConfig",
    "PayloadAlltoAllTokenDispatcher",
    "get_compression_tracker",
    "get_gpt_lsh_layer_local_spec",
    "get_lsh_moe_module_spec",
    "lsh_moe_layers",
    "set_lsh_iteration",
    "with_lsh_moe",
]
