#!/usr/bin/env bash
# asv over a commit range on the GPU machine, whose copy of the tree has no usable .git:
#
#   here:   git bundle create .gitcarry/ds4bench.bundle --all       (.gitcarry is git-ignored)
#   there:  benchmarks/asv_gpu.sh <range> [asv run options]          carry .whl, .debs and .gitcarry
#           e.g. benchmarks/asv_gpu.sh 8949325..HEAD --steps 5
#
# Clones the bundle into /tmp/ds4bench-asv (kept: a second call on the same machine resumes there,
# asv skipping the commits already measured), seeds it with this tree's results/asv, runs
# benchmarks/asv_range.sh on the range, and copies results/asv and the history plot back into this
# tree on any exit, a timeout's SIGTERM included; with OUT set, a tarball of them too.
# The full grid (tiny and flash-4l, every cache mode and placement, batch 1 and 16) takes a few
# minutes per commit on an H200: give a 5-commit range two or three calls (`timeout 560` each).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 A..B [asv run options]" >&2; exit 2; }
bundle=${BUNDLE:-.gitcarry/ds4bench.bundle}
[ -f "$bundle" ] || { echo "$0: no $bundle: create it where .git is (git bundle create $bundle --all) and carry it" >&2; exit 2; }
[ -f .whl/gpu-env.sh ] && source .whl/gpu-env.sh
here=$PWD work=/tmp/ds4bench-asv pid=
if [ ! -d "$work/.git" ]; then
  git clone -q "$bundle" "$work"
  rm -rf "$work/results/asv" && mkdir -p results/asv && cp -r results/asv "$work/results/"
fi
copy_back() {
  trap - EXIT TERM INT
  rm -rf results/asv && cp -r "$work/results/asv" results/asv
  cp "$work"/results/plots/asv-history*.png results/plots/ 2>/dev/null || true
  [ -n "${OUT:-}" ] && tar czf "$OUT/asv.tgz" --exclude=html results/asv results/plots/asv-history*.png || true
}
trap 'kill "$pid" 2>/dev/null; pkill -TERM -f "asv run --machine" 2>/dev/null; wait; copy_back; exit 143' TERM INT
trap copy_back EXIT
export PIP_FIND_LINKS="$here/.whl${PIP_FIND_LINKS:+ $PIP_FIND_LINKS}"
export DS4BENCH_ASV_LOG="${DS4BENCH_ASV_LOG:-${OUT:-$here}/asv-cells.log}"    # each cell's outcome and seconds
[ -d /tmp/site ] && export EXTRA_SITE="${EXTRA_SITE:-/tmp/site}"   # where gpu-env.sh put gguf, tokenizers, nvtx
export ASV_MACHINE="${ASV_MACHINE:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')}"
mkdir -p "$work/results/asv/results/$ASV_MACHINE"      # the card and driver each call ran on, beside asv's machine.json
echo "$(date -u +%FT%TZ) $* : $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)" \
  >> "$work/results/asv/results/$ASV_MACHINE/devices.txt"
(cd "$work" && exec benchmarks/asv_range.sh "$@") &
pid=$!
wait $pid || exit $?
