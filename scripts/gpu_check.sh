#!/usr/bin/env bash
# One command for a lent GPU (sized for one H100/H200, under 8 minutes): the GPU-marked tests, the
# codec and layer kernel tests compiled natively, bench_codec.py at 2^28 values, bench_rnn.py against
# cuDNN (H=1024, B=64, T=1024, fp32 and bf16) and discrnn-profile's GPU defaults. Every log and figure
# goes to one folder: $1, else $OUT (the device tool's output folder), else results/gpu_check.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --dry-run       # prints the steps, runs nothing (any machine)
#
# Each step runs under its own time limit (STEP_LIMITS below, 450 s in all) and a failing or
# timed-out step does not stop the others; summary.txt lists every step's exit code and seconds.
# discrnn is installed into the machine's own Python without dependencies (nothing can be fetched
# there; torch, triton, pytest, hypothesis, tqdm, matplotlib and einops are already in its image).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
DEST=${1:-${OUT:-results/gpu_check}}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
SUMMARY="$DEST/summary.txt"
: > "$SUMMARY"

# name, seconds, command
STEPS=(
  "env|20|nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))'"
  "install|40|$PY -m pip install --quiet --no-deps --no-build-isolation -e ."
  "tests_gpu|60|$PY -m pytest -q -m gpu -p no:cacheprovider"
  "tests_kernels|80|$PY -m pytest -q -x -p no:cacheprovider tests/test_codec.py tests/test_rnn_kernels.py"
  "bench_codec|50|$PY scripts/bench_codec.py --device cuda --numel $((1 << 28)) --out $DEST/bench_codec"
  "bench_rnn|90|$PY scripts/bench_rnn.py --device cuda --hidden 1024 --batch 64 --steps 1024 --dtype float32 bfloat16 --out $DEST/bench_rnn"
  "profile|110|$PY -m discrnn.profile --device cuda --no-progress --budget-variants lstm lstm-ckpt-sqrt dlstm-64 --max-length 65536 --out $DEST/profile"
)

for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit command <<< "$step"
  if [ "$DRY" = 1 ]; then
    echo "[$name, at most ${limit} s] $command"
    continue
  fi
  echo "== $name (at most ${limit} s): $command"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$command" > "$DEST/$name.log" 2>&1
  rc=$?
  took=$(( $(date +%s) - start ))
  [ "$rc" = 124 ] && note="timed out" || note=""
  printf '%-14s rc=%-3s %4ss %s\n' "$name" "$rc" "$took" "$note" | tee -a "$SUMMARY"
  tail -n 15 "$DEST/$name.log"
done
[ "$DRY" = 1 ] || { echo "== summary ($DEST)"; cat "$SUMMARY"; }
