#!/usr/bin/env bash
# asv over a commit range on the GPU machine, whose copy of the tree has no usable .git:
#
#   here:   git bundle create .gitcarry/ds4bench.bundle --all       (.gitcarry is git-ignored)
#   there:  benchmarks/asv_gpu.sh <range> [asv run options]          carry .whl, .debs and .gitcarry
#           e.g. benchmarks/asv_gpu.sh 8949325..HEAD --steps 5
#
# Clones the bundle into /tmp/ds4bench-asv, keeps this tree's results/asv there (so a second call
# adds commits with --skip-existing-successful), runs benchmarks/asv_range.sh on the range, and
# copies results/asv and the history plot back into this tree; with OUT set, a tarball of them too.
# Defaults for one call (about 10 minutes for five commits on an H100): tiny on every cell,
# flash-4l in device placement only (DS4BENCH_ASV_SKIP), time_* on tiny in device placement.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 A..B [asv run options]" >&2; exit 2; }
bundle=${BUNDLE:-.gitcarry/ds4bench.bundle}
[ -f "$bundle" ] || { echo "$0: no $bundle: create it where .git is (git bundle create $bundle --all) and carry it" >&2; exit 2; }
[ -f .whl/gpu-env.sh ] && source .whl/gpu-env.sh
here=$PWD work=/tmp/ds4bench-asv
rm -rf "$work" && git clone -q "$bundle" "$work"
mkdir -p results/asv && cp -r results/asv "$work/results/" 2>/dev/null || true
export PIP_FIND_LINKS="$here/.whl${PIP_FIND_LINKS:+ $PIP_FIND_LINKS}"
[ -d /tmp/site ] && export EXTRA_SITE="${EXTRA_SITE:-/tmp/site}"   # where gpu-env.sh put gguf, tokenizers, nvtx
export DS4BENCH_ASV_SKIP="${DS4BENCH_ASV_SKIP:-flash-4l:managed,flash-4l:managed-hinted,flash-4l:host}"
export ASV_MACHINE="${ASV_MACHINE:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')}"
rc=0
(cd "$work" && benchmarks/asv_range.sh "$@") || rc=$?
rm -rf results/asv && cp -r "$work/results/asv" results/asv
cp "$work"/results/plots/asv-history*.png results/plots/ 2>/dev/null || true
[ -n "${OUT:-}" ] && tar czf "$OUT/asv.tgz" --exclude=html results/asv results/plots/asv-history*.png
exit $rc
