#!/usr/bin/env bash
# GPT-MoE pretraining with LSH-compressed expert parallelism on one or many nodes.
#
# Run this on every node (or let scripts/slurm_pretrain.sbatch do it):
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=8 \
#   DATA_PATH=data/gpt/train_text_document TOKENIZER_MODEL=data/tokenizer/spm.model \
#   bash scripts/pretrain_gpt_moe_distributed.sh [extra flags]
# Extra flags go to pretrain_gpt_moe.py and override the ones below; the environment knobs
# are listed in scripts/launch_common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_NAME=gpt-moe
source scripts/launch_common.sh

MODEL_ARGS=(
    --num-layers 12
    --hidden-size 768
    --num-attention-heads 12
    --seq-length 1024
    --max-position-embeddings 1024
    --position-embedding-type rope
    --normalization RMSNorm
    --swiglu
    --disable-bias-linear
    --attention-dropout 0.0
    --hidden-dropout 0.0
)

MOE_ARGS=(
    --num-experts 8
    --moe-router-topk 2
    --moe-layer-freq 2
    --moe-aux-loss-coeff 1e-2
    --moe-token-dispatcher-type alltoall
)

TRAINING_ARGS=(
    --micro-batch-size 8
    --global-batch-size 256
    --train-iters 20000
    --lr 3e-4
    --min-lr 3e-5
    --lr-decay-style cosine
    --lr-warmup-iters 500
    --weight-decay 0.1
    --adam-beta2 0.95
    --clip-grad 1.0
)

DATA_ARGS=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
if [ -n "${VALID_DATA_PATH:-}" ]; then  # separate held-out data instead of a split
    DATA_ARGS+=(--train-data-path $DATA_PATH --valid-data-path $VALID_DATA_PATH)
else
    DATA_ARGS+=(--data-path $DATA_PATH --split 969,30,1)
fi

exec torchrun "${DISTRIBUTED_ARGS[@]}" pretrain_gpt_moe.py \
    "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${LSH_ARGS[@]}" "${TRAINING_ARGS[@]}" \
    "${PRECISION_ARGS[@]}" "${DATA_ARGS[@]}" "${EVAL_AND_LOGGING_ARGS[@]}" "$@"
