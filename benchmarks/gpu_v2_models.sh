#!/usr/bin/env bash
# Train the two v2 benchmark models side by side on one GPU (an LLaDA-style bidirectional one
# and an SDAR-style block-causal one, block 4), then run `dllm-jax bench quality` on both,
# side by side, under a time budget. One device call:
#   bash benchmarks/gpu_v2_models.sh OUT TRAIN_SECONDS BENCH_SECONDS [EVAL_N]
# BENCH_SECONDS 0 skips the bench (each model is then scored one token per step on EVAL_N
# held-out instances per task by train_bundled.py itself; default 0 = not scored there).
# Needs the training pool built beforehand on a CPU:
#   PYTHONPATH=. python benchmarks/train_bundled.py --out /tmp/p --task-set v2 \
#       --model-size bench --pool-size 20000 --save-pool .pool/v2-20k.npz
set -uo pipefail
out=${1:?OUT}; train_s=${2:-240}; bench_s=${3:-150}; eval_n=${4:-0}
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
settings="llada k=1,threshold 0.9,ce,threshold 0.9 dual,ce dual,llada k=2,threshold 0.7,threshold 0.95,r2,factor 1.0,dream maskgit_plus k=2,threshold 0.8,llada k=4,threshold 0.5,threshold 0.99,llada k=1 dual"
# cuDNN's fused attention in the training step if a 2-step probe trains with it (block-causal
# masks included), else XLA's (benchmarks/RESULTS.md: XLA's scores dominate the step's bytes).
attn=xla; rm -rf /tmp/attn-probe /tmp/attn-probe-ckpt
if timeout 120 python -m dllm_jax.cli train --out /tmp/attn-probe --task-set v2 --model-size bench \
     --steps 2 --batch-size 8 --pool-size 64 --compute-dtype bfloat16 --attn-impl cudnn --block-diffusion \
     --block-size 4 --log-every 1 --ckpt-every 2 > "$out/attn-probe.log" 2>&1; then attn=cudnn; fi
# Batch 512 for both with cuDNN; with XLA's attention the block-diffusion forward over
# [noisy | clean] (576 tokens) does not fit at 512 in 45 % of the card, so SDAR trains at 128.
llada_batch=512; sdar_batch=512; [ "$attn" = xla ] && sdar_batch=128
echo "training attention: $attn; batch llada $llada_batch sdar $sdar_batch"
train() {  # name, extra flags
  python benchmarks/train_bundled.py --out "$out/$1" --task-set v2 --model-size bench \
    --budget "$train_s" --pool-file .pool/v2-20k.npz --pool-size 20000 \
    --lr 1.5e-3 --log-every 100 --save-dtype bfloat16 --eval-n "$eval_n" --ckpt-dir "/tmp/ckpt-$1" \
    --attn-impl "$attn" "${@:2}" \
    > "$out/$1/log" 2>&1
}
bench() {  # name
  mkdir -p "/tmp/m-$1" && tar -xf "$out/$1/model.tar" -C "/tmp/m-$1" &&
  python -m dllm_jax.cli bench quality --model "/tmp/m-$1/model" --n 500 --batch-size 2750 \
    --settings "$settings" --time-budget "$bench_s" --json "$out/$1/quality.json" \
    >> "$out/$1/log" 2>&1
}
mkdir -p "$out/llada" "$out/sdar"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
train llada --batch-size "$llada_batch" & train sdar --batch-size "$sdar_batch" --block-size 4 & wait
if [ "$bench_s" != 0 ]; then bench llada & bench sdar & wait; fi
for m in llada sdar; do
  echo "== $m"; grep -E "compile\+chunk|trained|stopped|not run|Error|error|^\|" "$out/$m/log" | cut -c1-300
done
rm -f "$out"/*/results.md  # (results.json has them; at most 8 files come back)
