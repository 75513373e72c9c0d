#!/usr/bin/env bash
# Benchmark a commit range with asv without a package index (the GPU box), then publish.
#
#   benchmarks/asv_range.sh A..B [more asv run options]     e.g. benchmarks/asv_range.sh e6d2171..HEAD
#
# Each commit is installed editable (--no-deps --no-index --no-build-isolation) into a virtualenv
# under .asv/env that sees this python's packages through a .pth file (asv.conf.json's
# build_command writes it from $PARENT_SITE), so CuPy, NumPy and the rest come from the machine.
# asv's own set-up (pip install wheel/pip/build) is served from $PIP_FIND_LINKS (default ./.whl,
# which must hold wheel, build, packaging, pyproject_hooks; other find-links stay after it). Needs a git
# repository with the range.
# The benchmarks run under the spawn launch method (asv.conf.json) so CUDA starts clean per process.
# DS4BENCH_ASV_FULL=1 (the default here) runs tiny and flash-4l, every placement, batch 1 and 16;
# export DS4BENCH_ASV_PLACEMENTS / _BATCHES / _CACHES / _PRESETS to narrow it. The tracks (decode
# tok/s, first divergence, max |Δlogprob|, device bytes) are measured once per commit for every
# cell; time_prefill / time_decode_step, one process per cell each, run on DS4BENCH_ASV_TIME_PRESETS
# and DS4BENCH_ASV_TIME_PLACEMENTS (default here: tiny, device); DS4BENCH_ASV_SKIP leaves cells out.
# Results: results/asv/results/<machine>/, HTML: results/asv/html, plots: results/plots/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 A..B [asv run options]" >&2; exit 2; }
git rev-parse --git-dir >/dev/null 2>&1 || { echo "$0: $(pwd) is not a git repository: asv needs the history" >&2; exit 2; }
PARENT_SITE="$(python3 -c 'import site; print(":".join(site.getsitepackages()))')${EXTRA_SITE:+:$EXTRA_SITE}"
export PARENT_SITE
export PIP_NO_INDEX=1
[ -d .whl ] && export PIP_FIND_LINKS="$PWD/.whl${PIP_FIND_LINKS:+ $PIP_FIND_LINKS}"   # the carried wheels first
export DS4BENCH_ASV_FULL="${DS4BENCH_ASV_FULL:-1}"
export DS4BENCH_ASV_TIME_PRESETS="${DS4BENCH_ASV_TIME_PRESETS:-tiny}"           # time_*: tiny, device placement;
export DS4BENCH_ASV_TIME_PLACEMENTS="${DS4BENCH_ASV_TIME_PLACEMENTS:-device}"   # tracks: every cell not skipped
machine="${ASV_MACHINE:-$(hostname -s)}"
asv machine --yes --machine "$machine" >/dev/null
rc=0   # a failed benchmark fails the command, after the results are published and plotted
asv run --machine "$machine" --launch-method spawn --show-stderr --skip-existing-successful "$@" || rc=$?
asv publish
python3 -m ds4bench plot --asv results/asv/results --machine "$machine"
exit $rc
