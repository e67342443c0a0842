#!/usr/bin/env bash
# The one prepared GPU script (DESIGN.md "GPU runs"): on a fresh GPU machine with no network,
# in one call under 10 minutes, install the carried wheels, build csrc, run the GPU tests, the
# kernel microbenchmarks and the measured latency table, and write every log and table to
# OUTDIR. Each stage is time-boxed and may fail without stopping the others; a summary is
# printed last (and written to OUTDIR/summary.txt).
#
# Usage (from the repository root or anywhere):
#   bash bench/gpu_check.sh OUTDIR              # on the GPU machine
#   bash bench/gpu_check.sh OUTDIR --dry-run    # on a CPU: each stage's cheap stand-in
#
# Environment knobs (all optional):
#   GPU_CHECK_BUDGET_S  total seconds for all stages (default 540)
#   GPU_CHECK_MAX_STAGE_S  upper bound on any one stage's time box (default: none)
#   GPU_CHECK_SKIP      comma-separated stages to skip (env,wheels,build,cmake,gpu_tests,
#                       kernel_bench,latency,gpu_interop,gpu_adapt,quantizer_speed); default
#                       "cmake"
#   PYTHON              interpreter (default python3)
#   WHEEL_DIR           carried wheels (default .whl; see bench/fetch_gpu_wheels.sh)
#   DCGEN_QUANT_CUDA_ARCHS, DCGEN_QUANT_SKIP_CUDA   passed through to the CUDA build (default
#                       archs: the GPU's own, from nvidia-smi)
#
# With the device tool: carry [".whl"] and run, e.g.,
#   bash bench/gpu_check.sh "$OUT/gpu" ; cp -r bench/results "$OUT/" 2>/dev/null
# Files in OUTDIR: summary.txt, <stage>.log, latency/<gpu>-<date>.{md,json,png},
# kernel_bench/, gpu_interop/ and quantizer_speed/ (their .md/.json), gpu_tests.xml.

set -uo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR [--dry-run]" >&2
    exit 2
fi
OUTDIR="$1"
DRY=0
if [[ "${2:-}" == "--dry-run" ]]; then
    DRY=1
elif [[ -n "${2:-}" ]]; then
    echo "unknown argument: $2 (expected --dry-run)" >&2
    exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python3}"
WHEEL_DIR="${WHEEL_DIR:-.whl}"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
# cmake (the standalone library build) is checked by CPU CI already; on the GPU it would only
# spend the budget, so it is skipped unless GPU_CHECK_SKIP is set explicitly.
SKIP=",${GPU_CHECK_SKIP-cmake},"
MAX_STAGE="${GPU_CHECK_MAX_STAGE_S:-100000}"
START=$(date +%s)
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

# stage NAME LIMIT_S COMMAND...: run COMMAND in bash under `timeout`, log to OUTDIR/NAME.log,
# record "NAME ok|FAILED rc=N|TIMEOUT|skipped  seconds" in the summary. Never exits the script.
stage() {
    local name="$1" limit="$2"
    shift 2
    if [[ "$SKIP" == *",$name,"* ]]; then
        printf '%-16s skipped (GPU_CHECK_SKIP)\n' "$name" >>"$SUMMARY"
        return 0
    fi
    local left
    left=$(remaining)
    if ((left < 15)); then
        printf '%-16s skipped (budget spent)\n' "$name" >>"$SUMMARY"
        return 0
    fi
    ((limit > left - 5)) && limit=$((left - 5))
    ((limit > MAX_STAGE)) && limit=$MAX_STAGE
    local t0 rc status
    t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*" >"$OUTDIR/$name.log"
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" bash -c "$*" >>"$OUTDIR/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        5) [[ "$name" == gpu_tests ]] && status="ok (no tests collected)" || status="FAILED rc=5" ;;
        *) status="FAILED rc=$rc" ;;
    esac
    printf '%-16s %-24s %4ss  %s\n' "$name" "$status" "$(($(date +%s) - t0))" "$name.log" >>"$SUMMARY"
    tail -n +2 "$OUTDIR/$name.log" | tail -n 5
    return 0
}

has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

# --- env: versions of everything that shapes the numbers -------------------------------------
stage env 30 "
    date -u; uname -a; nproc
    (nvidia-smi || echo 'nvidia-smi: absent') 2>&1
    (nvcc --version || echo 'nvcc: absent') 2>&1
    $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name())'
    $PY -c 'import triton; print(\"triton\", triton.__version__)' || echo 'triton: absent'
    $PY -m pip list 2>/dev/null | grep -iE '^(torch|triton|diffusers|numpy|safetensors|pytest|pytest-benchmark|huggingface) ' || true
"

# --- wheels: diffusers and its missing requirements, carried in WHEEL_DIR --------------------
if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
    if ((DRY)); then
        stage wheels 30 "ls -l '$WHEEL_DIR'; unzip -l '$WHEEL_DIR'/diffusers-*.whl | tail -1"
    else
        stage wheels 90 "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site '$WHEEL_DIR'/*.whl && ls /tmp/site"
        if [[ -d /tmp/site ]]; then export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"; fi
    fi
