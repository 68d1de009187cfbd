"""Clustering of hashed tokens into centroids, and the way back to one output per token.

Tokens are grouped by (group, bucket): in the dispatcher a group is the destination expert, so
clusters never cross experts. Centroids are exact means of their members (half precision is
summed in fp32), built with ordinary differentiable ops, so gradients reach every member token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class GroupedClusters:
    """Clusters of N tokens, ordered by group and then by bucket id.

    centroids:          [C, hidden] mean of each cluster's members, in the tokens' dtype.
    token_to_cluster:   [N] cluster index of every token: the inverse map back to tokens.
    cluster_sizes:      [C] members per cluster.
    cluster_groups:     [C] group (expert) of every cluster, non-decreasing.
    clusters_per_group: [G] number of clusters in each group.
    """

    centroids: torch.Tensor
    token_to_cluster: torch.Tensor
    cluster_sizes: torch.Tensor
    cluster_groups: torch.Tensor
    clusters_per_group: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.token_to_cluster.numel()

    @property
    def num_clusters(self) -> int:
        return self.centroids.size(0)


def cluster_tokens(
    tokens: torch.Tensor,
    bucket_ids: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    total_buckets: int,
) -> GroupedClusters:
    """Group tokens that share both a group id and a bucket id, and average each group.

    Args:
        tokens: [N, hidden] token vectors.
        bucket_ids: [N] int64 ids in [0, total_buckets).
        group_ids: [N] int64 ids in [0, num_groups).
        num_groups: number of groups (experts).
        total_buckets: number of distinct bucket ids the hash family can give.
    """
    if total_buckets * num_groups > 2**63 - 1:
        raise ValueError(
            f"{num_groups} groups x {total_buckets} buckets overflows int64 cluster keys"
        )
    keys = group_ids.long() * total_buckets + bucket_ids.long()
    # Sorted unique keys put clusters in group order, which is the order the all-to-all needs.
    unique_keys, token_to_cluster, cluster_sizes = torch.unique(
        keys, sorted=True, return_inverse=True, return_counts=True
    )
    cluster_groups = torch.div(unique_keys, total_buckets, rounding_mode="floor")
    clusters_per_group = torch.bincount(cluster_groups, minlength=num_groups)

    # Half-precision tokens are summed in fp32: a bf16 running sum loses the mean.
    accumulate_dtype = torch.promote_types(tokens.dtype, torch.float32)
    sums = torch.zeros(
        unique_keys.numel(), tokens.size(1), dtype=accumulate_dtype, device=tokens.device
    ).index_add(0, token_to_cluster, tokens.to(accumulate_dtype))
    centroids = (sums / cluster_sizes.unsqueeze(1).to(accumulate_dtype)).to(tokens.dtype)
    return GroupedClusters(
        centroids=centroids,
        token_to_cluster=token_to_cluster,
        cluster_sizes=cluster_sizes,
        cluster_groups=cluster_groups,
        clusters_per_group=clusters_per_group,
    )


def expand_to_tokens(
    centroid_outputs: torch.Tensor,
    clusters: GroupedClusters,
    tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One output row per token from one output row per centroid.

    With ``tokens`` given, residual error compensation: token x in cluster c gets
    E(c) + (x - c), the first-order correction that restores each token's own deviation from
    its centroid. Without, every member of a cluster gets E(c).
    """
    if tokens is None:
        return centroid_outputs.index_select(0, clusters.token_to_cluster)
    # E(c) + (x - c) as x + (E(c) - c): the difference is taken once per cluster, so only one
    # gather and one add touch the (much larger) token rows, forward and backward. Half precision
    # adds in fp32 and rounds once: x and E(c) - c are large, their sum E(x) may be small.
    accumulate_dtype = torch.promote_types(centroid_outputs.dtype, torch.float32)
    corrections = centroid_outputs.to(accumulate_dtype) - clusters.centroids.to(accumulate_dtype)
    per_token = corrections.index_select(0, clusters.token_to_cluster)
    return (tokens.to(accumulate_dtype) + per_token).to(centroid_outputs.dtype)
