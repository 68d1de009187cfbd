"""megatron_lsh.lsh: hash families, clustering into centroids, and compensation."""

import math

import pytest
import torch

from megatron_lsh.lsh import (
    HASH_TYPES,
    CrossPolytopeHash,
    SphericalHash,
    adaptive_bucket_ids,
    bisecting_bucket_ids,
    build_hash_family,
    cluster_tokens,
    expand_to_tokens,
    fit_expert_gains,
    hash_and_cluster,
    relative_errors,
)

DIM = 64


def gaussian(n, dim=DIM, seed=0, dtype=torch.float32):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)


def neighbours(x, cosine, seed):
    """Vectors at exactly the given cosine similarity to each row of x (same norm)."""
    noise = gaussian(x.size(0), x.size(1), seed)
    unit = x / x.norm(dim=1, keepdim=True)
    orthogonal = noise - (noise * unit).sum(1, keepdim=True) * unit
    orthogonal = orthogonal / orthogonal.norm(dim=1, keepdim=True)
    return (cosine * unit + math.sqrt(1 - cosine**2) * orthogonal) * x.norm(dim=1, keepdim=True)


def per_hash_collision_rate(family, a, b):
    return (family.codes(a) == family.codes(b)).double().mean().item()


def hoeffding_halfwidth(samples, confidence_failure=1e-6):
    """Half-width t with P(|rate - p| > t) <= confidence_failure for a mean of bounded samples."""
    return math.sqrt(math.log(2 / confidence_failure) / (2 * samples))


@pytest.mark.parametrize("hash_type", HASH_TYPES)
def test_near_vectors_collide_far_more_often_than_far_ones(hash_type):
    # 16 independent functions x 2000 pairs; functions are independent, so per-function
    # collisions of one pair are independent draws; pairs add more draws.
    family = build_hash_family(hash_type, DIM, num_hashes=16, num_buckets=8, seed=3)
    x = gaussian(2000, seed=1)
    near_rate = per_hash_collision_rate(family, x, neighbours(x, 0.9, seed=2))
    far_rate = per_hash_collision_rate(family, x, gaussian(2000, seed=4))
    # Conservative: Hoeffding over the 2000 pairs only, as if functions were not independent.
    margin = hoeffding_halfwidth(2000)
    assert near_rate - margin > far_rate + margin, (near_rate, far_rate, margin)
    # A random pair lands in the same of 8 buckets about 1/8 of the time.
    assert abs(far_rate - 1 / 8) < margin


@pytest.mark.parametrize("hash_type", HASH_TYPES)
def test_collision_rate_falls_as_vectors_move_apart(hash_type):
    family = build_hash_family(hash_type, DIM, num_hashes=16, num_buckets=8, seed=5)
    x = gaussian(2000, seed=6)
    rates = [
        per_hash_collision_rate(family, x, neighbours(x, cosine, seed=7))
        for cosine in (0.99, 0.9, 0.7, 0.4, 0.0)
    ]
    margin = hoeffding_halfwidth(2000)
    assert all(a - margin > b + margin for a, b in zip(rates, rates[1:])), rates


def test_more_hashes_split_buckets_finer():
    x = gaussian(4000, seed=8)
    distinct = [
        build_hash_family("cross_polytope", DIM, h, 4, seed=9).bucket_ids(x).unique().numel()
        for h in (1, 2, 4, 6, 8)
    ]
    assert distinct == sorted(distinct) and distinct[0] <= 4 and distinct[-1] > 3000, distinct


