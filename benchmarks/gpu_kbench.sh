#!/usr/bin/env bash
# The kernel and per-layer decode timings (`ds4bench bench-kernels` on flash-4l) in one call on
# the GPU machine, as results/gpu/kbench-<card>.txt (its header: card, driver, commit, date, the
# command) and .json. With OUT set, copies of both land there too.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
model=/tmp/ds4bench-flash-4l.gguf
[ -f "$model" ] || python3 -m ds4bench model make --preset flash-4l -o "$model" >/dev/null || exit 1
base=results/gpu/kbench-$card
mkdir -p results/gpu
{
  echo "# $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1); commit ${DS4BENCH_COMMIT:-unknown}; $(date -u +%F)"
  echo "# benchmarks/gpu_kbench.sh: ds4bench model make --preset flash-4l -o $model && ds4bench bench-kernels --model $model --json $base.json"
  python3 -m ds4bench bench-kernels --model "$model" --json "$base.json"
} 2>&1 | tee "$base.txt"
rc=${PIPESTATUS[0]}
[ -n "${OUT:-}" ] && cp "$base.txt" "$base.json" "$OUT/" 2>/dev/null
exit "$rc"
