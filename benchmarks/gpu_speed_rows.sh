#!/usr/bin/env bash
# The GPU rows of issue 14 in one device call (about 8 minutes on an H200): LLaDA-8B shapes
# dual cache B1..B128 against weights + one cache and against the Fast-dLLM floor (measured
# peak FLOP/s and bandwidth), the cheaper refreshes and int8 at B1 / B32, Dream-7B at batch,
# SDAR-8B shapes with the exact cache (block 4, one step per block). Random bf16 weights drawn
# on the device. Usage (device machine, repository root):
#   bash benchmarks/gpu_speed_rows.sh "$OUT"
set -uo pipefail
out=${1:?OUT}; mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
B=benchmarks/decode_memory.py
run() {  # label, seconds, args...
  echo "== $1"; timeout "$2" python $B "${@:3}" 2>&1 | grep -E "^[|#]" | tee "$out/$1.md"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run llada-dual 200 --model llada-8b --batch 1 8 32 64 128 --run --floors
run llada-answer-refresh 60 --model llada-8b --batch 32 --run --floors --refresh-scope answer
run llada-refresh2 60 --model llada-8b --batch 32 --run --floors --refresh-blocks 2
run llada-both 60 --model llada-8b --batch 32 --run --floors --refresh-scope answer --refresh-blocks 2
run llada-int8 70 --model llada-8b --batch 1 32 --run --quantize int8
run dream-dual 70 --model dream-7b --batch 32 64 128 --run
run sdar-exact 70 --model sdar-8b --block 4 --batch 1 32 128 --run
