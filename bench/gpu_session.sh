#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in one call of about 9 minutes (under the 10-minute limit
# of a device call) on one H100/H200:
#   1. bench/throughput.py at full size (ResNet-50, 288x144, batch 32+32), alone on the card: the three
#      training steps in fp32, --amp, --channels_last, then whole train.py epochs, then the --compile rows
#      (last, as they pay for compilation: a time limit cuts those first);
#   2. the full-size pre-training study, two runs side by side, each under `timeout`: the paper's command
#      (--pcc --part, SGD lr 0.1) in fp32 with the loader's augmentation, and the same with --amp
#      --channels_last --augment device; 100 epochs x 100 steps = the 10,000 steps of #9's 90% target.
#      A run that hits its time limit keeps its last saved weights (every 5 epochs), which test.py judges
#      on the held-out identities.
# Usage on the device machine, from the repository root. Runs and checkpoints go to $WORK (default
# /tmp/gpu_session); $OUT (default ./gpu_out) gets four files: card.txt, throughput.md, summary.txt and
# logs.tgz (the logs and tensorboardX files of every run, no weights).
#   bash bench/gpu_session.sh [seconds of throughput, default 170] [seconds per training run, default 330]
#   SMOKE=1 bash bench/gpu_session.sh 60 60     # a rehearsal on the CPU at ResNet-18 96x48 (minutes)
# tensorboardX, which the machine lacks, is installed from .whl/ when present (fill it here as the device
# README says: tensorboardx, protobuf and packaging wheels; .whl listed in .git/info/exclude and named in
# the call's carry).
set -uo pipefail
throughput_seconds=${1:-170}
train_seconds=${2:-330}
out=${OUT:-gpu_out}
work=${WORK:-/tmp/gpu_session}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python -c 'import tensorboardX' || { echo "tensorboardX is missing: carry its wheels in .whl (see the top of this script)"; exit 1; }

if [ "${SMOKE:-0}" = 1 ]; then
  size=(--arch resnet18 --img_h 96 --img_w 48)
  throughput_flags=(--batch 8 --steps 2 --warmup 1 --epoch_steps 3 --workers 1)
  train_flags=(--batch-size 8 --workers 1)
  echo "CPU rehearsal ($(nproc) cores)" | tee "$out/card.txt"
else
  size=(--arch resnet50)
  throughput_flags=(--steps 10 --epoch_steps 30 --workers 8)
  train_flags=(--batch-size 32 --workers 6)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/card.txt"
fi
python synthetic.py > "$work/synthetic.txt" 2>&1 || { cat "$work/synthetic.txt"; exit 1; }

timeout "$throughput_seconds" python bench/throughput.py "${size[@]}" "${throughput_flags[@]}" \
  --out "$out/throughput.md" > "$work/throughput.log" 2>&1

study() {  # name, extra flags...
  local name=$1; shift
  timeout "$train_seconds" python train.py --dataset synthetic "${size[@]}" "${train_flags[@]}" --pcc --part \
    --epochs 100 --steps_per_epoch 100 --save_epoch 5 --log_every 50 \
    --model_path "$work/$name" --log_path "$work/$name" --vis_log_path "$work/$name/vis" "$@" > "$work/$name.train.txt" 2>&1
  local weights
  weights=$(ls -t "$work/$name"/*_epoch_*.t 2>/dev/null | head -1)
  echo "held-out judge of ${weights:-nothing (no weights saved)}" > "$work/$name.test.txt"
  [ -n "$weights" ] && python test.py --dataset synthetic --resume "$weights" --workers 4 >> "$work/$name.test.txt" 2>&1
}
study fp32 &
study amp --amp --channels_last --augment device &
wait

tar czf "$out/logs.tgz" -C "$work" --exclude='*.t' . 2>/dev/null
{
  echo "== card"; cat "$out/card.txt"
  echo "== throughput"
  if [ -f "$out/throughput.md" ]; then cat "$out/throughput.md"; else grep '^|' "$work/throughput.log"; echo "(cut at ${throughput_seconds} s)"; fi
  for name in fp32 amp; do
    echo "== $name: every fifth epoch and the last"
    grep -h '^epoch' "$work/$name"/*.log | awk 'NR % 5 == 0' | cut -c1-200
    grep -h '^epoch' "$work/$name"/*.log | tail -1 | cut -c1-200
    echo "== $name: held-out test"
    head -1 "$work/$name.test.txt"; grep -E 'permutation recovery|zero-shot' "$work/$name.test.txt"
    tr '\r' '\n' < "$work/$name.train.txt" | grep -iE 'error|traceback' | tail -3
    tr '\r' '\n' < "$work/$name.test.txt" | grep -iE 'error|traceback' | tail -3
  done
} | tee "$out/summary.txt"
