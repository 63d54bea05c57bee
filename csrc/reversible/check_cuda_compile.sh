#!/usr/bin/env bash
# Compile-only check of the CUDA half of the revkern extension (CI has nvcc but no GPU, and may
# have only a CPU build of torch):
#   1. csrc/reversible/revkern_kernels.cuh alone (plain CUDA, no torch) for sm_80 and sm_90, with every
#      (dst, src) dtype pair the glue instantiates;
#   2. csrc/reversible/revkern_cuda.cu with torch's headers (the glue + TORCH_LIBRARY_IMPL registration).
#      A CPU wheel ships c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h,
#      so we define C10_CUDA_NO_CMAKE_CONFIGURE_FILE (that header only sets export macros).
# Usage: csrc/reversible/check_cuda_compile.sh [python]   (NVCC=/path/to/nvcc picks the compiler,
#        REVKERN_CHECK_ARCHS="90" the SM architectures; default "80 90")
# Exit 0: both compiled; 1: a compile failed; 77: skipped (no nvcc / no torch headers).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${1:-${PYTHON:-python3}}"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then echo "check_cuda_compile: nvcc not found, skipped"; exit 77; fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
arch=()
for a in ${REVKERN_CHECK_ARCHS:-80 90}; do arch+=(-gencode "arch=compute_$a,code=sm_$a"); done

# 1. the kernels alone
cat > "$out/kernels_tu.cu" <<'CU'
#include "revkern_kernels.cuh"
namespace kc = revkern::cuda;
template __global__ void kc::axpy_inplace_batch_kernel<float, float>(const __grid_constant__ kc::Batch);
template __global__ void kc::axpy_inplace_batch_kernel<double, double>(const __grid_constant__ kc::Batch);
template __global__ void kc::axpy_inplace_batch_kernel<__nv_bfloat16, __nv_bfloat16>(const __grid_constant__ kc::Batch);
template __global__ void kc::axpy_inplace_batch_kernel<__half, __half>(const __grid_constant__ kc::Batch);
template __global__ void kc::axpy_inplace_batch_kernel<float, __nv_bfloat16>(const __grid_constant__ kc::Batch);
template __global__ void kc::axpy_inplace_batch_kernel<float, __half>(const __grid_constant__ kc::Batch);
CU
"$NVCC" -std=c++17 -O3 "${arch[@]}" -I"$here" -c "$out/kernels_tu.cu" -o "$out/kernels_tu.o"
echo "check_cuda_compile: kernels header OK ($("$NVCC" --version | tail -1))"

# 2. the glue against torch's headers
if ! incs="$("$PY" -c 'import torch.utils.cpp_extension as c; print(" ".join("-I"+p for p in c.include_paths()))' 2>/dev/null)"; then
  echo "check_cuda_compile: torch not importable with $PY, glue check skipped"; exit 77
fi
abi="$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
# REVKERN_CHECK_MODE=frontend: `nvcc -cuda` to PTX (nvcc's C++ front end on host and device code
# and the device compile, without ptxas and the g++ host pass, which the CPU build already covers
# for the same headers): about 2/3 of the time of the full `-c` (default, REVKERN_CHECK_MODE=full).
if [[ "${REVKERN_CHECK_MODE:-full}" == frontend ]]; then
  ptx=(); for a in ${REVKERN_CHECK_ARCHS:-80 90}; do ptx+=(-gencode "arch=compute_$a,code=compute_$a"); done
  step=(-cuda "${ptx[@]}" -O0 -o "$out/revkern_cuda.cu.ii")
else
  step=(-c "${arch[@]}" -O3 -o "$out/revkern_cuda.o")
fi
# shellcheck disable=SC2086
"$NVCC" -std=c++20 $incs -I"$here" -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
  -D_GLIBCXX_USE_CXX11_ABI="$abi" -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=revkern_check \
  --expt-relaxed-constexpr -Xcompiler -fPIC "${step[@]}" "$here/revkern_cuda.cu"
echo "check_cuda_compile: revkern_cuda.cu OK (${REVKERN_CHECK_MODE:-full}) against torch $("$PY" -c 'import torch; print(torch.__version__)')"
