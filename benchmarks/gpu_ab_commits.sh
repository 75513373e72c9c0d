#!/usr/bin/env bash
# Before/after of two commits in one call on the GPU machine, as one matrix: its tree axis holds
# $BEFORE (tree A: checked out of this repository's git, or of the carried bundle
# .gitcarry/ds4bench.bundle where the copy has no .git: `git bundle create .gitcarry/ds4bench.bundle
# --all` before the call) and this tree (B); their cells run interleaved round by round, ROUNDS
# processes each (default 5), and the run ends with the comparison of B against A
# (compare-A-B.md in results/runs/<date>-<card>-$NAME). Arguments: `ds4bench matrix` options;
# extra environment (DS4BENCH_DECODE_GRAPH=on, ...) applies to both trees. With OUT set, a
# tarball of the run (without fingerprints) is written there.
#   BEFORE=872985c NAME=flash-4l-kernels bash benchmarks/gpu_ab_commits.sh --spec gpu --preset flash-4l
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
: "${BEFORE:?set BEFORE=<commit>}"
name=${NAME:-ab}
id="$stamp-$card-$name"
python3 -m ds4bench matrix --rounds "${ROUNDS:-5}" "$@" --tree "A=$BEFORE" --tree B=. --id "$id"
rc=$?
[ -n "${OUT:-}" ] && tar czf "$OUT/$name.tgz" --exclude=fingerprints "results/runs/$id"
exit $rc
