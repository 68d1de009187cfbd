"""Clustering of hashed tokens into centroids, and the way back to one output per token.

Tokens are grouped by (group, bucket): in the dispatcher a group is the destination expert, so
clusters never cross experts. Centroids are exact means of their members (half precision is
summed in fp32), built with ordinary differentiable ops, so gradients reach every member token.

Shapes:
    N  tokens (the dispatcher's token rows);  H  hidden size;  G  groups (experts)
    L  hash functions (levels);  B  buckets per hash;  C  clusters (centroids), C <= N
    S  finest clusters of adaptive_bucket_ids (all L hashes equal, one group), C <= S <= N
    tokens [N, H], codes [N, L] in [0, B), group ids [N] -> bucket ids [N] -> clusters:
    token_to_cluster [N], centroids [C, H] (grouped by group), clusters_per_group [G]
Every host sync is marked ``# NOTE: device-to-host sync``; on a GPU the hashed path reads two
numbers (the finest clusters' count, the clusters' count), whatever the data.
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
    # Sorted unique keys put clusters in group order, which is the order the all-to-all needs;
    # their number, read on the host, sizes the centroids.
    unique_keys, token_to_cluster, cluster_sizes = torch.unique(  # NOTE: device-to-host sync
        keys, sorted=True, return_inverse=True, return_counts=True
    )
    cluster_groups = torch.div(unique_keys, total_buckets, rounding_mode="floor")
    # index_add, not bincount: bincount waits for the host to size its output on a GPU.
    clusters_per_group = torch.zeros(num_groups, dtype=torch.long, device=keys.device).index_add_(
        0, cluster_groups, torch.ones_like(cluster_groups))

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
    exact_rows:    [] int64 tensor (on the tokens' device): tokens sent as themselves, because no
                   cluster kept them within the bound or the threshold.
    threshold_splits: [] int64: clusters the merge threshold split (or, at the last level, sent
                   as rows of their own) that the bound alone could have kept: a larger threshold
                   would merge more.
    threshold_kept: [] int64: clusters of distinct members the threshold let through: a smaller
                   threshold would merge less. Both 0 without a threshold.
    """

    bucket_ids: torch.Tensor
    total_buckets: int
    exact_rows: torch.Tensor
    threshold_splits: torch.Tensor
    threshold_kept: torch.Tensor


# How a cluster that breaks the error bound splits: by the next hash function, or in two at its
# centroid (``bisecting_bucket_ids``).
SPLITS = ("hash", "bisect")

# Where a level gathers the clusters and rows it decides on first (their counts read on the
# host) rather than computing all and masking the decided ones. On a CPU reading a count costs
# nothing and the masked passes over every row cost several times the work; on a GPU it is the
# other way round. Both give the same decisions, bit for bit.
COMPACT_ROWS_ON_CPU = True


def _compacts_rows(device: torch.device) -> bool:
    return COMPACT_ROWS_ON_CPU and device.type == "cpu"


