"""T5-MoE: megatron-core's T5Model with LSH MoE layers in the encoder and the decoder.

megatron-core's T5 specs have dense MLPs and their local *block* helpers drop the final norm
without Transformer Engine, so the blocks are built here from its local *layer* specs: the MLP
of the chosen layers becomes an LSH MoE layer, the norms follow ``config.normalization``, and
self-attention takes the relative-position bias (see attention.py).
"""

from __future__ import annotations

import copy
from typing import List, Sequence, Union

import torch
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.T5 import T5Model
from megatron.core.models.T5.t5_spec import (
    decoder_model_with_local_spec,
    encoder_model_with_local_spec,
)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lsh.device import compute_device
from megatron_lsh.models.attention import BiasedDotProductAttention
from megatron_lsh.models.norm import with_sequence_parallel_norms
from megatron_lsh.moe.layer import lsh_moe_layers
from megatron_lsh.moe.specs import get_lsh_moe_module_spec

MoELayerFreq = Union[int, Sequence[int]]

# The names megatron-core's routers log their losses under.
_ROUTER_LOSS_NAMES = ("load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss", "z_loss")


def moe_layer_patterns(freq: MoELayerFreq, encoder_layers: int, decoder_layers: int):
    """(encoder pattern, decoder pattern) of 1 (MoE) / 0 (dense) per layer.

    An integer N puts an MoE layer at every layer i with i % N == 0 of each stack (Megatron's
    rule); a list gives every layer explicitly, the encoder's then the decoder's, or one pattern
    used by both stacks when they have the same depth.
    """
    if isinstance(freq, int):
        if freq < 1:
            raise ValueError(f"--moe-layer-freq {freq} must be at least 1")
        return ([int(i % freq == 0) for i in range(encoder_layers)],
                [int(i % freq == 0) for i in range(decoder_layers)])
    freq = list(freq)
    if len(freq) == encoder_layers + decoder_layers:
        return freq[:encoder_layers], freq[encoder_layers:]
    if encoder_layers == decoder_layers and len(freq) == encoder_layers:
        return list(freq), list(freq)
    raise ValueError(
        f"--moe-layer-freq has {len(freq)} entries; give {encoder_layers + decoder_layers} "
        f"(encoder then decoder layers) or an integer"
    )


def _layer_specs(dense_spec, config: TransformerConfig, pattern: List[int]):
    norm = LocalSpecProvider().layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=False)
    dense = copy.deepcopy(dense_spec)
    # Self-attention takes T5's relative-position bias; cross-attention has none, as in T5.
    dense.submodules.self_attention.submodules.core_attention = BiasedDotProductAttention
    for name in ("input_layernorm", "pre_cross_attn_layernorm", "pre_mlp_layernorm"):
        if getattr(dense.submodules, name, None) is not None and not _is_identity(getattr(dense.submodules, name)):
            setattr(dense.submodules, name, norm)
    if not config.num_moe_experts:  # a dense T5 (Megatron-LM's T5 example)
        return [dense] * len(pattern), norm
    moe = copy.deepcopy(dense)
    moe.submodules.mlp = get_lsh_moe_module_spec(config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm,
                                                 gradient_study=getattr(config, "lsh_gradient_study", None) is not None)
    return [moe if is_moe else dense for is_moe in pattern], norm


def _is_identity(module) -> bool:
    from megatron.core.transformer.identity_op import IdentityOp

    return module is IdentityOp


def build_t5_moe_model(
    config: TransformerConfig,
    encoder_config: TransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    position_embedding_type: str = "relative",
    relative_attention_num_buckets: int = 32,
    relative_attention_max_distance: int = 128,
    share_embeddings_and_output_weights: bool = True,
) -> T5Model:
    """A T5Model whose MoE layers (``config.moe_layer_freq``) use the LSH dispatcher.

    ``config`` describes the decoder and ``encoder_config`` the encoder (they differ in depth).
    Encoder and decoder MoE layers are named ``encoder_layer_N`` / ``decoder_layer_N`` in the
    compression statistics, and their routers log auxiliary losses in separate slots (encoder
    layers first), so the two stacks are never averaged together.
    """
    encoder_pattern, decoder_pattern = moe_layer_patterns(
        config.moe_layer_freq, encoder_config.num_layers, config.num_layers
    )
    encoder_layers, encoder_norm = _layer_specs(encoder_model_with_local_spec(), encoder_config, encoder_pattern)
    decoder_layers, decoder_norm = _layer_specs(decoder_model_with_local_spec(), config, decoder_pattern)
    model = T5Model(
        config=config,
        encoder_config=encoder_config,
        transformer_encoder_layer_spec=with_sequence_parallel_norms(
            TransformerBlockSubmodules(encoder_layers, layer_norm=encoder_norm)),
        transformer_decoder_layer_spec=with_sequence_parallel_norms(
            TransformerBlockSubmodules(decoder_layers, layer_norm=decoder_norm)),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        relative_attention_num_buckets=relative_attention_num_buckets,
        relative_attention_max_distance=relative_attention_max_distance,
        # T5Model's default process groups lack the expert-parallel group MoE layers need.
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )
    _reserve_router_loss_slots(encoder_config.num_layers + config.num_layers)
    for stack, offset in ((model.encoder, 0), (model.decoder, encoder_config.num_layers)):
        part = "encoder" if offset == 0 else "decoder"
        for layer in lsh_moe_layers(stack):
            number = layer.layer_number
            layer.set_layer_number(number, f"{part}_layer_{number}")
            # Aux-loss slots: encoder layers 1..E, decoder layers E+1..E+D.
            layer.router.set_layer_number(offset + number)
    return model


def _reserve_router_loss_slots(num_layers: int) -> None:
    """megatron-core sizes its per-layer router-loss tracker from the first router that logs,
    i.e. from one stack's depth; decoder routers log after the encoder's layers, so the tracker
    must have room for both stacks before the first forward pass."""
    tracker = get_moe_layer_wise_logging_tracker()
    device = compute_device()
    for name in _ROUTER_LOSS_NAMES:
        entry = tracker.setdefault(name, {})
        if "values" not in entry or entry["values"].numel() < num_layers:
            entry["values"] = torch.zeros(num_layers, device=device)
