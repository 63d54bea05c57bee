#!/usr/bin/env bash
# The project's one GPU script. On a bare GPU machine, from the repository root: make the peers'
# wheels (from .whl/, when carried) and this package importable, then run the requested stages.
# Logs, JSON and plots go to bench/out/, the benchmarks' result rows are appended to bench/results/*.jsonl; on
# the device machine ($OUT set) both come back as $OUT/results.tgz (out/ and results/).
#   usage: bash bench/gpu.sh [stage ...]     (no stage: all of them but ncu and roofline)
#   stages: tests     every GPU-marked test (plus the CPU suite's fast parts run on this machine)
#           memcheck  compute-sanitizer memcheck of one fwd+bwd of each kernel and extension op, of the chunked
#                     kernels' head-dim sweep (tests/gateloop/test_chunked_sweep.py) and of their packed launches
#                     (tests/gateloop/test_chunked_varlen.py; MEMCHECK_SWEEP_ARGS="-n 8 -k ..." passes on)
#           ncu       Nsight Compute on one float32 exact forward+backward of the chunked scan: per kernel in
#                     $NCU_KERNELS, stall reasons and shared-memory replays (bench/tools/ncu.py) into bench/out/ncu_*.txt
#           roofline  ncu over one warm forward+backward of the chunked scan per precision in $ROOFLINE (default
#                     "ieee:float32 tf32:float32 ieee:bfloat16"): per kernel time, DRAM bytes, tensor-pipe use
#                     (bench/tools/ncu.py roofline) into bench/out/ncu_roofline_*.txt
#           multi     several GPUs (issue 24): the NCCL tests (each skips below its 2 or 4 GPUs), then per W = 2, 4, 8
#                     up to the GPU count: `bench cp` timings at head dims 1 and 64 (T in $MULTI_SEQ, default 32768
#                     131072 524288; the one-GPU time of the whole sequence beside; rows with step, tokens/s, efficiency,
#                     collective share, peak memory per GPU, NVLink links), training runs of T = $MULTI_TRAIN_SEQ
#                     (65536) on one GPU and on a W-rank FSDP2 mesh and a (W/2 data x 2 context) HSDP one (peak memory
#                     and the longest trainable sequence it predicts); then `bench cp --predict` beside the measured
#           scan reversible model train generate overhead cp   the benchmarks (python -m bench <name> $<NAME>_ARGS,
#                     e.g. SCAN_ARGS="--quick --no-chunked" bash bench/gpu.sh scan; TESTS_ARGS="-n 8"
#                     runs the tests in 8 processes with pytest-xdist, which the GPU image has)
#   BENCH_COMMIT=<commit>: the commit the result rows name (a copied tree's .git can be older than its files: on the
#   device machine it was; `BENCH_COMMIT=$(git rev-parse --short=12 HEAD)` from the checkout that sends the tree)
set -uo pipefail
[[ -z ${BENCH_COMMIT:-} ]] && echo "gpu.sh: BENCH_COMMIT unset: result rows will name this copy's git HEAD ($(git rev-parse --short=12 HEAD 2>/dev/null || echo none)), which may be stale" >&2
stages=("$@"); [[ ${#stages[@]} -eq 0 ]] && stages=(tests memcheck scan reversible model train)
out=bench/out; mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
python3 -c 'import reversible; print("reversible extension:", reversible.extension_info())'
# STAGE_TIMEOUT=S: each test/benchmark stage is interrupted (SIGINT: pytest still prints what failed so far) after S
# seconds, so that a device call's time limit never loses the later stages' output (0, the default: no limit)
stop="timeout --signal=INT --kill-after=30 ${STAGE_TIMEOUT:-0}"
rc=0
for stage in "${stages[@]}"; do
  echo "=== $stage ($(date -u +%H:%M:%S)) ==="
  case $stage in
    tests) rm -f "$out/gpu_test_memory.txt"
           GATELOOP_GPU_MEM_LOG="$PWD/$out/gpu_test_memory.txt" $stop python3 -m pytest -q -m gpu -p no:cacheprovider ${TESTS_ARGS:-} $([[ " ${TESTS_ARGS:-} " == *" -n "* ]] && echo --dist loadgroup) 2>&1 | tee "$out/gpu_tests.log" || rc=1
           sort -rn "$out/gpu_test_memory.txt" 2>/dev/null | head -n 12 ;;
    memcheck) for tool in memcheck memcheck_revkern; do
                compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m bench.tools.$tool 2>&1 \
                  | tail -n 20 | tee -a "$out/memcheck.log"; [[ ${PIPESTATUS[0]} -eq 0 ]] || rc=1
              done
              # every tile class of the chunked kernels (head dims 16..256, d != e, partial chunks, every dtype), and
              # their packed (cu_seqlens) launches: both state-pass forms and the one-kernel walk's read-ahead table
              $stop compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all \
                python3 -m pytest -q -m gpu -p no:cacheprovider tests/gateloop/test_chunked_sweep.py \
                tests/gateloop/test_chunked_varlen.py ${MEMCHECK_SWEEP_ARGS:-} 2>&1 \
                | grep -v "^tests/" | tail -n 20 | tee -a "$out/memcheck.log"; [[ ${PIPESTATUS[0]} -eq 0 ]] || rc=1 ;;
    multi) ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
           echo "GPUs: $ngpu"; nvidia-smi topo -m 2>&1 | tee "$out/multi_topology.txt"
           $stop python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/gateloop/test_context_parallel.py \
             tests/gateloop/test_context_parallel_model.py tests/gateloop/test_context_parallel_varlen.py \
             tests/gateloop/test_context_parallel_train.py tests/reversible/test_reversible_ddp.py \
             tests/bench/test_bench_cp.py 2>&1 | tee "$out/multi_tests.log" || rc=1
           $stop python3 -m bench cp --train --nproc 1 --seq "${MULTI_TRAIN_SEQ:-65536}" 2>&1 | tee -a "$out/bench_cp_multi.log"
           for w in 2 4 8; do
             (( w <= ngpu )) || continue
             for d in 1 64; do
               for T in ${MULTI_SEQ:-32768 131072 524288}; do
                 $stop python3 -m bench cp --nproc "$w" --dim "$d" --seq "$T" 2>&1 | tee -a "$out/bench_cp_multi.log"
                 [[ ${PIPESTATUS[0]} -eq 0 ]] || rc=1
               done
             done
             for mesh in "--wrap fsdp" "--wrap hsdp --cp 2"; do
               $stop python3 -m bench cp --train --nproc "$w" --seq "${MULTI_TRAIN_SEQ:-65536}" $mesh 2>&1 \
                 | tee -a "$out/bench_cp_multi.log"
               [[ ${PIPESTATUS[0]} -eq 0 ]] || rc=1
             done
           done
           $stop python3 -m bench cp --predict 2>&1 | tee -a "$out/bench_cp_multi.log" || rc=1 ;;
    ncu) for kernel in ${NCU_KERNELS:-_fwd_o _bwd_dqk _bwd_dv _bwd_gate _chunk_local}; do
           rep="$out/ncu_$kernel"
           ncu --clock-control none -k "regex:$kernel" -s 1 -c 1 --section SpeedOfLight --section Occupancy \
               --section WarpStateStats --section SourceCounters --import-source no -f -o "$rep" \
               python3 -m bench.tools.ncu run > /dev/null 2>&1 || { echo "ncu failed on $kernel"; rc=1; continue; }
           ncu --import "$rep.ncu-rep" --page source --csv --print-source sass > "$rep.csv" 2>&1
           { ncu --import "$rep.ncu-rep" --page details | grep -E "Duration|Throughput|Occupancy|excessive"
             python3 -m bench.tools.ncu sass "$rep.csv"; } 2>&1 | tee "$rep.txt"
         done ;;
    roofline) for spec in ${ROOFLINE:-ieee:float32 tf32:float32 ieee:bfloat16}; do
                echo "--- ${spec} (shape ${ROOFLINE_SHAPE:-64,2048,64,64})"
                python3 -m bench.tools.ncu roofline --precision "${spec%%:*}" --dtype "${spec##*:}" \
                  --shape "${ROOFLINE_SHAPE:-64,2048,64,64}" --csv "$out/ncu_roofline_${spec/:/_}.csv" 2>&1 \
                  | tee "$out/ncu_roofline_${spec/:/_}.txt"; [[ ${PIPESTATUS[0]} -eq 0 ]] || rc=1
              done ;;
    scan|reversible|model|train|generate|overhead|cp) args_var="${stage^^}_ARGS"
      $stop python3 -m bench "$stage" ${!args_var:-} 2>&1 | tee "$out/bench_$stage.log" || rc=1 ;;
    *) echo "unknown stage $stage"; rc=2 ;;
  esac
  [[ -n ${OUT:-} ]] && tar czf "$OUT/results.tgz" -C bench out results   # what the stages so far wrote
done
python3 -m bench summary 2>&1 | tee "$out/summary.log"   # the short table, last
[[ -n ${OUT:-} ]] && tar czf "$OUT/results.tgz" -C bench out results
exit $rc
