#!/usr/bin/env bash
# One v2 benchmark model trained alone on the GPU for a 12-minute budget, split over two
# device calls on the warm machine (a call lasts at most 10 minutes):
#   bash benchmarks/gpu_train_v2.sh llada|sdar OUT [ATTN]     # call 1: ~8 min, checkpoints
#   bash benchmarks/gpu_train_v2.sh llada|sdar OUT [ATTN]     # call 2: resumes, ends, scores
# The first call calibrates the step, fixes the run's steps for 720 s of training, trains
# until --time-limit (460 s) and checkpoints in /tmp/ckpt-NAME (and writes a model.tar of the
# weights so far); the second finds that checkpoint, trains the remaining steps and scores one
# token per step on 100 held-out instances per task. If the machine went back in between, the
# second call starts over (its log says "calibrate"). Carry [".pool"]; the pool is built on a
# CPU beforehand (see gpu_v2_models.sh). ATTN: cudnn (default) or xla.
set -uo pipefail
name=${1:?llada or sdar}; out=${2:?OUT}; attn=${3:-cudnn}
case "$name" in
  llada) extra=() ;;
  sdar) extra=(--block-size 4) ;;
  *) echo "first argument must be llada or sdar, got '$name'" >&2; exit 2 ;;
esac
export PYTHONPATH=. PYTHONUNBUFFERED=1
ckpt=/tmp/ckpt-$name
if [ -f "$ckpt/train_config.json" ]; then phase=(--eval-n 100); else phase=(--time-limit 460 --eval-n 0); fi
mkdir -p "$out/$name"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python benchmarks/train_bundled.py --out "$out/$name" --task-set v2 --model-size bench \
  --budget 720 --pool-file .pool/v2-20k.npz --pool-size 20000 --batch-size 256 --lr 1e-3 \
  --log-every 100 --save-dtype bfloat16 --ckpt-dir "$ckpt" --attn-impl "$attn" \
  "${extra[@]}" "${phase[@]}" 2>&1 | tee "$out/$name/log" | grep -vE "^step [0-9]+/" | cut -c1-300
rm -f "$out/$name/results.md"
