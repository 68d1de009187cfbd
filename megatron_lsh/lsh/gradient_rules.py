"""Backward rules for merged tokens: which input gradient each member of a cluster receives.

A cluster's centroid c is the mean of its members x_i; the experts run on c, and every member
gets E(c) back (weighted by its own prob p_i). The backward then knows, per cluster, the centroid's
input gradient G = J_E(c)^T S, S = sum_i p_i g_i the summed output gradients of the members, and,
per member, its own output gradient h_i = p_i g_i. The exact gradient of member i would be
J_E(x_i)^T h_i; no rule may send more bytes than G, so each guesses it from G, h_i and x_i:

- 'mean' (autograd of the mean): G / n for every member; exact when all h_i are equal.
- 'share': w_i G with w_i = <h_i, S> / ||S||^2 (the w_i sum to 1); exact when the h_i are parallel.
- 'rotation': the rotation trick (Fifty et al. 2024) per member: (||c|| / ||x_i||) R_i^T (G / n),
  R_i the rotation taking x_i's direction to c's in the plane of the two.

Every rule gives a singleton cluster exactly its centroid's gradient. Rules other than 'mean' are
a pair of autograd functions sharing one ``MemberGradients`` per forward pass: the expansion's
backward (which runs first) leaves what it learns about each member, the merge's backward uses it.
"""

from __future__ import annotations

from typing import Optional

import torch

GRADIENT_RULES = ("mean", "share", "rotation")
# Measured and removed (docs/quality_study.md, merged tokens' gradients): 'straight_through',
# G / n + (h_i - S / n), the backward of the paper's residual compensation without its forward
# term, which takes each expert for the identity around its centroid; it trained far worse.


class MemberGradients:
    """What one forward pass's expansion backward tells its merge backward, per member row.

    rule: one of GRADIENT_RULES other than 'mean'.
    After the expansion's backward: ``shares`` [N] ('share'); None until then (the merge then
    falls back to the mean).
    """

    def __init__(self, rule: str):
        if rule not in GRADIENT_RULES or rule == "mean":
            raise ValueError(f"gradient rule {rule!r}: use one of {', '.join(GRADIENT_RULES[1:])}")
        self.rule = rule
        self.shares: Optional[torch.Tensor] = None

    def learn(self, member_grads: torch.Tensor, token_to_cluster: torch.Tensor, cluster_sizes: torch.Tensor,
              cluster_grads: torch.Tensor) -> None:
        """From each member's output gradient h_i [N, hidden] and their sums S [C, hidden] (fp32)."""
        if self.rule == "share":
            summed = cluster_grads.index_select(0, token_to_cluster)
            norm_sq = cluster_grads.square().sum(dim=1).index_select(0, token_to_cluster)
            even = 1.0 / cluster_sizes.index_select(0, token_to_cluster).to(member_grads.dtype)
            # A cluster whose gradients cancel (S = 0) has no direction to share along: the mean.
            self.shares = torch.where(norm_sq > 0, (member_grads * summed).sum(dim=1) / norm_sq.clamp(min=1e-30),
                                      even)


def cluster_means(tokens: torch.Tensor, token_to_cluster: torch.Tensor, cluster_sizes: torch.Tensor) -> torch.Tensor:
    """[C, hidden] mean of each cluster's members, in fp32 or wider: a half-precision running sum
    loses the mean."""
    accumulate_dtype = torch.promote_types(tokens.dtype, torch.float32)
    sums = torch.zeros(cluster_sizes.numel(), tokens.size(1), dtype=accumulate_dtype, device=tokens.device)
    sums.index_add_(0, token_to_cluster, tokens.to(accumulate_dtype))
    return sums / cluster_sizes.unsqueeze(1).to(accumulate_dtype)


