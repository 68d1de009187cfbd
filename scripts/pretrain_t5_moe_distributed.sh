#!/usr/bin/env bash
# T5-MoE (span corruption) pretraining with LSH-compressed expert parallelism, one or many nodes.
#
# Data: preprocess with --split-sentences and a tokenizer trained with --vocab-extra-ids 100.
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=8 \
#   DATA_PATH=data/t5/train_text_sentence TOKENIZER_MODEL=data/tokenizer/spm_t5.model \
#   bash scripts/pretrain_t5_moe_distributed.sh [extra flags]
# Extra flags go to pretrain_t5_moe.py and override the ones below; the environment knobs
# are listed in scripts/launch_common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_NAME=t5-moe
source scripts/launch_common.sh

MODEL_ARGS=(
    --encoder-num-layers 12
    --decoder-num-layers 12
    --hidden-size 768
    --ffn-hidden-size 3072
    --num-attention-heads 12
    --kv-channels 64
    --encoder-seq-length 512
    --decoder-seq-length 128
    --position-embedding-type relative
    --normalization RMSNorm
    --disable-bias-linear
    --vocab-extra-ids 100
)

MOE_ARGS=(
    --num-experts 8
    --moe-router-topk 1
    --moe-layer-freq 2
    --moe-aux-loss-coeff 1e-2
    --moe-token-dispatcher-type alltoall
)

TRAINING_ARGS=(
    --micro-batch-size 16
    --global-batch-size 256
    --train-iters 100000
    --lr 1e-4
    --min-lr 1e-5
    --lr-decay-style linear
    --lr-warmup-iters 1000
    --weight-decay 0.01
    --clip-grad 1.0
)

DATA_ARGS=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
if [ -n "${VALID_DATA_PATH:-}" ]; then  # separate held-out data instead of a split
    DATA_ARGS+=(--train-data-path $DATA_PATH --valid-data-path $VALID_DATA_PATH)
else
    DATA_ARGS+=(--data-path $DATA_PATH --split 949,50,1)
fi

exec torchrun "${DISTRIBUTED_ARGS[@]}" pretrain_t5_moe.py \
    "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${LSH_ARGS[@]}" "${TRAINING_ARGS[@]}" \
    "${PRECISION_ARGS[@]}" "${DATA_ARGS[@]}" "${EVAL_AND_LOGGING_ARGS[@]}" "$@"
