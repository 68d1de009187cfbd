"""What a checkpoint's flags must say for Hugging Face to hold the same model.

One list of requirements per architecture serves both directions: ``--hf-architecture NAME``
sets every flag the user left unset and refuses the ones set otherwise, and the converter checks
a saved run against the same list, naming the flags that would have made it exportable.

MixtralForCausalLM: RMSNorm, rotary positions, SwiGLU experts in every layer, no biases, untied
output layer, softmax-then-top-k routing renormalised over the k chosen (megatron-core's top-k of
the logits followed by a softmax over them is the same), top-k of at least 2 (Mixtral gives a
single chosen expert the weight 1, megatron-core's pre-softmax top-1 does not), dropless.

Qwen3MoeForCausalLM: the decoder for dense and MoE layers interleaved. Each layer is sparse or
dense by its own list (``mlp_only_layers``), so any ``--moe-layer-freq`` maps exactly, with the
dense layers' SwiGLU width (``intermediate_size``) apart from the experts'
(``moe_intermediate_size``). Otherwise as Mixtral, plus RMSNorm on each head's queries and keys
(``--qk-layernorm``); either routing: softmax over the top-k logits (renormalised, ``norm_topk_prob``)
or, with --moe-router-pre-softmax and for top-1 (which megatron-lsh routes pre-softmax), the
softmax over all experts' logits kept as it is. Chosen over Qwen2-MoE (always a shared expert, biased QKV) and
DeepSeek-V2/V3
(MLA attention, dense layers only first), which megatron-lsh's models cannot express.

SwitchTransformersForConditionalGeneration: T5 with RMSNorm (no bias, no mean), ReLU MLPs, no
biases, relative position buckets computed in the first layer and shared by every layer of a
stack, attention scores not scaled by 1/sqrt(d), untied LM head (a tied one would rescale the
decoder output), top-1 routing with the probability of the chosen expert as its weight, sparse
layers where ``i % sparse_step == 1`` (every layer for step 1), one d_ff for dense and expert MLPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

from megatron_lsh.models.t5 import moe_layer_patterns

ARCHITECTURES = ("mixtral", "qwen3_moe", "switch_transformers")
MODEL_OF_ARCHITECTURE = {"mixtral": "gpt", "qwen3_moe": "gpt", "switch_transformers": "t5"}


class NotExportableError(ValueError):
    """A checkpoint whose architecture has no Hugging Face equivalent; names the flags to fix."""


class ArchitectureFlagError(ValueError):
    """--hf-architecture contradicts a flag the user set; names the flag it needs."""


@dataclass
class Requirement:
    flag: str  # what to pass to satisfy it
    holds: Callable[[dict], bool]
    setting: Optional[dict] = None  # what --hf-architecture sets when the user left it unset


def _get(args: dict, name, default=None):
    value = args.get(name, default)
    return default if value is None else value


def switch_sparse_pattern(num_layers: int, sparse_step: int) -> List[int]:
    """Hugging Face's SwitchTransformersStack placement of sparse (MoE) layers."""
    return [int(sparse_step > 0 and (i % sparse_step == 1 or sparse_step == 1)) for i in range(num_layers)]


def switch_sparse_step(pattern: List[int]) -> Optional[int]:
    """The sparse step giving this pattern in Hugging Face, or None."""
    for step in range(0, len(pattern) + 1):
        if switch_sparse_pattern(len(pattern), step) == list(pattern):
            return step
    return None


def gpt_moe_pattern(args: dict) -> List[int]:
    """megatron-core's MoE layer placement for GPT: every N-th layer from the first, or a list
    (none in a dense model, without --num-experts)."""
    freq, layers = _get(args, "moe_layer_freq", 1), _get(args, "num_layers", 0)
    if args.get("num_experts", 1) is None:
        return [0] * layers
    if isinstance(freq, int):
        return [int(i % freq == 0) for i in range(layers)]
    return list(freq)


def routes_pre_softmax(args: dict) -> bool:
    """Whether the run weighted experts by the softmax over all logits (megatron-lsh routes top-1
    that way, as Switch does) rather than over the k chosen."""
    return bool(args.get("moe_router_pre_softmax")) or _get(args, "moe_router_topk", 2) == 1


def t5_patterns(args: dict):
    return moe_layer_patterns(
        _get(args, "moe_layer_freq", 1), args["encoder_num_layers"], args["decoder_num_layers"]
    )


def _switch_placement_holds(args: dict) -> bool:
    try:
        encoder, decoder = t5_patterns(args)
    except (ValueError, KeyError):
        return False
    return switch_sparse_step(encoder) is not None and switch_sparse_step(decoder) is not None