class _MergeToCentroids(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, token_to_cluster, cluster_sizes, members: MemberGradients):
        centroids = cluster_means(tokens, token_to_cluster, cluster_sizes)
        ctx.members = members
        ctx.save_for_backward(token_to_cluster, cluster_sizes,
                              tokens if members.rule == "rotation" else None,
                              centroids if members.rule == "rotation" else None)
        return centroids.to(tokens.dtype)

    @staticmethod
    def backward(ctx, centroid_grads):
        token_to_cluster, cluster_sizes, tokens, centroids = ctx.saved_tensors
        members: MemberGradients = ctx.members
        grads = centroid_grads.float()
        per_member = (grads / cluster_sizes.unsqueeze(1).float()).index_select(0, token_to_cluster)
        if members.rule == "share" and members.shares is not None:
            per_member = grads.index_select(0, token_to_cluster) * members.shares.unsqueeze(1)
        elif members.rule == "rotation":
            per_member = rotated(per_member, tokens.float(), centroids.float().index_select(0, token_to_cluster))
        members.shares = None  # one backward per forward
        return per_member.to(centroid_grads.dtype), None, None, None


class _ExpandFromCentroids(torch.autograd.Function):
    @staticmethod
    def forward(ctx, centroid_values, token_to_cluster, cluster_sizes, members: MemberGradients):
        ctx.members = members
        ctx.num_clusters = centroid_values.size(0)
        ctx.save_for_backward(token_to_cluster, cluster_sizes)
        return centroid_values.index_select(0, token_to_cluster)

    @staticmethod
    def backward(ctx, member_grads):
        token_to_cluster, cluster_sizes = ctx.saved_tensors
        accumulate_dtype = torch.promote_types(member_grads.dtype, torch.float32)
        member_grads32 = member_grads.to(accumulate_dtype)
        sums = torch.zeros(ctx.num_clusters, member_grads.size(1), dtype=accumulate_dtype, device=member_grads.device)
        sums.index_add_(0, token_to_cluster, member_grads32)
        ctx.members.learn(member_grads32, token_to_cluster, cluster_sizes, sums)
        return sums.to(member_grads.dtype), None, None, None


def rotated(grads: torch.Tensor, tokens: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(||c|| / ||x||) R^T g per row, R the rotation taking x's direction to c's (identity off
    their plane): R^T g = g - 2 r <r, g> + 2 x^ <c^, g>, r = (x^ + c^) / ||x^ + c^||.

    With a = <x^, g>, b = <c^, g>, d = <x^, c^> (so 2 r <r, g> = (x^ + c^)(a + b) / (1 + d)) it is
    l g + p x + q c with per-row scalars: five dot products and one pass over the rows."""
    x_norm = tokens.norm(dim=1, keepdim=True).clamp(min=1e-30)
    c_norm = centroids.norm(dim=1, keepdim=True).clamp(min=1e-30)
    a = (tokens * grads).sum(dim=1, keepdim=True) / x_norm
    b = (centroids * grads).sum(dim=1, keepdim=True) / c_norm
    one_plus_d = 1 + (tokens * centroids).sum(dim=1, keepdim=True) / (x_norm * c_norm)
    # Opposite directions (x^ = -c^) have no single rotation between them: leave those rows alone.
    opposite = one_plus_d < 1e-6
    share = (a + b) / one_plus_d.clamp(min=1e-6)
    scale = c_norm / x_norm
    on_x = scale * (2 * b - share) / x_norm
    on_c = -scale * share / c_norm
    out = torch.addcmul(torch.addcmul(scale * grads, on_x, tokens), on_c, centroids)
    return torch.where(opposite, grads, out)


def merge_to_centroids(tokens: torch.Tensor, token_to_cluster: torch.Tensor, cluster_sizes: torch.Tensor,
                       members: MemberGradients) -> torch.Tensor:
    """[C, hidden] means of the clusters (half precision summed in fp32), whose backward follows
    ``members.rule``."""
    return _MergeToCentroids.apply(tokens, token_to_cluster, cluster_sizes, members)


def expand_from_centroids(centroid_values: torch.Tensor, token_to_cluster: torch.Tensor,
                          cluster_sizes: torch.Tensor, members: MemberGradients) -> torch.Tensor:
    """[N, hidden] each member's row of its cluster's value; its backward sums the members'
    gradients (as a gather's would) and tells ``members`` what it saw."""
    return _ExpandFromCentroids.apply(centroid_values, token_to_cluster, cluster_sizes, members)
