#!/usr/bin/env bash
# The GPU numbers to take whenever a GPU is at hand, in one call (about 6 minutes on one H200):
#   1. 50 bf16 training steps with LSH and stock, 3 repeats interleaved (benchmarks/training_steps.py);
#   2. LSH's cost against the expert MLP at hidden 4096 in bf16 (benchmarks/lsh_overhead.py);
#   3. --moe-grouped-gemm's experts against the sequential ones at 8, 32 and 64 local experts in bf16
#      (benchmarks/gemm_and_recompute.py --device cuda), and a few steps of Megatron-LM's Mixtral
#      example flags (grouped GEMM, bf16, SwiGLU, RMSNorm, recomputation, and fused attention, which
#      the default --attention-backend auto picks on a GPU) through training.
# Both keep their summaries under docs/data/ and regenerate their docs; the logs and the summaries
# also go to $OUT (default runs/gpu_check/), to be copied into docs/data/ of the checkout that
# commits them (then `--report-only` on each benchmark rewrites its doc).
#
# On a machine that reaches no package index, megatron-core travels as a cp312 wheel. Fetch it
# where pip works (into .whl/, which git is told to ignore), then carry .whl/ along:
#   bash scripts/gpu_check.sh --fetch-wheels
#   bash scripts/gpu_check.sh                      # on the GPU machine
# Without CUDA it rehearses at a tiny size on CPU and writes no docs (what the tests run).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = --fetch-wheels ]; then
    exclude=$(git rev-parse --git-path info/exclude)
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
            manylinux2014_x86_64; do
        platforms+=(--platform "$p")
    done
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "megatron-core==0.16.1"
elif [ $# -gt 0 ]; then
    echo "usage: bash scripts/gpu_check.sh [--fetch-wheels]" >&2
    exit 2
fi

OUT_DIR=${OUT:-runs/gpu_check}
mkdir -p "$OUT_DIR"
if ! python3 -c 'import megatron.core' 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

python3 - <<'EOF' 2>&1 | tee "$OUT_DIR/environment.log"
import torch, megatron.core
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {device}, megatron-core {megatron.core.__version__}")
EOF

if python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    STEPS=(--size gpu --write-doc)
    OVERHEAD=(--device cuda --dtype bf16 --hidden-sizes 4096 --write-doc)
    GEMM=(--device cuda --dtype bf16 --repeats 5 --write-doc)
    SPEED_FLAGS=(--bf16 --micro-batch-size 4 --seq-length 1024 --hidden-size 1024 --num-attention-heads 16)
else  # a rehearsal: every step of the check, at sizes a CPU runs in a minute, the docs left alone
    STEPS=(--size tiny --repeats 1 --work "$OUT_DIR/runs")
    OVERHEAD=(--hidden-sizes 64 --tokens-per-rank 256 --repeats 1)
    GEMM=(--device cpu --repeats 3 --experts-only)
    SPEED_FLAGS=(--micro-batch-size 1 --seq-length 32 --hidden-size 64 --num-attention-heads 4)
fi

failed=0
python3 benchmarks/training_steps.py "${STEPS[@]}" 2>&1 | tee "$OUT_DIR/training_steps.log" || failed=1
python3 benchmarks/lsh_overhead.py "${OVERHEAD[@]}" 2>&1 | tee "$OUT_DIR/lsh_overhead.log" || failed=1
python3 benchmarks/gemm_and_recompute.py "${GEMM[@]}" 2>&1 | tee "$OUT_DIR/gemm.log" || failed=1
# The speed flags a GPU run of Megatron-LM's Mixtral script asks for, on one process, mock data.
python3 -m torch.distributed.run --nproc_per_node 1 pretrain_gpt_moe.py --mock-data --vocab-size 32000 \
    --num-layers 2 --num-experts 8 --moe-router-topk 2 --moe-grouped-gemm --swiglu --normalization RMSNorm \
    --disable-bias-linear --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 \
    --lr 1e-4 --train-iters 20 --log-interval 5 --eval-iters 0 --num-workers 0 --log-throughput \
    "${SPEED_FLAGS[@]}" 2>&1 | tee "$OUT_DIR/speed_flags.log" || failed=1
for summary in docs/data/training_steps/cuda-*.json docs/data/lsh_overhead/cuda-*.json \
        docs/data/gemm_and_recompute_cuda.json; do
    [ -f "$summary" ] && cp "$summary" "$OUT_DIR/"
done
exit $failed
