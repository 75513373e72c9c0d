#!/usr/bin/env bash
# Verdicts on healthy GPU cells (docs/verdicts.md): flash-4l, cache q8,f16,f32 x placement
# device,managed x batch 1,16 x NVTX (NVTX="off,on" by default: an axis of one run), once with
# DS4BENCH_DECODE_GRAPH=off and once =on (GRAPHS), per seed (SEEDS); every cell with the stage
# probe and the teacher-forced KL. None may be broken. The NumPy reference of each mode runs
# once on the host (the first cell of that mode; DS4BENCH_PROBE_CACHE shares it across the
# runs), so its cell gets a long timeout. Runs land in results/runs/<stamp>-<card>-flash-4l-verdicts-s<seed>-graph-<g>;
# with OUT set: $OUT/verdicts.tgz (the runs without fingerprints) and $OUT/verdicts.txt (every
# cell's verdict, KL and worst probe stage relative to its limit; the count of broken cells).
# Expected on an H200: the NumPy references ~3-5 min per mode (weights expanded on the host,
# 32 probe tokens), then ~20-30 s per cell (9-20 s measured before, plus one teacher-forced
# pass and the probe); with the defaults (1 seed, 2 graph settings, 24 cells each) ~25-35 min.
# SEEDS=0 GRAPHS=off NVTX=off PLACEMENTS=device halves it twice (~10-15 min).
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
export DS4BENCH_PROBE_TOKENS=${PROBE_TOKENS:-32}
export DS4BENCH_PROBE_CACHE=${DS4BENCH_PROBE_CACHE:-${TMPDIR:-/tmp}/ds4bench-probe-cache}
runs=()
for seed in ${SEEDS:-0}; do
  for g in ${GRAPHS:-off on}; do
    id="$stamp-$card-flash-4l-verdicts-s$seed-graph-$g"
    DS4BENCH_DECODE_GRAPH=$g python3 -m ds4bench matrix --spec gpu --preset flash-4l --seed "$seed" \
      --cache "${CACHES:-q8,f16,f32}" --placement "${PLACEMENTS:-device,managed}" --batch "${BATCHES:-1,16}" \
      --nvtx "${NVTX:-off,on}" -n "${NTOK:-16}" --reps "${REPS:-1}" --timeout "${TIMEOUT:-1500}" --id "$id"
    runs+=("results/runs/$id")
  done
done
summary=$(python3 - "${runs[@]}" <<'PY'
import json, sys
from ds4bench.harness import probe as P
broken = 0
for run in sys.argv[1:]:
    print(f"## {run}")
    for line in open(f"{run}/cells.jsonl"):
        r = json.loads(line)
        worst = max(((s["nmse"] / P.limit(r["backend"], r["cache"], s["stage"]), s["stage"], s["layer"])
                     for s in r.get("probe_stages") or []), default=(None, "-", "-"))
        broken += r["verdict"] in ("broken", "failed")
        kl = "KL n/a" if r.get("kl_median") is None else f"KL median {r['kl_median']:.3g} p99 {r['kl_p99']:.3g} top1 {r['top1_agree']:.2f}"
        ws = "probe n/a" if worst[0] is None else f"worst stage {worst[1]} L{worst[2]} at {worst[0]:.3g} of its limit"
        print(f"{r['key']}: {r['verdict']} | {kl} | {ws} | probe {r.get('probe_s') or 0:.1f} s, KL pass {r.get('kl_s') or 0:.1f} s | {r.get('verdict_reason', '')}")
print(f"broken or failed cells: {broken}")
PY
)
echo "$summary"
if [ -n "${OUT:-}" ]; then
  echo "$summary" > "$OUT/verdicts.txt"
  tar czf "$OUT/verdicts.tgz" --exclude=fingerprints "${runs[@]}"
fi
