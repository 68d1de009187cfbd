"""LSHAlltoAllTokenDispatcher on 2 and 4 CPU ranks (gloo, expert parallel = world size)."""

import pytest
import torch

from tests.distributed import run_distributed
from tests.moe_workers import (
    clustered_traffic,
    gradient_study_modes,
    host_syncs_per_layer_step,
    round_trip_errors,
    scoped_traffic,
    stock_vs_lsh_unclustered,
    train_gpt_moe,
)

# Every test here runs several processes (ep1 excepted, below).
pytestmark = pytest.mark.slow

PARITY_CASES = [
    dict(num_moe_experts=4, moe_router_topk=2),
    dict(num_moe_experts=8, moe_router_topk=2),  # several local experts per rank
    dict(num_moe_experts=4, moe_router_topk=1, moe_router_pre_softmax=True,
         moe_apply_probs_on_input=True),
    dict(num_moe_experts=4, moe_router_topk=2, moe_expert_capacity_factor=0.5),  # drops tokens
    dict(num_moe_experts=4, moe_router_topk=2, add_bias_linear=True),
    dict(num_moe_experts=4, moe_router_topk=2, params_dtype=torch.bfloat16, bf16=True),
    # The error bound's coarse-to-fine path, and expert-gain compensation, with singleton clusters.
    dict(num_moe_experts=8, moe_router_topk=2, lsh_error_bound=1e-6),
    dict(num_moe_experts=8, moe_router_topk=2, lsh_error_bound=1e-6, lsh_split="bisect"),  # halved to singletons
    dict(num_moe_experts=8, moe_router_topk=2, lsh_compensation="expert_gain"),
    # The study mode trains on LSH's values with the exact MoE's gradients: with singletons, stock.
    dict(num_moe_experts=4, moe_router_topk=2, lsh_gradient_study="exact_gradients"),
]


def tolerances(case):
    """fp32: 1e-5. bf16: outputs within a few bf16 steps of their size (~0.04); input gradients
    within one bf16 step of the incoming gradient (~3): compensation's identity path adds the
    incoming gradient and its centroid path subtracts it again, each rounded to bf16, as the
    residual stream around every MoE layer does anyway."""
    if PARITY_CASES[case].get("params_dtype") == torch.bfloat16:
        return 1e-3, 2e-2
    return 1e-5, 1e-5


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"ep{n}")
def parity(request):
    return run_distributed(stock_vs_lsh_unclustered, request.param, PARITY_CASES)


@pytest.mark.parametrize("case", range(len(PARITY_CASES)), ids=lambda i: str(PARITY_CASES[i]))
def test_singleton_clusters_match_stock_outputs_and_gradients(parity, case):
    out_tolerance, grad_tolerance = tolerances(case)
    for rank_results in parity:
        result = rank_results[case]
        assert result["stats"].compression_rate == 1.0  # every row is its own cluster
        stock, lsh = result["stock"], result["lsh"]
        assert lsh["out"].dtype == stock["out"].dtype
        torch.testing.assert_close(lsh["out"], stock["out"], atol=out_tolerance, rtol=0)
        torch.testing.assert_close(lsh["grad_in"], stock["grad_in"], atol=grad_tolerance, rtol=0)
        for name, grad in stock["grad_params"].items():
            torch.testing.assert_close(lsh["grad_params"][name], grad, atol=grad_tolerance, rtol=0)


def test_the_split_gradient_studies_take_lsh_gradients_on_inputs_or_on_experts_only():
    """Exact values always; 'lsh_input_gradients': the input's gradient is LSH's (that of
    'exact_values', which takes all of LSH's), every weight's the exact MoE's;
    'lsh_expert_gradients': the experts' weights get LSH's, the input and the router stock's."""
    studies = ("exact_values", "lsh_input_gradients", "lsh_expert_gradients")
    for results in run_distributed(gradient_study_modes, 2, studies):
        stock, lsh = results[None], results["exact_values"]
        assert (lsh["grad_in"] - stock["grad_in"]).abs().max() > 1e-3  # merging moves the gradients
        inputs, experts = results["lsh_input_gradients"], results["lsh_expert_gradients"]
        for result in (lsh, inputs, experts):
            torch.testing.assert_close(result["out"], stock["out"], atol=1e-6, rtol=0)
        torch.testing.assert_close(inputs["grad_in"], lsh["grad_in"], atol=1e-6, rtol=0)
        torch.testing.assert_close(experts["grad_in"], stock["grad_in"], atol=1e-6, rtol=0)
        for name, grad in stock["grad_params"].items():
            torch.testing.assert_close(inputs["grad_params"][name], grad, atol=1e-6, rtol=0)
            source = lsh if name.startswith("experts.") else stock
            torch.testing.assert_close(experts["grad_params"][name], source["grad_params"][name], atol=1e-6, rtol=0)
        assert max((lsh["grad_params"][name] - grad).abs().max() for name, grad in stock["grad_params"].items()
                   if name.startswith("experts.")) > 1e-4  # and the experts' weights' gradients


