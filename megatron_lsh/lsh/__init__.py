"""LSH-MoE core: hashing, clustering and residual compensation. Pure torch, no communication."""

from megatron_lsh.lsh.clustering import GroupedClusters, cluster_tokens, expand_to_tokens
from megatron_lsh.lsh.hashing import (
    HASH_TYPES,
    CrossPolytopeHash,
    LSHFamily,
    SphericalHash,
    build_hash_family,
    derive_seed,
)

__all__ = [
    "HASH_TYPES",
    "CrossPolytopeHash",
    "GroupedClusters",
    "LSHFamily",
    "SphericalHash",
    "build_hash_family",
    "cluster_tokens",
    "derive_seed",
    "expand_to_tokens",
]
