# Sourced by the GPU-machine scripts in benchmarks/: the carried wheels and Nsight Systems
# (.whl/gpu-env.sh, see docs/gpu-machine.md), this checkout on PYTHONPATH, the commit the
# records name (DS4BENCH_COMMIT, given, or HEAD of a clean git tree), the card's short name
# (`card`, e.g. h100) and a run-id stamp (`stamp`, UTC minute, or $STAMP).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -f .whl/gpu-env.sh ] && source .whl/gpu-env.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -z "${DS4BENCH_COMMIT:-}" ] && git diff --quiet HEAD -- 2>/dev/null; then
  export DS4BENCH_COMMIT=$(git rev-parse HEAD)      # only a clean tree is that commit
fi
[ -n "${DS4BENCH_COMMIT:-}" ] || echo "note: DS4BENCH_COMMIT is unset and git cannot vouch for this tree (no .git, or changes against HEAD): set DS4BENCH_COMMIT=<sha>" >&2
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')
stamp=${STAMP:-$(date -u +%Y%m%d-%H%M)}
