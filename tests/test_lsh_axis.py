"""Axis rows (megatron_lsh/lsh/axis.py): a second row per cluster along its members' spread."""

import math

import pytest
import torch

from megatron_lsh.lsh import cluster_tokens, expand_to_tokens
from megatron_lsh.lsh.axis import cluster_axes, principal_axes, rows_with_axes

HIDDEN = 6


def clusters_of(tokens, buckets, groups, num_groups=2):
    return cluster_tokens(tokens, torch.tensor(buckets), torch.tensor(groups), num_groups, max(buckets) + 1)


def through_expert(expert, tokens, clusters, compensate=False, scale=None):
    """Outputs per token the way the dispatcher makes them: rows sent by group, one expert for all."""
    axes = cluster_axes(tokens, clusters)
    sent = rows_with_axes(clusters, axes)
    centroid_outputs, axis_outputs = sent.split_outputs(expert(sent.rows), clusters.num_clusters)
    return expand_to_tokens(centroid_outputs, clusters, tokens if compensate else None, scale, axes, axis_outputs), axes


def line_cluster(generator):
    """Group 0: two members; group 1: three members on one line and a singleton."""
    centre, direction = torch.randn(2, HIDDEN, generator=generator)
    direction = direction / direction.norm()
    other = torch.randn(HIDDEN, generator=generator)
    tokens = torch.stack([centre + direction, centre - direction, 2 * centre + 0.5 * direction,
                          2 * centre - 0.2 * direction, 2 * centre - 0.3 * direction, other])
    return tokens, clusters_of(tokens, [0, 0, 1, 1, 1, 2], [0, 0, 1, 1, 1, 1])


def test_every_cluster_of_distinct_members_sends_one_axis_row_among_its_groups_rows():
    tokens, clusters = line_cluster(torch.Generator().manual_seed(0))
    axes = cluster_axes(tokens, clusters)
    assert axes.clusters.tolist() == [0, 1]  # the singleton (cluster 2) sends none
    sent = rows_with_axes(clusters, axes)
    assert sent.groups.tolist() == [0, 0, 1, 1, 1]
    assert sent.rows_per_group.tolist() == [2, 3]
    outputs = torch.arange(5.0).unsqueeze(1).expand(5, HIDDEN)
    centroid_outputs, axis_outputs = sent.split_outputs(outputs, clusters.num_clusters)
    assert torch.equal(sent.rows, torch.cat([clusters.centroids, axes.points]).index_select(0, sent.order))
    # Sent: group 0's centroid and axis row, then group 1's two centroids and its axis row.
    assert centroid_outputs[:, 0].tolist() == [0.0, 2.0, 3.0] and axis_outputs[:, 0].tolist() == [1.0, 4.0]


def test_a_two_member_clusters_axis_row_is_one_of_its_members():
    tokens, clusters = line_cluster(torch.Generator().manual_seed(1))
    axes = cluster_axes(tokens, clusters)
    torch.testing.assert_close(axes.points[0], tokens[0])
    assert axes.coordinates[:2].tolist() == pytest.approx([1.0, -1.0])