_COMMON = [
    Requirement("--normalization RMSNorm", lambda a: a.get("normalization") == "RMSNorm", {"normalization": "RMSNorm"}),
    Requirement("--disable-bias-linear", lambda a: bool(a.get("disable_bias_linear")), {"disable_bias_linear": True}),
    Requirement("--untie-embeddings-and-output-weights", lambda a: bool(a.get("untie_embeddings_and_output_weights")),
                {"untie_embeddings_and_output_weights": True}),
    Requirement("no --moe-expert-capacity-factor (dropless routing)",
                lambda a: a.get("moe_expert_capacity_factor") is None),
]

_DECODER = [
    Requirement("--swiglu", lambda a: bool(a.get("swiglu")), {"swiglu": True}),
    Requirement("--position-embedding-type rope", lambda a: a.get("position_embedding_type") == "rope",
                {"position_embedding_type": "rope"}),
    Requirement("no --attention-softmax-scale", lambda a: a.get("attention_softmax_scale") is None),
    Requirement("no --activation (SwiGLU's SiLU)", lambda a: a.get("activation") in (None, "silu")),
]

REQUIREMENTS = {
    "qwen3_moe": _COMMON + _DECODER + [
        Requirement("--qk-layernorm", lambda a: bool(a.get("qk_layernorm")), {"qk_layernorm": True}),
    ],
    "mixtral": _COMMON + _DECODER + [
        Requirement("--moe-layer-freq 1 (experts in every layer)",
                    lambda a: _get(a, "moe_layer_freq", 1) in (1, [1] * _get(a, "num_layers", 0)),
                    {"moe_layer_freq": 1}),
        Requirement("--moe-router-topk 2 or more", lambda a: _get(a, "moe_router_topk", 2) >= 2,
                    {"moe_router_topk": 2}),
        Requirement("no --moe-router-pre-softmax", lambda a: not a.get("moe_router_pre_softmax")),
        Requirement("no --qk-layernorm", lambda a: not a.get("qk_layernorm")),
    ],
    "switch_transformers": _COMMON + [
        Requirement("--activation relu", lambda a: a.get("activation") == "relu" and not a.get("swiglu"),
                    {"activation": "relu"}),
        Requirement("--position-embedding-type relative", lambda a: a.get("position_embedding_type") == "relative",
                    {"position_embedding_type": "relative"}),
        Requirement("--attention-softmax-scale 1.0", lambda a: a.get("attention_softmax_scale") == 1.0,
                    {"attention_softmax_scale": 1.0}),
        Requirement("--moe-router-topk 1", lambda a: _get(a, "moe_router_topk", 2) == 1, {"moe_router_topk": 1}),
        Requirement("--moe-ffn-hidden-size equal to --ffn-hidden-size",
                    lambda a: a.get("moe_ffn_hidden_size") in (None, a.get("ffn_hidden_size"))),
        Requirement("--moe-layer-freq placing experts where Hugging Face does (every layer, or layers i with "
                    "i % N == 1, e.g. [0,1,0,1])", _switch_placement_holds),
    ],
}


def apply_architecture(args, name: str, model: str) -> None:
    """--hf-architecture NAME: set what the user left unset, refuse what contradicts it
    (ArchitectureFlagError)."""
    if MODEL_OF_ARCHITECTURE[name] != model:
        raise ArchitectureFlagError(f"--hf-architecture {name} is a {MODEL_OF_ARCHITECTURE[name].upper()} "
                                    f"architecture, not {model.upper()}")
    values = vars(args)
    for requirement in REQUIREMENTS[name]:
        if requirement.holds(values):
            continue
        setting = requirement.setting or {}
        if setting and all(values.get(key) in (None, False) for key in setting):
            values.update(setting)
            continue
        if (name == "switch_transformers" and requirement.flag.startswith("--moe-layer-freq")
                and isinstance(values.get("moe_layer_freq"), int)):
            # An every-N-layers request, placed where Hugging Face puts sparse layers.
            step = values["moe_layer_freq"]
            values["moe_layer_freq"] = (switch_sparse_pattern(values["encoder_num_layers"], step)
                                        + switch_sparse_pattern(values["decoder_num_layers"], step))
            if requirement.holds(values):
                continue
        raise ArchitectureFlagError(f"--hf-architecture {name} needs {requirement.flag}")


def missing_flags(args: dict, name: str) -> List[str]:
    return [r.flag for r in REQUIREMENTS[name] if not r.holds(args)]


def exportable_architecture(args: dict, model: str) -> str:
    """The first architecture of ``model`` ('gpt' or 't5') that holds this saved run, or
    NotExportableError naming, for each candidate, the flags that would have made it fit."""
    candidates = [name for name in ARCHITECTURES if MODEL_OF_ARCHITECTURE[name] == model]
    for name in candidates:
        if not missing_flags(args, name):
            return name
    raise NotExportableError(
        "this checkpoint has no equivalent in Hugging Face; "
        + "; or ".join(f"for {name} train with {', '.join(missing_flags(args, name))} (--hf-architecture {name} "
                       "sets them)" for name in candidates)
    )
