#!/usr/bin/env bash
# The GPU measurements of the open issues, in stages that fit one device call (at most 10 minutes) on
# one H100/H200; each stage runs under `timeout`, and a training run stopped by it keeps its last saved
# weights (every 5 epochs), which test.py judges on the held-out identities.
#   throughput  bench/throughput.py at full size (ResNet-50, 288x144, batch 32+32), alone on the card:
#               the three training steps in fp32, --amp, --channels_last, whole train.py epochs, then
#               the --compile rows (last: they pay for compilation)                        170 s
#   pair        the paper's command (--pcc --part, SGD lr 0.1, 100 epochs x 100 steps = the 10,000
#               steps of #9's target) as pretext-study variants `default` (fp32, loader augmentation)
#               and `default+fast` (--amp --channels_last --augment device) side by side      335 s
#   onestream   `default+onestream+fast` (--stream one) alone on the card                       410 s
#   compile     only the --compile rows of bench/throughput.py (reduce-overhead: CUDA graphs,
#               then torch's default mode; MMGL first)                                         130 s
# The NVIDIA H200 session of 2026-11-26 ran `throughput pair` (and a 150 s onestream run); what is
# left is the default:
#   bash bench/gpu_session.sh [stage ...]            # default: onestream compile (about 9.7 minutes)
#   SMOKE=1 bash bench/gpu_session.sh pair           # a rehearsal on the CPU at ResNet-18 96x48
# Stage lengths can be changed with THROUGHPUT_S, PAIR_S, ONESTREAM_S and COMPILE_S (seconds).
# Runs and checkpoints go to $WORK (default /tmp/gpu_session); $OUT (default ./gpu_out) gets at most seven
# files: card.txt, throughput.md and compile.md (the stages' tables, when complete), summary.txt, table.md
# and curves.png (bench/runs_table.py: the pretext study's table of the training runs) and logs.tgz
# (logs and tensorboardX files, no weights).
# tensorboardX, which the machine lacks, is installed from .whl/ when present (fill it here as the device
# README says: tensorboardx, protobuf and packaging wheels; .whl listed in .git/info/exclude and named in
# the call's carry).
set -uo pipefail
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(onestream compile)
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
  schedule=(--epochs 10 --steps_per_epoch 4)
  echo "CPU rehearsal ($(nproc) cores)" | tee "$out/card.txt"
else
  size=(--arch resnet50)
  throughput_flags=(--steps 10 --epoch_steps 30 --workers 8)
  train_flags=(--batch-size 32 --workers 6)
  schedule=(--epochs 100 --steps_per_epoch 100)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/card.txt"
fi
python synthetic.py > "$work/synthetic.txt" 2>&1 || { cat "$work/synthetic.txt"; exit 1; }

throughput() {  # table name, seconds, extra flags...
  local name=$1 seconds=$2; shift 2
  timeout "$seconds" python bench/throughput.py "${size[@]}" "${throughput_flags[@]}" "$@" \
    --out "$out/$name.md" > "$work/$name.log" 2>&1
}

study() {  # seconds, pretext-study variant (its train.py flags come from bench/pretext_study.py)
  local seconds=$1 name=$2 flags
  read -ra flags <<< "$(python -c 'import sys; sys.path.insert(0, "bench"); import pretext_study
print(" ".join(pretext_study.variant_flags(sys.argv[1])))' "$name")"
  timeout "$seconds" python train.py --dataset synthetic "${size[@]}" "${train_flags[@]}" "${flags[@]}" \
    "${schedule[@]}" --save_epoch 5 --log_every 50 \
    --model_path "$work/$name" --log_path "$work/$name" --vis_log_path "$work/$name/vis" > "$work/$name.train.txt" 2>&1
  local weights
  weights=$(ls -t "$work/$name"/*_epoch_*.t 2>/dev/null | head -1)
  echo "held-out judge of ${weights:-nothing (no weights saved)}" > "$work/$name.test.txt"
  [ -n "$weights" ] && python test.py --dataset synthetic --resume "$weights" --workers 4 >> "$work/$name.test.txt" 2>&1
}

for stage in "${stages[@]}"; do
  case $stage in
    throughput) throughput throughput "${THROUGHPUT_S:-170}" ;;
    pair) study "${PAIR_S:-335}" default & study "${PAIR_S:-335}" default+fast & wait ;;
    onestream) study "${ONESTREAM_S:-410}" default+onestream+fast ;;
    compile) throughput compile "${COMPILE_S:-130}" --compiled_only \
               --precisions 'amp + channels_last + compile reduce-overhead,amp + channels_last + compile' ;;
    *) echo "unknown stage $stage: choose from throughput pair onestream compile"; exit 1 ;;
  esac
done

tar czf "$out/logs.tgz" -C "$work" --exclude='*.t' . 2>/dev/null
{
  echo "== card"; cat "$out/card.txt"
  for name in throughput compile; do
    [ -f "$work/$name.log" ] || continue
    echo "== $name"
    if [ -f "$out/$name.md" ]; then cat "$out/$name.md"; else grep '^|' "$work/$name.log"; echo "(cut by its time limit)"; fi
  done
  runs=()  # the judged training runs, for bench/runs_table.py
  for log in "$work"/*/*.log; do
    [ -e "$log" ] || continue
    name=$(basename "$(dirname "$log")")
    echo "== $name: every fifth epoch and the last"
    grep -h '^epoch' "$log" | awk 'NR % 5 == 0' | cut -c1-200
    grep -h '^epoch' "$log" | tail -1 | cut -c1-200
    echo "== $name: held-out test"
    head -1 "$work/$name.test.txt"; grep -E 'permutation recovery|zero-shot' "$work/$name.test.txt"
    cat "$work/$name.train.txt" "$work/$name.test.txt" | tr '\r' '\n' | grep -iE 'error|traceback' | tail -3
    grep -q '^permutation recovery, both' "$work/$name.test.txt" && runs+=("$name=$log,$work/$name.test.txt")
  done
  if [ ${#runs[@]} -gt 0 ]; then
    echo "== table"
    python bench/runs_table.py --out "$work/table" --setting "$(cat "$out/card.txt"), ${size[*]}, ${train_flags[*]}, ${schedule[*]}, stages: ${stages[*]}" "${runs[@]}" > /dev/null \
      && cp "$work/table/table.md" "$work/table/curves.png" "$out/" && cat "$out/table.md"
  fi
} | tee "$out/summary.txt"
