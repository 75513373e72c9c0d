#!/usr/bin/env bash
# The speed protocol's A/A and sensitivity tests in one call on the GPU machine (docs/speed.md).
#  1. A/A: benchmarks/matrices/speed-aa.toml (flash-4l x q8,f16,f32 x batch 1,16, device) run
#     RUNS times (default 3) as results/runs/<date>-<card>-speed-aa-<i>, compared pairwise
#     (3 runs: 18 cell comparisons; at most one may call a change).
#  2. Sensitivity: benchmarks/matrices/speed-sens.toml (q8 x batch 1,16, decode graph; tree S slowed by
#     SLOWDOWN, default moe:0.05, interleaved with tree A) as <date>-<card>-speed-sens.
#  3. benchmarks/speed_report.py over all of them: the pairwise table, the sensitivity table with
#     the true ratios, and where the variance comes from (clock, temperature, power, first process).
# AA_MODE: interleaved (default: the RUNS runs are trees A1..An of one matrix, interleaved round
# by round, as the protocol compares two configurations) or sequential (RUNS separate runs one
# after another, compared unpaired: what the protocol warns against on a host whose speed drifts).
# Knobs: STAGES ("aa sens"; one of them to split the work over two calls), RUNS (3), AA_ROUNDS (3),
# SENS_ROUNDS (8), NTOK (16), CACHES (q8,f16,f32), BATCHES (1,16), SLOWDOWN (moe:0.05), BUDGET_S
# (400: an A/A run or the sensitivity stage that would start later is skipped, and said),
# SENS_AA (off; 1 adds a third tree A2, identical to A, to the sensitivity matrix: A against A2
# is an A/A test interleaved round by round, compared paired, at no extra model write),
# DEADLINE_S (none: a matrix still running this many seconds after the start is stopped with
# SIGTERM, which keeps its finished cells, so that the report and the tarball are still written
# inside a call's time limit).
# Measured on an H200 (854a0e5): a cell process takes about 7 s, writing flash-4l about 40 s, so
# the A/A's 3 x 6 x 3 = 54 processes take about 6.5 minutes and the sensitivity stage's
# 3 x 2 x 8 = 48 (with SENS_AA) about 6: one call each (STAGES=aa, then STAGES=sens). Results: speed-report.md in
# the sensitivity run and in results/gpu/speed-<card>.md; with OUT set, $OUT/speed.tgz (the runs
# without fingerprints) and $OUT/speed-report.md.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
t0=$SECONDS
budget=${BUDGET_S:-400}
common=(-n "${NTOK:-16}" --cache "${CACHES:-q8,f16,f32}" --batch "${BATCHES:-1,16}")
stages=${STAGES:-aa sens}
# run a matrix, stopped (SIGTERM: finished cells kept) at DEADLINE_S seconds after the start
matrix() {
  if [ -n "${DEADLINE_S:-}" ]; then
    local left=$(( DEADLINE_S - (SECONDS - t0) ))
    (( left > 10 )) || { echo "note: $* not started: past DEADLINE_S=$DEADLINE_S s" >&2; return 1; }
    timeout -s TERM -k 30 "$left" python3 -m ds4bench matrix "$@"
  else
    python3 -m ds4bench matrix "$@"
  fi
}
aa=()
if [[ " $stages " == *" aa "* ]] && [ "${AA_MODE:-interleaved}" = interleaved ]; then
  # the protocol's A/A: the matrix RUNS times as trees A1..An of this same tree, interleaved round
  # by round (ABBA) in one run, and compared pairwise (paired, round by round)
  id="$stamp-$card-speed-aa"
  trees=(); for i in $(seq 1 "${RUNS:-3}"); do trees+=(--tree "A$i=."); done
  matrix --spec speed-aa --rounds "${AA_ROUNDS:-3}" --order abba "${common[@]}" "${trees[@]}" --id "$id" > /dev/null
  [ -f "results/runs/$id/run.json" ] && for i in $(seq 1 "${RUNS:-3}"); do aa+=("$id@A$i"); done
fi
[[ " $stages " == *" aa "* ]] && [ "${AA_MODE:-interleaved}" = sequential ] && for i in $(seq 1 "${RUNS:-3}"); do
  if (( SECONDS - t0 > budget )); then echo "note: A/A run $i skipped: past BUDGET_S=$budget s" >&2; break; fi
  id="$stamp-$card-speed-aa-$i"
  matrix --spec speed-aa --rounds "${AA_ROUNDS:-3}" "${common[@]}" --id "$id" > /dev/null
  [ -f "results/runs/$id/run.json" ] && aa+=("$id")
done
sens="$stamp-$card-speed-sens"
if [[ " $stages " != *" sens "* ]]; then
  sens=""
elif (( SECONDS - t0 > budget )); then
  echo "note: sensitivity skipped: past BUDGET_S=$budget s" >&2; sens=""
else
  matrix --spec speed-sens --rounds "${SENS_ROUNDS:-8}" -n "${NTOK:-16}" \
    --batch "${BATCHES:-1,16}" --tree A=. ${SENS_AA:+--tree A2=.} --tree S=. \
    --tree-env "S:DS4BENCH_SLOWDOWN=${SLOWDOWN:-moe:0.05}" --id "$sens" > /dev/null
  [ -f "results/runs/$sens/run.json" ] || sens=""
  [ -n "$sens" ] && [ -n "${SENS_AA:-}" ] && aa+=("$sens@A" "$sens@A2")
fi
report="results/gpu/speed-$card.md"
{ echo "# Speed A/A and sensitivity on $card ($(date -u +%FT%TZ), commit ${DS4BENCH_COMMIT:-unknown}, $((SECONDS - t0)) s)"
  echo; python3 benchmarks/speed_report.py --aa "${aa[@]}" ${sens:+--sens "$sens"}; } > "$report"
rc=$?
cat "$report"
[ -n "$sens" ] && cp "$report" "results/runs/$sens/speed-report.md"
if [ -n "${OUT:-}" ]; then
  cp "$report" "$OUT/speed-report.md"
  tar czf "$OUT/speed.tgz" --exclude=fingerprints \
    $(for r in "${aa[@]}" $sens; do echo "results/runs/${r%@*}"; done | sort -u) "$report"
fi
exit $rc
