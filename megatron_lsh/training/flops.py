"""Model FLOPs of one training sample, counted as Megatron-LM's --log-throughput counts them
(megatron/training/training.py, num_floating_point_operations, at the release we pin): every
matmul 2 FLOPs a multiply-add and 3 passes (forward, and the backward's two); causal attention
scores over half the square; the experts a token is routed to, not all of them; the logits once.
Norms, softmax, routing and LSH's own work are not counted. T5 counts its encoder (bidirectional
attention over the whole square), its decoder (causal self-attention, cross-attention to every
encoder position) and the logits of the decoder's tokens the same way.

Throughput (TFLOP/s per GPU) = FLOPs of a global batch / (step seconds x 1e12 x world size).
"""

from __future__ import annotations

from typing import Sequence

from megatron_lsh.models.architectures import gpt_moe_pattern

MATMUL = 3 * 2  # forward + two backward matmuls, 2 FLOPs a multiply-add


def _projections(args):
    """(query width, key/value width) of attention."""
    kv_channels = args.kv_channels or args.hidden_size // args.num_attention_heads
    groups = args.num_query_groups if args.group_query_attention and args.num_query_groups else args.num_attention_heads
    return kv_channels * args.num_attention_heads, kv_channels * groups


def _attention(args, query_tokens: float, key_tokens: float, keys_per_query: float) -> float:
    """An attention block: query and output projections per query token, key and value
    projections per key token, scores and weighted values per query over keys_per_query keys."""
    query, key_value = _projections(args)
    return MATMUL * (query_tokens * (args.hidden_size * query + query * args.hidden_size)
                     + key_tokens * args.hidden_size * 2 * key_value
                     + query_tokens * 2 * query * keys_per_query)


def _mlps(args, tokens: float, moe_pattern: Sequence[int]) -> float:
    """The MLPs of the layers of one stack: dense, or the experts each token is routed to."""
    gated = 3 if args.swiglu else 2  # SwiGLU's first matmul is twice as wide
    if getattr(args, "num_experts", 0) is None:  # a dense model: every layer's MLP is dense
        moe_pattern = [0] * len(moe_pattern)
    moe_layers = sum(moe_pattern)
    dense_layers = len(moe_pattern) - moe_layers
    routed = moe_layers * args.moe_ffn_hidden_size * args.moe_router_topk if moe_layers else 0
    per_token = (dense_layers * args.ffn_hidden_size + routed) * gated * args.hidden_size
    return MATMUL * tokens * per_token


def _logits(args, tokens: float, vocab_size: int) -> float:
    return MATMUL * tokens * args.hidden_size * vocab_size


def gpt_flops_per_sample(args, vocab_size: int) -> float:
    tokens = args.seq_length
    attention = args.num_layers * _attention(args, tokens, tokens, keys_per_query=tokens / 2)
    return attention + _mlps(args, tokens, gpt_moe_pattern(vars(args))) + _logits(args, tokens, vocab_size)


def t5_flops_per_sample(args, vocab_size: int) -> float:
    from megatron_lsh.models.t5 import moe_layer_patterns

    encoder, decoder = args.encoder_seq_length, args.decoder_seq_length
    encoder_pattern, decoder_pattern = moe_layer_patterns(args.moe_layer_freq, args.encoder_num_layers,
                                                          args.decoder_num_layers)
    flops = args.encoder_num_layers * _attention(args, encoder, encoder, keys_per_query=encoder)
    flops += args.decoder_num_layers * (_attention(args, decoder, decoder, keys_per_query=decoder / 2)
                                        + _attention(args, decoder, encoder, keys_per_query=encoder))
    flops += _mlps(args, encoder, encoder_pattern) + _mlps(args, decoder, decoder_pattern)
    return flops + _logits(args, decoder, vocab_size)


def tflops_per_gpu(flops_per_sample: float, samples: int, seconds: float, world_size: int) -> float:
    return flops_per_sample * samples / (seconds * 1e12 * world_size)
