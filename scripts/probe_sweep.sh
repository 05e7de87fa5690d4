#!/usr/bin/env bash
# Decode-kernel A/B on a GPU machine, without torch: scripts/decode_probe.cu built against this tree's
# hf_int4/csrc and, where PROBE_BASE names a folder holding another copy of the kernel headers (e.g. the last
# commit's, copied into the ignored .probe/base and carried), against that one too; per shape and M the two
# run one after the other. Columns: per-call time and TB/s of the GEMM, then of a plain read of the weights.
#   PROBE_BASE=.probe/base PROBE_SHAPES="4096x4096 8192x8192" PROBE_MS="1 16" scripts/probe_sweep.sh
set -uo pipefail
cd "$(dirname "$0")/.."
rm -f /tmp/probe_tree /tmp/probe_base
build() { nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -I "$1" scripts/decode_probe.cu -o "$2"; }
build hf_int4/csrc /tmp/probe_tree &
[ -n "${PROBE_BASE:-}" ] && build "$PROBE_BASE" /tmp/probe_base &
wait
[ -x /tmp/probe_tree ] || { echo "probe: build failed"; exit 1; }
for shape in ${PROBE_SHAPES:-4096x1024 4096x4096 4096x6144 4096x14336 14336x4096 4096x28672 8192x8192}; do
  for M in ${PROBE_MS:-1 4 16 64}; do
    for v in base tree; do
      [ -x /tmp/probe_$v ] && echo "$v $(/tmp/probe_$v "${shape%x*}" "${shape#*x}" "$M")"
    done
  done
done
exit 0
