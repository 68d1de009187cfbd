"""The compression controller: holds each layer's rate at the target as the data drift, takes
the same decision on every rank, and stops at the error bound."""

import math
from dataclasses import dataclass

import pytest

from megatron_lsh.moe import LSHTransformerConfig
from megatron_lsh.moe.controller import DEAD_BAND, CompressionController
from megatron_lsh.moe.dispatcher import INITIAL_MERGE_THRESHOLD, initial_merge_threshold
from tests.distributed import run_distributed


@dataclass
class FakeLayer:
    """A layer whose rate falls as the threshold grows, and rises as training spreads its states
    (the drift seen in the quickstart): rate = spread / (spread + threshold), but never below
    ``bound_rate``, the rate at which the error bound keeps every cluster from growing."""

    layer_name: str
    merge_threshold: float
    spread: float = 0.1
    bound_rate: float = 0.0
    window_rows: int = 0
    window_centroids: int = 0
    window_threshold_splits: int = 0
    window_threshold_kept: int = 0

    def forward(self, rows=8192):
        free_rate = min(1.0, self.spread / (self.spread + self.merge_threshold))
        rate = max(free_rate, self.bound_rate)
        self.window_rows += rows
        self.window_centroids += max(1, round(rate * rows))
        # The threshold splits clusters as long as it, not the bound, sets the rate; it keeps
        # clusters whole as long as any row merges.
        self.window_threshold_splits += int(free_rate > self.bound_rate)
        self.window_threshold_kept += int(rate < 1.0)
        return rate


def drive(controller, layers, steps, drift=0.0):
    rates = []
    for _ in range(steps):
        rates.append([layer.forward() for layer in layers])
        controller.update()
        for layer in layers:
            layer.spread *= 1 + drift
    return rates


def test_rate_converges_to_the_target_and_holds_while_states_spread_out():
    layers = [FakeLayer("layer_2", 0.5, spread=0.05), FakeLayer("layer_4", 0.5, spread=0.4)]
    controller = CompressionController(layers, target=0.2, bound=None)
    drive(controller, layers, 150)
    # Spread grows 5x over the next 1600 steps, as hidden states do in training.
    held = drive(controller, layers, 1600, drift=math.log(5) / 1600)
    for rates in held[-100:]:
        for rate in rates:
            assert abs(math.log(rate / 0.2)) <= DEAD_BAND + 0.02, rates


def test_noise_inside_the_dead_band_leaves_the_threshold_alone():
    layer = FakeLayer("layer_2", 0.4, spread=0.1)  # rate 0.2 exactly
    controller = CompressionController([layer], target=0.2, bound=None)
    drive(controller, [layer], 20)
    assert layer.merge_threshold == 0.4


def test_a_target_the_bound_forbids_stops_the_threshold_where_it_stops_acting_and_says_so(caplog):
    layer = FakeLayer("layer_2", 1.0, spread=5.0, bound_rate=0.6)  # the bound holds the rate at 0.6
    controller = CompressionController([layer], target=0.2, bound=0.5)
    rates = drive(controller, [layer], 300)
    assert rates[0][0] > 0.8 and rates[-1] == [0.6]
    # No windup: the threshold stopped rising once the bound, not the threshold, set the rate
    # (within one step of the point where it did).
    assert 0.6 * 0.8 < 5.0 / (5.0 + layer.merge_threshold) <= 0.6
    assert caplog.text.count("layer_2: compression 0.600 cannot reach its target 0.2: every cluster is as "
                             "coarse as --lsh-error-bound 0.5 allows") == 1
    # So when the data let it, the layer reaches the target within a few dozen steps.
    layer.bound_rate = 0.0
    rates = drive(controller, [layer], 40)
    assert abs(math.log(rates[-1][0] / 0.2)) <= DEAD_BAND + 0.02, rates


def test_a_layer_that_merges_more_than_asked_reaches_the_target_from_below():
    # Early in training every token looks alike: the first threshold merges far beyond the target.
    layer = FakeLayer("layer_2", 1.0, spread=0.01)
    controller = CompressionController([layer], target=0.3, bound=None)
    rates = drive(controller, [layer], 60)
    assert rates[0][0] < 0.02
    assert abs(math.log(rates[-1][0] / 0.3)) <= DEAD_BAND + 0.02, rates


def test_state_round_trips_by_layer_name_and_refuses_a_missing_layer():
    layers = [FakeLayer("layer_2", 0.7), FakeLayer("layer_4", 0.01)]
    state = CompressionController(layers, 0.2, None).state_dict()
    fresh = [FakeLayer("layer_2", 0.5), FakeLayer("layer_4", 0.5)]
    CompressionController(fresh, 0.2, None).load_state_dict(state)
    assert [layer.merge_threshold for layer in fresh] == [0.7, 0.01]
    with pytest.raises(KeyError, match="layer_6"):
        CompressionController([FakeLayer("layer_6", 0.5)], 0.2, None).load_state_dict(state)


def test_only_a_target_starts_a_merge_threshold():
    base = dict(num_layers=1, hidden_size=64, num_attention_heads=4, num_moe_experts=4)
    assert initial_merge_threshold(LSHTransformerConfig(**base)) is None
    assert initial_merge_threshold(LSHTransformerConfig(**base, lsh_error_bound=0.3)) is None
    assert initial_merge_threshold(LSHTransformerConfig(**base, lsh_target_compression=0.2)) == INITIAL_MERGE_THRESHOLD


def _thresholds_after_updates(rank, world_size):
    from megatron_lsh.training.initialize import initialize_distributed

    initialize_distributed(expert_model_parallel_size=world_size, seed=1)
    # Each rank sees different data, so different local rates.
    layers = [FakeLayer("layer_2", 0.5, spread=0.05 * (rank + 1)), FakeLayer("layer_4", 0.5, spread=0.3 + rank)]
    controller = CompressionController(layers, target=0.2, bound=None)
    drive(controller, layers, 30)
    return controller.thresholds()


@pytest.mark.slow
def test_every_rank_takes_the_same_decision_from_all_reduced_counts():
    thresholds = run_distributed(_thresholds_after_updates, 2)
    assert thresholds[0] == thresholds[1]
    assert thresholds[0]["layer_2"] != 0.5 and thresholds[0]["layer_4"] != 0.5


def _thresholds_of_two_pipeline_stages(rank, world_size):
    from megatron_lsh.moe.stats import layer_names_of_group
    from megatron_lsh.training.initialize import initialize_distributed

    initialize_distributed(expert_model_parallel_size=1, seed=1)
    # Rank 0 holds the first stage's layer, rank 1 the second's.
    layers = [FakeLayer(f"layer_{2 + 2 * rank}", 0.5, spread=0.05 + 0.3 * rank)]
    controller = CompressionController(layers, 0.2, None, layer_names_of_group([layers[0].layer_name]))
    drive(controller, layers, 30)
    return controller.state_dict(), {layer.layer_name: layer.merge_threshold for layer in layers}


@pytest.mark.slow
def test_pipeline_stages_follow_every_layer_so_any_rank_can_save_them():
    (state_0, held_0), (state_1, held_1) = run_distributed(_thresholds_of_two_pipeline_stages, 2)
    assert state_0 == state_1 and set(state_0) == {"layer_2", "layer_4"}
    assert held_0 == {"layer_2": state_0["layer_2"]} and held_1 == {"layer_4": state_0["layer_4"]}
    assert state_0["layer_2"] != state_0["layer_4"]  # each steered by its own stage's counts
