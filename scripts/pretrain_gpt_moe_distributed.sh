#!/usr/bin/env bash
# GPT-MoE pretraining with LSH-compressed expert parallelism on one or many nodes.
#
# Run this on every node (or let scripts/slurm_pretrain_gpt_moe.sbatch do it):
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=8 \
#   DATA_PATH=data/gpt/train_text_document TOKENIZER_MODEL=data/tokenizer/spm.model \
#   CHECKPOINT_DIR=checkpoints/gpt-moe bash scripts/pretrain_gpt_moe_distributed.sh [extra flags]
# Extra flags are passed to pretrain_gpt_moe.py and override the ones below; PRECISION=fp32 drops --bf16.
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
WORLD_SIZE=$((GPUS_PER_NODE * NNODES))

DATA_PATH=${DATA_PATH:?set DATA_PATH to a preprocessed prefix (data_tools/preprocess_data.py)}
TOKENIZER_MODEL=${TOKENIZER_MODEL:?set TOKENIZER_MODEL to a SentencePiece .model}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/gpt-moe}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$CHECKPOINT_DIR/tensorboard}
EXPERT_PARALLEL=${EXPERT_PARALLEL:-$WORLD_SIZE}

DISTRIBUTED_ARGS=(
    --nproc_per_node "$GPUS_PER_NODE"
    --nnodes "$NNODES"
    --node_rank "$NODE_RANK"
    --master_addr "$MASTER_ADDR"
    --master_port "$MASTER_PORT"
)

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
    --expert-model-parallel-size "$EXPERT_PARALLEL"
)

LSH_ARGS=(
    --lsh
    --lsh-hash-type cross_polytope
    --lsh-num-hashes 6
    --lsh-num-buckets 4
    --lsh-error-compensation
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
if [ "${PRECISION:-bf16}" = bf16 ]; then
    TRAINING_ARGS+=(--bf16)
fi

DATA_ARGS=(
    --data-path $DATA_PATH
    --split 969,30,1
    --tokenizer-type SentencePieceTokenizer
    --tokenizer-model "$TOKENIZER_MODEL"
)

EVAL_AND_LOGGING_ARGS=(
    --log-interval 10
    --eval-interval 500
    --eval-iters 20
    --save "$CHECKPOINT_DIR"
    --load "$CHECKPOINT_DIR"
    --save-interval 1000
    --tensorboard-dir "$TENSORBOARD_DIR"
)
if [ -n "${WANDB_PROJECT:-}" ]; then
    EVAL_AND_LOGGING_ARGS+=(--wandb-project "$WANDB_PROJECT" --wandb-exp-name "${WANDB_EXP_NAME:-gpt-moe-lsh}")
fi

exec torchrun "${DISTRIBUTED_ARGS[@]}" pretrain_gpt_moe.py \
    "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${LSH_ARGS[@]}" "${TRAINING_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${EVAL_AND_LOGGING_ARGS[@]}" "$@"
