#!/usr/bin/env bash
# Decode-kernel A/B on a GPU machine, without torch: scripts/decode_probe.cu built against this tree's
# hf_int4/csrc and, where PROBE_BASE names a folder holding another copy of the kernel headers (e.g. the last
# commit's, copied into the ignored .probe/base and carried), against that one too; per shape and M the two
# run one after the other. Columns: per-call time and TB/s of the GEMM, then of a plain read of the weights. Each run
# first checks the GEMM's result against a host reference and stops the sweep if it is wrong.
# PROBE_VARIANTS builds this tree once per NAME=DEFINES (commas for spaces), e.g. the streaming kernel's ring depth.
# PROBE_READS=1 also times six reads of the weights in other access orders (tile order, stream order), each as long as
# a GEMM run: off by default, where a sweep of several builds spends its device time on the GEMMs.
#   PROBE_BASE=.probe/base PROBE_SHAPES="4096x4096 8192x8192" PROBE_MS="1 16" scripts/probe_sweep.sh
#   PROBE_VARIANTS="ring8=-DHF_INT4_STREAM_RING=8 ring16=-DHF_INT4_STREAM_RING=16" scripts/probe_sweep.sh
# PROBE_NCU=1: instead of the timings, ncu's speed-of-light, warp-state, scheduler and memory sections of each build's
# third streaming-kernel launch per shape and M, and the stall reasons (cycles per issued instruction, which the
# warp-state section only sums); ncu locks the SM clock, so compare cycles.
set -uo pipefail
cd "$(dirname "$0")/.."
variants="${PROBE_VARIANTS:-tree=}"
names=""
rm -f /tmp/probe_base /tmp/probe_ref_*  # the host products that decode_probe caches per case (same data in every build)
build() { nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -I "$1" "${@:3}" scripts/decode_probe.cu -o "$2"; }
[ -n "${PROBE_BASE:-}" ] && { build "$PROBE_BASE" /tmp/probe_base & names="base"; }
for v in $variants; do
  name=${v%%=*}
  rm -f "/tmp/probe_$name"
  defs=${v#*=}
  build hf_int4/csrc "/tmp/probe_$name" ${defs//,/ } &
  names="$names $name"
done
wait
for name in $names; do [ -x "/tmp/probe_$name" ] || { echo "probe: build of $name failed"; exit 1; }; done
for shape in ${PROBE_SHAPES:-4096x1024 4096x4096 4096x6144 4096x14336 14336x4096 4096x28672 8192x8192}; do
  for M in ${PROBE_MS:-1 4 16 64}; do
    for name in $names; do
      if [ -n "${PROBE_NCU:-}" ]; then
        echo "=== ncu $name K=${shape%x*} N=${shape#*x} M=$M"
        ncu --launch-skip 2 --launch-count 1 -k regex:stream_gemm_kernel --section SpeedOfLight --section WarpStateStats \
          --section SchedulerStats --section MemoryWorkloadAnalysis \
          --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active" \
          "/tmp/probe_$name" "${shape%x*}" "${shape#*x}" "$M" 2>&1 \
          | grep -v "^==PROF=="
      else
        out=$(/tmp/probe_$name "${shape%x*}" "${shape#*x}" "$M") || { echo "$name $out"; echo "probe: $name is wrong"; exit 1; }
        echo "$name $out"
      fi
    done
  done
done
exit 0
