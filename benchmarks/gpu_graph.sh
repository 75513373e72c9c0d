#!/usr/bin/env bash
# Decode-graph A/B in one call on the GPU machine (README, "Decode graphs"): for tiny and
# flash-4l, cache q8 and f16, device placement, batch 1 and 16, the same matrix with
# DS4BENCH_DECODE_GRAPH=off then =on, back to back, as results/runs/<date>-<card>-<preset>-graph-{off,on},
# and `ds4bench compare` of each pair (compare-graph.md in the -on run). With TRACE=1, also
# <date>-<card>-flash-4l-graph-trace: q8 batch 1 with the graph, under Nsight Systems (the kernels
# replayed from the graph, per kernel). With OUT set, tarballs of the runs (without
# fingerprints and reports) are written there.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
save() { [ -n "${OUT:-}" ] && tar czf "$OUT/$1.tgz" --exclude=fingerprints --exclude='*.nsys-rep' --exclude='*.sqlite' "results/runs/$1"; }
for preset in ${PRESETS:-tiny flash-4l}; do
  for g in off on; do
    DS4BENCH_DECODE_GRAPH=$g python3 -m ds4bench matrix --spec gpu --preset "$preset" --cache q8,f16 \
      --placement device --batch 1,16 -n "${NTOK:-16}" --reps 2 --id "$stamp-$card-$preset-graph-$g"
  done
  python3 -m ds4bench compare "$stamp-$card-$preset-graph-off" "$stamp-$card-$preset-graph-on" \
    | tee "results/runs/$stamp-$card-$preset-graph-on/compare-graph.md"
  save "$stamp-$card-$preset-graph-off"; save "$stamp-$card-$preset-graph-on"
done
if [ "${TRACE:-0}" = 1 ]; then
  DS4BENCH_DECODE_GRAPH=on python3 -m ds4bench matrix --preset flash-4l --cache q8 --placement device --batch 1 \
    -n 16 --reps 2 --trace --id "$stamp-$card-flash-4l-graph-trace"
  save "$stamp-$card-flash-4l-graph-trace"
fi
