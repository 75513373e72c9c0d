#!/usr/bin/env bash
# GPU checks in one call on the GPU machine (see README, "GPU engine"): the gpu-marked parity
# tests (PYTEST=0 skips them), then `ds4bench generate` in every cache mode and placement on the
# presets in $PRESETS (default tiny) at the batch sizes in $BATCHES (default 1), $NTOK tokens.
# Logs go under $OUT (or ./gpu-out): pytest_gpu.txt, generate.txt.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
echo "commit $DS4BENCH_COMMIT" | tee -a "$OUT/gpu.txt"
[ "${PYTEST:-1}" = 0 ] || python3 -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25
for preset in ${PRESETS:-tiny}; do
  model=/tmp/ds4bench-$preset.gguf
  [ -f "$model" ] || python3 -m ds4bench model make --preset "$preset" -o "$model"
  for cache in q8 f16 f32; do
    for placement in device managed managed-hinted host; do
      for batch in ${BATCHES:-1}; do
        echo "== $preset $cache $placement batch $batch"
        timeout 300 python3 -m ds4bench generate --model "$model" --backend cupy --cache "$cache" \
          --placement "$placement" --batch "$batch" -n "${NTOK:-16}" 2>&1 | tail -1
      done
    done
  done
done 2>&1 | tee "$OUT/generate.txt"
