"""The compression controller: holds each layer's rate at the target as the data drift, takes
the same decision on every rank, and stops at the error bound."""

import math
from dataclasses import dataclass

import pytest

from megatron_lsh.moe.controller import DEAD_BAND, CompressionController
from megatron_lsh.moe.dispatcher import INITIAL_MERGE_THRESHOLD, initial_merge_threshold
from megatron_lsh.moe import LSHTransformerConfig
from tests.distributed import run_distributed


@dataclass
class FakeLayer:
    """A layer whose rate falls as the threshold grows, and rises as training spreads its states
    (the drift seen in the quickstart): rate = spread / (spread + threshold), clipped."""

    layer_name: str
    merge_threshold: float
    spread: float = 0.1
    window_rows: int = 0
    window_centroids: int = 0

    def forward(self, rows=8192):
        rate = min(1.0, self.spread / (self.spread + self.merge_threshold))
        self.window_rows += rows
        self.window_centroids += max(1, round(rate * rows))
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


def test_an_unreachable_target_leaves_the_threshold_at_its_limit_and_says_so(caplog):
    from megatron_lsh.moe.controller import MAX_THRESHOLD

    layer = FakeLayer("layer_2", 1.0, spread=1e9)  # the rate never falls
    controller = CompressionController([layer], target=0.2, bound=0.5)
    drive(controller, [layer], 200)
    assert layer.merge_threshold == MAX_THRESHOLD
    assert "--lsh-error-bound 0.5" in caplog.text


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
