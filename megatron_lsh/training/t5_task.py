"""T5-MoE pretraining: span corruption over the shared loop."""

from __future__ import annotations

import dataclasses
import math

from megatron.core.datasets.t5_dataset import T5MaskedWordPieceDataset

from megatron_lsh.data.t5_data import build_t5_datasets
from megatron_lsh.data.tokenizer import tokenizer_from_args
from megatron_lsh.device import compute_device
from megatron_lsh.models.t5 import build_t5_moe_model, moe_layer_patterns
from megatron_lsh.training.arguments import ArgumentError, apply_hf_architecture
from megatron_lsh.training.flops import t5_flops_per_sample
from megatron_lsh.training.task import ModelTask


def add_t5_args(parser):
    g = parser.add_argument_group("T5")
    g.add_argument("--encoder-num-layers", type=int, default=None, help="Default: --num-layers.")
    g.add_argument("--decoder-num-layers", type=int, default=None, help="Default: --num-layers.")
    g.add_argument("--encoder-seq-length", type=int, default=None, help="Default: --seq-length.")
    g.add_argument("--decoder-seq-length", type=int, default=None)
    g.add_argument("--mask-prob", type=float, default=0.15)
    g.add_argument("--short-seq-prob", type=float, default=0.1)
    g.add_argument("--relative-attention-num-buckets", type=int, default=32)
    g.add_argument("--relative-attention-max-distance", type=int, default=128)
    # Span corruption needs sentinels; Megatron-LM's T5 script passes 100 (its parser's default is 0).
    parser.set_defaults(vocab_extra_ids=100)
    return parser


def max_masked_tokens(args) -> int:
    """The most tokens megatron-core's span corruption masks in one sample (the encoder holds
    the sample plus <s> and </s>)."""
    return math.ceil(args.mask_prob * (args.encoder_seq_length - 2))


def validate_t5_args(args) -> None:
    if args.pipeline_model_parallel_size > 1:
        raise ArgumentError(
            "--pipeline-model-parallel-size: T5-MoE trains without pipeline parallelism "
            "(megatron-core 0.16 has no pipeline split between encoder and decoder); use data, tensor or "
            "expert parallelism"
        )
    args.encoder_num_layers = args.encoder_num_layers or args.num_layers
    args.decoder_num_layers = args.decoder_num_layers or args.num_layers
    if not args.encoder_num_layers or not args.decoder_num_layers:
        raise ArgumentError("T5 needs --num-layers, or --encoder-num-layers and --decoder-num-layers")
    args.num_layers = args.decoder_num_layers  # the decoder's config; the encoder's is derived
    if args.qk_layernorm:
        raise ArgumentError("--qk-layernorm: T5-MoE's attention has no query/key norm here; drop the flag")
    if args.hf_architecture:
        apply_hf_architecture(args, "t5")
    args.encoder_seq_length = args.encoder_seq_length or args.seq_length
    if not args.encoder_seq_length or not args.decoder_seq_length:
        raise ArgumentError("T5 needs --encoder-seq-length (or --seq-length) and --decoder-seq-length")
    args.seq_length = args.encoder_seq_length
    if args.mock_data:
        raise ArgumentError("--mock-data is GPT's; T5 trains on --data-path files made with --split-sentences")
    if not 0 < args.mask_prob < 1:
        raise ArgumentError(f"--mask-prob {args.mask_prob} must be between 0 and 1")
    if args.encoder_seq_length < 8:
        raise ArgumentError(f"--encoder-seq-length {args.encoder_seq_length} is too short for span corruption (at "
                            "least 8)")
    masked = max_masked_tokens(args)
    # The decoder reads <s>, then each span's sentinel and tokens; spans that do not fit are left
    # unmasked (data/t5_data.py), but one span of one token must.
    if args.decoder_seq_length < 3:
        raise ArgumentError(f"--decoder-seq-length {args.decoder_seq_length} is too short: <s>, a sentinel and a "
                            "masked token need 3 positions")
    if args.vocab_extra_ids < masked:
        raise ArgumentError(
            f"--vocab-extra-ids {args.vocab_extra_ids} sentinels cannot mark up to {masked} masked "
            f"spans of --encoder-seq-length {args.encoder_seq_length}; shorten the encoder or use "
            "a tokenizer with more sentinels"
        )
    if args.tokenizer_type is None:
        raise ArgumentError("T5 needs --tokenizer-type: SentencePieceTokenizer with a --tokenizer-model holding "
                            "sentinels, or BertWordPieceCase with --vocab-file (as Megatron-LM's T5 script)")
    tokenizer = tokenizer_from_args(args)
    sentinels = len(getattr(tokenizer, "additional_special_tokens_ids", []))
    if sentinels < args.vocab_extra_ids:
        raise ArgumentError(
            f"--tokenizer-model {args.tokenizer_model} holds {sentinels} sentinel pieces but "
            f"--vocab-extra-ids is {args.vocab_extra_ids}; train it with "
            f"data_tools/train_tokenizer.py --vocab-extra-ids {args.vocab_extra_ids}"
        )
    args.position_embedding_type = args.position_embedding_type or "relative"
    if args.position_embedding_type == "learned_absolute":
        args.max_position_embeddings = args.max_position_embeddings or max(
            args.encoder_seq_length, args.decoder_seq_length
        )
        if max(args.encoder_seq_length, args.decoder_seq_length) > args.max_position_embeddings:
            raise ArgumentError("--encoder/--decoder-seq-length exceed --max-position-embeddings")
    else:
        args.max_position_embeddings = args.max_position_embeddings or max(
            args.encoder_seq_length, args.decoder_seq_length
        )
    try:
        moe_layer_patterns(args.moe_layer_freq, args.encoder_num_layers, args.decoder_num_layers)
    except ValueError as error:
        raise ArgumentError(str(error)) from None


