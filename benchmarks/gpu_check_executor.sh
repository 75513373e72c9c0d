#!/usr/bin/env bash
# One call on the GPU machine: the gpu-marked tests (SKIP_TESTS=1 leaves them out), then the same flash-4l matrix (speed-aa.toml:
# q8, f16, f32 x batch 1, 16, device, one round) through the local runner and through
# `--executor pool`, compared cell by cell (tokens and verdicts must agree), and the local run
# compared with a run from before the options/cell redesign (BEFORE, default
# 20261205-0728-h200-speed-aa-1 at cfcf713: same spec, its tokens must not have moved).
# Results: results/gpu/pytest-gpu-<card>.txt, results/runs/<stamp>-<card>-check-{local,pool},
# results/gpu/check-executor-<card>.md; with OUT set, $OUT/check.tgz.
# The probe is off (DS4BENCH_PROBE_TOKENS=0): a flash-4l probe lead costs minutes of NumPy.
# Measured on an H200 (854a0e5): the tests 75 s, writing flash-4l about 40 s, each matrix 1-1.5 min:
# about 5 minutes; do not cut it with a timeout of under 6.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
export DS4BENCH_PROBE_TOKENS=${DS4BENCH_PROBE_TOKENS:-0}
before=${BEFORE:-20261205-0728-h200-speed-aa-1}
report="results/gpu/check-executor-$card.md"
{ echo "# GPU tests and the executor check on $card ($(date -u +%FT%TZ), commit ${DS4BENCH_COMMIT:-unknown})"; echo
  nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader | sed 's/^/    /'; echo
  if [ -z "${SKIP_TESTS:-}" ]; then
    echo "## gpu-marked tests"; echo
    python3 -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tail -6 | sed 's/^/    /'
  fi
  for ex in local pool; do
    python3 -m ds4bench matrix --spec speed-aa --rounds 1 --executor "$ex" --id "$stamp-$card-check-$ex" \
      --format json > /dev/null 2> "/tmp/check-$ex.err" || tail -3 "/tmp/check-$ex.err"
  done
  echo; echo "## pool against local (same call)"; echo
  python3 -m ds4bench compare "$stamp-$card-check-local" "$stamp-$card-check-pool" | head -30
  if [ -d "results/runs/$before" ]; then
    echo; echo "## local against $before (before the redesign)"; echo
    python3 -m ds4bench compare "$before" "$stamp-$card-check-local" | head -30
  fi; } > "$report" 2>&1
cat "$report"
[ -n "${OUT:-}" ] && tar czf "$OUT/check.tgz" --exclude=fingerprints "results/runs/$stamp-$card-check-local" \
  "results/runs/$stamp-$card-check-pool" "$report"
exit 0
