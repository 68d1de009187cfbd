"""GPT-MoE: megatron-core's GPTModel whose MoE layers use the LSH dispatcher."""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lsh.models.attention import FusedDotProductAttention, fused_attention_wanted
from megatron_lsh.models.norm import with_sequence_parallel_norms
from megatron_lsh.moe.specs import replace_modules, with_lsh_moe


def gpt_moe_block_spec(config: TransformerConfig, use_transformer_engine: bool = False,
                       vp_stage: Optional[int] = None):
    """megatron-core's GPT decoder block spec (MoE every ``config.moe_layer_freq`` layers) for
    this pipeline stage (and virtual stage), with LSHMoELayer in place of MoELayer and norms
    that allow sequence parallelism."""
    # Without Transformer Engine megatron-core's grouped experts need the grouped_gemm package;
    # ours (moe/experts.py) replace its SequentialMLP instead.
    ours = config.moe_grouped_gemm and not use_transformer_engine
    spec_config = copy.copy(config)
    spec_config.moe_grouped_gemm = config.moe_grouped_gemm and use_transformer_engine
    spec = with_sequence_parallel_norms(with_lsh_moe(
        get_gpt_decoder_block_spec(
            spec_config,
            use_transformer_engine=use_transformer_engine,
            normalization=config.normalization,
            vp_stage=vp_stage,
        ),
        grouped_gemm=ours,
        gradient_study=getattr(config, "lsh_gradient_study", None) is not None,
    ))
    if not use_transformer_engine and fused_attention_wanted(config.attention_backend):
        spec = replace_modules(spec, {DotProductAttention: FusedDotProductAttention})
    return spec


def build_gpt_moe_model(
    config: TransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    position_embedding_type: str = "rope",
    share_embeddings_and_output_weights: bool = True,
    use_transformer_engine: bool = False,
    rotary_base: int = 10000,
    rotary_percent: float = 1.0,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
) -> GPTModel:
    """The whole model, or under pipeline parallelism the chunk of this rank's (virtual) stage:
    pre_process on the first stage (embedding), post_process on the last (output layer, loss)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=gpt_moe_block_spec(config, use_transformer_engine, vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        rotary_base=rotary_base,
        rotary_percent=rotary_percent,
    )
