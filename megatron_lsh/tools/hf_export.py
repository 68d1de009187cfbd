"""megatron-core GPT-MoE / T5-MoE weights as Mixtral, Qwen3-MoE or SwitchTransformers checkpoints.

Weights are written in the layout of the models published on the Hugging Face hub (Mixtral's
``block_sparse_moe.experts.N.w1/w2/w3``, Qwen3-MoE's ``mlp.experts.N.gate_proj/up_proj/down_proj``,
Switch's ``expert_N.wi/wo``), which every transformers version since they were added loads (5.x
converts Mixtral's and Qwen3-MoE's to its fused form on load).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Tuple

import torch

from megatron_lsh.models.architectures import (
    gpt_moe_pattern,
    routes_pre_softmax,
    switch_sparse_step,
    t5_patterns,
)

Tensor = torch.Tensor


def split_qkv(weight: Tensor, num_heads: int, num_groups: int, head_dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    """megatron-core's fused QKV rows, grouped per query group as [q heads of the group, k, v],
    as separate q, k and v projections."""
    heads_per_group = num_heads // num_groups
    grouped = weight.view(num_groups, (heads_per_group + 2) * head_dim, -1)
    q, k, v = torch.split(grouped, [heads_per_group * head_dim, head_dim, head_dim], dim=1)
    hidden = weight.size(-1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def split_kv(weight: Tensor, num_groups: int, head_dim: int) -> Tuple[Tensor, Tensor]:
    """Cross-attention's fused KV rows, [k, v] per group, as separate k and v projections."""
    grouped = weight.view(num_groups, 2 * head_dim, -1)
    k, v = torch.split(grouped, [head_dim, head_dim], dim=1)
    hidden = weight.size(-1)
    return k.reshape(-1, hidden), v.reshape(-1, hidden)


def _heads(args) -> Tuple[int, int, int]:
    heads = args.num_attention_heads
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
    head_dim = args.kv_channels or args.hidden_size // heads
    return heads, groups, head_dim


def _experts(state: Dict[str, Tensor], prefix: str) -> Iterable[Tuple[int, Tensor, Tensor]]:
    expert = 0
    while f"{prefix}.experts.local_experts.{expert}.linear_fc1.weight" in state:
        yield (
            expert,
            state[f"{prefix}.experts.local_experts.{expert}.linear_fc1.weight"],
            state[f"{prefix}.experts.local_experts.{expert}.linear_fc2.weight"],
        )
        expert += 1


def _decoder_state_dict(state: Dict[str, Tensor], args, vocab_size: int, layer_mlp) -> Dict[str, Tensor]:
    """What Mixtral and Qwen3-MoE share: embeddings, norms and attention (Qwen3's q/k norms when
    trained with them); ``layer_mlp(out, src, dst, i)`` adds each layer's MLP or experts."""
    heads, groups, head_dim = _heads(args)
    out = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab_size],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
        "lm_head.weight": state["output_layer.weight"][:vocab_size],
    }
    for i in range(args.num_layers):
        src, dst = f"decoder.layers.{i}", f"model.layers.{i}"
        q, k, v = split_qkv(state[f"{src}.self_attention.linear_qkv.weight"], heads, groups, head_dim)
        out.update({
            f"{dst}.input_layernorm.weight": state[f"{src}.input_layernorm.weight"],
            f"{dst}.self_attn.q_proj.weight": q,
            f"{dst}.self_attn.k_proj.weight": k,
            f"{dst}.self_attn.v_proj.weight": v,
            f"{dst}.self_attn.o_proj.weight": state[f"{src}.self_attention.linear_proj.weight"],
            f"{dst}.post_attention_layernorm.weight": state[f"{src}.pre_mlp_layernorm.weight"],
        })
        if getattr(args, "qk_layernorm", False):
            out[f"{dst}.self_attn.q_norm.weight"] = state[f"{src}.self_attention.q_layernorm.weight"]
            out[f"{dst}.self_attn.k_norm.weight"] = state[f"{src}.self_attention.k_layernorm.weight"]
        layer_mlp(out, src, dst, i)
    return out


