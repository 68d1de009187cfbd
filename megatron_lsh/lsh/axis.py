"""A second row per cluster, along the direction its members spread: the experts' side of merging.

With centroids alone an expert runs at one point per cluster: every member gets E(c), and the
expert's weights learn from the members' summed output gradient at c, blind to how the members
differ (docs/quality_study.md: these weight gradients cost most of the gap). With an axis row, a
cluster of distinct members also sends a = c + sigma u, u the top principal direction of its
members' scatter and sigma their RMS spread along it, and a member x gets the secant along u,

    E(c) + t (E(a) - E(c)),   t = <x - c, u> / sigma,

exact at c and at a and first-order in between: the expert runs (and learns) at two points of
the cluster, and each member's output, and so its gradient, depends on where it lies along the
axis. The part of x - c off the axis is what compensation, if any, adds back. A two-member cluster
sends exactly one of its members as a. Everything is differentiable, the direction and the spread
too (through the power iterations that find them): the backward is the exact gradient of this
forward, as the mean rule is of centroids'. The cost is one more row per such cluster in every
all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lsh.lsh.clustering import GroupedClusters

# Power iterations for the principal direction, started from the member farthest from the
# centroid (already the exact axis of a two-member cluster); each costs one pass over the rows.
POWER_ITERATIONS = 2
# Clusters spread less than this, relative to their members' RMS norm, send no axis row: their
# members are alike, and the rounding of x - c would pick a direction at random.
MIN_RELATIVE_SPREAD = 1e-4


@dataclass
class ClusterAxes:
    """The axis rows of some clusters and each token's coordinate along its cluster's axis.

    clusters:    [A] index of the cluster of each axis row (non-decreasing, so the rows keep the
                 clusters' order by group).
    points:      [A, hidden] a = c + sigma u, in the tokens' dtype.
    directions:  [C, hidden] sigma u per cluster (zeros where no axis), fp32.
    coordinates: [N] t of every token (0 in clusters without an axis), fp32.
    All three differentiable in the tokens.
    """

    clusters: torch.Tensor
    points: torch.Tensor
    directions: torch.Tensor
    coordinates: torch.Tensor

    @property
    def num_axes(self) -> int:
        return self.clusters.numel()


def _per_cluster(values: torch.Tensor, token_to_cluster: torch.Tensor, num_clusters: int) -> torch.Tensor:
    shape = (num_clusters, *values.shape[1:])
    return torch.zeros(shape, dtype=values.dtype, device=values.device).index_add_(0, token_to_cluster, values)


@dataclass
class _Spread:
    direction: torch.Tensor  # [C, hidden] unit principal direction (zeros for singletons)
    spread: torch.Tensor  # [C] RMS of the members' coordinates along it
    along: torch.Tensor  # [N] each token's <x - c, direction>
    deviation_norms: torch.Tensor  # [N] ||x - c||^2, no gradient


def _principal_spread(tokens: torch.Tensor, clusters: GroupedClusters) -> _Spread:
    members_of = clusters.token_to_cluster
    num_clusters = clusters.num_clusters
    deviations = tokens.float() - clusters.centroids.float().index_select(0, members_of)
    with torch.no_grad():
        norms = deviations.detach().square().sum(dim=1)
        # Start from the farthest member (the lowest index among equals, so the start is deterministic).
        farthest_norm = torch.zeros(num_clusters, device=tokens.device).scatter_reduce_(
            0, members_of, norms, reduce="amax", include_self=False)
        is_farthest = norms == farthest_norm.index_select(0, members_of)
        candidates = torch.where(is_farthest, torch.arange(tokens.size(0), device=tokens.device),
                                 torch.full_like(members_of, tokens.size(0)))
        start = torch.full((num_clusters,), tokens.size(0), dtype=torch.long, device=tokens.device).scatter_reduce_(
            0, members_of, candidates, reduce="amin")
    direction = deviations.index_select(0, start)
    for _ in range(POWER_ITERATIONS):
        projections = (deviations * direction.index_select(0, members_of)).sum(dim=1, keepdim=True)
        direction = _per_cluster(projections * deviations, members_of, num_clusters)
        # A singleton's direction is 0 (its deviation is): the norm is kept off 0 for its gradient.
        direction = direction / direction.norm(dim=1, keepdim=True).clamp(min=1e-30)
    along = (deviations * direction.index_select(0, members_of)).sum(dim=1)
    sizes = clusters.cluster_sizes.to(torch.float32)
    spread = (_per_cluster(along.square(), members_of, num_clusters) / sizes).clamp(min=1e-30).sqrt()
    return _Spread(direction, spread, along, norms)


def principal_axes(tokens: torch.Tensor, clusters: GroupedClusters):
    """[C, hidden] unit principal directions of every cluster's members (fp32; zeros for
    singletons) and [C] the members' RMS spread along them, differentiable in the tokens (the
    choice of the starting member aside)."""
    found = _principal_spread(tokens, clusters)
    return found.direction, found.spread


def cluster_axes(tokens: torch.Tensor, clusters: GroupedClusters) -> ClusterAxes:
    """The axis rows of ``clusters`` of [N, hidden] ``tokens`` (see the module's docstring):
    one for every cluster of two or more members that spread beyond ``MIN_RELATIVE_SPREAD``.
    The host waits for their count."""
    found = _principal_spread(tokens, clusters)
    members_of = clusters.token_to_cluster
    centroids = clusters.centroids.float()
    with torch.no_grad():
        # The members' mean ||x||^2 is their mean ||x - c||^2 plus ||c||^2 (the deviations sum to 0).
        mean_square_norm = _per_cluster(found.deviation_norms, members_of, clusters.num_clusters) / \
            clusters.cluster_sizes.float() + centroids.detach().square().sum(dim=1)
        has_axis = (clusters.cluster_sizes > 1) & (found.spread.square() > MIN_RELATIVE_SPREAD**2 * mean_square_norm)
        axis_clusters = has_axis.nonzero().squeeze(1)
    directions = found.direction * (found.spread * has_axis).unsqueeze(1)
    points = (centroids.index_select(0, axis_clusters) + directions.index_select(0, axis_clusters)).to(tokens.dtype)
    # t = <x - c, u> / sigma where the cluster has an axis, 0 elsewhere.
    per_unit_spread = has_axis / torch.where(has_axis, found.spread, torch.ones_like(found.spread))
    coordinates = found.along * per_unit_spread.index_select(0, members_of)
    return ClusterAxes(axis_clusters, points, directions, coordinates)


@dataclass
class SentRows:
    """Centroids and axis rows merged in the order the all-to-all sends them (by group).

    rows: [C + A, hidden]; groups: [C + A] group of every row, non-decreasing;
    rows_per_group: [G]; order: [C + A] position in cat(centroids, axis points) of each row.
    """

    rows: torch.Tensor
    groups: torch.Tensor
    rows_per_group: torch.Tensor
    order: torch.Tensor

    def split_outputs(self, outputs: torch.Tensor, num_clusters: int):
        """The outputs of the rows sent, as (centroids' [C, hidden], axis rows' [A, hidden])."""
        unsorted = torch.empty_like(outputs).index_copy(0, self.order, outputs)
        return unsorted[:num_clusters], unsorted[num_clusters:]


def rows_with_axes(clusters: GroupedClusters, axes: ClusterAxes) -> SentRows:
    """Each cluster's axis row placed among its group's centroids."""
    groups = torch.cat([clusters.cluster_groups, clusters.cluster_groups.index_select(0, axes.clusters)])
    order = torch.argsort(groups, stable=True)
    rows = torch.cat([clusters.centroids, axes.points]).index_select(0, order)
    rows_per_group = torch.zeros_like(clusters.clusters_per_group).index_add_(
        0, groups, torch.ones_like(groups))
    return SentRows(rows, groups.index_select(0, order), rows_per_group, order)
