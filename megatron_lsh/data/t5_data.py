"""T5 span-corruption data: megatron-core's T5MaskedWordPieceDataset over our SentencePiece
tokenizer, whose sentinel pieces <extra_id_N> replace the masked spans."""

from __future__ import annotations

from typing import Sequence

from megatron.core.datasets.t5_dataset import T5MaskedWordPieceDataset, T5MaskedWordPieceDatasetConfig

from megatron_lsh.data.gpt_data import blends_from_args, build_splits


class DecoderBoundedT5Dataset(T5MaskedWordPieceDataset):
    """megatron-core's span corruption, its targets bounded by the decoder: the decoder reads <s>
    then each span's sentinel and tokens, and megatron-core fails on a sample whose spans need
    more positions than --decoder-seq-length has (rare at T5's own 512/128 and 15%, but possible:
    its masking counts only the encoder's length). Then the spans are taken in random order (this
    sample's own random state) as long as they fit, and the others left unmasked (if none fits
    whole, the first is cut to what does), so every sample stays a valid span corruption of its
    text; a sample that fits, the common case, is megatron-core's unchanged."""

    def _create_masked_lm_predictions(self, token_ids, target_sequence_length, numpy_random_state):
        masked, positions, labels, boundaries, spans = super()._create_masked_lm_predictions(
            token_ids, target_sequence_length, numpy_random_state)
        budget = self.config.sequence_length_decoder - 1  # after <s>
        needed = sum(1 + len(span_labels) for _, span_labels in spans)
        if needed <= budget:
            return masked, positions, labels, boundaries, spans
        order = [int(index) for index in numpy_random_state.permutation(len(spans))]  # spans in random order
        kept, remaining = {}, budget
        for index in order:
            if 1 + len(spans[index][0]) <= remaining:
                kept[index] = spans[index][0]
                remaining -= 1 + len(spans[index][0])
        if not kept:  # none fits whole: the first, cut to what does
            kept[order[0]] = spans[order[0]][0][:budget - 1]
        masked_now = {position for span_positions in kept.values() for position in span_positions}
        unmasked = {position for span_positions, _ in spans for position in span_positions} - masked_now
        masked = [token_ids[i] if i in unmasked else token for i, token in enumerate(masked)]
        pairs = [(p, label) for p, label in zip(positions, labels) if p in masked_now]
        spans = [(kept[index], [token_ids[p] for p in kept[index]]) for index in sorted(kept)]  # in text order
        return masked, [p for p, _ in pairs], [label for _, label in pairs], boundaries, spans


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
    return build_splits(DecoderBoundedT5Dataset, config, num_samples, split)