def test_one_rank_holding_every_expert_trains_with_expert_biases():
    """Expert parallel 1 with biases: megatron-core 0.16.1 alone fails in backward (an in-place
    bias add on a view); stock and LSH both train, and agree."""
    [rank_results] = run_distributed(stock_vs_lsh_unclustered, 1, [dict(num_moe_experts=4, moe_router_topk=2,
                                                                         add_bias_linear=True)])
    result = rank_results[0]
    torch.testing.assert_close(result["lsh"]["out"], result["stock"]["out"], atol=1e-5, rtol=0)
    assert any(name.endswith("bias") and grad is not None and grad.abs().sum() > 0
               for name, grad in result["stock"]["grad_params"].items())


# Tensor parallel 2 x expert parallel 2 on 4 ranks (sequence parallel, as megatron-core requires
# for MoE): experts whole on each rank (expert tensor parallel 1), or split over the tensor-parallel
# pair (2: the dispatcher all-gathers centroids over it, through compat's gloo shim).
TP_PARITY_CASES = [
    dict(num_moe_experts=4, moe_router_topk=2),
    dict(num_moe_experts=8, moe_router_topk=2),  # several local experts per rank
    dict(num_moe_experts=4, moe_router_topk=2, moe_expert_capacity_factor=0.5),
]


@pytest.fixture(scope="module", params=[1, 2], ids=lambda n: f"tp2-ep2-etp{n}")
def tensor_parallel_parity(request):
    return run_distributed(stock_vs_lsh_unclustered, 4, TP_PARITY_CASES, 2, 2, request.param)


@pytest.mark.parametrize("case", range(len(TP_PARITY_CASES)), ids=lambda i: str(TP_PARITY_CASES[i]))
def test_singleton_clusters_match_stock_under_tensor_and_sequence_parallelism(tensor_parallel_parity, case):
    for rank_results in tensor_parallel_parity:
        result = rank_results[case]
        assert result["stats"].compression_rate == 1.0
        stock, lsh = result["stock"], result["lsh"]
        torch.testing.assert_close(lsh["out"], stock["out"], atol=1e-5, rtol=0)
        torch.testing.assert_close(lsh["grad_in"], stock["grad_in"], atol=1e-5, rtol=0)
        for name, grad in stock["grad_params"].items():
            torch.testing.assert_close(lsh["grad_params"][name], grad, atol=1e-5, rtol=0)


def test_each_tensor_parallel_rank_clusters_its_own_sequence_shard(tensor_parallel_parity):
    # 16 x 2 tokens per rank, top-2: each rank dispatches its own 64 rows, not the whole sequence.
    for rank_results in tensor_parallel_parity:
        stats = rank_results[0]["stats"]
        assert stats.tokens == 16 * 2 * 2
        assert stats.dispatch_bytes_stock > 0
        # Singletons: what returns is what stock returns, over the all-to-all and (expert tensor
        # parallel 2) the reduce-scatter among expert-tensor-parallel peers.
        assert stats.combine_bytes == stats.combine_bytes_stock > 0


def test_statistics_count_the_gather_among_expert_tensor_parallel_peers(tensor_parallel_parity):
    # Rows that cross the all-to-all, at 64 bf16 values each (as counted, whatever the run computes
    # in); expert tensor parallel 2 also sends
    # every row received to the peer and gets the peer's outputs back: more bytes than that.
    for rank_results in tensor_parallel_parity:
        stats = rank_results[0]["stats"]
        all_to_all_only = rank_results[0]["remote_rows"] * 64 * 2
        if rank_results[0]["expert_tensor_parallel"] == 1:
            assert stats.combine_bytes == all_to_all_only
        else:
            assert stats.combine_bytes > all_to_all_only


def test_experts_differ_across_ranks_and_the_router_is_shared(parity):
    first, second = parity[0][0]["params"], parity[1][0]["params"]
    assert torch.equal(first["router.weight"], second["router.weight"])
    expert_weight = "experts.local_experts.0.linear_fc1.weight"
    assert not torch.equal(first[expert_weight], second[expert_weight])


