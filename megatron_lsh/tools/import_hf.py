"""A Hugging Face model as a megatron-lsh checkpoint, to continue pretraining it.

    python -m megatron_lsh.tools.import_hf --hf-model hf/Qwen3-30B-A3B --save checkpoints/qwen3
    python -m megatron_lsh.tools.import_hf --hf-model hf/Qwen3-0.6B --save checkpoints/up \\
        --moe-upcycle --num-experts 8 --moe-router-topk 2

Reads config.json and the safetensors weights (the hub's layout) of MixtralForCausalLM,
Qwen3MoeForCausalLM (dense and MoE layers interleaved, q/k norms) or
SwitchTransformersForConditionalGeneration (a T5-MoE, trained on dropless: its expert capacity is
not kept), or of a dense Qwen3 / Llama model
with ``--moe-upcycle`` (sparse upcycling, Komatsuzaki et al. 2023: every expert starts as a copy of
the layer's MLP; with the top-k weights renormalised to sum to 1, the MoE's first forward is the
dense model's whatever the router says). Writes iteration 0 of a checkpoint (model weights only,
in megatron-core's dist_checkpointing format, so any parallel layout loads it) with the model's
tokenizer beside it, and prints the flags that training needs to continue it:

    torchrun ... pretrain_gpt_moe.py <printed flags> --load checkpoints/qwen3 --finetune \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model hf/Qwen3-30B-A3B ...

The embedding and output tables keep the model's rows: ``--make-vocab-size-divisible-by`` is set
to its vocabulary size (which every tensor-parallel size that divides it keeps). A model this
cannot express (another architecture, activation, biases, sliding windows, rope scaling) gets one
error naming what does not fit; nothing is written before every weight has been checked.
megatron-core's upcycling utilities convert a megatron dense model in memory; here the dense
weights come from Hugging Face, so they go straight into the experts.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import sys
from typing import Dict, List, Optional

import torch

from megatron_lsh.data.tokenizer import HuggingFaceTokenizer, TokenizerError
from megatron_lsh.models.architectures import switch_sparse_pattern
from megatron_lsh.training.arguments import ArgumentError, parse_args, validate_args
from megatron_lsh.training.checkpointing import CheckpointError, find_latest_checkpoint, save_checkpoint
from megatron_lsh.training.config import transformer_config_from_args
from megatron_lsh.training.gpt_task import GPT_TASK
from megatron_lsh.training.initialize import free_port, initialize_distributed
from megatron_lsh.training.t5_task import T5_TASK, add_t5_args
from megatron_lsh.training.task import padded_vocab_size

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
MOE_TYPES = ("mixtral", "qwen3_moe", "switch_transformers")
DENSE_TYPES = ("qwen3", "llama")  # with --moe-upcycle
# The MoE architecture each dense one becomes (Qwen3's q/k norms are Qwen3-MoE's).
UPCYCLED_AS = {"qwen3": "qwen3_moe", "llama": "mixtral"}


class HFImportError(ValueError):
    """A directory or model that cannot be imported; the message names the file, field or flag."""


def read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir) or not os.path.isfile(path):
        raise HFImportError(f"--hf-model {hf_dir}: no config.json there; not a Hugging Face model directory")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as error:
        raise HFImportError(f"{path} is not valid JSON ({error})") from None
    model_type = config.get("model_type")
    if model_type not in MOE_TYPES + DENSE_TYPES:
        raise HFImportError(
            f"{path}: model_type {model_type!r} is not importable; megatron-lsh imports "
            f"{', '.join(MOE_TYPES)} and, with --moe-upcycle, the dense {', '.join(DENSE_TYPES)}")
    return config


def read_weights(hf_dir: str) -> Dict[str, Tensor]:
    """Every tensor of the model's safetensors files (sharded or not), by name."""
    from safetensors.torch import load_file

    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise HFImportError(f"--hf-model {hf_dir}: no *.safetensors weights (pytorch_model.bin is not read; "
                            "save the model with save_pretrained(..., safe_serialization=True))")
    weights = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            raise HFImportError(f"{index} names {name}, which is missing from {hf_dir}")
        weights.update(load_file(path))
    return weights


