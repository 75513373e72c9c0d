#!/usr/bin/env bash
# The GPU matrix (benchmarks/matrices/gpu.toml: cache x placement x batch on flash-4l) in one
# call on the GPU machine, as results/runs/<date>-<card>-flash-4l-gpu. Set OUT to also get a
# tarball of the run (without the fingerprints) there.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .whl/gpu-env.sh ] && source .whl/gpu-env.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export DS4BENCH_COMMIT=${DS4BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')
id="${STAMP:-$(date -u +%Y%m%d-%H%M)}-$card-flash-4l-gpu"
python3 -m ds4bench matrix --spec gpu --id "$id" "$@"
rc=$?
[ -n "${OUT:-}" ] && tar czf "$OUT/gpu-matrix.tgz" --exclude=fingerprints results/runs/"$id"
exit $rc
