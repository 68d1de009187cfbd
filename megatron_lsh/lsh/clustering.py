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
    """Where each token goes under a merge threshold and/or an error bound (``adaptive_bucket_ids``).

    bucket_ids:    [N] int64 ids in [0, total_buckets): tokens with equal ids (and group) merge.
    total_buckets: the id space, for ``cluster_tokens``.
    exact_rows:    tokens sent as themselves because no cluster kept them within the bound.
    """

    bucket_ids: torch.Tensor
    total_buckets: int
    exact_rows: int


def _per_cluster(values: torch.Tensor, inverse: torch.Tensor, num_clusters: int) -> torch.Tensor:
    shape = (num_clusters, *values.shape[1:])
    return torch.zeros(shape, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)


def _exact_after_outliers(values, limits_sq, rows, keys):
    """The tokens ``rows`` of clusters that broke the bound at the finest level: those beyond it
    travel exact, the rest are re-averaged, and a cluster that still breaks it travels exact.
    Returns (rows kept, rows sent exact)."""
    def distances(members, member_keys):
        _, inverse, counts = torch.unique(member_keys, return_inverse=True, return_counts=True)
        points = values.index_select(0, members)
        centroids = _per_cluster(points, inverse, counts.numel()) / counts.unsqueeze(1).to(points.dtype)
        return inverse, counts.numel(), (points - centroids.index_select(0, inverse)).square().sum(dim=1)

    _, _, distance_sq = distances(rows, keys)
    outliers = distance_sq > limits_sq.index_select(0, rows)
    rest, rest_keys = rows[~outliers], keys[~outliers]
    inverse, num_clusters, distance_sq = distances(rest, rest_keys)
    broken = torch.zeros(num_clusters, dtype=torch.bool, device=rows.device)
    broken.index_fill_(0, inverse[distance_sq > limits_sq.index_select(0, rest)], True)
    broken_rows = broken.index_select(0, inverse)
    return rest[~broken_rows], torch.cat([rows[outliers], rest[broken_rows]])


@torch.no_grad()
def adaptive_bucket_ids(
    tokens: torch.Tensor,
    codes: torch.Tensor,
    group_ids: torch.Tensor,
    num_buckets: int,
    merge_threshold: Optional[float] = None,
    error_bound: Optional[float] = None,
) -> BoundedAssignment:
    """Coarse-to-fine buckets: each cluster as coarse as its error allows.

    Level l buckets tokens by the first l of the L hash codes, so a level splits each bucket of
    the one before. A cluster is taken at the coarsest level where
      * its relative squared error, sum ||x - c||^2 / mean ||x||^2 over its n members, is at
        most ``merge_threshold`` (the knob the compression controller turns: splitting the
        clusters that lose the most first spends centroids where they buy the most), and
      * with ``error_bound``, every member keeps ||x - c|| <= error_bound * ||x||.
    Other clusters go on to the next level. At the last level the threshold no longer splits;
    members beyond the bound travel as themselves and the rest of their cluster is checked once
    more against its new centroid (what still breaks it travels as itself too).

    Cost: the finest buckets' sums are taken once over the tokens; each coarser level adds up
    those sums (a bucket is a union of finest buckets). A cluster's spread, sum ||x - c||^2 =
    sum ||x||^2 - n ||c||^2, needs no pass over its members; for the bound, a spread above
    sum (bound ||x||)^2 proves that a member breaks it, so only the clusters that pass this test
    are checked member by member.

    Args:
        tokens: [N, hidden]; codes: [N, L] codes in [0, num_buckets); group_ids: [N] experts.
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
    limits_sq = error_bound**2 * squared_norms if error_bound is not None else None
    groups = group_ids.long()
    bucket_ids = torch.empty(num_tokens, dtype=torch.int64, device=device)

    # The finest clusters, whose sums make every coarser cluster's.
    _, fine_of_token, fine_counts = torch.unique(
        groups * total_buckets + prefixes[:, -1], return_inverse=True, return_counts=True
    )
    num_fine = fine_counts.numel()
    fine_sums = _per_cluster(values, fine_of_token, num_fine)
    fine_squares = _per_cluster(squared_norms, fine_of_token, num_fine)
    fine_limits = _per_cluster(limits_sq, fine_of_token, num_fine) if error_bound is not None else None
    representative = torch.full((num_fine,), num_tokens, dtype=torch.long, device=device).scatter_reduce_(
        0, fine_of_token, torch.arange(num_tokens, device=device), reduce="amin")
    fine_prefixes, fine_groups = prefixes.index_select(0, representative), groups.index_select(0, representative)

    undecided = torch.arange(num_fine, device=device)  # finest clusters not yet taken
    for level in range(num_hashes):
        last_level = level == num_hashes - 1
        local = level * level_buckets + fine_prefixes.index_select(0, undecided)[:, level]
        _, coarse_of_fine = torch.unique(fine_groups.index_select(0, undecided) * total_buckets + local,
                                         return_inverse=True)
        num_coarse = int(coarse_of_fine.max()) + 1
        counts = _per_cluster(fine_counts.index_select(0, undecided).float(), coarse_of_fine, num_coarse)
        centroids = _per_cluster(fine_sums.index_select(0, undecided), coarse_of_fine, num_coarse) / counts.unsqueeze(1)
        squares = _per_cluster(fine_squares.index_select(0, undecided), coarse_of_fine, num_coarse)
        spread = (squares - counts * centroids.square().sum(dim=1)).clamp(min=0)
        candidate = torch.ones(num_coarse, dtype=torch.bool, device=device)
        if merge_threshold is not None and not last_level:
            candidate &= counts * spread <= merge_threshold * squares.clamp(min=1e-30)
        if error_bound is not None:
            # Slack for cancellation in the spread: a candidate let through wrongly is checked below.
            candidate &= spread <= _per_cluster(fine_limits.index_select(0, undecided), coarse_of_fine,
                                                num_coarse) * (1 + 1e-3) + 1e-6 * squares
            # Each token of a candidate cluster, checked against its centroid.
            coarse_of_fine_all = torch.full((num_fine,), -1, dtype=torch.long, device=device)
            coarse_of_fine_all[undecided] = coarse_of_fine
            coarse_of_token = coarse_of_fine_all.index_select(0, fine_of_token)
            rows = ((coarse_of_token >= 0) & candidate.index_select(0, coarse_of_token.clamp(min=0))).nonzero().squeeze(1)
            row_coarse = coarse_of_token.index_select(0, rows)
            distance_sq = (values.index_select(0, rows) - centroids.index_select(0, row_coarse)).square().sum(dim=1)
            broken = torch.zeros(num_coarse, dtype=torch.bool, device=device)
            broken.index_fill_(0, row_coarse[distance_sq > limits_sq.index_select(0, rows)], True)
            candidate &= ~broken
        taken_fine = undecided[candidate.index_select(0, coarse_of_fine)]
        taken_rows = torch.zeros(num_fine, dtype=torch.bool, device=device).index_fill_(0, taken_fine, True) \
            .index_select(0, fine_of_token).nonzero().squeeze(1)
        bucket_ids[taken_rows] = level * level_buckets + prefixes.index_select(0, taken_rows)[:, level]
        undecided = undecided[~candidate.index_select(0, coarse_of_fine)]
        if undecided.numel() == 0:
            break
    exact_rows = torch.empty(0, dtype=torch.long, device=device)
    if undecided.numel():  # only the bound leaves clusters undecided after the last level
        left = torch.zeros(num_fine, dtype=torch.bool, device=device).index_fill_(0, undecided, True)
        rows = left.index_select(0, fine_of_token).nonzero().squeeze(1)
        last = (num_hashes - 1) * level_buckets + prefixes.index_select(0, rows)[:, -1]
        kept, exact_rows = _exact_after_outliers(
            values, limits_sq, rows, groups.index_select(0, rows) * total_buckets + last)
        bucket_ids[kept] = (num_hashes - 1) * level_buckets + prefixes.index_select(0, kept)[:, -1]
    bucket_ids[exact_rows] = num_hashes * level_buckets + exact_rows
    return BoundedAssignment(bucket_ids, total_buckets, int(exact_rows.numel()))


@torch.no_grad()
def relative_errors(tokens: torch.Tensor, clusters: GroupedClusters) -> torch.Tensor:
    """[N] ||x - c|| / ||x|| of every token against its cluster's centroid, fp32."""
    values = tokens.detach().float()
    centroids = clusters.centroids.detach().float().index_select(0, clusters.token_to_cluster)
    return (values - centroids).norm(dim=1) / values.norm(dim=1).clamp(min=1e-30)