def _per_slot(values: torch.Tensor, slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Sums of ``values`` by ``slot`` into ``num_slots`` slots."""
    shape = (num_slots, *values.shape[1:])
    return torch.zeros(shape, dtype=values.dtype, device=values.device).index_add_(0, slot, values)


def _dense_ids(keys: torch.Tensor) -> torch.Tensor:
    """[M] ids in [0, M) with equal keys sharing an id, ids ordered as the keys: what
    ``torch.unique(keys, return_inverse=True)`` gives, at a fixed size (no host sync)."""
    sorted_keys, order = keys.sort(stable=True)
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return torch.empty_like(order).scatter_(0, order, starts.cumsum(0) - 1)


def _members_beyond_bound(values, limits_sq, cluster_of_token, members, num_slots):
    """[N] bool: the ``members`` tokens farther from their cluster's centroid, taken over the
    cluster's members only, than their bound."""
    if _compacts_rows(values.device):
        beyond = torch.zeros_like(members)
        rows = members.nonzero().squeeze(1)  # NOTE: device-to-host sync (CPU only)
        if rows.numel() == 0:
            return beyond
        points = values.index_select(0, rows)
        clusters = _dense_ids(cluster_of_token.index_select(0, rows))  # only the clusters these rows are in
        num_clusters = int(clusters.max()) + 1  # NOTE: device-to-host sync (CPU only)
        counts = _per_slot(torch.ones_like(rows, dtype=values.dtype), clusters, num_clusters)
        sums = _per_slot(points, clusters, num_clusters)
        centroids = sums.index_select(0, clusters) / counts.index_select(0, clusters).unsqueeze(1)
        distance_sq = (points - centroids).square().sum(dim=1)
        beyond[rows] = distance_sq > limits_sq.index_select(0, rows)
        return beyond
    weights = members.to(values.dtype)
    counts = _per_slot(weights, cluster_of_token, num_slots)
    sums = _per_slot(values * weights.unsqueeze(1), cluster_of_token, num_slots)
    centroids = sums / counts.clamp(min=1).unsqueeze(1)
    distance_sq = (values - centroids.index_select(0, cluster_of_token)).square().sum(dim=1)
    return members & (distance_sq > limits_sq)


@torch.no_grad()
def adaptive_bucket_ids(
    tokens: torch.Tensor,
    codes: torch.Tensor,
    group_ids: torch.Tensor,
    num_buckets: int,
    merge_threshold: Optional[float] = None,
    error_bound: Optional[float] = None,
    uncounted_groups: Optional[torch.Tensor] = None,
) -> BoundedAssignment:
    """Coarse-to-fine buckets: each cluster as coarse as its error allows.

    Level l buckets tokens by the first l of the L hash codes, so a level splits each bucket of
    the one before. A cluster is taken at the coarsest level where
      * its relative squared error, sum ||x - c||^2 / mean ||x||^2 over its n members, is at
        most ``merge_threshold`` (the knob the compression controller turns: splitting the
        clusters that lose the most first spends centroids where they buy the most), and
      * with ``error_bound``, every member keeps ||x - c|| <= error_bound * ||x||.
    Other clusters go on to the next level. A cluster of the last level beyond the threshold
    sends its members as themselves: the threshold acts down to every row exact, so a controller
    can always reach its target from below. Members of a last-level cluster beyond the bound
    travel as themselves and the rest of their cluster is checked once more against its new
    centroid (what still breaks it travels as itself too).

    Cost: the finest buckets' sums are taken once over the tokens; each coarser level adds up
    those sums (a bucket is a union of finest buckets). A cluster's spread, sum ||x - c||^2 =
    sum ||x||^2 - n ||c||^2, needs no pass over its members; for the bound, a spread above
    sum (bound ||x||)^2 proves that a member breaks it, so only the members of clusters that
    pass this test count. Every decision stays on the device: the host reads one number, how
    many finest clusters there are, which sizes the arrays; decided clusters are masked, not
    removed, so no size depends on a decision and no level waits for the host. On a CPU, where
    waiting costs nothing, each level adds up only its undecided clusters, the bound's check
    gathers the rows it checks instead of masking all, and the levels stop once every cluster
    is taken (``COMPACT_ROWS_ON_CPU``); the decisions are the same.

    Args:
        tokens: [N, hidden]; codes: [N, L] codes in [0, num_buckets); group_ids: [N] experts.
        uncounted_groups: [num_groups] bool, groups left out of the threshold's counts.
    """
    num_tokens, num_hashes = codes.shape
    device = codes.device
    fine = _finest_clusters(tokens, codes, group_ids, num_buckets, error_bound)
    bucket_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    threshold_splits = threshold_kept = torch.zeros((), dtype=torch.long, device=device)
    dissolved = torch.zeros(fine.slots, dtype=torch.bool, device=device)  # finest clusters sent as rows
    undecided = fine.counts > 0  # finest clusters not yet taken (empty slots never are)
    compact = _compacts_rows(device)
    for level in range(num_hashes):
        if compact and not bool(undecided.any()):  # NOTE: device-to-host sync (CPU only)
            break  # every cluster taken: the levels left would decide nothing
        taken, level_dissolved, splits, kept = _level_decision(
            fine, level, undecided, merge_threshold, error_bound, uncounted_groups, compact)
        threshold_splits, threshold_kept = threshold_splits + splits, threshold_kept + kept
        if level_dissolved is not None:
            dissolved = level_dissolved
        bucket_ids = torch.where(taken.index_select(0, fine.of_token),
                                 level * fine.level_buckets + fine.prefixes[:, level], bucket_ids)
        undecided &= ~taken
    bucket_ids, exact = _finish_last_level(fine, undecided, dissolved, bucket_ids, error_bound)
    return BoundedAssignment(bucket_ids, fine.total_buckets, exact.sum(), threshold_splits, threshold_kept)


@dataclass
class _FinestClusters:
    """What every level of adaptive_bucket_ids adds up: per finest cluster (all L hashes equal,
    one expert) its row count, sums of rows, of squared norms and of squared bound limits; per
    token its finest cluster. Shapes: [N] per token, [S] or [S, hidden] per finest cluster."""

    values: torch.Tensor  # [N, hidden] fp32 rows
    limits_sq: Optional[torch.Tensor]  # [N] (bound ||x||)^2, None without a bound
    prefixes: torch.Tensor  # [N, L] bucket id under the first l+1 hashes
    of_token: torch.Tensor  # [N] finest cluster of each token
    slots: int  # S
    counts: torch.Tensor
    sums: torch.Tensor
    squares: torch.Tensor
    limits: Optional[torch.Tensor]
    cluster_prefixes: torch.Tensor  # [S, L]
    cluster_groups: torch.Tensor  # [S]
    level_buckets: int
    total_buckets: int


def _finest_clusters(tokens, codes, group_ids, num_buckets: int, error_bound: Optional[float]) -> _FinestClusters:
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
    # The finest clusters, whose sums make every coarser cluster's. Their number is the one
    # value read on the host: it sizes every array below.
    of_token = _dense_ids(groups * total_buckets + prefixes[:, -1])
    slots = int(of_token.max()) + 1 if num_tokens else 0  # NOTE: device-to-host sync (sizes the arrays)
    representative = torch.full((slots,), num_tokens - 1, dtype=torch.long, device=device).scatter_reduce_(
        0, of_token, torch.arange(num_tokens, device=device), reduce="amin")
    return _FinestClusters(
        values=values, limits_sq=limits_sq, prefixes=prefixes, of_token=of_token, slots=slots,
        counts=_per_slot(torch.ones_like(squared_norms), of_token, slots),
        sums=_per_slot(values, of_token, slots),
        squares=_per_slot(squared_norms, of_token, slots),
        limits=_per_slot(limits_sq, of_token, slots) if error_bound is not None else None,
        cluster_prefixes=prefixes.index_select(0, representative),
        cluster_groups=groups.index_select(0, representative),
        level_buckets=level_buckets, total_buckets=total_buckets,
    )


def _level_decision(fine: _FinestClusters, level: int, undecided, merge_threshold, error_bound, uncounted_groups,
                    compact: bool):
    """One level: which undecided finest clusters its clusters take ([S] bool), which the last
    level dissolves into rows ([S] bool, None before it), and the threshold's split and kept
    counts. Decided and empty slots share one key below every real one, and their sums go to a
    spare slot past the end: undecided clusters' sums add up as if the others were gone."""
    device = undecided.device
    last_level = level == fine.prefixes.size(1) - 1
    keys = torch.where(undecided, fine.cluster_groups * fine.total_buckets + level * fine.level_buckets
                       + fine.cluster_prefixes[:, level], torch.full_like(fine.cluster_groups, -1))
    coarse_of_fine = _dense_ids(keys)
    # Sized by the level's clusters where reading their count is free (a CPU), else by the
    # finest ones; and, on a CPU, only undecided clusters' sums are added up (a level's
    # clusters nest in the one before's, so a cluster is undecided as a whole).
    coarse = int(coarse_of_fine.max()) + 1 if compact else fine.slots  # NOTE: device-to-host sync (CPU only)
    into = torch.where(undecided, coarse_of_fine, torch.full_like(coarse_of_fine, coarse))
    active = undecided.nonzero().squeeze(1) if compact else None  # NOTE: device-to-host sync (CPU only)

    def per_coarse(fine_values):
        if active is not None:
            return _per_slot(fine_values.index_select(0, active), into.index_select(0, active), coarse + 1)[:coarse]
        return _per_slot(fine_values, into, coarse + 1)[:coarse]

    counts, sums, squares = per_coarse(fine.counts), per_coarse(fine.sums), per_coarse(fine.squares)
    # sum ||x - c||^2 = sum ||x||^2 - ||sum x||^2 / n: no centroid over all clusters' width.
    spread = (squares - sums.square().sum(dim=1) / counts.clamp(min=1)).clamp(min=0)
    candidate = torch.ones(coarse, dtype=torch.bool, device=device)
    splits = kept = torch.zeros((), dtype=torch.long, device=device)
    dissolved = None
    if error_bound is not None:
        # Slack for cancellation in the spread: a candidate let through wrongly is checked below.
        candidate &= spread <= per_coarse(fine.limits) * (1 + 1e-3) + 1e-6 * squares
    if merge_threshold is not None:
        within = counts * spread <= merge_threshold * squares.clamp(min=1e-30)
        if uncounted_groups is not None:
            counted = per_coarse((~uncounted_groups.index_select(0, fine.cluster_groups)).long()) > 0
        else:
            counted = torch.ones(coarse, dtype=torch.bool, device=device)
        several = counted & (counts > 1)
        splits = (several & candidate & ~within).sum()
        kept = (several & within & (spread > 0)).sum()
        if last_level:
            dissolved = undecided & ~within.index_select(0, coarse_of_fine)
        candidate &= within
    if error_bound is not None:
        candidate &= ~_broken_by_a_member(fine, undecided, candidate, coarse_of_fine, counts, sums, coarse, compact)
    return undecided & candidate.index_select(0, coarse_of_fine), dissolved, splits, kept


def _broken_by_a_member(fine: _FinestClusters, undecided, candidate, coarse_of_fine, counts, sums, coarse: int,
                        compact: bool):
    """[coarse] bool: candidate clusters one of whose tokens is beyond the bound from its centroid."""
    coarse_of_token = coarse_of_fine.index_select(0, fine.of_token)
    checked = undecided.index_select(0, fine.of_token) & candidate.index_select(0, coarse_of_token)
    broken = torch.zeros(coarse, dtype=torch.bool, device=candidate.device)
    if compact:
        rows = checked.nonzero().squeeze(1)  # NOTE: device-to-host sync (CPU only)
        row_coarse = coarse_of_token.index_select(0, rows)
        row_counts = counts.index_select(0, row_coarse).clamp(min=1).unsqueeze(1)
        row_centroids = sums.index_select(0, row_coarse) / row_counts
        distance_sq = (fine.values.index_select(0, rows) - row_centroids).square().sum(dim=1)
        broken.index_put_((row_coarse,), distance_sq > fine.limits_sq.index_select(0, rows), accumulate=True)
    else:
        centroids = sums / counts.clamp(min=1).unsqueeze(1)
        distance_sq = (fine.values - centroids.index_select(0, coarse_of_token)).square().sum(dim=1)
        broken.index_put_((coarse_of_token,), checked & (distance_sq > fine.limits_sq), accumulate=True)
    return broken


def _finish_last_level(fine: _FinestClusters, undecided, dissolved, bucket_ids, error_bound):
    """The clusters no level took: without a bound, the last level's (within the threshold);
    with one, their members beyond it travel exact, the rest is averaged again, and a rest that
    still breaks it travels exact. Returns the bucket ids and which tokens travel as themselves."""
    num_tokens, num_hashes = fine.prefixes.shape
    exact = dissolved.index_select(0, fine.of_token)
    last = (num_hashes - 1) * fine.level_buckets + fine.prefixes[:, -1]
    if error_bound is None:
        bucket_ids = torch.where(undecided.index_select(0, fine.of_token) & ~exact, last, bucket_ids)
    else:
        left = undecided.index_select(0, fine.of_token) & ~exact
        outliers = _members_beyond_bound(fine.values, fine.limits_sq, fine.of_token, left, fine.slots)
        rest = left & ~outliers
        rest_broken = _members_beyond_bound(fine.values, fine.limits_sq, fine.of_token, rest, fine.slots)
        broken = torch.zeros(fine.slots, dtype=torch.bool, device=bucket_ids.device).index_put_(
            (fine.of_token,), rest_broken, accumulate=True)
        exact = exact | outliers | (rest & broken.index_select(0, fine.of_token))
        bucket_ids = torch.where(left, last, bucket_ids)
    own_ids = num_hashes * fine.level_buckets + torch.arange(num_tokens, device=bucket_ids.device)
    return torch.where(exact, own_ids, bucket_ids), exact


@torch.no_grad()
def bisecting_bucket_ids(tokens: torch.Tensor, group_ids: torch.Tensor, error_bound: float,
                         max_levels: int, skipped_groups: Optional[torch.Tensor] = None) -> BoundedAssignment:
    """Clusters halved until every member is within ``error_bound``: data-dependent splits.

    Each group starts as one cluster. A cluster with a member farther from its centroid than
    ``error_bound * ||x||`` is cut in two by the hyperplane through its centroid across its
    principal direction, estimated by one power-iteration step from the member farthest from
    the centroid: w = sum_i d_i (d_i . d_far), d_i = x_i - c. The deviations sum to zero and
    w . w > 0, so both halves have members: every cut makes progress. Random hyperplanes (the
    hash levels of ``adaptive_bucket_ids``) rarely cut a tight cluster far from the origin
    through its middle; these cut across its widest spread, so clusters stay as coarse as the
    bound allows (about 0.7x as many rows at bound 0.3 on the quickstart's MoE inputs).

    After ``max_levels`` cuts, members of a cluster still beyond the bound travel as themselves
    and the rest is averaged again; a rest that still breaks it travels as itself too.

    Each level works on the rows still undecided, gathered: the host reads how many clusters they
    form, which sizes the level's arrays, and which rows go on to the next level (two reads a level).

    Args: tokens [N, hidden]; group_ids [N] (clusters never cross groups); max_levels >= 0;
    skipped_groups [num_groups] bool: groups whose rows are not clustered (their ids are left to
    the caller: ``hash_and_cluster`` sends them as themselves).
    """
    num_tokens = tokens.size(0)
    device = tokens.device
    values = tokens.detach().float()
    limits_sq = error_bound**2 * values.square().sum(dim=1)
    # Ids: a level's clusters (dense, fewer than the tokens) at level * N, then one per exact row.
    total_buckets = (max_levels + 2) * num_tokens
    exact_ids = (max_levels + 1) * num_tokens + torch.arange(num_tokens, device=device)
    bucket_ids = exact_ids.clone()
    rows = torch.arange(num_tokens, device=device)  # undecided rows, and below their values and clusters
    if skipped_groups is not None:
        counted = ~skipped_groups.index_select(0, group_ids.long())
        rows = counted.nonzero().squeeze(1)  # NOTE: device-to-host sync (bisect)
    points, row_limits_sq = values.index_select(0, rows), limits_sq.index_select(0, rows)
    cluster = _dense_ids(group_ids.long().index_select(0, rows))
    exact = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    for level in range(max_levels + 1 if rows.numel() else 0):
        num_clusters = int(cluster.max()) + 1  # NOTE: device-to-host sync (bisect)
        counts = _per_slot(torch.ones_like(row_limits_sq), cluster, num_clusters)
        centroids = _per_slot(points, cluster, num_clusters) / counts.unsqueeze(1)
        deviations = points - centroids.index_select(0, cluster)
        distance_sq = torch.linalg.vecdot(deviations, deviations)
        beyond = distance_sq > row_limits_sq
        row_broken = torch.zeros(num_clusters, dtype=torch.bool, device=device).index_put_(
            (cluster,), beyond, accumulate=True).index_select(0, cluster)
        level_ids = level * num_tokens + cluster
        bucket_ids.index_put_((rows,), torch.where(row_broken, bucket_ids.index_select(0, rows), level_ids))
        if level == max_levels:  # out of levels
            row_exact, rest_kept = _bisection_finish(points, row_limits_sq, cluster, num_clusters, row_broken, beyond)
            exact.index_put_((rows,), row_exact)
            kept_ids = bucket_ids.index_select(0, rows)
            bucket_ids.index_put_((rows,), torch.where(rest_kept, level_ids, kept_ids))
            break
        broken_rows = row_broken.nonzero().squeeze(1)  # NOTE: device-to-host sync (bisect: the level's second read)
        if broken_rows.numel() == 0:
            break
        if broken_rows.numel() < rows.numel():  # (at the first levels every cluster breaks: nothing to gather)
            rows, cluster, points, row_limits_sq, deviations, distance_sq = (
                t.index_select(0, broken_rows) for t in (rows, cluster, points, row_limits_sq, deviations, distance_sq))
        cluster = _halved(cluster, num_clusters, deviations, distance_sq)
    bucket_ids = torch.where(exact, exact_ids, bucket_ids)
    zero = torch.zeros((), dtype=torch.long, device=device)
    return BoundedAssignment(bucket_ids, total_buckets, exact.sum(), zero, zero)


def _halved(cluster, num_clusters: int, deviations, distance_sq):
    """[M] each row's cluster after cutting every cluster across its principal direction (one
    power-iteration step from its member farthest from the centroid, the first among ties)."""
    device = cluster.device
    rows = cluster.numel()
    farthest_sq = torch.zeros(num_clusters, device=device).scatter_reduce_(
        0, cluster, distance_sq, reduce="amax", include_self=False)
    position = torch.arange(rows, device=device)
    candidates = torch.where(distance_sq == farthest_sq.index_select(0, cluster), position, rows - 1)
    farthest = torch.full((num_clusters,), rows - 1, dtype=torch.long, device=device).scatter_reduce_(
        0, cluster, candidates, reduce="amin")
    start = deviations.index_select(0, farthest).index_select(0, cluster)
    direction = _per_slot(deviations * torch.linalg.vecdot(deviations, start).unsqueeze(1), cluster, num_clusters)
    side = torch.linalg.vecdot(deviations, direction.index_select(0, cluster)) > 0
    return _dense_ids(cluster * 2 + side.long())


def _bisection_finish(points, row_limits_sq, cluster, num_clusters: int, row_broken, beyond):
    """Out of levels: members beyond the bound travel exact, the rest of their cluster is
    averaged again and what still breaks the bound travels exact too. Returns, per row, whether
    it travels exact and whether it stays in its (re-averaged) cluster."""
    device = points.device
    rest = row_broken & ~beyond
    weights = rest.to(points.dtype)
    rest_centroids = _per_slot(points * weights.unsqueeze(1), cluster, num_clusters) / _per_slot(
        weights, cluster, num_clusters).clamp(min=1).unsqueeze(1)
    rest_deviations = points - rest_centroids.index_select(0, cluster)
    rest_beyond = rest & (torch.linalg.vecdot(rest_deviations, rest_deviations) > row_limits_sq)
    rest_broken = torch.zeros(num_clusters, dtype=torch.bool, device=device).index_put_(
        (cluster,), rest_beyond, accumulate=True).index_select(0, cluster)
    return (row_broken & beyond) | (rest & rest_broken), rest & ~rest_broken


@torch.no_grad()
def relative_errors(tokens: torch.Tensor, clusters: GroupedClusters) -> torch.Tensor:
    """[N] ||x - c|| / ||x|| of every token against its cluster's centroid, fp32."""
    values = tokens.detach().float()
    centroids = clusters.centroids.detach().float().index_select(0, clusters.token_to_cluster)
    return (values - centroids).norm(dim=1) / values.norm(dim=1).clamp(min=1e-30)


@dataclass
class ClusterCounts:
    """What a clustering decided, in counts ([] int64 tensors on the tokens' device, no host wait)."""

    exact_rows: torch.Tensor
    """Rows sent as themselves by the bound or the threshold (not those of ``exact_groups``)."""
    threshold_splits: torch.Tensor
    """See BoundedAssignment: clusters a larger merge threshold would keep whole."""
    threshold_kept: torch.Tensor
    """Clusters a smaller merge threshold would split."""


def hash_and_cluster(tokens: torch.Tensor, family, group_ids: torch.Tensor, num_groups: int,
                     merge_threshold: Optional[float] = None, error_bound: Optional[float] = None,
                     exact_groups: Optional[torch.Tensor] = None, split: str = "hash"):
    """Clusters of tokens by ``family``'s buckets within each group: plain buckets of all L
    hashes, or with a merge threshold and/or an error bound, ``adaptive_bucket_ids``; with
    ``split='bisect'`` (an error bound and no threshold), ``bisecting_bucket_ids`` with up to L
    halvings instead of the hashes.

    ``exact_groups`` ([num_groups] bool): groups whose tokens each form a cluster of their own
    (in the dispatcher, experts whose rows do not cross a slow link). They are hashed with the
    rest, so that no size depends on the data, and their buckets ignored (bisection leaves them
    out: it reads sizes on the host anyway).

    Returns (GroupedClusters, [N] relative errors ||x - c|| / ||x|| (no gradient), ClusterCounts).
    The host waits for the count of clusters (``cluster_tokens``) and, on the coarse-to-fine
    path, for the count of finest ones; bisection reads two numbers a level besides.
    """
    zero = torch.zeros((), dtype=torch.long, device=tokens.device)
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    if split == "bisect":
        if error_bound is None or merge_threshold is not None:
            raise ValueError("split='bisect' halves clusters until they meet an error bound: it needs error_bound "
                             "and no merge_threshold")
        assignment = bisecting_bucket_ids(tokens, group_ids, error_bound, family.num_hashes, exact_groups)
        bucket_ids, total_buckets = assignment.bucket_ids, assignment.total_buckets
        counts = ClusterCounts(assignment.exact_rows, zero, zero)
    elif merge_threshold is None and error_bound is None:
        bucket_ids, total_buckets = family.bucket_ids(tokens), family.total_buckets
        counts = ClusterCounts(zero, zero, zero)
    else:
        assignment = adaptive_bucket_ids(tokens, family.codes(tokens), group_ids, family.num_buckets,
                                         merge_threshold, error_bound, exact_groups)
        bucket_ids, total_buckets = assignment.bucket_ids, assignment.total_buckets
        counts = ClusterCounts(assignment.exact_rows, assignment.threshold_splits, assignment.threshold_kept)
    if exact_groups is not None:
        # Unhashed rows get ids of their own, past every bucket id the hashed rows can have.
        unhashed = exact_groups.index_select(0, group_ids.long())
        own_ids = total_buckets + torch.arange(tokens.size(0), dtype=torch.int64, device=tokens.device)
        if merge_threshold is not None or error_bound is not None:  # rows sent exact, among the hashed ones
            counts.exact_rows = ((bucket_ids >= total_buckets - tokens.size(0)) & ~unhashed).sum()
        bucket_ids = torch.where(unhashed, own_ids, bucket_ids.long())
        total_buckets += tokens.size(0)
    clusters = cluster_tokens(tokens, bucket_ids, group_ids, num_groups, total_buckets)
    return clusters, relative_errors(tokens, clusters), counts