@pytest.mark.parametrize("hash_type", HASH_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_tokens_always_share_a_bucket(hash_type, dtype):
    family = build_hash_family(hash_type, DIM, num_hashes=6, num_buckets=4, seed=10)
    distinct = gaussian(50, seed=11, dtype=dtype)
    order = torch.randperm(500, generator=torch.Generator().manual_seed(12))
    tokens = distinct.repeat(10, 1)[order]
    ids = family.bucket_ids(tokens)
    source = torch.arange(50).repeat(10)[order]
    for token in range(50):
        assert ids[source == token].unique().numel() == 1


def test_bucket_ids_cover_the_combined_range_and_match_the_codes():
    family = CrossPolytopeHash(DIM, num_hashes=3, num_buckets=6, seed=13)
    assert family.total_buckets == 6**3
    x = gaussian(3000, seed=14)
    codes = family.codes(x)
    assert codes.min() >= 0 and codes.max() < 6
    expected = codes[:, 0] + 6 * codes[:, 1] + 36 * codes[:, 2]
    assert torch.equal(family.bucket_ids(x), expected)


def test_cross_polytope_code_is_largest_coordinate_with_its_sign():
    family = CrossPolytopeHash(DIM, num_hashes=1, num_buckets=8, seed=15)
    x = gaussian(100, seed=16)
    projected = x @ family._projection
    expected = torch.cat([projected, -projected], dim=1).argmax(dim=1)
    assert torch.equal(family.codes(x)[:, 0], expected)


def test_spherical_code_is_nearest_random_unit_vector():
    family = SphericalHash(DIM, num_hashes=1, num_buckets=8, seed=17)
    directions = family._projection.T
    assert torch.allclose(directions.norm(dim=1), torch.ones(8))
    x = gaussian(100, seed=18)
    cosines = (x / x.norm(dim=1, keepdim=True)) @ directions.T
    assert torch.equal(family.codes(x)[:, 0], cosines.argmax(dim=1))


def test_hashing_is_deterministic_from_the_seed():
    x = gaussian(500, seed=19)
    same = [build_hash_family("spherical", DIM, 4, 4, seed=20).bucket_ids(x) for _ in range(2)]
    other = build_hash_family("spherical", DIM, 4, 4, seed=21).bucket_ids(x)
    assert torch.equal(same[0], same[1])
    assert not torch.equal(same[0], other)


@pytest.mark.parametrize(
    "args, message",
    [
        (("hyperplane", DIM, 4, 4, 0), "unknown LSH hash type"),
        (("cross_polytope", DIM, 0, 4, 0), "num_hashes"),
        (("cross_polytope", DIM, 4, 5, 0), "even"),
        (("spherical", DIM, 4, 1, 0), "num_buckets"),
        (("spherical", DIM, 40, 16, 0), "int64"),
    ],
)
def test_bad_hash_settings_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        build_hash_family(*args)


def test_hashing_refuses_tokens_of_the_wrong_size():
    family = build_hash_family("cross_polytope", DIM, 2, 4, 0)
    with pytest.raises(ValueError, match=r"\[N, 64\]"):
        family.codes(torch.zeros(3, 32))


def clustered(tokens, groups, seed=22, num_groups=4, hashes=2):
    family = build_hash_family("cross_polytope", tokens.size(1), hashes, 4, seed)
    return cluster_tokens(
        tokens, family.bucket_ids(tokens), groups, num_groups, family.total_buckets
    )


def bf16_step(values: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at each value (8 significant bits)."""
    exponent = torch.floor(torch.log2(values.abs().clamp(min=1e-30)))
    return torch.pow(2.0, exponent - 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_centroids_are_exact_means_of_their_members(dtype):
    """Each centroid is its members' exact mean, rounded once to the tokens' dtype: at most one
    step of that dtype away (fp32 rounds the fp32 sum; the fp64 mean is the reference)."""
    tokens = gaussian(400, seed=23, dtype=dtype)
    groups = torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(24))
    clusters = clustered(tokens, groups)
    assert clusters.centroids.dtype == dtype
    assert clusters.cluster_sizes.sum() == 400
    for c in range(clusters.num_clusters):
        members = tokens[clusters.token_to_cluster == c].double()
        assert members.size(0) == clusters.cluster_sizes[c]
        expected = members.mean(dim=0)
        if dtype == torch.float32:
            assert torch.allclose(clusters.centroids[c].double(), expected, atol=1e-6, rtol=0)
        else:
            assert torch.all((clusters.centroids[c].double() - expected).abs() <= bf16_step(expected))


def test_a_bf16_running_sum_would_miss_the_mean_by_more_than_a_bf16_step():
    """Why centroids sum half precision in fp32: the tolerance above fails a naive bf16 sum."""
    tokens = gaussian(400, seed=23, dtype=torch.bfloat16)
    members = tokens[:200]
    naive = torch.zeros(DIM, dtype=torch.bfloat16)
    for row in members:
        naive = naive + row
    naive_mean = (naive / 200).double()
    expected = members.double().mean(dim=0)
    assert torch.any((naive_mean - expected).abs() > bf16_step(expected))


def test_clusters_never_cross_groups_and_come_in_group_order():
    # Every token is identical, so only the group separates them.
    tokens = torch.ones(30, DIM)
    groups = torch.tensor([2, 0, 1] * 10)
    clusters = clustered(tokens, groups)
    assert clusters.num_clusters == 3
    assert clusters.cluster_groups.tolist() == [0, 1, 2]
    assert clusters.clusters_per_group.tolist() == [1, 1, 1, 0]
    assert torch.equal(clusters.cluster_groups[clusters.token_to_cluster], groups)


def test_inverse_map_restores_token_order():
    tokens = gaussian(300, seed=25)
    groups = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(26))
    # With fine hashes every token is its own cluster: expanding the centroids gives the tokens.
    singletons = clustered(tokens, groups, hashes=24)
    assert singletons.num_clusters == 300
    assert torch.equal(expand_to_tokens(singletons.centroids, singletons), tokens)
    # With coarse hashes, each token gets its own cluster's centroid.
    coarse = clustered(tokens, groups, hashes=1)
    assert coarse.num_clusters < 300
    expanded = expand_to_tokens(coarse.centroids, coarse)
    assert torch.equal(expanded, coarse.centroids[coarse.token_to_cluster])


def test_compensation_adds_each_tokens_residual():
    tokens = gaussian(300, seed=27)
    groups = torch.zeros(300, dtype=torch.long)
    clusters = clustered(tokens, groups, hashes=1)
    # An identity expert: compensation restores every token exactly, without it they collapse.
    assert torch.allclose(expand_to_tokens(clusters.centroids, clusters, tokens), tokens, atol=1e-6)
    uncompensated = expand_to_tokens(clusters.centroids, clusters)
    assert uncompensated.unique(dim=0).size(0) == clusters.num_clusters
    # Any expert: E(c) + (x - c).
    outputs = torch.tanh(clusters.centroids)
    expected = outputs[clusters.token_to_cluster] + tokens - clusters.centroids[clusters.token_to_cluster]
    assert torch.allclose(expand_to_tokens(outputs, clusters, tokens), expected)


@pytest.mark.parametrize("compensate", [True, False])
def test_gradients_reach_every_token(compensate):
    """Each member of cluster c (n members) gets the centroid's gradient shared equally,
    J_E(c)^T sum_j g_j / n; with the residual E(c) + (x - c) also its own g_i less the mean."""
    tokens = gaussian(200, seed=28).double().requires_grad_(True)
    groups = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(29))
    clusters = clustered(tokens, groups, hashes=1)
    assert clusters.num_clusters < 100  # clusters really merge tokens
    weights = gaussian(DIM, DIM, seed=30).double()
    output_grads = gaussian(200, seed=31).double()
    outputs = torch.tanh(clusters.centroids @ weights)
    per_token = expand_to_tokens(outputs, clusters, tokens if compensate else None)
    (per_token * output_grads).sum().backward()

    cluster_of = clusters.token_to_cluster
    sizes = clusters.cluster_sizes.double().unsqueeze(1)
    summed = torch.zeros(clusters.num_clusters, DIM, dtype=torch.float64).index_add(0, cluster_of, output_grads)
    through_expert = ((1 - outputs.detach().square()) * summed) @ weights.T / sizes
    expected = through_expert[cluster_of]
    if compensate:
        expected = expected + output_grads - (summed / sizes)[cluster_of]
    assert torch.allclose(tokens.grad, expected, atol=1e-12)
    assert torch.all(tokens.grad.abs().sum(dim=1) > 0)


def test_gradients_are_those_of_the_mean_and_the_residual():
    tokens = gaussian(40, dim=8, seed=32).double().requires_grad_(True)
    groups = torch.randint(0, 2, (40,), generator=torch.Generator().manual_seed(33))
    family = build_hash_family("spherical", 8, 1, 3, seed=34)
    bucket_ids = family.bucket_ids(tokens)

    def compensated(x):
        clusters = cluster_tokens(x, bucket_ids, groups, 2, family.total_buckets)
        return expand_to_tokens(torch.sin(clusters.centroids), clusters, x)

    assert torch.autograd.gradcheck(compensated, (tokens,))


def test_bf16_compensation_keeps_small_expert_outputs_of_large_tokens():
    # A singleton cluster: x == c, so E(c) + (x - c) must be E(c) to bf16 precision of E(c),
    # not of x (a naive x + (E(c) - c) in bf16 loses E(c) when |E(c)| << |x|).
    tokens = (100 * gaussian(64, seed=35)).to(torch.bfloat16)
    clusters = clustered(tokens, torch.zeros(64, dtype=torch.long), hashes=24)
    assert clusters.num_clusters == 64
    outputs = (0.01 * gaussian(64, seed=36)).to(torch.bfloat16)[: clusters.num_clusters]
    expanded = expand_to_tokens(outputs, clusters, tokens)
    assert expanded.dtype == torch.bfloat16
    expected = outputs[clusters.token_to_cluster].float()
    # One bf16 rounding of E(c), plus one fp32 rounding at the size of x.
    fp32_step = tokens.float().abs().max().item() * 2**-23
    torch.testing.assert_close(expanded.float(), expected, rtol=2**-8, atol=fp32_step)
    naive = tokens + (outputs[clusters.token_to_cluster] - tokens)
    assert (naive.float() - expected).abs().max() > 0.01


def centred_blobs(num_centres=12, per_centre=60, spread=0.15, seed=0):
    centres = gaussian(num_centres, seed=seed) * 3
    noise = gaussian(num_centres * per_centre, seed=seed + 1) * spread
    return centres.repeat_interleave(per_centre, dim=0) + noise


def bounded_clusters(tokens, groups, radius, num_groups=2, hashes=6, buckets=4, seed=11, threshold=None):
    family = build_hash_family("cross_polytope", tokens.size(1), hashes, buckets, seed=seed)
    assignment = adaptive_bucket_ids(tokens, family.codes(tokens), groups, buckets, threshold, radius)
    clusters = cluster_tokens(tokens, assignment.bucket_ids, groups, num_groups, assignment.total_buckets)
    return assignment, clusters


@pytest.mark.parametrize("radius", [0.05, 0.2, 0.5, 1.0])
def test_no_token_merges_into_a_centroid_beyond_the_error_bound(radius):
    tokens = torch.cat([centred_blobs(), gaussian(200, seed=9) * 2])  # clusters and scattered outliers
    groups = torch.randint(0, 2, (tokens.size(0),), generator=torch.Generator().manual_seed(3))
    assignment, clusters = bounded_clusters(tokens, groups, radius)
    assert relative_errors(tokens, clusters).max().item() <= radius * (1 + 1e-5)
    # Clusters never cross groups.
    assert torch.equal(clusters.cluster_groups.index_select(0, clusters.token_to_cluster), groups)


def test_a_looser_bound_merges_more_and_a_tight_one_sends_tokens_as_themselves():
    tokens = centred_blobs()
    groups = torch.zeros(tokens.size(0), dtype=torch.long)
    rates = [bounded_clusters(tokens, groups, r, num_groups=1)[1].num_clusters / tokens.size(0)
             for r in (0.01, 0.1, 0.3, 3.0)]
    assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1]
    tight, clusters = bounded_clusters(tokens, groups, 1e-4, num_groups=1)
    assert clusters.num_clusters == tokens.size(0) and tight.exact_rows > 0
    # A loose bound takes whole clusters of the data at coarse levels: about one per centre.
    assert bounded_clusters(tokens, groups, 3.0, num_groups=1)[1].num_clusters <= 4 * 12


@pytest.mark.parametrize("radius", [None, 0.3])
def test_a_larger_merge_threshold_keeps_clusters_coarser_within_the_bound(radius):
    tokens = torch.cat([centred_blobs(), gaussian(100, seed=9) * 2])
    groups = torch.zeros(tokens.size(0), dtype=torch.long)
    counts = [bounded_clusters(tokens, groups, radius, num_groups=1, threshold=t)[1].num_clusters
              for t in (1e-4, 1.0, 30.0, 1e6)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    # The smallest threshold acts beyond the last level: every row travels as itself, so a
    # controller can reach any rate.
    assert counts[0] == tokens.size(0)
    for threshold in (1.0, 1e6):
        _, clusters = bounded_clusters(tokens, groups, radius, num_groups=1, threshold=threshold)
        if radius is not None:
            assert relative_errors(tokens, clusters).max().item() <= radius * (1 + 1e-5)


def test_bounded_clusters_keep_gradients_reaching_every_token():
    tokens = centred_blobs().requires_grad_()
    groups = torch.zeros(tokens.size(0), dtype=torch.long)
    _, clusters = bounded_clusters(tokens, groups, 0.3, num_groups=1)
    expand_to_tokens(clusters.centroids * 2, clusters).sum().backward()
    torch.testing.assert_close(tokens.grad, torch.full_like(tokens, 2.0))


def test_expert_gain_recovers_the_slope_of_an_expert_that_scales_its_input():
    inputs = gaussian(300, seed=2)
    outputs = torch.cat([3.0 * inputs[:100] + 1.0, -0.5 * inputs[100:290], inputs[290:] * 0 + 7])
    gains = fit_expert_gains(inputs, outputs, torch.tensor([100, 190, 10, 0]))
    torch.testing.assert_close(gains, torch.tensor([3.0, -0.5, 0.0, 0.0]), atol=1e-5, rtol=1e-5)


def test_scaled_residual_compensation_gives_E_of_c_plus_g_times_the_residual():
    tokens = gaussian(40, seed=5)
    groups = torch.arange(40) % 2
    family = build_hash_family("cross_polytope", DIM, 1, 2, seed=1)
    clusters = cluster_tokens(tokens, family.bucket_ids(tokens), groups, 2, family.total_buckets)
    outputs = torch.tanh(clusters.centroids)
    scale = torch.where(clusters.cluster_groups == 0, 0.5, 2.0)
    expected = (outputs + scale.unsqueeze(1) * 0).index_select(0, clusters.token_to_cluster) + \
        scale.index_select(0, clusters.token_to_cluster).unsqueeze(1) * (
            tokens - clusters.centroids.index_select(0, clusters.token_to_cluster))
    torch.testing.assert_close(expand_to_tokens(outputs, clusters, tokens, scale), expected)


@pytest.mark.parametrize("threshold", [None, 1.0])
def test_exact_groups_are_not_hashed_and_every_other_group_clusters_as_before(threshold):
    tokens = centred_blobs()
    groups = torch.arange(tokens.size(0)) % 3
    family = build_hash_family("cross_polytope", DIM, 6, 4, seed=11)
    exact = torch.tensor([False, True, False])
    clusters, errors, _ = hash_and_cluster(tokens, family, groups, 3, threshold, None, exact)
    everything, _, _ = hash_and_cluster(tokens, family, groups, 3, threshold, None)
    member_of_exact_group = exact[groups]
    assert clusters.clusters_per_group[1] == int(member_of_exact_group.sum())
    assert errors[member_of_exact_group].abs().max() == 0
    for group in (0, 2):  # the hashed groups' clusters are unchanged
        assert clusters.clusters_per_group[group] == everything.clusters_per_group[group]
    assert clusters.clusters_per_group[0] < (groups == 0).sum()


@pytest.mark.parametrize("threshold", [None, 1.0])
def test_all_groups_exact_sends_every_token_as_itself(threshold):
    tokens = gaussian(40)
    groups = torch.arange(40) % 2
    family = build_hash_family("cross_polytope", DIM, 6, 4, seed=11)
    clusters, _, _ = hash_and_cluster(tokens, family, groups, 2, threshold, None, torch.tensor([True, True]))
    assert clusters.num_clusters == 40
    torch.testing.assert_close(clusters.centroids.index_select(0, clusters.token_to_cluster), tokens)


@pytest.mark.parametrize("threshold, bound", [(0.5, None), (None, 0.3), (0.2, 0.3), (None, 1e-6)])
def test_coarse_to_fine_clustering_decides_on_the_device_without_host_syncs(threshold, bound, monkeypatch):
    """As on a GPU: every row masked, none gathered (what COMPACT_ROWS_ON_CPU does on a CPU)."""
    from megatron_lsh.lsh import clustering
    from tests.moe_workers import HostSyncCounter

    monkeypatch.setattr(clustering, "COMPACT_ROWS_ON_CPU", False)
    tokens, groups = torch.randn(300, 16), torch.randint(0, 4, (300,))
    family = build_hash_family("cross_polytope", 16, 6, 4, seed=3)
    codes = family.codes(tokens)
    with HostSyncCounter() as counter:
        assignment = adaptive_bucket_ids(tokens, codes, groups, 4, threshold, bound)
    assert counter.calls == ["__int__"]  # the number of finest clusters, whatever the levels decide
    with HostSyncCounter() as counter:
        hash_and_cluster(tokens, family, groups, 4, threshold, bound, exact_groups=torch.tensor([1, 0, 0, 1]).bool())
    assert counter.calls == ["__int__", "unique"]  # and the cluster count, which sizes the centroids
    assert counter.unmarked_sites() == [] and len(counter.our_sites) == 2  # each line says it syncs
    with HostSyncCounter() as counter:
        hash_and_cluster(tokens, family, groups, 4)
    assert counter.calls == ["unique"]
    assert assignment.bucket_ids.shape == (300,)


@pytest.mark.parametrize("threshold, bound", [(0.5, None), (None, 0.3), (0.2, 0.3), (1.0, 0.05), (None, 3.0)])
def test_gathering_the_undecided_and_masking_the_decided_decide_alike(threshold, bound, monkeypatch):
    """On a CPU each level gathers what it still decides on and stops when nothing is left (a
    bound of 3 takes every cluster at the first level); on a GPU every level masks all."""
    from megatron_lsh.lsh import clustering

    base = torch.randn(8, 16, generator=torch.Generator().manual_seed(40))
    picks = torch.randint(0, 8, (400,), generator=torch.Generator().manual_seed(41))
    tokens = base[picks] + 0.2 * gaussian(400, dim=16, seed=42)
    groups = torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(43))
    codes = build_hash_family("cross_polytope", 16, 6, 4, seed=44).codes(tokens)
    decided = {}
    for compact in (True, False):
        monkeypatch.setattr(clustering, "COMPACT_ROWS_ON_CPU", compact)
        decided[compact] = adaptive_bucket_ids(tokens, codes, groups, 4, threshold, bound)
    assert torch.equal(decided[True].bucket_ids, decided[False].bucket_ids)
    for count in ("exact_rows", "threshold_splits", "threshold_kept"):
        assert int(getattr(decided[True], count)) == int(getattr(decided[False], count))
    assert len(decided[True].bucket_ids.unique()) < 400  # clusters merge rows


def test_the_threshold_counts_say_in_which_direction_it_still_acts():
    tokens = torch.cat([centred_blobs(), gaussian(100, seed=9) * 2])
    groups = torch.zeros(tokens.size(0), dtype=torch.long)
    codes = build_hash_family("cross_polytope", DIM, 6, 4, seed=11).codes(tokens)

    def counts(threshold, bound=None):
        assignment = adaptive_bucket_ids(tokens, codes, groups, 4, threshold, bound)
        return int(assignment.threshold_splits), int(assignment.threshold_kept), int(assignment.exact_rows)

    splits, kept, _ = counts(1.0)
    assert splits > 0 and kept > 0  # in its range it acts both ways
    assert counts(1e9)[0] == 0  # nothing left to keep whole: raising it changes nothing
    assert counts(1e-12)[1] == 0  # nothing kept whole: lowering it changes nothing
    assert counts(1e-12)[2] > 0  # rows of last-level clusters sent as themselves
    # With a tight bound, the bound splits what a large threshold would keep: nothing left for it.
    assert counts(1e9, bound=1e-6)[0] == 0
    assert counts(None, 0.3) == (0, 0, counts(None, 0.3)[2])  # no threshold, no counts


def bisected(tokens, groups, bound, num_groups=2, levels=16):
    assignment = bisecting_bucket_ids(tokens, groups, bound, levels)
    return assignment, cluster_tokens(tokens, assignment.bucket_ids, groups, num_groups, assignment.total_buckets)


def offset_blobs(num_centres=12, per_centre=60, spread=0.15, seed=0):
    """Blobs around centres far from the origin and from each other, nearly parallel: what a
    layer's inputs look like, and where random hyperplanes through the origin rarely cut a blob."""
    return centred_blobs(num_centres, per_centre, spread, seed) + 6 * gaussian(1, seed=seed + 7)


@pytest.mark.parametrize("bound", [0.05, 0.2, 0.5])
def test_bisection_keeps_every_member_within_the_bound_and_inside_its_group(bound):
    tokens = torch.cat([offset_blobs(), gaussian(200, seed=9) * 2])
    groups = torch.randint(0, 2, (tokens.size(0),), generator=torch.Generator().manual_seed(3))
    assignment, clusters = bisected(tokens, groups, bound)
    assert relative_errors(tokens, clusters).max().item() <= bound * (1 + 1e-5)
    assert torch.equal(clusters.cluster_groups.index_select(0, clusters.token_to_cluster), groups)
    assert clusters.num_clusters < tokens.size(0)


def test_bisection_cuts_across_the_spread_so_clusters_stay_coarser_than_hash_levels_at_one_bound():
    tokens = offset_blobs()
    groups = torch.zeros(tokens.size(0), dtype=torch.long)
    _, by_hashes = bounded_clusters(tokens, groups, 0.05, num_groups=1, hashes=16)
    _, by_halves = bisected(tokens, groups, 0.05, num_groups=1)
    assert by_halves.num_clusters < 0.8 * by_hashes.num_clusters
    # A bound every blob meets: about one cluster per blob.
    assert bisected(tokens, groups, 0.3, num_groups=1)[1].num_clusters <= 12 + 4


def test_bisection_out_of_levels_sends_what_breaks_the_bound_as_itself():
    tokens = torch.cat([offset_blobs(num_centres=2, per_centre=20), gaussian(5, seed=4) * 50])
    groups = torch.zeros(tokens.size(0), dtype=torch.long)
    assignment, clusters = bisected(tokens, groups, 0.3, num_groups=1, levels=0)  # no cut allowed
    assert int(assignment.exact_rows) > 0
    assert relative_errors(tokens, clusters).max().item() <= 0.3 * (1 + 1e-5)
    # Identical tokens never break a bound: one cluster, whatever the levels.
    same = gaussian(1, seed=5).repeat(30, 1)
    assert bisected(same, torch.zeros(30, dtype=torch.long), 1e-6, num_groups=1, levels=0)[1].num_clusters == 1


def test_hash_and_cluster_bisects_on_request_with_exact_groups_and_refuses_it_without_a_bound():
    tokens = torch.cat([offset_blobs(num_centres=4, per_centre=30), offset_blobs(num_centres=4, per_centre=30, seed=3)])
    groups = torch.arange(tokens.size(0)) % 2
    family = build_hash_family("cross_polytope", DIM, 8, 4, seed=11)
    clusters, errors, counts = hash_and_cluster(tokens, family, groups, 2, None, 0.3, torch.tensor([False, True]),
                                                split="bisect")
    exact_group = groups == 1
    assert (clusters.cluster_sizes.index_select(0, clusters.token_to_cluster)[exact_group] == 1).all()
    assert clusters.clusters_per_group[0] < (~exact_group).sum() and int(counts.exact_rows) == 0
    assert errors.max().item() <= 0.3 * (1 + 1e-5)
    # The other group is clustered as it would be alone: skipped rows take no part.
    everything, _, _ = hash_and_cluster(tokens, family, groups, 2, None, 0.3, split="bisect")
    assert clusters.clusters_per_group[0] == everything.clusters_per_group[0]
    with pytest.raises(ValueError, match="needs error_bound"):
        hash_and_cluster(tokens, family, groups, 2, None, None, split="bisect")


@pytest.mark.parametrize("split", ["hash", "bisect"])
def test_every_host_sync_of_lsh_says_so_where_it_happens(split):
    """On a CPU (rows gathered, levels cut short) and when bisecting, the host reads more: each
    read in megatron_lsh carries the greppable marker '# NOTE: device-to-host sync'."""
    from tests.moe_workers import HostSyncCounter

    tokens, groups = torch.randn(300, 16), torch.randint(0, 4, (300,))
    family = build_hash_family("cross_polytope", 16, 6, 4, seed=3)
    settings = dict(merge_threshold=0.5 if split == "hash" else None, error_bound=0.3,
                    exact_groups=torch.tensor([1, 0, 0, 1]).bool(), split=split)
    hash_and_cluster(tokens, family, groups, 4, **settings)  # warm-up: the projections move to the device once
    with HostSyncCounter() as counter:
        hash_and_cluster(tokens, family, groups, 4, **settings)
    assert len(counter.our_sites) >= 2
    assert counter.unmarked_sites() == []