def hash_and_cluster(tokens: torch.Tensor, family, group_ids: torch.Tensor, num_groups: int,
                     merge_threshold: Optional[float] = None, error_bound: Optional[float] = None,
                     exact_groups: Optional[torch.Tensor] = None):
    """Clusters of tokens by ``family``'s buckets within each group: plain buckets of all L
    hashes, or with a merge threshold and/or an error bound, ``adaptive_bucket_ids``.

    ``exact_groups`` ([num_groups] bool): groups whose tokens are not hashed and each form a
    cluster of their own (in the dispatcher, experts whose rows do not cross a slow link).

    Returns (GroupedClusters, [N] relative errors ||x - c|| / ||x|| (no gradient), rows sent as
    themselves because of the bound).
    """
    hashed_rows = None
    hashed, hashed_groups = tokens, group_ids
    if exact_groups is not None:
        hashed_rows = (~exact_groups.index_select(0, group_ids.long())).nonzero().squeeze(1)
        hashed, hashed_groups = tokens.index_select(0, hashed_rows), group_ids.index_select(0, hashed_rows)
    if hashed.size(0) == 0:  # every row exact: nothing to hash
        bucket_ids, total_buckets, exact_rows = group_ids.new_empty(0, dtype=torch.int64), 1, 0
    elif merge_threshold is None and error_bound is None:
        bucket_ids, total_buckets, exact_rows = family.bucket_ids(hashed), family.total_buckets, 0
    else:
        assignment = adaptive_bucket_ids(hashed, family.codes(hashed), hashed_groups, family.num_buckets,
                                         merge_threshold, error_bound)
        bucket_ids, total_buckets, exact_rows = assignment.bucket_ids, assignment.total_buckets, assignment.exact_rows
    if hashed_rows is not None:
        # Unhashed rows get ids of their own, past every bucket id the hashed rows can have.
        all_ids = total_buckets + torch.arange(tokens.size(0), dtype=torch.int64, device=tokens.device)
        bucket_ids = all_ids.index_copy(0, hashed_rows, bucket_ids.long())
        total_buckets += tokens.size(0)
    clusters = cluster_tokens(tokens, bucket_ids, group_ids, num_groups, total_buckets)
    return clusters, relative_errors(tokens, clusters), exact_rows
