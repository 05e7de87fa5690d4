#!/usr/bin/env bash
# The streaming decode kernel (stream_gemm.cuh, M <= 8) against another copy of the kernel headers (PROBE_BASE,
# e.g. the last commit's decode_gemm.cuh + kernels.h + gemm_common.cuh + stream_gemm.cuh copied into the ignored
# .probe/base and carried) on a GPU machine, no torch: scripts/decode_probe.cu per shape and M.
#   PROBE_BASE=.probe/base OUT=... scripts/experiments/stream_sweep.sh      (gpu_check.sh sweep)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/sweep}; mkdir -p "$OUT"
b() { nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -I "$2" scripts/decode_probe.cu -o /tmp/s_$1; }
b tree hf_int4/csrc & [ -d "${PROBE_BASE:-}" ] && b base "$PROBE_BASE" & wait
for shape in 4096x1024 4096x4096 4096x6144 4096x14336 14336x4096 4096x28672 8192x8192; do
  for M in ${STREAM_MS:-1 2 4 8}; do
    for v in base tree; do [ -x /tmp/s_$v ] && echo "$v $(/tmp/s_$v ${shape%x*} ${shape#*x} $M)"; done
  done
done 2>&1 | sed -E 's/tile-order read x4.*//; s/tile=-1x-1 blocks=-1: //' | tee "$OUT/stream_sweep.txt"
