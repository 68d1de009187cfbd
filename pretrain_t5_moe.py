"""Pretrain a T5-MoE with LSH-compressed expert parallelism. Launch with torchrun; see scripts/."""

from megatron_lsh.training.arguments import parse_args
from megatron_lsh.training.loop import pretrain
from megatron_lsh.training.t5_task import T5_TASK, add_t5_args

if __name__ == "__main__":  # dist_checkpointing's writer re-imports this module in a subprocess
    pretrain(T5_TASK, parse_args(__doc__, extra_args=add_t5_args))