# (lsh_enabled, compensation, experts, top-k, distinct tokens or None for all distinct, hashes)
ROUND_TRIPS = {
    "stock dispatcher": (False, False, 4, 2, None, 6),
    "duplicated tokens, exact clusters, no compensation": (True, False, 4, 2, 5, 6),
    "duplicated tokens, several local experts": (True, False, 8, 2, 5, 6),
    "duplicated tokens, top-1": (True, False, 4, 1, 3, 6),
    "distinct tokens merged, compensation restores them": (True, True, 8, 2, None, 1),
    "distinct tokens merged, no compensation": (True, False, 8, 2, None, 1),
    # The round trip's expert is the identity: the fitted gain is 1, so E(c) + g (x - c) = x.
    "distinct tokens merged, expert-gain compensation": (True, "expert_gain", 8, 2, None, 1),
}
NOT_RESTORED = {"distinct tokens merged, no compensation"}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"ep{n}")
def round_trips(request):
    errors = run_distributed(round_trip_errors, request.param, list(ROUND_TRIPS.values()))
    return {name: [rank[i] for rank in errors] for i, name in enumerate(ROUND_TRIPS)}


@pytest.mark.parametrize("case", sorted(set(ROUND_TRIPS) - NOT_RESTORED))
def test_round_trip_restores_the_input(round_trips, case):
    # Rank 0 routes to the first experts only: a rank sending nothing to some ranks works too.
    for rank_result in round_trips[case]:
        assert rank_result["error"] < 1e-5


def test_round_trip_of_merged_tokens_without_compensation_gives_centroids(round_trips):
    for rank_result in round_trips["distinct tokens merged, no compensation"]:
        assert rank_result["error"] > 0.1


def test_round_trip_really_compressed(round_trips):
    for case, (lsh_enabled, *_) in ROUND_TRIPS.items():
        if lsh_enabled:
            assert all(r["rate"] < 0.8 for r in round_trips[case]), case


@pytest.mark.parametrize("world_size", [2, 4], ids=lambda n: f"ep{n}")
def test_bytes_on_the_wire_fall_to_the_compression_rate(world_size):
    ranks = run_distributed(clustered_traffic, world_size, 8, 2, 6)
    for r in ranks:
        # bf16 rows, and bf16 probs with megatron-core's rows (LSH keeps them home).
        stats, row_bytes = r["stats"], 64 * 2
        # Clusters are exactly the (prototype, expert) pairs.
        assert stats.centroids == r["expected_centroids"]
        assert stats.dispatch_bytes == r["expected_remote_centroids"] * row_bytes
        assert stats.dispatch_bytes_stock == r["expected_remote_rows"] * (row_bytes + 2)
        assert stats.combine_bytes_stock == r["expected_remote_rows"] * row_bytes
        assert stats.backward_bytes == stats.backward_bytes_stock == 0  # no gradients asked for
    # What the collectives really carried, both directions, summed over ranks.
    lsh_wire = sum(r["wire"]["lsh"] for r in ranks)
    stock_wire = sum(r["wire"]["stock"] for r in ranks)
    assert lsh_wire == sum(r["stats"].bytes_sent for r in ranks)
    assert stock_wire == sum(r["stats"].bytes_stock for r in ranks)
    rate = sum(r["stats"].centroids for r in ranks) / sum(r["stats"].tokens for r in ranks)
    assert rate < 0.2
    assert abs(lsh_wire / stock_wire - rate) < 0.05


def test_mxfp8_payloads_send_a_byte_an_element_and_a_scale_per_32():
    """Both forward all-to-alls in mxfp8, for megatron-core's rows and for LSH's centroids: the
    wire carries 64 + 2 bytes a row (and 2 for a stock row's prob), as the stats count it."""
    ranks = run_distributed(clustered_traffic, 2, 8, 2, 6, "mxfp8")
    for r in ranks:
        stock, lsh = r["stock_stats"], r["stats"]
        assert stock.dispatch_bytes == r["expected_remote_rows"] * (64 + 2 + 2)
        assert stock.combine_bytes == r["expected_remote_rows"] * (64 + 2)
        assert stock.dispatch_bytes_stock == r["expected_remote_rows"] * (128 + 2)
        assert lsh.dispatch_bytes == lsh.combine_bytes == r["expected_remote_centroids"] * (64 + 2)
        assert r["stock_round_trip_error"] < 2 ** -4  # e4m3's relative rounding, at most
        assert r["stock_round_trip_error"] > 0  # and it did round
    assert sum(r["wire"]["stock"] for r in ranks) == sum(r["stock_stats"].bytes_sent for r in ranks)
    assert sum(r["wire"]["lsh"] for r in ranks) == sum(r["stats"].bytes_sent for r in ranks)
    stock_ratio = sum(r["stock_stats"].bytes_sent for r in ranks) / sum(r["stock_stats"].bytes_stock for r in ranks)
    assert abs(stock_ratio - (2 * 66 + 2) / (2 * 128 + 2)) < 1e-9


