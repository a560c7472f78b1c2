#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in one call of about 9 minutes (under the 10-minute limit of a device call) on one H100/H200:
#   1. bench/throughput.py at full size (ResNet-50, 288x144, batch 32+32): the three training steps in
#      fp32, --amp, --channels_last and --compile, and whole train.py epochs;
#   2. the full-size pre-training study (two runs side by side, each under `timeout`): the default
#      command in fp32 with the loader's augmentation, and the same with --amp --channels_last
#      --augment device, 100 epochs x 100 steps = the 10,000 steps of the 90% target (a run that
#      hits the time limit keeps its last state; test.py then judges its last weights).
# Usage on the device machine, from the repository root (it writes under $OUT, default ./gpu_out):
#   bash bench/gpu_session.sh [minutes per training run, default 4]
# tensorboardX, which the machine lacks, is installed from .whl/ when present (fill it here with
# `pip download tensorboardX -d .whl`, list .whl in .git/info/exclude and name it in the call's carry).
set -uo pipefail
minutes=${1:-4}
out=${OUT:-gpu_out}
mkdir -p "$out"
if [ -d .whl ]; then
  pip install -q --no-index --find-links .whl --target /tmp/site tensorboardX && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/card.txt"
python synthetic.py > "$out/synthetic.txt" 2>&1

timeout 300 python bench/throughput.py --steps 10 --epoch_steps 30 --workers 8 --out "$out/throughput.md" > "$out/throughput.log" 2>&1 &
throughput=$!
wait $throughput

study() {  # name, extra flags...
  local name=$1; shift
  timeout $((minutes * 60)) python train.py --dataset synthetic --arch resnet50 --pcc --part --batch-size 32 \
    --epochs 100 --steps_per_epoch 100 --save_epoch 10 --workers 6 --log_every 50 \
    --model_path "$out/$name" --log_path "$out/$name" --vis_log_path "$out/$name/vis" "$@" > "$out/$name.train.txt" 2>&1
  local weights
  weights=$(ls -t "$out/$name"/*_epoch_*.t 2>/dev/null | head -1)
  [ -n "$weights" ] && python test.py --dataset synthetic --resume "$weights" --workers 4 > "$out/$name.test.txt" 2>&1
}
study fp32 &
study amp --amp --channels_last --augment device &
wait

tar czf "$out/logs.tgz" -C "$out" --exclude='*.t' fp32 amp 2>/dev/null
echo "== card"; cat "$out/card.txt"
echo "== throughput"; cat "$out/throughput.md"
for name in fp32 amp; do
  echo "== $name: last epochs"; grep '^epoch' "$out/$name"/*.log | tail -3 | cut -c1-220
  echo "== $name: held-out test"; grep -E 'permutation recovery|zero-shot' "$out/$name.test.txt"
done
