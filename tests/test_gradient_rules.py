"""Backward rules for merged tokens: hand-computed gradients on a small cluster, the forward
untouched, singletons exact under every rule."""

import pytest
import torch

from megatron_lsh.lsh import GRADIENT_RULES, MemberGradients, cluster_tokens, expand_to_tokens


def merged_backward(rule, tokens, bucket_ids, member_grads, expert=None, compensation=False):
    """Gradients (tokens, expert weight) and the forward rows of: merge into clusters, an expert
    (a linear map), each member's row of its centroid's output, loss sum_i <h_i, y_i>."""
    tokens = tokens.clone().requires_grad_(True)
    expert = (torch.eye(tokens.size(1)) if expert is None else expert).clone().requires_grad_(True)
    members = None if rule == "mean" else MemberGradients(rule)
    groups = torch.zeros(tokens.size(0), dtype=torch.long)
    clusters = cluster_tokens(tokens, bucket_ids, groups, 1, int(bucket_ids.max()) + 1, members)
    outputs = clusters.centroids @ expert.T
    rows = expand_to_tokens(outputs, clusters, tokens if compensation else None, None, members)
    (rows * member_grads).sum().backward()
    return tokens.grad, expert.grad, rows.detach()


# Two members in the plane, x1 = (2, 0) and x2 = (0, 2), centroid (1, 1), the expert the identity,
# member output gradients h1 = (1, 0), h2 = (3, 0): S = (4, 0), the centroid's gradient G = (4, 0).
TWO = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
ONE_CLUSTER = torch.tensor([0, 0])
H = torch.tensor([[1.0, 0.0], [3.0, 0.0]])


@pytest.mark.parametrize("rule, expected", [
    ("mean", [[2.0, 0.0], [2.0, 0.0]]),  # G / 2 each
    ("share", [[1.0, 0.0], [3.0, 0.0]]),  # <h_i, S> / |S|^2 = 1/4 and 3/4 of G: exact, the h_i parallel
    # x1's direction turned onto c's is a turn of +45 degrees: G / 2 = (2, 0) turned back by 45
    # degrees, scaled by |c| / |x1| = 1/sqrt(2); x2 turns the other way.
    ("rotation", [[1.0, -1.0], [1.0, 1.0]]),
])
def test_each_rule_gives_the_hand_computed_member_gradients(rule, expected):
    token_grads, _, _ = merged_backward(rule, TWO, ONE_CLUSTER, H)
    torch.testing.assert_close(token_grads, torch.tensor(expected))


def test_share_falls_back_to_the_mean_when_the_members_gradients_cancel():
    cancelling = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    weight = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    share, _, _ = merged_backward("share", TWO, ONE_CLUSTER, cancelling, weight)
    mean, _, _ = merged_backward("mean", TWO, ONE_CLUSTER, cancelling, weight)
    torch.testing.assert_close(share, mean)


@pytest.mark.parametrize("rule", GRADIENT_RULES)
def test_rules_change_only_the_members_input_gradients(rule):
    """Forward rows and the expert's weight gradient are the mean rule's, bit for bit."""
    torch.manual_seed(0)
    tokens, grads, weight = torch.randn(12, 8), torch.randn(12, 8), torch.randn(8, 8)
    buckets = torch.tensor([0, 1, 0, 2, 1, 0, 3, 3, 2, 0, 1, 4])
    _, weight_grad, rows = merged_backward(rule, tokens, buckets, grads, weight)
    _, mean_weight_grad, mean_rows = merged_backward("mean", tokens, buckets, grads, weight)
    assert torch.equal(rows, mean_rows)
    torch.testing.assert_close(weight_grad, mean_weight_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rule", GRADIENT_RULES)
def test_every_rule_is_exact_when_every_cluster_is_a_singleton(rule):
    torch.manual_seed(1)
    tokens, grads, weight = torch.randn(10, 8), torch.randn(10, 8), torch.randn(8, 8)
    token_grads, _, _ = merged_backward(rule, tokens, torch.arange(10), grads, weight)
    torch.testing.assert_close(token_grads, grads @ weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["share", "rotation"])
def test_a_rule_holds_with_residual_compensation(rule):
    """The residual's own gradient reaches each member as before; the rule acts on the centroid's."""
    torch.manual_seed(2)
    tokens, grads, weight = torch.randn(6, 8), torch.randn(6, 8), torch.randn(8, 8)
    buckets = torch.tensor([0, 0, 0, 1, 1, 2])
    ruled, _, rows = merged_backward(rule, tokens, buckets, grads, weight, compensation=True)
    mean, _, mean_rows = merged_backward("mean", tokens, buckets, grads, weight, compensation=True)
    torch.testing.assert_close(rows, mean_rows)
    torch.testing.assert_close(ruled[5], mean[5])  # the singleton
    assert not torch.allclose(ruled[:5], mean[:5])


def test_half_precision_tokens_get_gradients_in_their_dtype():
    tokens = TWO.to(torch.bfloat16)
    token_grads, _, _ = merged_backward("share", tokens, ONE_CLUSTER, H.to(torch.bfloat16),
                                        torch.eye(2, dtype=torch.bfloat16))
    assert token_grads.dtype == torch.bfloat16
    torch.testing.assert_close(token_grads.float(), torch.tensor([[1.0, 0.0], [3.0, 0.0]]))


@pytest.mark.parametrize("name", ["newton", "mean"])  # the mean is autograd's own: no state to share
def test_member_gradients_exist_only_for_the_rules_that_need_them(name):
    with pytest.raises(ValueError, match=name):
        MemberGradients(name)
