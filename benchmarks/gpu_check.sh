#!/usr/bin/env bash
# The one prepared check for a session with a lent H200 (see issue 6 and docs/benchmarks.md).
#
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=480)
#
# No installs: the machine's own python3 (jax 0.11.2 with CUDA, pytest).  Steps, each with its own
# time limit, each continuing when an earlier one fails; ends with a summary.  Everything printed also
# lands in $OUT (when set) so it comes back even if the run is cut short.  Whole run: at most
# 6.5 minutes (the sum of the step limits), typically less.
#
#   1. environment: GPU, jax version and devices
#   2. kernel tests that apply on a GPU: the compiled Triton-lowered kernels against the references
#      (pallas_gpu / "compiled" ids), the references, the schedule and cross-lowering tests
#   3. benchmarks/kernels.py at full shapes, dense FP8 GEMM table (with a small tile sweep)
#   4. benchmarks/kernels.py at full shapes, grouped expert GEMM table (with a small tile sweep)
#   5. benchmarks/kernels.py, MLA decode attention table (SPEC §11's B=64, 128 heads, T=4096)

set -x
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=.
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
PY=${PY:-python3}
OUT_DIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT_DIR"
SUMMARY=()

step() {  # step NAME SECONDS CMD...
    local name=$1 secs=$2
    shift 2
    local t0=$SECONDS
    timeout --kill-after=10 "$secs" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    SUMMARY+=("$name: rc=$rc ($((SECONDS - t0)) s)$([ "$rc" = 124 ] && echo ' TIMED OUT')")
}

step env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    $PY -c 'import jax, jaxlib; print(\"jax\", jax.__version__, \"jaxlib\", jaxlib.__version__, jax.devices())'"

step tests 100 "$PY" -m pytest tests/test_kernels.py -q -p no:cacheprovider -rs \
    -W "ignore::DeprecationWarning" \
    -k "pallas_gpu or compiled or matches_numpy or ref_grad or schedules or lower or backend"

step bench_dense 110 "$PY" benchmarks/kernels.py --only dense --json "$OUT_DIR/bench_dense.json"

step bench_grouped 140 "$PY" benchmarks/kernels.py --only grouped --json "$OUT_DIR/bench_grouped.json"

step bench_mla 45 "$PY" benchmarks/kernels.py --only mla --json "$OUT_DIR/bench_mla.json"

set +x
echo
echo "=== gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ)) ==="
for s in "${SUMMARY[@]}"; do echo "  $s"; done
echo "logs and JSON tables in $OUT_DIR"
