"""megatron-core's local DotProductAttention with an additive attention bias.

T5Model hands each self-attention its relative-position bias, which megatron-core only accepts
in Transformer Engine's attention; the local one asserts it away. This subclass adds the bias
to the scaled scores, before the mask and the softmax (TE's "post-scale bias"), by handing the
softmax a mask that carries it; everything else is megatron-core's own code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.transformer import utils as transformer_utils
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


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
