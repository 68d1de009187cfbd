"""The megatron-core TransformerConfig (LSHTransformerConfig) that the flags describe."""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnBackend

from megatron_lsh.models.architectures import routes_pre_softmax
from megatron_lsh.moe import LSHConfigError, LSHTransformerConfig
from megatron_lsh.moe.config import added_settings, flag_named_after, flag_of
from megatron_lsh.training.arguments import ArgumentError, lsh_config_kwargs

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}

# megatron-core settings whose flag is not their name with dashes (Megatron-LM's names).
_FLAG_EXCEPTIONS = {"num_moe_experts": "--num-experts"}
# The other megatron-core settings LSHTransformerConfig's checks name.
_MEGATRON_SETTINGS_NAMED = ("expert_tensor_parallel_size", "expert_model_parallel_size",
                            "moe_token_dispatcher_type", "moe_pad_expert_input_to_capacity",
                            "moe_router_padding_for_quantization")


def _flags_of_settings() -> dict:
    """setting -> (flag, the flag's word for None or None): every setting a config error names."""
    flags = {f.name: (flag_of(f), f.metadata["off"]) for f in added_settings() if flag_of(f) is not None}
    flags.update({name: (flag_named_after(name), None) for name in _MEGATRON_SETTINGS_NAMED})
    flags.update({name: (flag, None) for name, flag in _FLAG_EXCEPTIONS.items()})
    return flags


def in_flag_terms(error: LSHConfigError) -> str:
    """A config error as the command-line user wrote it: ``lsh_target_compression=1.5 ... or
    None`` becomes ``--lsh-target-compression 1.5 ... or 'off'``, ``lsh_enabled=False``
    ``--no-lsh``."""
    message = str(error)
    flags = _flags_of_settings()

    def as_flag(match) -> str:
        name, value = match.group(1), match.group(2)
        flag, off = flags[name]
        if value == "True":
            return flag
        if value == "False":
            return "--no-" + flag[2:]
        if value == "None":
            return f"{flag} {off or 'unset'}"
        return f"{flag} {value.strip(chr(39))}"

    names = "|".join(sorted(flags, key=len, reverse=True))
    message = re.sub(rf"\b({names})=('[^']*'|[^\s,;:)]+)", as_flag, message)
    message = re.sub(rf"\b({names})\b", lambda m: flags[m.group(1)][0], message)
    off = flags.get(error.setting, (None, None))[1]
    if off is not None:
        message = message.replace("or None", f"or '{off}'")
    return message


# megatron-core's local layers run unfused here, whatever Megatron-LM's fusion flags (on by default
# there) say: these TransformerConfig fields are not taken from the flags of the same name.
_UNFUSED = dict(bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
                apply_rope_fusion=False, persist_layer_norm=False)


def transformer_config_from_args(args, **overrides) -> LSHTransformerConfig:
    """As Megatron-LM builds it: every TransformerConfig field that a flag of the same name sets
    (None: megatron-core's default), then the renamed and derived ones listed here, then the LSH
    settings (moe/config.py). A new megatron-core flag with a same-named field needs nothing here."""
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if getattr(args, "fp16", False) else torch.float32
    settings = {field.name: getattr(args, field.name) for field in dataclasses.fields(LSHTransformerConfig)
                if getattr(args, field.name, None) is not None}
    settings.update(_UNFUSED)
    settings.update(
        # Megatron-LM's flag names for these fields (the flag's destination, as there).
        num_moe_experts=args.num_experts,
        layernorm_epsilon=args.norm_epsilon,
        layernorm_zero_centered_gamma=getattr(args, "apply_layernorm_1p", False),
        add_bias_linear=not args.disable_bias_linear,
        gated_linear_unit=args.swiglu,
        softmax_scale=args.attention_softmax_scale,
        # Derived from several flags.
        attention_backend=AttnBackend[getattr(args, "attention_backend", "auto")],
        activation_func=_ACTIVATIONS[args.activation or ("silu" if args.swiglu else "gelu")],
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        moe_router_pre_softmax=routes_pre_softmax(vars(args)),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        expert_tensor_parallel_size=getattr(args, "expert_tensor_parallel_size", None)
        or args.tensor_model_parallel_size,
        # gloo has no coalesced point-to-point: the pipeline sends one tensor at a time there.
        batch_p2p_comm=torch.cuda.is_available(),
        **lsh_config_kwargs(args),
    )
    settings.update(overrides)
    try:
        return LSHTransformerConfig(**settings)
    except LSHConfigError as error:
        raise ArgumentError(in_flag_terms(error)) from None
    except (AssertionError, ValueError) as error:
        raise ArgumentError(f"megatron-core rejects these model flags: {error}") from None
