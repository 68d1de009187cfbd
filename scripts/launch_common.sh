# Sourced by the pretrain_*_distributed.sh launchers: what every model's launch shares.
#   Node layout, Megatron-LM style: GPUS_PER_NODE (default: the GPUs here, or 1), NNODES (1),
#   NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (6000).
#   CHECKPOINT_DIR (checkpoints/$MODEL_NAME), TENSORBOARD_DIR ($CHECKPOINT_DIR/tensorboard),
#   WANDB_PROJECT / WANDB_EXP_NAME (optional), PRECISION (bf16 or fp32),
#   Parallel layout, checked against the processes before anything starts:
#   TENSOR_PARALLEL (1; above 1 adds --sequence-parallel, as MoE needs), PIPELINE_PARALLEL (1),
#   VIRTUAL_PIPELINE_LAYERS (unset; layers per interleaved pipeline chunk), EXPERT_TENSOR_PARALLEL
#   (1: experts whole), EXPERT_PARALLEL (default: processes / (PIPELINE_PARALLEL x
#   EXPERT_TENSOR_PARALLEL)); data parallel takes what is left. LSH_NUM_HASHES (16),
#   LSH_TARGET_COMPRESSION and LSH_ERROR_BOUND (a number or off; unset: the flags' defaults),
#   LSH_SCOPE (all, or inter-node: compress only what crosses between nodes).
#   DATA_PATH (required), VALID_DATA_PATH (optional: held-out data instead of a --split),
#   TOKENIZER_MODEL (required).
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
WORLD_SIZE=$((GPUS_PER_NODE * NNODES))
# On SIGTERM torchrun forwards it to the workers and kills them this many seconds later: time for
# --exit-signal-handler's last step and save (the SLURM script's warning is 300 s). An environment
# variable rather than --shutdown-timeout, which older torchruns lack.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}
DISTRIBUTED_ARGS=(
    --nproc_per_node "$GPUS_PER_NODE"
    --nnodes "$NNODES"
    --node_rank "$NODE_RANK"
    --master_addr "$MASTER_ADDR"
    --master_port "$MASTER_PORT"
)

DATA_PATH=${DATA_PATH:?set DATA_PATH to a preprocessed prefix (data_tools/preprocess_data.py)}
TOKENIZER_MODEL=${TOKENIZER_MODEL:?set TOKENIZER_MODEL to a SentencePiece .model}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/$MODEL_NAME}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$CHECKPOINT_DIR/tensorboard}
TENSOR_PARALLEL=${TENSOR_PARALLEL:-1}
PIPELINE_PARALLEL=${PIPELINE_PARALLEL:-1}
EXPERT_TENSOR_PARALLEL=${EXPERT_TENSOR_PARALLEL:-1}

layout_error() {
    echo "error: $*" >&2
    exit 2
}
for knob in TENSOR_PARALLEL PIPELINE_PARALLEL EXPERT_TENSOR_PARALLEL ${EXPERT_PARALLEL:+EXPERT_PARALLEL} \
        ${VIRTUAL_PIPELINE_LAYERS:+VIRTUAL_PIPELINE_LAYERS}; do
    [[ "${!knob}" =~ ^[1-9][0-9]*$ ]] || layout_error "$knob=${!knob} must be a positive integer"
done
if (( WORLD_SIZE % (TENSOR_PARALLEL * PIPELINE_PARALLEL) )); then
    layout_error "TENSOR_PARALLEL=$TENSOR_PARALLEL x PIPELINE_PARALLEL=$PIPELINE_PARALLEL must divide" \
        "the $WORLD_SIZE processes (GPUS_PER_NODE=$GPUS_PER_NODE x NNODES=$NNODES)"
fi
if (( WORLD_SIZE % (EXPERT_TENSOR_PARALLEL * PIPELINE_PARALLEL) )); then
    layout_error "EXPERT_TENSOR_PARALLEL=$EXPERT_TENSOR_PARALLEL x PIPELINE_PARALLEL=$PIPELINE_PARALLEL" \
        "must divide the $WORLD_SIZE processes (GPUS_PER_NODE=$GPUS_PER_NODE x NNODES=$NNODES)"
fi
EXPERT_PARALLEL=${EXPERT_PARALLEL:-$((WORLD_SIZE / (EXPERT_TENSOR_PARALLEL * PIPELINE_PARALLEL)))}
if (( WORLD_SIZE % (EXPERT_PARALLEL * EXPERT_TENSOR_PARALLEL * PIPELINE_PARALLEL) )); then
    layout_error "EXPERT_PARALLEL=$EXPERT_PARALLEL x EXPERT_TENSOR_PARALLEL=$EXPERT_TENSOR_PARALLEL x" \
        "PIPELINE_PARALLEL=$PIPELINE_PARALLEL must divide the $WORLD_SIZE processes" \
        "(GPUS_PER_NODE=$GPUS_PER_NODE x NNODES=$NNODES)"
fi
PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TENSOR_PARALLEL"
    --pipeline-model-parallel-size "$PIPELINE_PARALLEL"
    --expert-model-parallel-size "$EXPERT_PARALLEL"
    --expert-tensor-parallel-size "$EXPERT_TENSOR_PARALLEL"
)
if (( TENSOR_PARALLEL > 1 )); then
    PARALLEL_ARGS+=(--sequence-parallel)
fi
if [ -n "${VIRTUAL_PIPELINE_LAYERS:-}" ]; then
    PARALLEL_ARGS+=(--num-layers-per-virtual-pipeline-stage "$VIRTUAL_PIPELINE_LAYERS")
fi

LSH_ARGS=(--lsh)  # training's default (the bound, 16 levels of hashes, 8-bit payloads)
if [ -n "${LSH_NUM_HASHES:-}" ]; then
    LSH_ARGS+=(--lsh-num-hashes "$LSH_NUM_HASHES")
fi
if [ -n "${LSH_TARGET_COMPRESSION:-}" ]; then
    LSH_ARGS+=(--lsh-target-compression "$LSH_TARGET_COMPRESSION")
fi
if [ -n "${LSH_ERROR_BOUND:-}" ]; then
    LSH_ARGS+=(--lsh-error-bound "$LSH_ERROR_BOUND")
fi
if [ -n "${LSH_SCOPE:-}" ]; then
    LSH_ARGS+=(--lsh-scope "$LSH_SCOPE")
fi

PRECISION_ARGS=()
if [ "${PRECISION:-bf16}" = bf16 ]; then
    PRECISION_ARGS+=(--bf16)
fi

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
    EVAL_AND_LOGGING_ARGS+=(--wandb-project "$WANDB_PROJECT" --wandb-exp-name "${WANDB_EXP_NAME:-$MODEL_NAME}")
fi
