#!/usr/bin/env bash
# GPT-MoE pretraining on the GPUs (or CPU processes: GPUS_PER_NODE=2 PRECISION=fp32) of this machine.
#   DATA_PATH=... TOKENIZER_MODEL=... bash scripts/pretrain_gpt_moe_single_node.sh [extra flags]
set -euo pipefail
NNODES=1 NODE_RANK=0 MASTER_ADDR=localhost exec bash "$(dirname "$0")/pretrain_gpt_moe_distributed.sh" "$@"
