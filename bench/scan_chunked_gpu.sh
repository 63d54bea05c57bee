#!/bin/bash
# One device call for issue 5: GPU tests, compute-sanitizer, benchmark. Usage: bench/scan_chunked_gpu.sh [tests] [sanitize] [bench ARGS...]
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
while [ $# -gt 0 ]; do
  case $1 in
    tests) shift; timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -x -m gpu tests/test_chunked.py --durations=8 2>&1 | tee $OUT/tests.log ;;
    sanitize) shift; timeout 200 compute-sanitizer --tool memcheck --print-limit 20 python3 -c "
import torch
from gateloop_kernels.chunked import chunk_gate_loop
B,n,H,d,e=2,300,2,16,48
q,k=torch.randn(B,n,H,d,device='cuda'),torch.randn(B,n,H,d,device='cuda'); v=torch.randn(B,n,H,e,device='cuda')
ar,ai=torch.rand(B,n,H,device='cuda'),torch.rand(B,n,H,device='cuda')*0.1
h0=torch.randn(B,H,d,e,dtype=torch.complex64,device='cuda')
xs=[t.requires_grad_() for t in (q,k,v,ar,ai,h0)]
o,st=chunk_gate_loop(*xs[:5],initial_state=xs[5],output_final_state=True)
(o.sum()+st.abs().sum()).backward(); torch.cuda.synchronize(); print('sanitizer run done')
" > $OUT/sanitize.log 2>&1; grep -m12 -E "Invalid|at 0x|_chunk|_state|_fwd|_bwd|ERROR SUMMARY|done" $OUT/sanitize.log ;;
    bench) shift; python3 -m bench.scan_chunked --json $OUT/scan_chunked.json "$@" 2>&1 | tee $OUT/bench.log; break ;;
    *) echo "unknown step $1"; exit 2 ;;
  esac
done
