#!/usr/bin/env bash
# Before/after of two commits in one call on the GPU machine, baseline rerun beside the
# candidate: the same `ds4bench matrix` (arguments: this script's) at $BEFORE (checked out from
# the carried git bundle, .gitcarry/ds4bench.bundle: `git bundle create .gitcarry/ds4bench.bundle
# --all` before the call) and on this tree, as results/runs/<date>-<card>-$NAME-{before,after},
# then `ds4bench compare` of the two into compare.md in the -after run. Extra environment
# (DS4BENCH_DECODE_GRAPH=on, ...) applies to both. With OUT set, a tarball of both runs
# (without fingerprints) is written there.
#   BEFORE=872985c NAME=flash-4l-kernels bash benchmarks/gpu_ab_commits.sh --spec gpu --preset flash-4l
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
: "${BEFORE:?set BEFORE=<commit>}"
name=${NAME:-ab}
before="$stamp-$card-$name-before" after="$stamp-$card-$name-after"
old=$(mktemp -d)
git clone -q .gitcarry/ds4bench.bundle "$old" && git -C "$old" checkout -q "$BEFORE" || exit 2
(cd "$old" && DS4BENCH_COMMIT=$BEFORE PYTHONPATH="$old:$PYTHONPATH" python3 -m ds4bench matrix "$@" \
   --out "$OLDPWD/results/runs" --id "$before")
python3 -m ds4bench matrix "$@" --id "$after"
python3 -m ds4bench compare "$before" "$after" | tee "results/runs/$after/compare.md" || exit 1
[ -n "${OUT:-}" ] && tar czf "$OUT/$name.tgz" --exclude=fingerprints "results/runs/$before" "results/runs/$after"
exit 0
