#!/usr/bin/env bash
# Rebuilds the demo model shipped in deepseek_jax/assets/demo_model/ (what `deepseek-jax demo` runs):
# a DeepSeek-V3-shaped model (configs/demo.json: MLA with q-LoRA, 1 dense + 2 MoE layers with 8 routed
# experts in 4 groups (2 groups kept, 2 experts per token) + 1 shared expert, one MTP layer) trained from
# scratch on held-in 1-3 digit additions, then Hub (BF16) -> `convert` -> Orbax -> `export --dtype fp8`.
#
# Run from anywhere with the project's venv active (`deepseek-jax` on PATH):  tools/make_demo_model.sh [DIR]
# (DIR: where to write it; default, in place of the shipped model)
# It took 5 min (3000 steps at ~10 steps/s on 2 CPU cores; 14 min when they were shared with other
# jobs), 2026-11-28, jax 0.11.2; two runs gave byte-identical files. Held-out results: teacher-forced
# exact match 97.1% (train_eval.json), greedy generation of the FP8 export 97.7% (500/512);
# on 2026-12-07 the shipped model answered 494-497 of 512 (seeds 0, 1, 2, 2024 of the held-out split).
# XLA's CPU float results may differ across machines/versions: a rebuild elsewhere can differ in the
# last bits of the weights.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-$(mktemp -d -t demo_model.XXXXXX)}"
PYTHON="${PYTHON:-python}"
OUT="$(realpath -m "${1:-$ROOT/deepseek_jax/assets/demo_model}")"
# (it is replaced at the end: only an empty folder or an earlier run of this script, which
# leaves train_eval.json in it, never another checkpoint)
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ] && [ ! -f "$OUT/train_eval.json" ]; then
    echo "make_demo_model.sh: $OUT is not empty and not an earlier demo model: give an empty or new DIR" >&2
    exit 2
fi

"$PYTHON" "$ROOT/tools/make_demo_tokenizer.py" --out "$WORK/tokenizer"
deepseek-jax train --config "$ROOT/configs/demo.json" --data synthetic:addition:digits=3 \
    --steps 3000 --batch 64 --lr 3e-3 --warmup 100 --seed 0 --eval-batches 8 \
    --tokenizer "$WORK/tokenizer" --out "$WORK/train"
deepseek-jax convert "$WORK/train/hub" "$WORK/orbax" --quiet
rm -rf "$OUT"
deepseek-jax export "$WORK/orbax" "$OUT" --dtype fp8 --quiet
cp "$WORK/train/eval.json" "$OUT/train_eval.json"
echo "demo model written to $OUT (work files in $WORK)"
