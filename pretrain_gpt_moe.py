"""Pretrain a GPT-MoE with LSH-compressed expert parallelism. Launch with torchrun; see scripts/."""

from megatron_lsh.training.arguments import parse_args
from megatron_lsh.training.gpt_task import GPT_TASK
from megatron_lsh.training.loop import pretrain

if __name__ == "__main__":  # dist_checkpointing's writer re-imports this module in a subprocess
    pretrain(GPT_TASK, parse_args(__doc__))
