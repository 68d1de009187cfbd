"""LSH-MoE core: hashing, clustering (by hashes or by bisection) and residual compensation. Pure torch, no
communication."""

from megatron_lsh.lsh.clustering import (
    SPLITS,
    BoundedAssignment,
    ClusterCounts,
    GroupedClusters,
    adaptive_bucket_ids,
    bisecting_bucket_ids,
    cluster_tokens,
    expand_to_tokens,
    hash_and_cluster,
    relative_errors,
)
from megatron_lsh.lsh.compensation import fit_expert_gains
from megatron_lsh.lsh.hashing import (
    HASH_TYPES,
    CrossPolytopeHash,
    LSHFamily,
    SphericalHash,
    build_hash_family,
    derive_seed,
)

__all__ = [
    "BoundedAssignment",
    "ClusterCounts",
    "SPLITS",
    "adaptive_bucket_ids",
    "bisecting_bucket_ids",
    "fit_expert_gains",
    "hash_and_cluster",
    "relative_errors",
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