def _gate_up(fc1: Tensor) -> Tuple[Tensor, Tensor]:
    """megatron-core's fused GLU input projection: act(first half) * second half."""
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def mixtral_state_dict(state: Dict[str, Tensor], args, vocab_size: int) -> Dict[str, Tensor]:
    def experts(out, src, dst, i):
        out[f"{dst}.block_sparse_moe.gate.weight"] = state[f"{src}.mlp.router.weight"]
        for expert, fc1, fc2 in _experts(state, f"{src}.mlp"):
            gate, up = _gate_up(fc1)
            out[f"{dst}.block_sparse_moe.experts.{expert}.w1.weight"] = gate
            out[f"{dst}.block_sparse_moe.experts.{expert}.w3.weight"] = up
            out[f"{dst}.block_sparse_moe.experts.{expert}.w2.weight"] = fc2

    return _decoder_state_dict(state, args, vocab_size, experts)


def qwen3_moe_state_dict(state: Dict[str, Tensor], args, vocab_size: int) -> Dict[str, Tensor]:
    pattern = gpt_moe_pattern(vars(args))

    def mlp(out, src, dst, i):
        if pattern[i]:
            out[f"{dst}.mlp.gate.weight"] = state[f"{src}.mlp.router.weight"]
            mlps = [(f"{dst}.mlp.experts.{expert}", fc1, fc2) for expert, fc1, fc2 in _experts(state, f"{src}.mlp")]
        else:
            mlps = [(f"{dst}.mlp", state[f"{src}.mlp.linear_fc1.weight"], state[f"{src}.mlp.linear_fc2.weight"])]
        for name, fc1, fc2 in mlps:
            out[f"{name}.gate_proj.weight"], out[f"{name}.up_proj.weight"] = _gate_up(fc1)
            out[f"{name}.down_proj.weight"] = fc2

    return _decoder_state_dict(state, args, vocab_size, mlp)


def _decoder_config(args, vocab_size: int, tokenizer) -> dict:
    """The config fields Mixtral and Qwen3-MoE share."""
    heads, groups, head_dim = _heads(args)
    return dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=args.norm_epsilon,
        rope_theta=float(args.rotary_base),
        num_experts_per_tok=args.moe_router_topk,
        router_aux_loss_coef=args.moe_aux_loss_coeff,
        output_router_logits=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        use_cache=True,
        # None without a tokenizer (a model imported without one): the ids are the tokenizer's to say.
        bos_token_id=tokenizer.bos if tokenizer is not None else None,
        eos_token_id=tokenizer.eos if tokenizer is not None else None,
        pad_token_id=tokenizer.pad if tokenizer is not None else None,
    )


def mixtral_config(args, vocab_size: int, tokenizer) -> dict:
    return dict(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        **_decoder_config(args, vocab_size, tokenizer),
        intermediate_size=args.moe_ffn_hidden_size,
        num_local_experts=args.num_experts,
        sliding_window=None,
    )


def qwen3_moe_config(args, vocab_size: int, tokenizer) -> dict:
    pattern = gpt_moe_pattern(vars(args))
    return dict(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        **_decoder_config(args, vocab_size, tokenizer),
        intermediate_size=args.ffn_hidden_size,
        moe_intermediate_size=args.moe_ffn_hidden_size,
        num_experts=args.num_experts,
        attention_bias=False,
        use_sliding_window=False,
        # Every layer placed by its own entry: the dense ones listed, the step leaving the rest sparse.
        decoder_sparse_step=1,
        mlp_only_layers=[i for i, sparse in enumerate(pattern) if not sparse],
        # megatron-core's softmax over the top-k logits is HF's softmax, top-k and renormalise; its
        # pre-softmax routing (and top-1) keeps the full softmax's values.
        norm_topk_prob=not routes_pre_softmax(vars(args)),
    )


def _t5_block(state, out, src, dst, args, decoder: bool, sparse: bool):
    heads, groups, head_dim = _heads(args)
    q, k, v = split_qkv(state[f"{src}.self_attention.linear_qkv.weight"], heads, groups, head_dim)
    attention = f"{dst}.layer.0.SelfAttention"
    out.update({
        f"{dst}.layer.0.layer_norm.weight": state[f"{src}.input_layernorm.weight"],
        f"{attention}.q.weight": q,
        f"{attention}.k.weight": k,
        f"{attention}.v.weight": v,
        f"{attention}.o.weight": state[f"{src}.self_attention.linear_proj.weight"],
    })
    mlp_index = 1
    if decoder:
        cross = f"{dst}.layer.1.EncDecAttention"
        k, v = split_kv(state[f"{src}.cross_attention.linear_kv.weight"], groups, head_dim)
        out.update({
            f"{dst}.layer.1.layer_norm.weight": state[f"{src}.pre_cross_attn_layernorm.weight"],
            f"{cross}.q.weight": state[f"{src}.cross_attention.linear_q.weight"],
            f"{cross}.k.weight": k,
            f"{cross}.v.weight": v,
            f"{cross}.o.weight": state[f"{src}.cross_attention.linear_proj.weight"],
        })
        mlp_index = 2
    ff = f"{dst}.layer.{mlp_index}"
    out[f"{ff}.layer_norm.weight"] = state[f"{src}.pre_mlp_layernorm.weight"]
    if sparse:
        out[f"{ff}.mlp.router.classifier.weight"] = state[f"{src}.mlp.router.weight"]
        for expert, fc1, fc2 in _experts(state, f"{src}.mlp"):
            out[f"{ff}.mlp.experts.expert_{expert}.wi.weight"] = fc1
            out[f"{ff}.mlp.experts.expert_{expert}.wo.weight"] = fc2
    else:
        out[f"{ff}.mlp.wi.weight"] = state[f"{src}.mlp.linear_fc1.weight"]
        out[f"{ff}.mlp.wo.weight"] = state[f"{src}.mlp.linear_fc2.weight"]


