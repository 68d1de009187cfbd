"""megatron-core's local DotProductAttention, with an additive attention bias or fused.

BiasedDotProductAttention: T5Model hands each self-attention its relative-position bias, which megatron-core only
accepts
in Transformer Engine's attention; the local one asserts it away. This subclass adds the bias
to the scaled scores, before the mask and the softmax (TE's "post-scale bias"), by handing the
softmax a mask that carries it; everything else is megatron-core's own code.

FusedDotProductAttention (--attention-backend flash|fused, and auto on a GPU): the same
attention through torch's scaled_dot_product_attention, which picks its flash or
memory-efficient kernels on a GPU instead of materialising the [b, heads, s, s] scores. It
takes what those kernels express exactly: causal or unmasked attention without a bias, a plain
softmax, no sliding window; anything else (a padding mask, T5's bias) runs megatron-core's
unfused path, with the same parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer import utils as transformer_utils
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType


@dataclass
class _MaskWithBias:
    mask: Optional[torch.Tensor]
    bias: torch.Tensor


class BiasedDotProductAttention(DotProductAttention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        softmax = self.scale_mask_softmax
        plain_mask_func = softmax.mask_func

        def add_bias_then_mask(scores, mask):
            if not isinstance(mask, _MaskWithBias):
                return plain_mask_func(scores, mask)
            scores = scores + mask.bias.to(scores.dtype)
            bool_mask = mask.mask
            if bool_mask is None and softmax.attn_mask_type == AttnMaskType.causal and scores.size(2) > 1:
                bool_mask = transformer_utils.get_default_causal_mask(scores.size(2)).to(scores.device)
            return scores if bool_mask is None else plain_mask_func(scores, bool_mask)

        softmax.mask_func = add_bias_then_mask

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            attention_mask = _MaskWithBias(attention_mask, attention_bias)
        return super().forward(query, key, value, attention_mask, attn_mask_type, None, packed_seq_params)


def fused_attention_wanted(backend: AttnBackend) -> bool:
    """Megatron-LM's --attention-backend: flash and fused are fused kernels; auto picks them on a
    GPU (on CPU torch's fused path is no faster, and megatron-core's unfused one stays)."""
    return backend in (AttnBackend.flash, AttnBackend.fused) or (
        backend == AttnBackend.auto and torch.cuda.is_available())


class FusedDotProductAttention(DotProductAttention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.config
        # What the fused kernels compute as megatron-core does: a softmax of the scaled scores.
        self.fusable = (self.softmax_offset is None and self.scale_mask_softmax.window_size is None
                        and not config.apply_query_key_layer_scaling)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        # query [sq, b, heads, d], key and value [sk, b, groups, d]; returns [sq, b, heads * d].
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        if (not self.fusable or attention_mask is not None or attention_bias is not None
                or packed_seq_params is not None or mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask)
                or (causal and query.size(0) != key.size(0))):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads or groups, s, d]
        dropout = self.attention_dropout.p if self.training else 0.0
        attend = partial(F.scaled_dot_product_attention, q, k, v, dropout_p=dropout, scale=self.softmax_scale,
                         is_causal=causal and query.size(0) > 1,
                         enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition)
        if dropout and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():  # the model-parallel stream, as megatron-core
                context = attend()
        else:
            context = attend()
        return context.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1), self.hidden_size_per_partition)
