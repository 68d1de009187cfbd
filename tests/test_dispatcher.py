"""LSHAlltoAllTokenDispatcher at the layer level against a reference written apart: one rank in
the fast tier, two in the slow one."""

import pytest

from tests.distributed import run_distributed
from tests.moe_workers import merged_clusters_against_reference


@pytest.mark.parametrize("world_size", [1, pytest.param(2, marks=pytest.mark.slow)], ids=lambda n: f"ep{n}")
def test_merged_clusters_give_each_token_its_probs_times_its_experts_output_on_the_centroid(world_size):
    for result in run_distributed(merged_clusters_against_reference, world_size):
        assert result["clusters_seen"] < result["rows"] / 4  # clusters really merge rows
        assert (result["stats_centroids"], result["stats_rows"]) == (result["clusters_seen"], result["rows"])
        assert result["max_difference"] < 1e-5 * result["scale"], result
