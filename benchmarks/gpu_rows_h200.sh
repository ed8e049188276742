#!/usr/bin/env bash
# The GPU rows the H100 run of gpu_speed_rows.sh could not give (issues 14, 17, 20), in one
# device call of about 9 minutes on an H200: LLaDA-8B dual at B64 / B128 (out of memory on
# an 80 GB card), Dream-7B and SDAR-8B at B128, the DiffusionGemma row against transformers'
# generate, and the server's load row under 64 clients. Usage (device machine, repo root;
# carry [".whl"] made here beforehand by `bash benchmarks/device_wheels.sh`):
#   bash benchmarks/gpu_rows_h200.sh "$OUT" [ROWS]
# ROWS: comma-separated labels of the rows below (default all, ~20 minutes at their timeouts:
# more than one 10-minute call, and more than the 8 files a call brings back). Calls that fit:
#   "llada-big,dream-sdar-128,mem-report,int8-triton,bf16-triton"      (<= 540 s)
#   "profile-train,profile-decode,serve"                                 (<= 510 s)
#   "diffusion-gemma"                                                    (<= 150 s)
set -uo pipefail
out=${1:?OUT}; rows=${2:-all}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
B=benchmarks/decode_memory.py
row() {  # label, seconds, command...
  [ "$rows" = all ] || [[ ",$rows," == *",$1,"* ]] || return 0
  echo "== $1"; timeout "$2" "${@:3}" > "$out/$1.log" 2>&1; grep -E "^[|#]" "$out/$1.log"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
row llada-big 150 python $B --model llada-8b --batch 64 128 --run --floors
row dream-sdar-128 120 bash -c "python $B --model dream-7b --batch 128 --run && python $B --model sdar-8b --block 4 --batch 128 --run"
# Where the XLA temp goes at B32 (21.6 GiB on the H100, 2.7x the cache): XLA's own report of
# the decode's buffer assignment, compiled only (CPU f32 for comparison: the carried cache plus
# ~3.5 GiB of attention and MLP buffers, the cache updated in place).
row mem-report 120 bash -c "XLA_FLAGS='--xla_dump_to=/tmp/hlo --xla_dump_hlo_pass_re=^$ --xla_dump_hlo_as_text' python $B --model llada-8b --batch 32 && cp /tmp/hlo/*generate*memory-usage-report.txt $out/mem-report-b32.txt && head -12 $out/mem-report-b32.txt"
# int8 at B1 was 0.93x the bf16 step on the H100 (the int8 -> bf16 convert not fused into the
# matmul): the same rows with XLA's Triton GEMM taking every matmul, where it fuses the convert.
row int8-triton 90 env XLA_FLAGS=--xla_gpu_triton_gemm_any=true python $B --model llada-8b --batch 1 --run --quantize int8
row bf16-triton 60 env XLA_FLAGS=--xla_gpu_triton_gemm_any=true python $B --model llada-8b --batch 1 --run
# Where the time goes (issue 12's training step, issue 14's B1 step): JAX's profiler, per kernel.
P=benchmarks/profile_top.py
row profile-train 240 bash -c "python $P train --batch 512 --attn-impl cudnn && python $P train --batch 512 --attn-impl xla && python $P train --batch 512 --block-size 4 --attn-impl cudnn"
row profile-decode 150 bash -c "python $P decode --model llada-8b --batch 1 && python $P decode --model llada-8b --batch 1 --quantize int8"
row diffusion-gemma 150 python benchmarks/diffusion_gemma_speed.py --out /tmp/dg --layers 12 --repeats 2
row serve 120 python benchmarks/serve_load.py --random-8b --max-batch 32 --clients 64 --requests 128 \
  --batches 2 --prompt-len 256 --gen-length 256 --block-length 32 --controller threshold