def switch_state_dict(state: Dict[str, Tensor], args, vocab_size: int) -> Dict[str, Tensor]:
    encoder_pattern, decoder_pattern = t5_patterns(vars(args))
    embedding = state["embedding.word_embeddings.weight"][:vocab_size]
    out = {
        "shared.weight": embedding,
        "encoder.embed_tokens.weight": embedding,
        "decoder.embed_tokens.weight": embedding,
        "lm_head.weight": state["output_layer.weight"][:vocab_size],
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
            state["encoder_relative_pos_emb.relative_attention_bias.weight"],
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
            state["decoder_relative_pos_emb.relative_attention_bias.weight"],
        "encoder.final_layer_norm.weight": state["encoder.final_layernorm.weight"],
        "decoder.final_layer_norm.weight": state["decoder.final_layernorm.weight"],
    }
    for stack, pattern, decoder in (("encoder", encoder_pattern, False), ("decoder", decoder_pattern, True)):
        for i, sparse in enumerate(pattern):
            _t5_block(state, out, f"{stack}.layers.{i}", f"{stack}.block.{i}", args, decoder, bool(sparse))
    return out


def _num_sparse(pattern) -> int:
    """num_sparse_*_layers for SwitchTransformersConfig, whose sparse step is layers // it."""
    step = switch_sparse_step(pattern)
    return next(n for n in range(1, len(pattern) + 1) if len(pattern) // n == step)


def switch_config(args, vocab_size: int, tokenizer) -> dict:
    heads, _, head_dim = _heads(args)
    encoder_pattern, decoder_pattern = t5_patterns(vars(args))
    return dict(
        architectures=["SwitchTransformersForConditionalGeneration"],
        model_type="switch_transformers",
        vocab_size=vocab_size,
        d_model=args.hidden_size,
        d_kv=head_dim,
        d_ff=args.ffn_hidden_size,
        num_layers=args.encoder_num_layers,
        num_decoder_layers=args.decoder_num_layers,
        num_sparse_encoder_layers=_num_sparse(encoder_pattern),
        num_sparse_decoder_layers=_num_sparse(decoder_pattern),
        num_heads=heads,
        num_experts=args.num_experts,
        # The model was trained dropless: no token may overflow an expert.
        expert_capacity=max(args.encoder_seq_length, args.decoder_seq_length, args.max_position_embeddings),
        router_bias=False,
        router_jitter_noise=0.0,
        router_dtype="float32",
        router_ignore_padding_tokens=False,
        relative_attention_num_buckets=args.relative_attention_num_buckets,
        relative_attention_max_distance=args.relative_attention_max_distance,
        dropout_rate=0.0,
        layer_norm_epsilon=args.norm_epsilon,
        router_z_loss_coef=args.moe_z_loss_coeff or 0.0,
        router_aux_loss_coef=args.moe_aux_loss_coeff,
        dense_act_fn="relu",
        is_encoder_decoder=True,
        tie_word_embeddings=False,
        use_cache=True,
        pad_token_id=tokenizer.pad,
        eos_token_id=tokenizer.eos,
        # megatron-core's T5 data start every decoder input with <s>.
        decoder_start_token_id=tokenizer.bos,
    )


def save_safetensors(state: Dict[str, Tensor], output_dir: str, dtype: torch.dtype,
                     max_shard_bytes: int = 5 * 1024**3) -> None:
    """model.safetensors, or shards with model.safetensors.index.json past max_shard_bytes."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(dtype).contiguous().clone() for k, v in state.items()}
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(output_dir, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(output_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
