#!/usr/bin/env bash
# On a bare GPU machine, from the repository root: install the peers' wheels (from .whl/ when
# present) and this package, run the scan's GPU tests, a compute-sanitizer memcheck of one
# forward+backward, and the scan benchmark. Results and logs go to ${OUT:-bench/out}.
#   usage: bash bench/scan_gpu.sh [tests|memcheck|bench|all] [extra args for python -m bench scan]
set -uo pipefail
what=${1:-all}; shift || true
out=${OUT:-bench/out}; mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
rc=0
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -x tests/test_elementwise.py tests/test_operator_dispatch.py tests/test_compile_scan.py \
    2>&1 | tee "$out/scan_tests.log" || rc=1
fi
if [[ $what == memcheck || $what == all ]]; then
  compute-sanitizer --tool memcheck --error-exitcode 3 python3 -c '
import torch
from gateloop_kernels import elementwise as ew
for cplx in (True, False):
    q, k, v, ar, ai = (torch.randn(2, 3000, 40, device="cuda", requires_grad=True) for _ in range(5))
    h0r, h0i = (torch.randn(2, 40, device="cuda", requires_grad=True) for _ in range(2))
    o, hr, hi, _ = ew.elementwise_scan(q, k, v if cplx else None, 0.5 * ar, 0.5 * ai if cplx else None, h0r, h0i if cplx else None)
    (o.sum() + hr.sum()).backward()
torch.cuda.synchronize(); print("memcheck run done")' 2>&1 | tee "$out/scan_memcheck.log" || rc=1
fi
if [[ $what == bench || $what == all ]]; then
  python3 -m bench scan --out "$out" "$@" 2>&1 | tee "$out/scan_bench.log" || rc=1
fi
exit $rc
