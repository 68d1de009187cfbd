#!/usr/bin/env bash
# Export the newest checkpoint of a run to a Hugging Face model directory.
#   bash scripts/convert_to_hf.sh CHECKPOINT_DIR OUTPUT_DIR [--dtype bf16]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
    echo "usage: $0 CHECKPOINT_DIR OUTPUT_DIR [--dtype fp32|bf16|fp16]" >&2
    exit 2
fi
exec python -m megatron_lsh.tools.convert --load "$1" --output "$2" "${@:3}"
