#!/usr/bin/env bash
# Nsight Compute on the decode kernels (benchmarks/ncu_probe.py) in one call on the GPU machine:
# speed of light, memory workload, warp stalls, occupancy and launch statistics of the last
# launch of each kernel, as text under $OUT (or ./gpu-out): ncu-<probe>.txt.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
declare -A pattern=([moe]="regex:moe_(gate_up|down)_" [q8_head]="regex:^matmul_q8_0$" [q8_qb]="regex:^matmul_q8_0$"
                    [attention]="regex:attend_sink_ring")
for probe in ${PROBES:-moe q8_head attention}; do
  ncu --kernel-name "${pattern[$probe]}" --launch-skip 2 --launch-count 2 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
      --section Occupancy --section LaunchStats --section SchedulerStats \
      python3 -m benchmarks.ncu_probe "$probe" > "$OUT/ncu-$probe.txt" 2>&1
  echo "== $probe: rc $?"; grep -E "^  [a-z_]+.*\(|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|One or More Eligible|L1/TEX Hit|L2 Hit|Compute \(SM\)" "$OUT/ncu-$probe.txt" | head -40
done
