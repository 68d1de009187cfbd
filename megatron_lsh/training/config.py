"""The megatron-core TransformerConfig (LSHTransformerConfig) that the flags describe."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lsh.checkpoint.hf_architectures import routes_pre_softmax
from megatron_lsh.moe import LSHConfigError, LSHTransformerConfig
from megatron_lsh.training.arguments import ArgumentError, lsh_config_kwargs

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}

# Flag names of the LSHTransformerConfig settings, for error messages.
_FLAG_OF_SETTING = {
    "lsh_hash_type": "--lsh-hash-type",
    "lsh_num_hashes": "--lsh-num-hashes",
    "lsh_num_buckets": "--lsh-num-buckets",
    "lsh_redraw_interval": "--lsh-redraw-interval",
    "lsh_scope": "--lsh-scope",
    "lsh_compensation": "--lsh-compensation",
    "lsh_error_bound": "--lsh-error-bound",
    "lsh_target_compression": "--lsh-target-compression",
    "lsh_gradient_study": "--lsh-gradient-study",
    "expert_tensor_parallel_size": "--expert-tensor-parallel-size",
    "num_moe_experts": "--num-experts",
    "expert_model_parallel_size": "--expert-model-parallel-size",
    "moe_token_dispatcher_type": "--moe-token-dispatcher-type",
}


def transformer_config_from_args(args, **overrides) -> LSHTransformerConfig:
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    settings = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        kv_channels=args.kv_channels,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        add_bias_linear=not args.disable_bias_linear,
        gated_linear_unit=args.swiglu,
        qk_layernorm=getattr(args, "qk_layernorm", False),
        activation_func=_ACTIVATIONS[args.activation or ("silu" if args.swiglu else "gelu")],
        softmax_scale=args.attention_softmax_scale,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        params_dtype=dtype,
        bf16=args.bf16,
        pipeline_dtype=dtype,
        num_moe_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_layer_freq=args.moe_layer_freq,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_z_loss_coeff=args.moe_z_loss_coeff,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_router_pre_softmax=routes_pre_softmax(vars(args)),
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_expert_capacity_factor=args.moe_expert_capacity_factor,
        expert_model_parallel_size=args.expert_model_parallel_size,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        sequence_parallel=getattr(args, "sequence_parallel", False),
        expert_tensor_parallel_size=getattr(args, "expert_tensor_parallel_size", None)
        or args.tensor_model_parallel_size,
        pipeline_model_parallel_size=getattr(args, "pipeline_model_parallel_size", 1),
        virtual_pipeline_model_parallel_size=getattr(args, "virtual_pipeline_model_parallel_size", None),
        # gloo has no coalesced point-to-point: the pipeline sends one tensor at a time there.
        batch_p2p_comm=torch.cuda.is_available(),
        **lsh_config_kwargs(args),
    )
    settings.update(overrides)
    try:
        return LSHTransformerConfig(**settings)
    except LSHConfigError as error:
        message = str(error)
        for setting, flag in _FLAG_OF_SETTING.items():
            message = message.replace(setting, flag)
        raise ArgumentError(message) from None
    except (AssertionError, ValueError) as error:
        raise ArgumentError(f"megatron-core rejects these model flags: {error}") from None