else
    printf '%-16s skipped (no %s/*.whl; run bench/fetch_gpu_wheels.sh)\n' wheels "$WHEEL_DIR" >>"$SUMMARY"
fi

# --- build: install the project; setup.py builds csrc with nvcc when it is present ------------
# Only this GPU's architecture (e.g. 9.0 -> 90a): a fifth of the default five-architecture build.
if ((!DRY)) && [[ -z "${DCGEN_QUANT_CUDA_ARCHS:-}" ]]; then
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
    case "$cc" in
        90 | 100 | 120) export DCGEN_QUANT_CUDA_ARCHS="${cc}a" ;;
        [0-9][0-9]) export DCGEN_QUANT_CUDA_ARCHS="$cc" ;;
    esac
fi
if ((DRY)); then
    stage build 120 "$PY -c 'import dcgen_quant, dcgen_quant.bench.latency; print(dcgen_quant.__file__)'"
else
    # no network: no build isolation; the build log (nvcc lines) goes to build.log
    stage build 240 "$PY -m pip install -v --no-index --no-deps --no-build-isolation -e . \
        || { echo '### CUDA build failed: installing without it (DCGEN_QUANT_SKIP_CUDA=1)';
             DCGEN_QUANT_SKIP_CUDA=1 $PY -m pip install --no-index --no-deps --no-build-isolation -e .; exit 1; }"
fi
if [[ -f csrc/CMakeLists.txt ]]; then
    if ((DRY)); then
        stage cmake 60 "cmake --version && ls csrc"
    else
        stage cmake 150 "cmake -S csrc -B build/csrc-standalone -G Ninja -DCMAKE_BUILD_TYPE=Release \
            && cmake --build build/csrc-standalone -j \$(nproc)"
    fi
fi

# --- GPU tests ---------------------------------------------------------------------------------
if ((DRY)); then
    stage gpu_tests 120 "$PY -m pytest -m gpu --collect-only -q -p no:cacheprovider"
else
    stage gpu_tests 150 "$PY -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml='$OUTDIR/gpu_tests.xml'"
fi

# --- kernel microbenchmarks (triton engineer's module) ----------------------------------------
if has_module dcgen_quant.bench.kernel_bench; then
    if ((DRY)); then
        stage kernel_bench 60 "$PY -m dcgen_quant.bench.kernel_bench --help"
    else
        # first calls autotune and compile: give it room, and let it stop itself in time
        stage kernel_bench 180 "$PY -m dcgen_quant.bench.kernel_bench --budget-s 160 \
            --out '$OUTDIR/kernel_bench'"
    fi
else
    printf '%-16s skipped (dcgen_quant.bench.kernel_bench not in this build)\n' kernel_bench >>"$SUMMARY"
fi

# --- imported Nunchaku-format FLUX blocks through the Triton and CUDA backends (interop) ----------
if ((DRY)); then
    stage gpu_interop 180 "$PY -m dcgen_quant.bench.gpu_interop --dry-run --formats int4 --out '$OUTDIR/gpu_interop'"
else
    stage gpu_interop 120 "$PY -m dcgen_quant.bench.gpu_interop --out '$OUTDIR/gpu_interop'"
fi

# --- measured latency table (base vs DC-Gen, bf16 and W4A4 when kernels serve it) -------------
if ((DRY)); then
    stage latency 240 "$PY -m dcgen_quant bench table --measured --tiny --out '$OUTDIR/latency'"
else
    left=$(remaining)
    lat_limit=$((left - 40 > 330 ? 330 : left - 40))
    lat_budget=$((lat_limit - 90 > 30 ? lat_limit - 90 : 30))
    stage latency "$lat_limit" "$PY -m dcgen_quant bench table --measured --budget-s $lat_budget \
        --out '$OUTDIR/latency'"
fi

# --- DC-Gen stage 3 at full width, with and without checkpointing: step time, peak vs plan -------
stage gpu_adapt 150 "$PY -m dcgen_quant.bench.gpu_adapt --out '$OUTDIR/gpu_adapt'$( ((DRY)) && echo ' --dry-run')"

# --- quantizer speed (quantizer engineer's module), last: least GPU-specific --------------------
if has_module dcgen_quant.bench.quantizer_speed; then
    if ((DRY)); then
        stage quantizer_speed 60 "$PY -m dcgen_quant.bench.quantizer_speed --help"
    else
        stage quantizer_speed 60 "$PY -m dcgen_quant.bench.quantizer_speed --quick --out '$OUTDIR/quantizer_speed'"
    fi
else
    printf '%-16s skipped (dcgen_quant.bench.quantizer_speed not in this build)\n' quantizer_speed >>"$SUMMARY"
fi

# --- summary, printed last ---------------------------------------------------------------------
{
    echo "total $(($(date +%s) - START))s of ${BUDGET}s budget; dry_run=$DRY; outdir=$OUTDIR"
    for f in "$OUTDIR"/latency/*.md; do
        # shellcheck disable=SC2016  # the backticks are the markdown fence, not a substitution
        [[ -f "$f" ]] && sed -n '/^```/,/^```/p' "$f" | head -n 12
    done
} >>"$SUMMARY"
echo
echo "==================== gpu_check summary ===================="
cat "$SUMMARY"
