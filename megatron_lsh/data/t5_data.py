"""T5 span-corruption data: megatron-core's T5MaskedWordPieceDataset over our SentencePiece
tokenizer, whose sentinel pieces <extra_id_N> replace the masked spans."""

from __future__ import annotations

from typing import Sequence

from megatron.core.datasets.t5_dataset import T5MaskedWordPieceDataset, T5MaskedWordPieceDatasetConfig

from megatron_lsh.data.gpt_data import blends_from_args, build_splits


def build_t5_datasets(args, tokenizer, num_samples: Sequence[int]):
    blend, blend_per_split, split = blends_from_args(args, tokenizer)
    config = T5MaskedWordPieceDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.encoder_seq_length,
        sequence_length_decoder=args.decoder_seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer,
        masking_probability=args.mask_prob,
        short_sequence_probability=args.short_seq_prob,
        masking_max_ngram=10,
        # SentencePiece pieces, not WordPiece words: spans are counted in pieces, as in T5.
        masking_do_full_word=False,
        masking_do_permutation=False,
        masking_use_longer_ngrams=False,
        masking_use_geometric_distribution=True,
        mmap_bin_files=True,
    )
    return build_splits(T5MaskedWordPieceDataset, config, num_samples, split)
