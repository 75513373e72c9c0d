# Sourced by the GPU-machine scripts in benchmarks/: the carried wheels and Nsight Systems
# (.whl/gpu-env.sh, see ../shared/device/README.md), this checkout on PYTHONPATH, the commit the
# records name (DS4BENCH_COMMIT; that machine's copy has no usable .git), the card's short name
# (`card`, e.g. h100) and a run-id stamp (`stamp`, UTC minute, or $STAMP).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -f .whl/gpu-env.sh ] && source .whl/gpu-env.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export DS4BENCH_COMMIT=${DS4BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')
stamp=${STAMP:-$(date -u +%Y%m%d-%H%M)}
