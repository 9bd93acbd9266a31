#!/usr/bin/env bash
# The GPU check, one command on a machine with a CUDA GPU (under 8 minutes on an H200):
#
#     bash benchmarks/gpu_check.sh [RESULTS_DIR]        # default benchmarks/results/
#
# Steps (each timed, each with a time limit; a failing step does not stop the others):
#   1. pytest_gpu:  python -m pytest -m gpu -q            -> RESULTS_DIR/pytest_gpu.xml (JUnit), .log
#   2. gpu_check:   python benchmarks/gpu_check.py        -> RESULTS_DIR/gpu_check.json, .log
#                   (CUDA graphs vs eager, FP32 CUDA vs CPU with TF32 off, SDPA kernels, the GPU
#                   scheduler vs sequential segmentation through the front door; tiny model)
#   3. bench_gpu:   python benchmarks/bench_gpu.py, 2 images of 100 boxes
#                   -> RESULTS_DIR/bench_gpu.json, bench_gpu.md, .log
# Then RESULTS_DIR/summary.txt. Exit status 1 when any step failed (or ran out of time), else 0.
#
# Environment: PYTHON (default python), and the per-step limits in seconds
# GPU_CHECK_PYTEST_TIMEOUT (170), GPU_CHECK_CHECK_TIMEOUT (110), GPU_CHECK_BENCH_TIMEOUT (170).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/benchmarks/results}"
mkdir -p "$OUT" || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

STEPS=()
FAILED=()
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# run_step NAME LIMIT_SECONDS COMMAND...: output to the console and OUT/NAME.log
run_step() {
    local name="$1" limit="$2"
    shift 2
    echo "==== $name (limit ${limit}s): $*"
    local t0 t1 rc
    t0=$(date +%s)
    timeout --kill-after=20 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    t1=$(date +%s)
    local status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="TIMED OUT"
    elif [ "$rc" -ne 0 ]; then
        status="FAILED"
    fi
    [ "$status" = "ok" ] || FAILED+=("$name")
    STEPS+=("$(printf '%-10s %-10s rc=%-4s %5ss' "$name" "$status" "$rc" "$((t1 - t0))")")
    echo "==== $name: $status (rc $rc, $((t1 - t0)) s)"
}

T_START=$(date +%s)
{
    echo "gpu_check $(date '+%Y-%m-%d %H:%M:%S') on $(hostname)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
    "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1
} | tee -a "$SUMMARY"

run_step pytest_gpu "${GPU_CHECK_PYTEST_TIMEOUT:-170}" \
    "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml"
run_step gpu_check "${GPU_CHECK_CHECK_TIMEOUT:-110}" \
    "$PY" benchmarks/gpu_check.py --device cuda --out "$OUT"
run_step bench_gpu "${GPU_CHECK_BENCH_TIMEOUT:-170}" \
    "$PY" benchmarks/bench_gpu.py --images 2 --boxes 100 --warmup 1 \
    --out "$OUT/bench_gpu.json" --results-md "$OUT/bench_gpu.md"

{
    echo
    echo "steps:"
    for s in "${STEPS[@]}"; do echo "  $s"; done
    echo "total $(($(date +%s) - T_START)) s"
    if [ "${#FAILED[@]}" -gt 0 ]; then
        echo "FAILED: ${FAILED[*]}"
    else
        echo "all steps passed"
    fi
    echo "results in $OUT"
} | tee -a "$SUMMARY"

[ "${#FAILED[@]}" -eq 0 ]