def _rope_theta(config: dict, path: str) -> int:
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    rope_type = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise HFImportError(f"{path}: rope type {rope_type!r} (rope scaling) cannot be expressed; megatron-lsh "
                            "applies plain rotary embeddings (--rotary-base)")
    theta = config.get("rope_theta", parameters.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise HFImportError(f"{path}: rope_theta {theta} is not an integer, which --rotary-base takes")
    return int(theta)


def _require(config: dict, path: str, field: str, allowed, why: str) -> None:
    value = config.get(field)
    if value not in allowed:
        raise HFImportError(f"{path}: {field}={json.dumps(value)} cannot be expressed ({why})")


def _field(config: dict, path: str, *names: str):
    """The first of ``names`` the config has (transformers versions spell some fields apart)."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    raise HFImportError(f"{path} has no {' or '.join(names)}")


def model_flags(config: dict, hf_dir: str, upcycle: Optional[dict] = None) -> List[str]:
    """The training flags that build the model of ``config`` (a dense one upcycled with
    ``upcycle`` = {'num_experts', 'topk'})."""
    path = os.path.join(hf_dir, "config.json")
    model_type = config["model_type"]
    if model_type in DENSE_TYPES and upcycle is None:
        raise HFImportError(f"{path}: {model_type} is a dense model and megatron-lsh trains MoE models; pass "
                            "--moe-upcycle --num-experts N to start every expert as a copy of its MLP")
    if model_type in MOE_TYPES and upcycle is not None:
        raise HFImportError(f"--moe-upcycle: {path} is already an MoE ({model_type}); drop --moe-upcycle")
    if model_type == "switch_transformers":
        return _switch_flags(config, path)
    _require(config, path, "hidden_act", ("silu",), "the experts are SwiGLU")
    for field in ("attention_bias", "mlp_bias"):
        _require(config, path, field, (None, False), "megatron-lsh's decoder layers have no biases")
    # Qwen's configs carry a sliding_window that only use_sliding_window switches on.
    _require(config, path, "use_sliding_window" if model_type.startswith("qwen3") else "sliding_window",
             (None, False), "attention spans the whole sequence")
    def field(*names):
        return _field(config, path, *names)

    layers, hidden, heads = field("num_hidden_layers"), field("hidden_size"), field("num_attention_heads")
    groups = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    architecture = UPCYCLED_AS.get(model_type, model_type)
    if model_type == "mixtral":
        experts, topk = field("num_local_experts", "num_experts"), field("num_experts_per_tok")
        expert_width = field("intermediate_size")
        pattern, dense_width, pre_softmax = [1] * layers, expert_width, False
    elif model_type == "qwen3_moe":
        experts, topk = field("num_experts", "num_local_experts"), field("num_experts_per_tok")
        expert_width, dense_width = field("moe_intermediate_size"), field("intermediate_size")
        step, dense_layers = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
        pattern = [int(i not in dense_layers and experts > 0 and (i + 1) % step == 0) for i in range(layers)]
        pre_softmax = not config.get("norm_topk_prob", False)
        if topk == 1 and not pre_softmax:
            raise HFImportError(f"{path}: num_experts_per_tok=1 with norm_topk_prob=true weighs the chosen expert "
                                "1, which megatron-lsh's top-1 routing (weight p, the softmax over all experts) "
                                "cannot express")
    else:
        experts, topk = upcycle["num_experts"], upcycle["topk"]
        if topk < 2:
            raise HFImportError(f"--moe-router-topk {topk}: upcycling needs at least 2, whose weights renormalise to "
                                "1 so that identical experts give the dense MLP's output (top-1 weighs it by p < 1)")
        expert_width = dense_width = field("intermediate_size")
        pattern, pre_softmax = [1] * layers, False
    flags = [
        "--hf-architecture", architecture, "--num-layers", str(layers), "--hidden-size", str(hidden),
        "--num-attention-heads", str(heads), "--kv-channels", str(head_dim),
        "--ffn-hidden-size", str(dense_width), "--moe-ffn-hidden-size", str(expert_width),
        "--num-experts", str(experts), "--moe-router-topk", str(topk),
        "--moe-layer-freq", "[" + ",".join(map(str, pattern)) + "]",
        "--norm-epsilon", repr(float(config.get("rms_norm_eps", 1e-6))),
        "--rotary-base", str(_rope_theta(config, path)),
        "--max-position-embeddings", str(field("max_position_embeddings")),
        "--make-vocab-size-divisible-by", str(field("vocab_size")),
    ]
    if groups != heads:
        flags += ["--group-query-attention", "--num-query-groups", str(groups)]
    if pre_softmax:
        flags.append("--moe-router-pre-softmax")
    if config.get("router_aux_loss_coef") and model_type in MOE_TYPES:
        flags += ["--moe-aux-loss-coeff", repr(float(config["router_aux_loss_coef"]))]
    return flags


def _switch_flags(config: dict, path: str) -> List[str]:
    """SwitchTransformers: T5 with experts in every sparse_step-th layer, top-1 routing."""
    def field(*names):
        return _field(config, path, *names)

    _require(config, path, "dense_act_fn", ("relu",), "the MLPs are ReLU")
    _require(config, path, "is_gated_act", (None, False), "the MLPs are not gated")
    _require(config, path, "router_bias", (None, False), "the router has no bias")
    encoder_layers, decoder_layers = field("num_layers"), config.get("num_decoder_layers") or field("num_layers")
    patterns = []
    for layers, sparse in ((encoder_layers, config.get("num_sparse_encoder_layers", 0)),
                           (decoder_layers, config.get("num_sparse_decoder_layers", 0))):
        patterns += switch_sparse_pattern(layers, layers // sparse if sparse else 0)
    logger.info("%s: expert_capacity %s is not kept; megatron-lsh trains dropless", path, config.get("expert_capacity"))
    return [
        "--hf-architecture", "switch_transformers", "--encoder-num-layers", str(encoder_layers),
        "--decoder-num-layers", str(decoder_layers), "--hidden-size", str(field("d_model")),
        "--num-attention-heads", str(field("num_heads")), "--kv-channels", str(field("d_kv")),
        "--ffn-hidden-size", str(field("d_ff")), "--num-experts", str(field("num_experts")), "--moe-router-topk", "1",
        "--moe-layer-freq", "[" + ",".join(map(str, patterns)) + "]",
        "--norm-epsilon", repr(float(config.get("layer_norm_epsilon", 1e-6))),
        "--relative-attention-num-buckets", str(config.get("relative_attention_num_buckets", 32)),
        "--relative-attention-max-distance", str(config.get("relative_attention_max_distance", 128)),
        "--make-vocab-size-divisible-by", str(field("vocab_size")),
        "--moe-aux-loss-coeff", repr(float(config.get("router_aux_loss_coef", 0.0))),
    ]


def _fused_qkv(q: Tensor, k: Tensor, v: Tensor, groups: int, head_dim: int) -> Tensor:
    """Separate q, k, v projections as megatron-core's fused rows: per query group, its query
    heads, then its key, then its value."""
    hidden = q.size(-1)
    q = q.reshape(groups, -1, hidden)
    k, v = k.reshape(groups, head_dim, hidden), v.reshape(groups, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def _fused_kv(k: Tensor, v: Tensor, groups: int, head_dim: int) -> Tensor:
    """Cross-attention's k and v as megatron-core's fused rows, [k, v] per group."""
    hidden = k.size(-1)
    fused = torch.cat([k.reshape(groups, head_dim, hidden), v.reshape(groups, head_dim, hidden)], dim=1)
    return fused.reshape(-1, hidden)


def switch_megatron_state_dict(weights: Dict[str, Tensor], config: dict, args) -> Dict[str, Tensor]:
    heads, head_dim = args.num_attention_heads, args.kv_channels
    # A tied LM head reads the decoder output scaled by d_model^-0.5: untied, the scale goes into it.
    tied = config.get("tie_word_embeddings", True)
    output = weights["shared.weight"] * args.hidden_size ** -0.5 if tied else weights["lm_head.weight"]
    out = {
        "embedding.word_embeddings.weight": weights["shared.weight"],
        "output_layer.weight": output,
        "lm_head.output_layer.weight": output,  # megatron-core's T5 holds the layer under both names
        "encoder_relative_pos_emb.relative_attention_bias.weight":
            weights["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
        "decoder_relative_pos_emb.relative_attention_bias.weight":
            weights["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
        "encoder.final_layernorm.weight": weights["encoder.final_layer_norm.weight"],
        "decoder.final_layernorm.weight": weights["decoder.final_layer_norm.weight"],
    }
    pattern = list(args.moe_layer_freq)
    stacks = (("encoder", pattern[:args.encoder_num_layers], False),
              ("decoder", pattern[args.encoder_num_layers:], True))
    for stack, sparse_layers, decoder in stacks:
        for i, sparse in enumerate(sparse_layers):
            src, dst = f"{stack}.block.{i}", f"{stack}.layers.{i}"
            attention = f"{src}.layer.0.SelfAttention"
            out[f"{dst}.input_layernorm.weight"] = weights[f"{src}.layer.0.layer_norm.weight"]
            out[f"{dst}.self_attention.linear_qkv.weight"] = _fused_qkv(
                weights[f"{attention}.q.weight"], weights[f"{attention}.k.weight"], weights[f"{attention}.v.weight"],
                heads, head_dim)
            out[f"{dst}.self_attention.linear_proj.weight"] = weights[f"{attention}.o.weight"]
            mlp_index = 1
            if decoder:
                cross = f"{src}.layer.1.EncDecAttention"
                out[f"{dst}.pre_cross_attn_layernorm.weight"] = weights[f"{src}.layer.1.layer_norm.weight"]
                out[f"{dst}.cross_attention.linear_q.weight"] = weights[f"{cross}.q.weight"]
                out[f"{dst}.cross_attention.linear_kv.weight"] = _fused_kv(
                    weights[f"{cross}.k.weight"], weights[f"{cross}.v.weight"], heads, head_dim)
                out[f"{dst}.cross_attention.linear_proj.weight"] = weights[f"{cross}.o.weight"]
                mlp_index = 2
            ff = f"{src}.layer.{mlp_index}"
            out[f"{dst}.pre_mlp_layernorm.weight"] = weights[f"{ff}.layer_norm.weight"]
            if sparse:
                out[f"{dst}.mlp.router.weight"] = weights[f"{ff}.mlp.router.classifier.weight"]
                for e in range(args.num_experts):
                    ours, theirs = f"{dst}.mlp.experts.local_experts.{e}", f"{ff}.mlp.experts.expert_{e}"
                    out[f"{ours}.linear_fc1.weight"] = weights[f"{theirs}.wi.weight"]
                    out[f"{ours}.linear_fc2.weight"] = weights[f"{theirs}.wo.weight"]
            else:
                out[f"{dst}.mlp.linear_fc1.weight"] = weights[f"{ff}.mlp.wi.weight"]
                out[f"{dst}.mlp.linear_fc2.weight"] = weights[f"{ff}.mlp.wo.weight"]
    return out


def megatron_state_dict(weights: Dict[str, Tensor], config: dict, args, upcycle: bool) -> Dict[str, Tensor]:
    """Our model's tensors by name from the Hugging Face ones (KeyError on a missing one)."""
    if config["model_type"] == "switch_transformers":
        return switch_megatron_state_dict(weights, config, args)
    groups = args.num_query_groups if args.group_query_attention else args.num_attention_heads
    head_dim = args.kv_channels
    tied = config.get("tie_word_embeddings", False)
    out = {
        "embedding.word_embeddings.weight": weights["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": weights["model.norm.weight"],
        # A tied output layer starts as the embedding and trains apart from it (Mixtral and
        # Qwen3-MoE, which the checkpoint exports to, are untied).
        "output_layer.weight": weights["model.embed_tokens.weight" if tied else "lm_head.weight"],
    }
    pattern = args.moe_layer_freq if isinstance(args.moe_layer_freq, list) else [1] * args.num_layers
    for i in range(args.num_layers):
        src, dst = f"model.layers.{i}", f"decoder.layers.{i}"
        attention = f"{src}.self_attn"
        out[f"{dst}.self_attention.linear_qkv.weight"] = _fused_qkv(
            weights[f"{attention}.q_proj.weight"], weights[f"{attention}.k_proj.weight"],
            weights[f"{attention}.v_proj.weight"], groups, head_dim)
        out[f"{dst}.self_attention.linear_proj.weight"] = weights[f"{attention}.o_proj.weight"]
        out[f"{dst}.input_layernorm.weight"] = weights[f"{src}.input_layernorm.weight"]
        out[f"{dst}.pre_mlp_layernorm.weight"] = weights[f"{src}.post_attention_layernorm.weight"]
        if args.qk_layernorm:
            out[f"{dst}.self_attention.q_layernorm.weight"] = weights[f"{attention}.q_norm.weight"]
            out[f"{dst}.self_attention.k_layernorm.weight"] = weights[f"{attention}.k_norm.weight"]
        if config["model_type"] == "mixtral":
            moe = f"{src}.block_sparse_moe"
            out[f"{dst}.mlp.router.weight"] = weights[f"{moe}.gate.weight"]
            for e in range(args.num_experts):
                expert = f"{moe}.experts.{e}"
                out[f"{dst}.mlp.experts.local_experts.{e}.linear_fc1.weight"] = torch.cat(
                    [weights[f"{expert}.w1.weight"], weights[f"{expert}.w3.weight"]])
                out[f"{dst}.mlp.experts.local_experts.{e}.linear_fc2.weight"] = weights[f"{expert}.w2.weight"]
        elif upcycle:  # every expert a copy of the dense MLP; the router keeps its fresh init
            fc1 = torch.cat([weights[f"{src}.mlp.gate_proj.weight"], weights[f"{src}.mlp.up_proj.weight"]])
            for e in range(args.num_experts):
                out[f"{dst}.mlp.experts.local_experts.{e}.linear_fc1.weight"] = fc1.clone()
                out[f"{dst}.mlp.experts.local_experts.{e}.linear_fc2.weight"] = \
                    weights[f"{src}.mlp.down_proj.weight"].clone()
        else:
            mlps = {f"{dst}.mlp": f"{src}.mlp"}
            if pattern[i]:
                out[f"{dst}.mlp.router.weight"] = weights[f"{src}.mlp.gate.weight"]
                mlps = {f"{dst}.mlp.experts.local_experts.{e}": f"{src}.mlp.experts.{e}"
                        for e in range(args.num_experts)}
            for ours, theirs in mlps.items():
                out[f"{ours}.linear_fc1.weight"] = torch.cat(
                    [weights[f"{theirs}.gate_proj.weight"], weights[f"{theirs}.up_proj.weight"]])
                out[f"{ours}.linear_fc2.weight"] = weights[f"{theirs}.down_proj.weight"]
    return out


def _tokenizer(hf_dir: str, tokenizer_dir: str, vocab_rows: int) -> Optional[HuggingFaceTokenizer]:
    """The tokenizer to save with the model: --tokenizer's, or the model's own; None (said once)
    when the model directory has none."""
    try:
        tokenizer = HuggingFaceTokenizer(tokenizer_dir)
    except TokenizerError as error:
        if tokenizer_dir != hf_dir:
            raise HFImportError(str(error)) from None
        logger.warning("%s has no tokenizer (%s): the checkpoint is written without one; pass "
                       "--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR when training", hf_dir, error)
        return None
    if tokenizer.vocab_size > vocab_rows:
        raise HFImportError(f"--tokenizer {tokenizer_dir}: {tokenizer.vocab_size} tokens, more than the model's "
                            f"vocab_size {vocab_rows} ({os.path.join(hf_dir, 'config.json')}); pass the model's own "
                            "tokenizer")
    return tokenizer


def _load_weights(model, weights: dict, config: dict, args, hf_dir: str, upcycle: bool) -> None:
    """The Hugging Face weights into our model, every tensor placed and of its shape, or one error
    naming the first that is not."""
    try:
        state = megatron_state_dict(weights, config, args, upcycle)
    except KeyError as error:
        raise HFImportError(
            f"--hf-model {hf_dir}: weight {error.args[0]} is missing from its safetensors files") from None
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if upcycle:  # the routers keep the fresh model's initialisation
        state.update({k: v for k, v in ours.items() if k.endswith("mlp.router.weight")})
    unexpected = sorted(set(state) - set(ours))
    missing = sorted(set(ours) - set(state))
    if missing or unexpected:
        raise HFImportError(f"--hf-model {hf_dir}: the weights do not make this model (missing {missing[:3]}, "
                            f"not placed {unexpected[:3]})")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(ours[name].shape):
            raise HFImportError(f"--hf-model {hf_dir}: {name} comes out {tuple(tensor.shape)} from the safetensors "
                                f"files, the model of config.json has {tuple(ours[name].shape)}")
    model.load_state_dict({**state, **{k: v for k, v in model.state_dict().items() if k.endswith("_extra_state")}})


def import_hf(hf_dir: str, save_dir: str, tokenizer_dir: Optional[str] = None, upcycle: Optional[dict] = None,
              seed: int = 1234) -> List[str]:
    """Write iteration 0 of a checkpoint in save_dir; returns the model flags training needs."""
    config = read_config(hf_dir)
    config_path = os.path.join(hf_dir, "config.json")
    flags = model_flags(config, hf_dir, upcycle)
    tokenizer_dir = tokenizer_dir or hf_dir
    vocab_rows = _field(config, config_path, "vocab_size")
    tokenizer = _tokenizer(hf_dir, tokenizer_dir, vocab_rows)
    if find_latest_checkpoint(save_dir) is not None:
        raise HFImportError(f"--save {save_dir} already holds a checkpoint; import into an empty directory")
    weights = read_weights(hf_dir)

    t5 = config["model_type"] == "switch_transformers"
    task = T5_TASK if t5 else GPT_TASK
    if t5:
        if tokenizer is None:
            raise HFImportError(f"--hf-model {hf_dir}: a Switch Transformers model needs its tokenizer (T5's span "
                                "corruption writes its sentinels); pass --tokenizer DIR")
        flags += ["--vocab-extra-ids", str(len(tokenizer.additional_special_tokens_ids))]
    tokenizer_flags = (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir]
                       if tokenizer is not None
                       else ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab_rows)])
    lengths = (["--encoder-seq-length", "64", "--decoder-seq-length", "32"] if t5 else
               ["--seq-length", str(min(_field(config, config_path, "max_position_embeddings"), 4096))])
    training = [*lengths, "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-5", "--seed", str(seed),
                "--no-lsh", *tokenizer_flags]
    try:
        args = parse_args("import", flags + training, extra_args=add_t5_args if t5 else None)
        task.validate(args)
        # No data to read here: the data checks pass as for synthetic data (which T5's own
        # check refuses, so it ran first).
        args.mock_data = True
        validate_args(args, world_size=1)
        args.mock_data = False
    except (ArgumentError, TokenizerError, SystemExit) as error:
        raise HFImportError(f"{config_path} gives a model training refuses: {error}") from None

    for key, value in dict(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    initialize_distributed(expert_model_parallel_size=1, seed=seed)
    model_config = transformer_config_from_args(args, hidden_dropout=0.0, attention_dropout=0.0)
    vocab = padded_vocab_size(tokenizer.vocab_size if tokenizer else vocab_rows, args.make_vocab_size_divisible_by)
    model = task.build_model(args, model_config, vocab)
    _load_weights(model, weights, config, args, hf_dir, upcycle is not None)

    # Everything checked: only now is anything written, and a failure removes what was.
    existed = os.path.isdir(save_dir)
    try:
        save_checkpoint(save_dir, 0, [model], None, None, 0, args, task.name)
    except BaseException:
        if not existed:
            shutil.rmtree(save_dir, ignore_errors=True)
        raise
    return [*flags, *tokenizer_flags] if tokenizer is not None else flags


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-model", required=True, help="Hugging Face model directory (config.json, *.safetensors).")
    parser.add_argument("--save", required=True, help="Checkpoint directory to write (training's --load).")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer directory (default: the model's own).")
    parser.add_argument("--moe-upcycle", action="store_true",
                        help="A dense model: experts start as copies of its MLPs.")
    parser.add_argument("--num-experts", type=int, default=None, help="With --moe-upcycle: experts per layer.")
    parser.add_argument("--moe-router-topk", type=int, default=2, help="With --moe-upcycle: experts per token.")
    parser.add_argument("--seed", type=int, default=1234, help="Initialises the upcycled routers.")
    args = parser.parse_args(argv)
    upcycle = None
    if args.moe_upcycle:
        if not args.num_experts or args.num_experts < 2:
            parser.error("--moe-upcycle needs --num-experts N (2 or more)")
        upcycle = {"num_experts": args.num_experts, "topk": args.moe_router_topk}
    elif args.num_experts is not None:
        parser.error("--num-experts is read with --moe-upcycle only (an MoE keeps its own)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        flags = import_hf(args.hf_model, args.save, args.tokenizer, upcycle, args.seed)
    except (HFImportError, CheckpointError) as error:
        sys.exit(f"error: {error}")
    script = (
        "pretrain_t5_moe.py"
        if read_config(args.hf_model)["model_type"] == "switch_transformers"
        else "pretrain_gpt_moe.py"
    )
    print(
        f"wrote iteration 0 of {args.save}; continue it with {script} --load {args.save} --finetune "
        "and these model flags:"
    )
    print(" ".join(f"'{f}'" if f.startswith("[") else f for f in flags))


if __name__ == "__main__":
    main()
