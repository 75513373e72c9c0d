#!/usr/bin/env bash
# The GPU matrix (benchmarks/matrices/gpu.toml: cache x placement x batch on flash-4l) in one
# call on the GPU machine, as results/runs/<date>-<card>-flash-4l-gpu. Set OUT to also get a
# tarball of the run (without the fingerprints) there.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
id="$stamp-$card-flash-4l-gpu"
python3 -m ds4bench matrix --spec gpu --id "$id" "$@"
rc=$?
[ -n "${OUT:-}" ] && tar czf "$OUT/gpu-matrix.tgz" --exclude=fingerprints results/runs/"$id"
exit $rc
