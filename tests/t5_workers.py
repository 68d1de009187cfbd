"""Per-rank bodies of the T5 data tests (megatron-core's T5 dataset needs a process group)."""

from __future__ import annotations

import argparse

import megatron_lsh  # noqa: F401  (CPU workarounds)
from megatron_lsh.data.t5_data import build_t5_datasets
from megatron_lsh.data.tokenizer import SentencePieceTokenizer
from megatron_lsh.training.initialize import initialize_distributed


def t5_samples(rank, world_size, corpus, count, encoder_length, decoder_length):
    """The first `count` T5 training samples, each with the original tokens it was cut from."""
    initialize_distributed(seed=1)
    tokenizer = SentencePieceTokenizer(corpus["t5_tokenizer"])
    args = argparse.Namespace(
        mock_data=False, data_path=None, split=None, train_data_path=[corpus["t5_train"]],
        valid_data_path=None, test_data_path=None, seed=3, data_cache_path=None,
        encoder_seq_length=encoder_length, decoder_seq_length=decoder_length,
        mask_prob=0.15, short_seq_prob=0.1,
    )
    train, _, _ = build_t5_datasets(args, tokenizer, [count, 0, 0])
    dataset = train.datasets[0] if hasattr(train, "datasets") else train
    samples = []
    for i in range(count):
        begin, end, target_length = dataset.sample_index[i]
        original = [int(t) for s in range(begin, end) for t in dataset.dataset[s]][:target_length]
        sample = {key: value.tolist() if hasattr(value, "tolist") else value for key, value in dataset[i].items()}
        samples.append({"original": original, **sample})
    return {
        "samples": samples,
        "sentinels": tokenizer.additional_special_tokens_ids,
        "bos": tokenizer.bos,
        "eos": tokenizer.eos,
        "pad": tokenizer.pad,
    }
