#!/usr/bin/env bash
# The GPU fault-injection confusion table (docs/faults.md): first the CUDA twins of the injected
# faults against their healthy kernels and their NumPy twins (pytest -m gpu tests/test_faults.py),
# then `ds4bench faults --spec faults-gpu` (flash-4l, device placement, healthy q8/f16/f32 plus
# every fault in q8) once per seed, as results/runs/<date>-<card>-faults-s<seed>, each with its
# confusion.md. With OUT set: faults-<card>.tgz (the runs, without fingerprints) and
# faults-<card>.txt (the twin tests' summary and every confusion table) are written there.
#   SEEDS="0 1 2"   synthetic weight seeds (default 0)
#   BATCHES="1 16"  batch sizes (default 1)
#   PYTEST=0        skip the twin tests (when the whole `pytest -m gpu` ran before in the same call)
#   FAULTS_ARGS=... more arguments for `ds4bench faults`, e.g. "--executor pool --gpus 0,0,0,0" (four
#                   cells at a time on one GPU: verdicts only, their speed is not comparable)
#   DEADLINE_S=S    a seed's matrix still running S seconds after the start is stopped (SIGTERM, its
#                   finished cells kept) and the confusion table is written from the cells that finished
#                   (`ds4bench faults --report RUN`, which says how many cells have none)
#   RESUME="RUN ..." finish runs an earlier call stopped (`ds4bench faults --resume RUN`), on the same
#                   warm machine: the runs and their probe-cache/ (the NumPy references) are still there
#   RUNS_DIR=DIR    where the runs live (default results/runs); for a run that two calls share, a folder
#                   outside the checkout (e.g. /root/faults-runs), which a call's copy of the tree leaves alone
# Expected time on an H200: ~1 min for the twin tests (NVRTC compiles each fault's module), then
# 17 cells per seed and batch at ~15-25 s each (flash-4l load, a 2.1k-token prefill per slot,
# 8 tokens): ~5-7 min for the default; SEEDS="0 1 2" BATCHES="1 16" is ~6x that, so split it
# over calls (one seed per call).
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
batches=$(echo ${BATCHES:-1} | tr ' ' ',')
runs_dir=${RUNS_DIR:-results/runs}
summary=$(mktemp)
{
  echo "# ds4bench faults on $card, commit ${DS4BENCH_COMMIT:-unknown}, $(date -u +%FT%TZ)"
  echo "# SEEDS='${SEEDS:-0}' BATCHES='${BATCHES:-1}': benchmarks/gpu_faults.sh"
  echo "## CUDA twins: python3 -m pytest -q -m gpu tests/test_faults.py"
  if [ "${PYTEST:-1}" = 0 ]; then echo "(skipped: PYTEST=0)"
  else python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_faults.py 2>&1 | tail -15; fi
} >> "$summary"
runs=()
for seed in ${RESUME:-${SEEDS:-0}}; do
  if [ -n "${RESUME:-}" ]; then        # a run an earlier call stopped: finish it (seed = the run id here)
    id=$seed
    cmd=(python3 -m ds4bench faults --resume "$id" --out "$runs_dir" ${FAULTS_ARGS:-})
  else
    id="$stamp-$card-faults-s$seed"
    cmd=(python3 -m ds4bench faults --spec faults-gpu --batch "$batches" --seed "$seed" --id "$id" --out "$runs_dir" ${FAULTS_ARGS:-})
  fi
  if [ -n "${DEADLINE_S:-}" ]; then
    left=$(( DEADLINE_S - SECONDS ))
    (( left > 30 )) || { echo "note: seed $seed not started: past DEADLINE_S=$DEADLINE_S s" >> "$summary"; break; }
    timeout -s TERM -k 20 "$left" "${cmd[@]}"
  else
    "${cmd[@]}"
  fi
  rc=$?
  if { (( rc >= 124 )) || [ ! -f "$runs_dir/$id/confusion.md" ]; } && [ -f "$runs_dir/$id/run.json" ]; then
    python3 -m ds4bench faults --report "$id" --out "$runs_dir" > /dev/null     # stopped at DEADLINE_S: the table of what finished
  fi
  echo "exit status $rc (0: every fault caught, no healthy cell broken)" >> "$runs_dir/$id/confusion.md"
  { echo; echo "## seed $seed: ds4bench faults --spec faults-gpu --batch $batches --seed $seed"; cat "$runs_dir/$id/confusion.md"; } >> "$summary"
  runs+=("$runs_dir/$id")
done
cat "$summary"
if [ -n "${OUT:-}" ]; then
  cp "$summary" "$OUT/faults-$card.txt"
  tar czf "$OUT/faults-$card.tgz" --exclude=fingerprints --exclude=probe-cache -C "$runs_dir" \
    --transform 's,^,results/runs/,' "${runs[@]#$runs_dir/}"      # unpacked at the checkout's root
fi
rm -f "$summary"