def test_inter_node_scope_merges_only_rows_bound_for_other_nodes():
    """Two nodes of two ranks: rows for experts on the rank's own node travel exact, rows for
    the other node's experts merge into one centroid per (prototype, expert)."""
    ranks = run_distributed(scoped_traffic, 4, "inter-node", 2)
    row_bytes = 64 * 2  # bf16
    for r in ranks:
        stats = r["stats"]
        assert stats.tokens == r["off_node_rows"]  # the rate is a rate of the rows in scope
        assert stats.centroids == r["off_node_pairs"]
        assert stats.inter_node_bytes == r["off_node_pairs"] * 2 * row_bytes
        assert stats.inter_node_bytes_stock == r["off_node_rows"] * (2 * row_bytes + 2)
        # Every row to the neighbour on the same node crossed as itself.
        same_node_remote_rows = r["rows_to_other_ranks"] - r["off_node_rows"]
        assert stats.dispatch_bytes == (same_node_remote_rows + r["off_node_pairs"]) * row_bytes
        assert r["same_node_round_trip_error"] < 1e-5
    # Combine bytes are counted where outputs return to: the totals are what the wire carried.
    assert sum(r["wire"] for r in ranks) == sum(r["stats"].bytes_sent for r in ranks)
    # Rank 0 routes to its own node only; the others send the other node many rows.
    assert all(r["off_node_pairs"] < r["off_node_rows"] / 4 for r in ranks[1:])
    assert ranks[0]["stats"].inter_node_bytes_stock == 0


def test_all_scope_counts_inter_node_bytes_and_merges_same_node_rows_too():
    ranks = run_distributed(scoped_traffic, 4, "all", 2)
    row_bytes = 64 * 2  # bf16
    for r in ranks:
        stats = r["stats"]
        assert stats.tokens == r["off_node_rows"] + r["same_node_rows"]
        assert stats.inter_node_bytes == r["off_node_pairs"] * 2 * row_bytes
        assert stats.dispatch_bytes == (r["same_node_pairs_to_other_ranks"] + r["off_node_pairs"]) * row_bytes


# Expert parallel 2 trains in test_pretrain_gpt.py (2 ranks, LSH) and test_resume.py (stock).
@pytest.mark.parametrize("world_size, lsh_enabled", [(4, True)], ids=["ep4-lsh"])

def test_gpt_moe_trains_with_falling_loss(world_size, lsh_enabled):
    result = run_distributed(train_gpt_moe, world_size, lsh_enabled, 20)[0]
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    if lsh_enabled:
        assert set(result["rates"][-1]) == {"layer_1", "layer_2"}
        assert all(0 < rate < 1 for rate in result["rates"][-1].values())
    else:
        assert result["rates"][-1] == {}


# (settings, merge threshold, the host syncs LSH adds to stock's)
SYNC_CASES = [
    ({}, None, ["unique"]),                                      # fixed hashing
    ({"lsh_scope": "inter-node", "lsh_ranks_per_node": 1}, None, ["unique"]),
    ({"lsh_num_hashes": 4}, 0.5, ["__int__", "unique"]),         # the controller's coarse-to-fine path
    ({"lsh_error_bound": 0.3}, None, ["__int__", "unique"]),     # the error bound
    ({"lsh_error_bound": 0.3, "lsh_target_compression": 0.3}, 0.5, ["__int__", "unique"]),
]


@pytest.mark.slow
def test_lsh_dispatch_waits_for_the_host_at_most_twice_more_than_stock_megatron_core():
    """On a GPU every host sync stalls the stream. megatron-core's alltoall dispatcher reads its
    splits on the host (13 reads per layer step on CPU, the calls a GPU makes too). LSH adds
    the number of clusters, which sizes the centroids it sends, and on the coarse-to-fine path
    the number of finest clusters; its statistics stay on the device until the loop logs."""
    cases = [(settings, threshold) for settings, threshold, _ in SYNC_CASES]
    for counts, (_, _, added) in zip(run_distributed(host_syncs_per_layer_step, 2, cases)[0], SYNC_CASES):
        extra = list(counts["lsh"])
        for call in counts["stock"]:
            extra.remove(call)
        assert sorted(extra) == sorted(added), counts
        assert counts["lsh unmarked"] == [], counts  # each of ours marked '# NOTE: device-to-host sync'
        assert counts["stock unmarked"] == [], counts
