#!/usr/bin/env bash
# Nsight Systems figures in one call on the GPU machine (README, "Nsight Systems"):
#   1. <date>-<card>-flash-4l-trace: flash-4l, cache q8 and f16 (and the f32 baseline), device
#      placement, batch 1, every cell under nsys, with CUDA-event stage times as well;
#   2. <date>-<card>-flash-4l-nvtx: q8 at batch 1 and 16 with NVTX ranges off and on, not traced:
#      the cost of the ranges.
# `ds4bench compare` of the two runs then gives the cost of tracing (the untraced nvtx-on q8
# cell joined with the traced one). Runs land in results/runs/; with OUT set, tarballs of them
# (without fingerprints and reports) are written there after each run.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
trace="$stamp-$card-flash-4l-trace" nvtx="$stamp-$card-flash-4l-nvtx"
common="--preset flash-4l --placement device -n 16"
save() { [ -n "${OUT:-}" ] && tar czf "$OUT/$1.tgz" --exclude=fingerprints --exclude='*.nsys-rep' --exclude='*.sqlite' "results/runs/$1"; }
python3 -m ds4bench matrix $common --reps 2 --cache q8,f16 --batch 1 --stages --trace --id "$trace"; save "$trace"
python3 -m ds4bench matrix $common --reps 3 --cache q8 --batch 1,16 --nvtx off,on --id "$nvtx"; save "$nvtx"
python3 -m ds4bench compare "$nvtx" "$trace" > "results/runs/$trace/compare-untraced.md"; save "$trace"
