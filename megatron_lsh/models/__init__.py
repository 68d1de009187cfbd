"""GPT-MoE and T5-MoE builders over megatron-core models with LSH MoE layer specs."""

from megatron_lsh.models.gpt import build_gpt_moe_model, gpt_moe_block_spec

__all__ = ["build_gpt_moe_model", "gpt_moe_block_spec"]
