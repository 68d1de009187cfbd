"""LSHTransformerConfig: defaults, and one clear error naming the setting for bad input."""

import pytest

from megatron_lsh.moe import LSHConfigError, LSHTransformerConfig

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=4)


def config(**settings):
    return LSHTransformerConfig(**{**BASE, **settings})


def test_defaults_use_the_alltoall_dispatcher_and_cross_polytope_hashing_without_compensation():
    c = config()
    assert c.lsh_enabled and c.moe_token_dispatcher_type == "alltoall"
    assert (c.lsh_hash_type, c.lsh_num_hashes, c.lsh_compensation) == ("cross_polytope", 6, "none")


def test_lsh_can_be_switched_off_for_stock_behaviour_with_any_dispatcher():
    c = config(lsh_enabled=False, moe_token_dispatcher_type="allgather")
    assert c.moe_token_dispatcher_type == "allgather"


@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(lsh_hash_type="hyperplane"), "lsh_hash_type"),
        (dict(lsh_num_hashes=0), "lsh_num_hashes"),
        (dict(lsh_num_hashes=2.5), "lsh_num_hashes"),
        (dict(lsh_num_buckets=1), "lsh_num_buckets"),
        (dict(lsh_num_buckets=5), "lsh_num_buckets"),
        (dict(lsh_num_hashes=40, lsh_num_buckets=16), "lsh_num_hashes"),
        (dict(lsh_redraw_interval=-1), "lsh_redraw_interval"),
        (dict(lsh_scope="intra-node"), "lsh_scope"),
        (dict(num_moe_experts=6, expert_model_parallel_size=4), "expert_model_parallel_size"),
        (dict(moe_token_dispatcher_type="allgather"), "moe_token_dispatcher_type"),
        (dict(moe_token_dispatcher_type="flex"), "moe_token_dispatcher_type"),
        (dict(num_moe_experts=None), "num_moe_experts"),
        (
            dict(moe_pad_expert_input_to_capacity=True, moe_expert_capacity_factor=1.0),
            "moe_pad_expert_input_to_capacity",
        ),
    ],
)
def test_bad_settings_raise_one_error_naming_the_setting(settings, named):
    with pytest.raises(LSHConfigError, match=named):
        config(**settings)


def test_spherical_hashing_accepts_odd_bucket_counts():
    assert config(lsh_hash_type="spherical", lsh_num_buckets=5).lsh_num_buckets == 5
