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


# -- one home per setting: the flags, the evaluation CLI and old checkpoints follow the fields --

from megatron_lsh.moe.config import PAYLOAD_SETTINGS, added_settings, flag_of, settings_before_they_existed  # noqa: E402
from megatron_lsh.training.arguments import build_parser, lsh_config_kwargs, parse_args  # noqa: E402
from megatron_lsh.training.config import in_flag_terms  # noqa: E402

TRAINING_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--micro-batch-size",
                  "2", "--train-iters", "2", "--lr", "1e-3", "--num-experts", "4"]


def test_every_lsh_setting_is_a_flag_of_its_own_name_except_the_listed_ones():
    flags = {f.name: flag_of(f) for f in added_settings()}
    exceptions = {"lsh_enabled": "--lsh", "lsh_ranks_per_node": None}
    for name, flag in flags.items():
        assert flag == exceptions.get(name, "--" + name.replace("_", "-"))
    options = {option for action in build_parser("test")._actions for option in action.option_strings}
    assert {flag for flag in flags.values() if flag} <= options


def test_flag_defaults_are_the_config_defaults_except_the_training_default():
    """Training's --lsh: the bound, 16 levels of hashes, 8-bit payloads; --no-lsh: stock bf16."""
    expected = {f.name: f.default for f in added_settings() if flag_of(f)}
    with_lsh = {**expected, "lsh_error_bound": 0.3, "lsh_num_hashes": 16,
                **{name: "mxfp8" for name in PAYLOAD_SETTINGS}}
    assert lsh_config_kwargs(parse_args("test", TRAINING_FLAGS)) == with_lsh
    assert lsh_config_kwargs(parse_args("test", TRAINING_FLAGS + ["--no-lsh"])) == {
        **with_lsh, "lsh_enabled": False, **{name: "bf16" for name in PAYLOAD_SETTINGS}}
    # A format given explicitly holds either way.
    given = parse_args("test", TRAINING_FLAGS + ["--no-lsh", "--moe-dispatch-fwd-dtype", "mxfp8"])
    assert (given.moe_dispatch_fwd_dtype, given.moe_combine_fwd_dtype) == ("mxfp8", "bf16")


def test_a_flag_reaches_its_config_field_with_off_as_none():
    args = parse_args("test", TRAINING_FLAGS + ["--lsh-num-hashes", "3", "--lsh-target-compression", "off",
                                                "--lsh-error-bound", "0.25", "--no-lsh", "--lsh-error-compensation"])
    kwargs = lsh_config_kwargs(args)
    assert (kwargs["lsh_num_hashes"], kwargs["lsh_target_compression"], kwargs["lsh_error_bound"]) == (3, None, 0.25)
    assert (kwargs["lsh_enabled"], kwargs["lsh_compensation"]) == (False, "residual")


@pytest.mark.parametrize("settings, flag_message", [
    (dict(lsh_target_compression=1.5), "--lsh-target-compression 1.5 must be in (0, 1] (centroids per token row, "
                                        "e.g. 0.2), or 'off' for fixed hashing"),
    (dict(lsh_error_bound=-1.0), "--lsh-error-bound -1.0 must be a positive number"),
    (dict(lsh_hash_type="hyperplane"), "--lsh-hash-type hyperplane is not supported"),
    (dict(lsh_enabled=False, lsh_gradient_study="exact_values"), "--lsh-gradient-study compares LSH with the exact "
                                                                  "MoE, so it needs --lsh"),
    (dict(moe_token_dispatcher_type="allgather"), "set --moe-token-dispatcher-type alltoall or --no-lsh"),
    (dict(num_moe_experts=6, expert_model_parallel_size=4), "--num-experts 6 is not divisible by "
                                                             "--expert-model-parallel-size 4"),
    (dict(moe_dispatch_fwd_dtype="fp4"), "--moe-dispatch-fwd-dtype fp4: 'fp4' is not a payload format; "
                                         "use one of 'bf16', 'mxfp8'"),
    (dict(moe_combine_bwd_dtype="mxfp8", hidden_size=48, num_attention_heads=4),
     "--moe-combine-bwd-dtype mxfp8: 'mxfp8' scales blocks of 32 elements, which do not divide the hidden size 48"),
    (dict(lsh_split="bisect"), "--lsh-split bisect halves clusters until every member is within "
                               "--lsh-error-bound off: set --lsh-error-bound (e.g. 0.3), or use --lsh-split hash"),
    (dict(lsh_split="bisect", lsh_error_bound=0.3, lsh_target_compression=0.3),
     "--lsh-split bisect cannot hold --lsh-target-compression 0.3"),
    (dict(moe_dispatch_fwd_dtype="mxfp8", moe_token_dispatcher_type="allgather", lsh_enabled=False),
     "low-precision payloads are sent by the all-to-all dispatcher, but --moe-token-dispatcher-type "
     "allgather; set --moe-token-dispatcher-type alltoall"),
])
def test_config_errors_read_in_the_flags_the_user_typed(settings, flag_message):
    with pytest.raises(LSHConfigError) as error:
        config(**settings)
    assert flag_message in in_flag_terms(error.value)
    assert "None" not in in_flag_terms(error.value)


def test_a_run_saved_before_a_setting_existed_loads_with_what_it_ran_with():
    bf16_payloads = {name: "bf16" for name in PAYLOAD_SETTINGS}
    assert settings_before_they_existed({"lsh_error_compensation": True}) == {
        "lsh_compensation": "residual", "lsh_error_bound": None, "lsh_target_compression": None,
        "lsh_split": "hash", "moe_payload_bwd_rounding": "nearest", **bf16_payloads}
    assert settings_before_they_existed({"lsh_compensation": "none", "lsh_error_bound": 0.3,
                                         "lsh_target_compression": 0.3, "lsh_split": "hash",
                                         "moe_payload_bwd_rounding": "nearest", **bf16_payloads}) == {}


def test_evaluation_overrides_only_the_lsh_settings_given_and_off_means_no_bound():
    from megatron_lsh.tools.evaluate import parse_args as evaluation_args

    _, overrides = evaluation_args(["--load", "ckpt", "--input", "held_out.jsonl", "--lsh"])
    assert overrides == {}
    _, overrides = evaluation_args(["--load", "ckpt", "--input", "held_out.jsonl", "--lsh", "--lsh-num-hashes", "4",
                                    "--lsh-error-bound", "off", "--lsh-hash-type", "spherical"])
    assert overrides == {"lsh_num_hashes": 4, "lsh_error_bound": None, "lsh_hash_type": "spherical"}
    with pytest.raises(SystemExit):
        evaluation_args(["--load", "ckpt", "--input", "x.jsonl", "--lsh-target-compression", "0.3"])
