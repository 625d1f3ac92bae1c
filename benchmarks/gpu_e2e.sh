#!/usr/bin/env bash
# Issue 9's prepared GPU run (after benchmarks/gpu_check.sh, in a session with a lent H200):
#   run(command="bash benchmarks/gpu_e2e.sh", timeout_s=420)
# No installs; the machine's own jax 0.11.2, torch 2.11, transformers 5.17. Real-width 1 dense +
# 3 MoE layers with random FP8 weights made on the GPU; the HF bf16 peer runs first in its own
# process (XLA preallocates most of the GPU once this process touches it).
set -x
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
OUT_DIR=${OUT:-/tmp/gpu_e2e}
mkdir -p "$OUT_DIR"
timeout --kill-after=10 400 "${PY:-python3}" benchmarks/e2e_gpu.py --json "$OUT_DIR/e2e.json" 2>&1 | tee "$OUT_DIR/e2e.log"
