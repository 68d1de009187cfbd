"""GPT-MoE pretraining: the model, data and loss the shared loop needs."""

from __future__ import annotations

from megatron_lsh.data.gpt_data import build_gpt_datasets
from megatron_lsh.device import compute_device
from megatron_lsh.models import build_gpt_moe_model
from megatron_lsh.training.arguments import validate_gpt_args
from megatron_lsh.training.flops import gpt_flops_per_sample
from megatron_lsh.training.task import ModelTask


def build_model(args, config, vocab_size, pre_process=True, post_process=True, vp_stage=None):
    model = build_gpt_moe_model(
        config,
        vocab_size=vocab_size,
        max_sequence_length=args.max_position_embeddings,
        position_embedding_type=args.position_embedding_type,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        rotary_base=args.rotary_base,
        rotary_percent=getattr(args, "rotary_percent", 1.0),
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
    )
    positions = getattr(getattr(model, "embedding", None), "position_embeddings", None)
    if positions is not None:
        # megatron-core makes the learned position table a plain fp32 torch Embedding (Megatron-LM's
        # Float16Module casts the whole model); in 16-bit runs it joins the word embeddings' dtype.
        positions.to(config.params_dtype)
    return model


def forward(batch, model):
    """One micro-batch through the model: per-token next-token losses (hidden states on a
    pipeline stage before the last), and the mask of the tokens that count."""
    device = compute_device()
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    return model(tokens, position_ids, None, labels=labels), loss_mask


GPT_TASK = ModelTask(
    name="GPT-MoE",
    build_model=build_model,
    build_datasets=build_gpt_datasets,
    forward=forward,
    tokens_per_sample=lambda args: args.seq_length,
    flops_per_sample=gpt_flops_per_sample,
    validate=validate_gpt_args,
)