def test_on_members_along_a_line_a_linear_expert_gives_exact_outputs_and_weight_gradients():
    """The secant of a linear map is the map: members on their cluster's axis get their own
    output, the weights their exact gradients, and each member its exact input gradient along
    the axis."""
    generator = torch.Generator().manual_seed(2)
    tokens, _ = line_cluster(generator)
    expert = torch.nn.Linear(HIDDEN, HIDDEN)
    grad = torch.randn(tokens.shape, generator=generator)

    exact_in = tokens.clone().requires_grad_(True)
    expert(exact_in).backward(grad)
    exact_input_grad, exact_weight_grad, exact_bias_grad = exact_in.grad, expert.weight.grad.clone(), expert.bias.grad.clone()
    expert.zero_grad()

    merged_in = tokens.clone().requires_grad_(True)
    clusters = clusters_of(merged_in, [0, 0, 1, 1, 1, 2], [0, 0, 1, 1, 1, 1])
    outputs, axes = through_expert(expert, merged_in, clusters)
    outputs.backward(grad)
    torch.testing.assert_close(outputs, expert(tokens), atol=1e-5, rtol=0)
    torch.testing.assert_close(expert.weight.grad, exact_weight_grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(expert.bias.grad, exact_bias_grad, atol=1e-5, rtol=0)
    unit = torch.nn.functional.normalize(axes.directions, dim=1).index_select(0, clusters.token_to_cluster)
    torch.testing.assert_close((merged_in.grad * unit).sum(1)[:5], (exact_input_grad * unit).sum(1)[:5],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_in.grad[5], exact_input_grad[5], atol=1e-6, rtol=0)  # the singleton


def test_gradients_of_a_merged_cluster_are_those_of_the_secant_written_out_by_hand():
    """Three members off any line, a nonlinear expert: the weights learn at c from sum (1 - t_i) g_i
    and at a from sum t_i g_i; the members' input gradients are those of the whole forward,
    through the centroid, the coordinates, the direction and the spread."""
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randn(3, HIDDEN, generator=generator)
    grad = torch.randn(3, HIDDEN, generator=generator)
    weight = torch.randn(HIDDEN, HIDDEN, generator=generator)

    def expert(rows):
        return torch.tanh(rows @ weight_in_use.T)

    weight_in_use = weight.clone().requires_grad_(True)
    inputs = tokens.clone().requires_grad_(True)
    clusters = clusters_of(inputs, [0, 0, 0], [0, 0, 0], num_groups=1)
    outputs, axes = through_expert(expert, inputs, clusters)
    outputs.backward(grad)

    # By hand: the same forward from first principles (two power iterations from the farthest
    # member), differentiated by autograd.
    hand_weight = weight.clone().requires_grad_(True)
    hand_inputs = tokens.clone().requires_grad_(True)
    centroid = hand_inputs.mean(dim=0)
    deviations = hand_inputs - centroid
    unit = deviations[deviations.detach().norm(dim=1).argmax()]
    for _ in range(2):
        unit = (deviations @ unit) @ deviations
        unit = unit / unit.norm()
    sigma = (deviations @ unit).square().mean().sqrt()
    axis_point = centroid + sigma * unit
    t = deviations @ unit / sigma
    at_centroid, at_axis = torch.tanh(centroid @ hand_weight.T), torch.tanh(axis_point @ hand_weight.T)
    hand = at_centroid + t.unsqueeze(1) * (at_axis - at_centroid)
    hand.backward(grad)

    torch.testing.assert_close(outputs, hand.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(axes.coordinates.detach(), t.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(inputs.grad, hand_inputs.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(weight_in_use.grad, hand_weight.grad, atol=1e-5, rtol=0)
    # The weights' gradient splits between the two rows as the coordinates say.
    pre_c, pre_a = centroid.detach() @ weight.T, axis_point.detach() @ weight.T
    at_c = (grad * (1 - t.detach()).unsqueeze(1)).sum(0) * (1 - torch.tanh(pre_c) ** 2)
    at_a = (grad * t.detach().unsqueeze(1)).sum(0) * (1 - torch.tanh(pre_a) ** 2)
    by_rows = torch.outer(at_c, centroid.detach()) + torch.outer(at_a, axis_point.detach())
    torch.testing.assert_close(weight_in_use.grad, by_rows, atol=1e-5, rtol=0)


def test_the_axis_is_the_members_principal_direction_and_sigma_their_rms_spread_along_it():
    generator = torch.Generator().manual_seed(4)
    direction = torch.randn(HIDDEN, generator=generator)
    direction /= direction.norm()
    along = torch.randn(40, 1, generator=generator) * 3.0
    tokens = 5 + along * direction + 0.3 * torch.randn(40, HIDDEN, generator=generator)
    clusters = clusters_of(tokens, [0] * 40, [0] * 40, num_groups=1)
    found, spread = principal_axes(tokens, clusters)
    deviations = tokens - tokens.mean(dim=0)
    top = torch.linalg.svd(deviations, full_matrices=False).Vh[0]
    angle = math.degrees(math.acos(min(1.0, abs(float(found[0] @ top)))))
    assert angle < 1.0
    assert float(spread[0]) == pytest.approx(float((deviations @ found[0]).square().mean().sqrt()), rel=1e-5)


def test_singletons_and_alike_members_send_no_axis_and_change_nothing():
    generator = torch.Generator().manual_seed(5)
    row = torch.randn(HIDDEN, generator=generator)
    tokens = torch.stack([row, row.clone(), torch.randn(HIDDEN, generator=generator)])
    clusters = clusters_of(tokens, [0, 0, 1], [0, 0, 1])
    expert = torch.nn.Linear(HIDDEN, HIDDEN)
    for compensate in (False, True):
        outputs, axes = through_expert(expert, tokens, clusters, compensate)
        assert axes.num_axes == 0
        assert torch.equal(outputs, expand_to_tokens(expert(clusters.centroids), clusters,
                                                     tokens if compensate else None))


def test_with_compensation_only_the_part_off_the_axis_is_added_back():
    generator = torch.Generator().manual_seed(6)
    tokens = torch.randn(4, HIDDEN, generator=generator)
    clusters = clusters_of(tokens, [0, 0, 0, 0], [0, 0, 0, 0], num_groups=1)
    scale = torch.tensor([0.5])
    expert = torch.nn.Linear(HIDDEN, HIDDEN)
    outputs, axes = through_expert(expert, tokens, clusters, compensate=True, scale=scale)
    centroid = clusters.centroids[0]
    step = axes.directions[0]
    t = axes.coordinates.unsqueeze(1)
    secant = expert(centroid + step) - expert(centroid)
    expected = expert(centroid) + t * secant + 0.5 * (tokens - centroid - t * step)
    torch.testing.assert_close(outputs, expected, atol=1e-5, rtol=0)
