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
    residual_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One output row per token from one output row per centroid.

    With ``tokens`` given, residual error compensation: token x in cluster c gets
    E(c) + s (x - c), the first-order correction that restores each token's own deviation from
    its centroid, with s = 1 (the paper's) or ``residual_scale`` [C], one factor per cluster.
    Without, every member of a cluster gets E(c).
    """
    if tokens is None:
        return centroid_outputs.index_select(0, clusters.token_to_cluster)
    # E(c) + s (x - c) as s x + (E(c) - s c): the difference is taken once per cluster, so only
    # one gather and one add touch the (much larger) token rows, forward and backward. Half
    # precision adds in fp32 and rounds once: x and E(c) - c are large, their sum E(x) may be small.
    accumulate_dtype = torch.promote_types(centroid_outputs.dtype, torch.float32)
    centroids = clusters.centroids.to(accumulate_dtype)
    token_values = tokens.to(accumulate_dtype)
    if residual_scale is None:
        corrections = centroid_outputs.to(accumulate_dtype) - centroids
    else:
        scale = residual_scale.to(accumulate_dtype).unsqueeze(1)
        corrections = centroid_outputs.to(accumulate_dtype) - scale * centroids
        token_values = token_values * scale.index_select(0, clusters.token_to_cluster)
    per_token = corrections.index_select(0, clusters.token_to_cluster)
    return (token_values + per_token).to(centroid_outputs.dtype)


@dataclass
class BoundedAssignment:
    """Where each token goes under an error bound (see ``bounded_bucket_ids``).

    bucket_ids:      [N] int64 ids in [0, total_buckets): tokens with equal ids (and group) merge.
    total_buckets:   the id space, for ``cluster_tokens``.
    relative_errors: [N] ||x - c|| / ||x|| of every token against the centroid it merges into
                     (0 for tokens sent as themselves), fp32, no gradient.
    exact_rows:      tokens sent as themselves because every level's cluster broke the bound.
    """

    bucket_ids: torch.Tensor
    total_buckets: int
    relative_errors: torch.Tensor
    exact_rows: int


def _centroids(tokens: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    sums = torch.zeros(counts.numel(), tokens.size(1), dtype=tokens.dtype, device=tokens.device)
    return sums.index_add_(0, inverse, tokens) / counts.unsqueeze(1).to(tokens.dtype)


def _check_bound(tokens: torch.Tensor, squared_norms: torch.Tensor, limits: torch.Tensor, keys: torch.Tensor):
    """(per token: does its cluster keep the bound, distance to its centroid) for the clusters of
    keys. A cluster's spread, sum ||x - c||^2 = sum ||x||^2 - n ||c||^2, costs no gather: when it
    exceeds sum (radius ||x||)^2, some member must break the bound, so only the clusters that pass
    this test are checked member by member."""
    _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    num_clusters = counts.numel()
    centroids = _centroids(tokens, inverse, counts)

    def per_cluster(values):
        return torch.zeros(num_clusters, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)

    sum_squares = per_cluster(squared_norms)
    spread = sum_squares - counts.to(tokens.dtype) * centroids.square().sum(dim=1)
    # Slack for cancellation in the spread: a candidate kept wrongly is checked exactly below.
    candidate_clusters = spread <= per_cluster(limits.square()) * (1 + 1e-3) + 1e-6 * sum_squares
    candidates = candidate_clusters.index_select(0, inverse).nonzero().squeeze(1)
    distance = torch.full_like(limits, float("inf"))
    distance[candidates] = (
        tokens.index_select(0, candidates) - centroids.index_select(0, inverse.index_select(0, candidates))
    ).norm(dim=1)
    broken = torch.zeros(num_clusters, dtype=torch.bool, device=tokens.device)
    broken.index_fill_(0, inverse[distance > limits], True)
    return ~broken.index_select(0, inverse), distance


@torch.no_grad()
def bounded_bucket_ids(
    tokens: torch.Tensor,
    codes: torch.Tensor,
    group_ids: torch.Tensor,
    num_buckets: int,
    radius: float,
) -> BoundedAssignment:
    """Coarse-to-fine buckets under a relative error bound.

    A token may merge only into a cluster whose centroid c satisfies ||x - c|| <= radius * ||x||
    for every member x. Level l buckets tokens by the first l of the L hash codes (so a level
    splits each bucket of the one before); a cluster whose members all keep the bound is taken
    at the coarsest level where they do, the members of any other cluster go on to the next
    level. After the last level, members beyond the bound travel as themselves and the rest of
    their cluster is checked once more against its new centroid (what still breaks it travels
    as itself too). Each level is one vectorised pass over the tokens still undecided.

    Args:
        tokens: [N, hidden]; codes: [N, L] codes in [0, num_buckets); group_ids: [N] experts.
        radius: the bound on ||x - c|| / ||x||.
    """
    num_tokens, num_hashes = codes.shape
    device = codes.device
    level_buckets = num_buckets**num_hashes
    radix = num_buckets ** torch.arange(num_hashes, dtype=torch.int64, device=device)
    prefixes = (codes * radix).cumsum(dim=1)  # [N, L]: bucket id under the first l+1 hashes
    # Ids: level-major within a group, then one id per token for the tokens sent as themselves.
    total_buckets = num_hashes * level_buckets + num_tokens
    values = tokens.detach().float()
    squared_norms = values.square().sum(dim=1)
    norms = squared_norms.sqrt()
    limits = radius * norms
    groups = group_ids.long()
    bucket_ids = torch.empty(num_tokens, dtype=torch.int64, device=device)
    errors = torch.zeros(num_tokens, dtype=torch.float32, device=device)

    def check(rows, local):
        return _check_bound(values.index_select(0, rows), squared_norms.index_select(0, rows),
                            limits.index_select(0, rows), groups.index_select(0, rows) * total_buckets + local)

    def take(rows, local, kept, distance):
        bucket_ids[rows[kept]] = local[kept]
        errors[rows[kept]] = distance[kept]

    undecided = torch.arange(num_tokens, device=device)
    for level in range(num_hashes):
        local = level * level_buckets + prefixes.index_select(0, undecided)[:, level]
        kept, distance = check(undecided, local)
        take(undecided, local, kept, distance)
        undecided = undecided[~kept]
        if undecided.numel() == 0:
            break
    exact = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    if undecided.numel():
        # Last level: the members beyond the bound go exact, the rest re-averaged and re-checked.
        last = (num_hashes - 1) * level_buckets + prefixes.index_select(0, undecided)[:, -1]
        _, inverse, counts = torch.unique(groups.index_select(0, undecided) * total_buckets + last,
                                          return_inverse=True, return_counts=True)
        rows = values.index_select(0, undecided)
        distance = (rows - _centroids(rows, inverse, counts).index_select(0, inverse)).norm(dim=1)
        outliers = distance > limits.index_select(0, undecided)
        exact[undecided[outliers]] = True
        rest, rest_local = undecided[~outliers], last[~outliers]
        if rest.numel():
            kept, distance = check(rest, rest_local)
            take(rest, rest_local, kept, distance)
            exact[rest[~kept]] = True
    exact_rows = exact.nonzero().squeeze(1)
    bucket_ids[exact_rows] = num_hashes * level_buckets + exact_rows
    errors[exact_rows] = 0.0
    return BoundedAssignment(bucket_ids, total_buckets, errors / norms.clamp(min=1e-30), int(exact_rows.numel()))


@torch.no_grad()
def relative_errors(tokens: torch.Tensor, clusters: GroupedClusters) -> torch.Tensor:
    """[N] ||x - c|| / ||x|| of every token against its cluster's centroid, fp32."""
    values = tokens.detach().float()
    centroids = clusters.centroids.detach().float().index_select(0, clusters.token_to_cluster)
    return (values - centroids).norm(dim=1) / values.norm(dim=1).clamp(min=1e-30)


def hash_and_cluster(tokens: torch.Tensor, family, group_ids: torch.Tensor, num_groups: int,
                     radius: Optional[float] = None):
    """Clusters of tokens by ``family``'s buckets within each group, under the error bound
    ``radius`` when given (``bounded_bucket_ids``), else plain buckets of all L hashes.

    Returns (GroupedClusters, [N] relative errors ||x - c|| / ||x|| (no gradient), rows sent as
    themselves because of the bound).
    """
    if radius is None:
        clusters = cluster_tokens(tokens, family.bucket_ids(tokens), group_ids, num_groups, family.total_buckets)
        return clusters, relative_errors(tokens, clusters), 0
    assignment = bounded_bucket_ids(tokens, family.codes(tokens), group_ids, family.num_buckets, radius)
    clusters = cluster_tokens(tokens, assignment.bucket_ids, group_ids, num_groups, assignment.total_buckets)
    return clusters, assignment.relative_errors, assignment.exact_rows