def build_model(args, config, vocab_size, pre_process=True, post_process=True, vp_stage=None):
    # validate_t5_args refuses pipeline parallelism: one chunk holds the whole model.
    encoder_config = dataclasses.replace(config, num_layers=args.encoder_num_layers)
    return build_t5_moe_model(
        config,
        encoder_config,
        vocab_size=vocab_size,
        max_sequence_length=args.max_position_embeddings,
        position_embedding_type=args.position_embedding_type,
        relative_attention_num_buckets=args.relative_attention_num_buckets,
        relative_attention_max_distance=args.relative_attention_max_distance,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
    )


def forward(batch, model):
    """One micro-batch through the model: per-token losses over the decoder's targets, and the
    mask of the tokens that count."""
    device = compute_device()
    encoder_tokens = batch["text_enc"].long()
    decoder_tokens = batch["text_dec"].long()
    encoder_mask, decoder_mask, cross_mask = T5MaskedWordPieceDataset.config_attention_mask(
        encoder_tokens, decoder_tokens, batch["enc_mask"], batch["dec_mask"], use_local=True
    )
    per_token = model(
        encoder_tokens.to(device),
        decoder_tokens.to(device),
        encoder_mask.to(device),
        decoder_mask.to(device),
        cross_mask.to(device),
        lm_labels=batch["labels"].long().to(device),
    )
    return per_token, batch["loss_mask"].to(device)


T5_TASK = ModelTask(
    name="T5-MoE",
    build_model=build_model,
    build_datasets=build_t5_datasets,
    forward=forward,
    tokens_per_sample=lambda args: args.encoder_seq_length + args.decoder_seq_length,
    flops_per_sample=t5_flops_per_sample,
    validate=validate_t5_args,
    router_loss_groups=lambda args: {
        "encoder": range(0, args.encoder_num_layers),
        "decoder": range(args.encoder_num_layers, args.encoder_num_layers + args.decoder_num_layers),
    },
)
