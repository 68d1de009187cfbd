"""Model FLOPs for --log-throughput, against Megatron-LM's closed form worked out by hand."""

import argparse

import pytest

from megatron_lsh.training.flops import gpt_flops_per_sample, t5_flops_per_sample, tflops_per_gpu


def model(**changes):
    values = dict(hidden_size=64, num_attention_heads=4, kv_channels=None, group_query_attention=False,
                  num_query_groups=None, ffn_hidden_size=256, moe_ffn_hidden_size=128, moe_router_topk=2,
                  swiglu=False, num_layers=2, seq_length=32, moe_layer_freq=2)
    return argparse.Namespace(**{**values, **changes})


def test_gpt_flops_count_every_matmul_three_times_and_causal_scores_over_half_the_square():
    # Per token: each layer's attention 6 x (4h^2 + h s) (projections; QK^T and AV over s/2 keys),
    # layer 0's two experts 6 x 2 x 2 x h x 128, layer 1's dense MLP 6 x 2 x h x 256, logits 6 x h x 256.
    per_token = 2 * 6 * (4 * 64 ** 2 + 64 * 32) + 6 * 2 * 2 * 64 * 128 + 6 * 2 * 64 * 256 + 6 * 64 * 256
    assert gpt_flops_per_sample(model(), vocab_size=256) == 32 * per_token == 22_806_528
    # SwiGLU widens the first matmul of every MLP: 3 matmuls' worth instead of 2.
    swiglu = 2 * 6 * (4 * 64 ** 2 + 64 * 32) + 6 * 3 * 2 * 64 * 128 + 6 * 3 * 64 * 256 + 6 * 64 * 256
    assert gpt_flops_per_sample(model(swiglu=True), vocab_size=256) == 32 * swiglu
    # Grouped-query attention: keys and values for 1 group of 16 channels instead of 4 heads.
    gqa = 2 * 6 * (2 * 64 ** 2 + 2 * 64 * 16 + 64 * 32) + 6 * 2 * 2 * 64 * 128 + 6 * 2 * 64 * 256 + 6 * 64 * 256
    assert gpt_flops_per_sample(model(group_query_attention=True, num_query_groups=1), 256) == 32 * gqa


def test_t5_flops_count_the_encoder_square_the_decoder_half_and_cross_attention():
    args = model(encoder_num_layers=1, decoder_num_layers=1, encoder_seq_length=32, decoder_seq_length=8,
                 moe_layer_freq=1)
    h, enc, dec = 64, 32, 8
    encoder = enc * 6 * (4 * h * h + 2 * h * enc) + enc * 6 * 2 * 2 * h * 128
    self_attention = dec * 6 * (4 * h * h + 2 * h * dec / 2)
    cross = dec * 6 * (2 * h * h + 2 * h * enc) + enc * 6 * 2 * h * h
    decoder = self_attention + cross + dec * 6 * 2 * 2 * h * 128 + dec * 6 * h * 256
    assert t5_flops_per_sample(args, vocab_size=256) == pytest.approx(encoder + decoder)


def test_throughput_is_flops_of_the_batch_over_time_and_gpus():
    assert tflops_per_gpu(1e12, samples=8, seconds=2.0, world_size=4) == 1.0
