#!/usr/bin/env bash
# Nsight Systems figures in one call on the GPU machine (README, "Nsight Systems"):
#   1. <date>-<card>-flash-4l-trace: flash-4l, cache q8 and f16 (and the f32 baseline), device
#      placement, batch 1, every cell under nsys with CUDA-event stage times as well;
#   2. <date>-<card>-flash-4l-nvtx: the same cells at batch 1 and 16 with NVTX ranges off and on,
#      not traced: the cost of the ranges.
# Then `ds4bench compare` of the two runs gives the cost of tracing (nvtx-on cells joined with
# the traced ones). Runs land in results/runs/. Set OUT to also get a tarball of them there.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .whl/gpu-env.sh ] && source .whl/gpu-env.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export DS4BENCH_COMMIT=${DS4BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')
stamp=${STAMP:-$(date -u +%Y%m%d)}
common="--preset flash-4l --placement device -n 16 --reps 3"
python3 -m ds4bench matrix $common --cache q8,f16 --batch 1 --stages --trace --id "$stamp-$card-flash-4l-trace"
python3 -m ds4bench matrix $common --cache q8,f16 --batch 1,16 --nvtx off,on --id "$stamp-$card-flash-4l-nvtx"
python3 -m ds4bench compare "$stamp-$card-flash-4l-nvtx" "$stamp-$card-flash-4l-trace" | tee "results/runs/$stamp-$card-flash-4l-trace/compare-untraced.md"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/trace-runs.tgz" --exclude=fingerprints --exclude='*.nsys-rep' --exclude='*.sqlite' \
    results/runs/"$stamp-$card"-flash-4l-trace results/runs/"$stamp-$card"-flash-4l-nvtx
fi
