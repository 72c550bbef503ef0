#!/usr/bin/env bash
# One command for a lent GPU (sized for one H100/H200, under 8 minutes): the GPU-marked tests, the
# codec, layer kernel and CUDA-graph tests compiled natively, bench_codec.py at 2^28 values,
# tune_codec.py, bench_launch.py (the host's cost per step-kernel launch), bench_rnn.py against
# cuDNN (H=1024, B=64, T=1024, fp32 and bf16 as two steps, so that one running out of time keeps
# the other's table; 64 levels, also under CUDA graphs and, in fp32, with TF32 flipped on both
# sides; a profiled call per row says what kept the device busy) and discrnn-profile at its GPU
# sizes (H=1024, B=16, 4 GiB budget) at T=1024 on the LSTM variants, dlstm-64-graph among them
# (its full GPU defaults take longer). Every log and figure goes to one folder: $1, else
# results/gpu_check.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --dry-run       # prints the steps, runs nothing (any machine)
#
# Each step runs under its own time limit (the STEPS table below, 475 s in all with the install) and a failing or
# timed-out step does not stop the others; summary.txt lists every step's exit code and seconds.
# When $OUT is set (the device tool's output folder, which brings back only a few files), the
# folder is also packed into $OUT/gpu_check.tar.gz after every step, so a run cut short still
# returns what it finished.
# discrnn is installed into the machine's own Python without dependencies (nothing can be fetched
# there; torch, triton, pytest, pytest-xdist, hypothesis, tqdm, matplotlib and einops are already in
# its image); if pip cannot, a folder of links on PYTHONPATH stands in for the install.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
DEST=${1:-results/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
SUMMARY="$DEST/summary.txt"
: > "$SUMMARY"

XDIST=""
if [ "$DRY" = 0 ] && $PY -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi
TESTS="$PY -m pytest -q -rfE -p no:cacheprovider $XDIST"

# name, seconds, command
STEPS=(
  "env|10|nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))'"
  "tests_gpu|35|$TESTS -m gpu"
  "tests_kernels|95|$TESTS -vv --maxfail=20 tests/test_codec.py tests/test_rnn_kernels.py tests/test_triton_layers_reference.py tests/test_cuda_graphs.py"
  "bench_codec|20|$PY scripts/bench_codec.py --device cuda --numel $((1 << 28)) --skip-compile --out $DEST/bench_codec/bench_codec_cuda.csv"
  "tune_codec|35|$PY scripts/tune_codec.py --out $DEST/tune_codec.csv"
  "bench_launch|15|$PY scripts/bench_launch.py --device cuda --calls 1000 --rounds 3 --out $DEST/bench_launch.csv"
  "bench_rnn|85|$PY scripts/bench_rnn.py --device cuda --hidden 1024 --batch 64 --steps 1024 --dtype float32 --levels 64 --cuda-graphs --tf32 --trace --repeats 5 --memory-jobs 6 --out $DEST/bench_rnn/bench_rnn_cuda.csv"
  "bench_rnn_bf16|50|$PY scripts/bench_rnn.py --device cuda --hidden 1024 --batch 64 --steps 1024 --dtype bfloat16 --levels 64 --cuda-graphs --trace --repeats 5 --memory-jobs 6 --out $DEST/bench_rnn/bench_rnn_cuda_bf16.csv"
  "profile|115|$PY -m discrnn.profile --device cuda --lengths 1024 --variants lstm lstm-ckpt-sqrt lstm-bf16 dlstm-64 dlstm-64-ckpt-sqrt dlstm-64-graph --budget-variants lstm dlstm-64 --steps 5 --warmup 1 --resolution 0.25 --max-length 65536 --out $DEST/profile"
)
# GPU_CHECK_STEPS="tests_gpu bench_rnn" runs only those steps (install always runs).
ONLY=" ${GPU_CHECK_STEPS:-} "

pack() {
  if [ -n "${OUT:-}" ] && [ "$DEST" != "$OUT" ]; then
    tar czf "$OUT/gpu_check.tar.gz" -C "$DEST" . 2>/dev/null
    cp "$SUMMARY" "$OUT/summary.txt"
  fi
}

install() {
  if timeout 15 $PY -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT"; then return 0; fi
  echo "pip could not install discrnn; putting a folder of links on PYTHONPATH instead"
  local site=/tmp/discrnn_site
  rm -rf "$site" && mkdir -p "$site/discrnn"
  ln -s "$ROOT"/discrnn/* "$site/discrnn/" && ln -s "$ROOT/kernels" "$site/discrnn/kernels"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  $PY -c "import discrnn.kernels.codec, discrnn; print('discrnn from', discrnn.__file__)"
}

if [ "$DRY" = 1 ]; then
  echo "[install, at most 15 s] $PY -m pip install --no-deps --no-build-isolation -e . (else links on PYTHONPATH)"
else
  start=$(date +%s)
  install > "$DEST/install.log" 2>&1
  rc=$?
  printf '%-14s rc=%-3s %4ss\n' install "$rc" "$(( $(date +%s) - start ))" | tee -a "$SUMMARY"
  tail -n 5 "$DEST/install.log"
fi

for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit command <<< "$step"
  if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then continue; fi
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
  tail -n 25 "$DEST/$name.log"
  pack
done
[ "$DRY" = 1 ] || { echo "== summary ($DEST)"; cat "$SUMMARY"; }
