#!/usr/bin/env bash
# ds4 (antirez/ds4) beside our engine on the synthetic full-Flash file (docs/engines.md), in one
# call on the GPU machine: the file lives in /dev/shm, which survives only while the machine
# stays warm. Needs an H200 (ds4 copies the 81 GiB of weights to the device; so does ours), and
# a clone of antirez/ds4 in the ignored folder .ds4src, carried with the call (carry .ds4src).
#   1. ds4bench engines build ds4: ds4's CUDA binary for the card's arch, cuBLAS from the torch
#      venv's nvidia-cublas (the toolkit there has none), in /tmp/ds4-build
#   2. ds4bench model make --preset "$preset" --workers: the q2 file, seed 0, in /dev/shm/ds4bench
#   3. ds4bench matrix --engine ds4, batch 1, over DS4_CUDA_NO_Q8_F16_CACHE (the batched Q8
#      matmuls of prefill through F16 copies, off) and DS4_CUDA_NO_Q8_DP4A (the dp4a Q8 dot
#      products, off): each alone and neither, as results/runs/<stamp>-<card>-ds4
#   4. our CuPy engine on the same file, q8, device placement, batch 1, the decode graph (how
#      batch-1 speed is measured, docs/speed.md), as results/runs/<stamp>-<card>-ds4bench-flash
#      (no stage probe: its NumPy reference at full Flash would take the call)
#   5. benchmarks/compare_engines.py: every ds4 cell against ours, prompt by prompt
# Environment:
#   PRESET=flash      flash (43 layers: needs an H200) or flash-4l (ds4 built with --layers 4; 9.5 GB: any
#                     80 GB card), for the model file, both matrices and the build
#   DS4_SRC=.ds4src   the ds4 clone      ARCH=sm_90 (default: the card's)   CUBLAS=DIR (default: found)
#   WORKERS=12        writer processes (the file takes 87 GB of the 128 GiB in memory; each worker up to 1.5 GiB, one 8)
#   N=16              tokens per prompt  PROMPTS=capital (one prompt; smoke: three, about 3x the matrix time)
#   OUT=DIR           also write ds4-<card>.txt (the log, as it goes) and ds4-<card>.tgz (the runs, fingerprints included: compare_engines.py reads them) there
#   DEADLINE_S=S      a matrix still running S seconds after the start is stopped with SIGTERM (its finished
#                     cells kept), so that the comparison and the tarball are written inside a call's limit
# Expected on an H200 (estimates from the device notes: ds4's build ~30 s, the write ~90 s with 15
# processes, ds4 at 41.6 tok/s with DS4_CUDA_COPY_MODEL=1): build 0.5 min, write 1.5 min, ds4 3 cells
# x 2 processes at ~15-30 s (each copies the weights), ours 2-4 min: 6-9 min in all.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
src=${DS4_SRC:-.ds4src}
shm=/dev/shm/ds4bench
mkdir -p "$shm"
export DS4BENCH_MODEL_CACHE=$shm
preset=${PRESET:-flash}
case $preset in flash) layers=43 ;; flash-4l) layers=4 ;; *) echo "PRESET=$preset: flash or flash-4l" >&2; exit 2 ;; esac
model=$shm/$preset-q2-seed0.gguf
t_start=$SECONDS
if [ -n "${OUT:-}" ]; then log=$OUT/ds4-$card.txt; else log=$(mktemp); fi
: > "$log"
# a matrix, stopped (SIGTERM: finished cells kept) DEADLINE_S seconds after the start
matrix() {
  if [ -n "${DEADLINE_S:-}" ]; then
    local left=$(( DEADLINE_S - (SECONDS - t_start) ))
    (( left > 10 )) || { say "note: matrix not started: past DEADLINE_S=$DEADLINE_S s"; return 1; }
    timeout -s TERM -k 20 "$left" python3 -m ds4bench matrix "$@"
  else
    python3 -m ds4bench matrix "$@"
  fi
}
say() { echo "$@" | tee -a "$log" >&2; }
say "# ds4 beside ds4bench on $card, commit ${DS4BENCH_COMMIT:-unknown}, $(date -u +%FT%TZ): benchmarks/gpu_ds4.sh"
say "# ds4 source: $src at $(git -C "$src" rev-parse HEAD 2>/dev/null || echo '(no git)')"

cublas=${CUBLAS:-$(ls -d /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -1)}
build=(python3 -m ds4bench engines build ds4 --src "$src" --out /tmp/ds4-build)    # /dev/shm may be noexec
[ -n "${ARCH:-}" ] && build+=(--arch "$ARCH")
[ -n "$cublas" ] && build+=(--cublas "$cublas")
(( layers == 43 )) || build+=(--layers "$layers")
t0=$SECONDS
ds4=$("${build[@]}" 2>>"$log") || { tail -3 "$log" >&2; exit 2; }
say "## build: ${build[*]} -> $ds4 ($((SECONDS - t0)) s)"
cat /tmp/ds4-build/ds4bench-build.json >> "$log"
export DS4_BIN=$ds4

if [ ! -f "$model" ]; then
  t0=$SECONDS
  python3 -m ds4bench model make --preset "$preset" --workers "${WORKERS:-12}" -o "$model" 2>&1 | tee -a "$log" >&2 || exit 2
  say "## write: $((SECONDS - t0)) s"
fi

prompts=${PROMPTS:-capital}
if [ "$prompts" = capital ]; then
  prompts=$shm/capital.toml
  printf '[[prompt]]\nid = "capital_france"\nkind = "smoke"\ntext = "What is the capital of France? One word."\nexpect = "Paris"\n' > "$prompts"
fi
n=${N:-16}
ds4_id="$stamp-$card-ds4"
ours_id="$stamp-$card-ds4bench-$preset"

say "## ds4 matrix: two toggles, each alone"
matrix --engine ds4 --preset "$preset" --model "$model" -n "$n" --prompts "$prompts" --reps 1 \
  --env DS4_CUDA_NO_Q8_F16_CACHE=unset,1 --env DS4_CUDA_NO_Q8_DP4A=unset,1 \
  --exclude env.DS4_CUDA_NO_Q8_F16_CACHE=1,env.DS4_CUDA_NO_Q8_DP4A=1 --id "$ds4_id" 2>>"$log" | tee -a "$log"
say "exit status $? (0: every cell identical, close or drift)"

say "## our engine on the same file: q8, device, batch 1, decode graph"
DS4BENCH_PROBE_TOKENS=0 DS4BENCH_DECODE_GRAPH=on matrix --preset "$preset" --model "$model" --mode q8 --placement device \
  --batch 1 --nvtx off --baseline cache=q8,placement=device,batch=1 -n "$n" --prompts "$prompts" --reps 1 \
  --id "$ours_id" 2>>"$log" | tee -a "$log"
say "exit status $?"

say "## ds4's cells against ours"
python3 benchmarks/compare_engines.py "results/runs/$ours_id" "results/runs/$ds4_id" | tee -a "$log"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/ds4-$card.tgz" $(ls -d "results/runs/$ds4_id" "results/runs/$ours_id" 2>/dev/null)
else
  rm -f "$log"
fi
