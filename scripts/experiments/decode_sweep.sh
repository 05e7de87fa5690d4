#!/usr/bin/env bash
# Decode-kernel experiment sweep on a GPU machine (no torch): probe builds of this tree's kernel with compile-time
# knobs and with the patches beside this script (tile_128x256: 4 k-blocks per warp per barrier; fp16_inplace_nibbles:
# nibbles 1/5 and 3/7 dequantized in place with one fma, fp16 symmetric only, timing only), per shape and M; then
# ncu's warp-stall, scheduler and memory sections for M = 1 and 16 on 8192^2 and for the tile-order read.
#   OUT=... scripts/experiments/decode_sweep.sh      (gpu_check.sh sweep)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/sweep}; mkdir -p "$OUT"
variant() {  # variant NAME "NVCC FLAGS" PATCH...: the probe against a patched copy of the kernel headers
  local name=$1 flags=$2; shift 2
  local dir=/tmp/sweep_$name
  rm -rf "$dir" && mkdir -p "$dir" && cp hf_int4/csrc/decode_gemm.cuh hf_int4/csrc/kernels.h "$dir"/
  for p in "$@"; do patch -s -d "$dir" -p1 < "scripts/experiments/$p.patch" || return 1; done
  nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 $flags -I "$dir" scripts/decode_probe.cu -o /tmp/p_$name
}
variant s4 "" tile_128x256 & variant s6 "-DHF_INT4_STAGES=6" tile_128x256 & variant s8 "-DHF_INT4_STAGES=8" &
variant s4n "-DHF_INT4_EARLY_LAUNCH=0" tile_128x256 & variant ns "" fp16_inplace_nibbles & wait
ls /tmp/p_*
{
for shape in "8192 8192" "4096 14336" "14336 4096" "4096 4096"; do
  for M in 1 16; do
    for tile in "128 128" "128 256"; do
      echo "s4  $(/tmp/p_s4 $shape $M $tile -1)"
      echo "s6  $(/tmp/p_s6 $shape $M $tile -1)"
      if [ "$tile" = "128 128" ]; then
        echo "s8  $(/tmp/p_s8 $shape $M $tile -1)"
        echo "ns  $(/tmp/p_ns $shape $M $tile -1)"
      fi
      echo "s4n $(/tmp/p_s4n $shape $M $tile -1)"
      echo "s4n $(/tmp/p_s4n $shape $M $tile 264)"
    done
  done
done
} 2>&1 | tee "$OUT/sweep.txt"
sections="--section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section SpeedOfLight"
for M in 1 16; do
  timeout 120 ncu $sections -k regex:int4_gemm --launch-skip 2 --launch-count 1 /tmp/p_s4 8192 8192 $M 128 128 -1 \
    2>&1 | tail -150 > "$OUT/ncu_m$M.txt"
done
timeout 120 ncu $sections -k regex:pattern_read --launch-skip 2 --launch-count 1 /tmp/p_s4 8192 8192 1 2>&1 | tail -100 \
  > "$OUT/ncu_tile_order_read.txt"
exit 0
