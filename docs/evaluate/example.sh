#!/usr/bin/env bash
# Makes the example pictures docs/evaluate/grid.png and docs/evaluate/layers.png (README.md,
# docs/EVALUATE.md): the embedded tiny SANA quantized twice, SVDQuant INT4 (the default) and
# plain round-to-nearest W4A4 (--rank 0 --no-smooth --no-gptq --no-clip-search), both evaluated
# against the 16-bit model.
#
# Usage, from anywhere (a few minutes on 2 CPU cores):
#   bash docs/evaluate/example.sh [WORKDIR]      # default WORKDIR: a new temporary directory
# PYTHON selects the interpreter (default python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="${1:-$(mktemp -d)}"
py="${PYTHON:-python3}"
cd "$here/../.."

"$py" -m dcgen_quant quantize --model tiny-sana --out "$work/sana-int4.safetensors"
"$py" -m dcgen_quant quantize --model tiny-sana --rank 0 --no-smooth --no-gptq --no-clip-search \
    --out "$work/sana-rtn.safetensors"
"$py" -m dcgen_quant evaluate --model "$work/sana-int4.safetensors" \
    --model "$work/sana-rtn.safetensors" --prompts "$here/prompts.txt" --out "$work/eval"
cp "$work/eval/grid.png" "$work/eval/layers.png" "$here/"
echo "wrote $here/grid.png and $here/layers.png (work files in $work)"
