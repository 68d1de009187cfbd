"""LSHTransformerConfig: megatron-core's TransformerConfig plus the LSH-MoE settings."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lsh.lsh.hashing import HASH_TYPES, MAX_TOTAL_BUCKETS


class LSHConfigError(ValueError):
    """A configuration that LSH-MoE cannot run; the message names the setting to change."""


# Dispatcher types whose all-to-all LSH compresses.
LSH_DISPATCHER_TYPES = ("alltoall",)


@dataclass
class LSHTransformerConfig(TransformerConfig):
    """TransformerConfig with LSH-compressed expert-parallel dispatch.

    LSH needs the all-to-all dispatcher, so that is the default here (megatron-core's default
    is 'allgather').
    """

    moe_token_dispatcher_type: str = "alltoall"

    lsh_enabled: bool = True
    """Compress the MoE all-to-all with LSH. False gives stock megatron-core behaviour."""

    lsh_hash_type: str = "cross_polytope"
    """'cross_polytope' or 'spherical'."""

    lsh_num_hashes: int = 6
    """Hash functions per token; a token's bucket is the tuple of all their codes. More hashes:
    finer buckets, more centroids, less error (the paper's default is 6)."""

    lsh_num_buckets: int = 4
    """Buckets per hash function (even for cross-polytope: b/2 projections and their signs)."""

    lsh_error_compensation: bool = False
    """Give each token E(c) + (x - c) instead of E(c), c its cluster's centroid (the paper's
    residual compensation). Off by default: it adds the token's whole deviation from its centroid
    to an expert output that changes far less than that, and measured worse here
    (docs/speed_study.md)."""

    lsh_seed: int = 1234
    """Seed of the hash projections; every rank derives the same projections from it."""

    lsh_redraw_interval: int = 0
    """Draw new projections every this many training iterations (0: never)."""

    def __post_init__(self):
        self._check_lsh_settings()
        super().__post_init__()

    def _check_lsh_settings(self) -> None:
        experts = self.num_moe_experts
        ep_size = self.expert_model_parallel_size
        if experts is not None and ep_size > 0 and experts % ep_size != 0:
            raise LSHConfigError(
                f"num_moe_experts={experts} is not divisible by expert_model_parallel_size="
                f"{ep_size}; every expert-parallel rank must hold the same number of experts"
            )
        if self.lsh_hash_type not in HASH_TYPES:
            raise LSHConfigError(
                f"lsh_hash_type={self.lsh_hash_type!r} is not supported; "
                f"use one of {', '.join(repr(t) for t in HASH_TYPES)}"
            )
        if not isinstance(self.lsh_num_hashes, int) or self.lsh_num_hashes < 1:
            raise LSHConfigError(
                f"lsh_num_hashes={self.lsh_num_hashes!r} must be an integer of at least 1"
            )
        if not isinstance(self.lsh_num_buckets, int) or self.lsh_num_buckets < 2:
            raise LSHConfigError(
                f"lsh_num_buckets={self.lsh_num_buckets!r} must be an integer of at least 2"
            )
        if self.lsh_hash_type == "cross_polytope" and self.lsh_num_buckets % 2:
            raise LSHConfigError(
                f"lsh_num_buckets={self.lsh_num_buckets} must be even for "
                "lsh_hash_type='cross_polytope' (each projection gives two buckets, one per sign)"
            )
        if self.lsh_num_buckets**self.lsh_num_hashes * max(experts or 1, 1) > MAX_TOTAL_BUCKETS:
            raise LSHConfigError(
                f"lsh_num_buckets={self.lsh_num_buckets} and lsh_num_hashes="
                f"{self.lsh_num_hashes} give more bucket ids per expert than int64 cluster keys "
                "hold; lower lsh_num_hashes or lsh_num_buckets"
            )
        if not isinstance(self.lsh_redraw_interval, int) or self.lsh_redraw_interval < 0:
            raise LSHConfigError(
                f"lsh_redraw_interval={self.lsh_redraw_interval!r} must be 0 (never) or a "
                "positive number of iterations"
            )
        if not self.lsh_enabled:
            return
        if experts is None:
            raise LSHConfigError(
                "lsh_enabled=True needs an MoE model: set num_moe_experts, or lsh_enabled=False"
            )
        if self.moe_token_dispatcher_type not in LSH_DISPATCHER_TYPES:
            raise LSHConfigError(
                f"lsh_enabled=True compresses the all-to-all dispatcher, but "
                f"moe_token_dispatcher_type={self.moe_token_dispatcher_type!r}; set "
                "moe_token_dispatcher_type='alltoall' or lsh_enabled=False"
            )
        if self.moe_pad_expert_input_to_capacity:
            raise LSHConfigError(
                "lsh_enabled=True cannot be combined with moe_pad_expert_input_to_capacity=True: "
                "padding fixes every expert's row count, which LSH changes; unset one of them"
            )
        if self.moe_router_padding_for_quantization:
            raise LSHConfigError(
                "lsh_enabled=True cannot be combined with moe_router_padding_for_quantization: "
                "unset one of them"
            )
