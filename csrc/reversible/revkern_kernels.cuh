// CUDA kernels of the `revkern` extension. Plain CUDA: no ATen/c10 dependency, so this header can
// be compiled (and checked) on its own; revkern_cuda.cu is the ATen glue.
//
// One launch applies a batch of in-place updates `dst += alpha * src` ("pairs"); blockIdx.y picks
// the pair, blockIdx.x/threadIdx.x grid-stride over its work units. A pair is either
//   * vectorized: innermost dim contiguous in dst and src, its extent, every outer stride and both
//     base pointers multiples of the vector width (16 bytes of dst): one unit = one 16-byte
//     load/store of dst (and a VEC-element load of src), or
//   * scalar: any strides (explicit index math over up to kMaxDims coalesced dims).
// Arithmetic is in float (double for double); the result is rounded once to the dst type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include "revkern_acc.h"

namespace revkern {
namespace cuda {

constexpr int kMaxDims = 8;
constexpr int kMaxPairs = 12;  // pairs per launch: keeps the argument struct < 4 KiB
constexpr int kThreads = 256;

struct PairMeta {
  void* dst;
  const void* src;
  int64_t units;  // work units of this pair (vectors in vectorized mode, elements otherwise)
  double alpha;
  int32_t ndim;   // coalesced dims, innermost last
  int32_t vec;    // 1: vectorized mode (sizes[ndim-1] counted in vectors), 0: scalar
  int64_t sizes[kMaxDims];
  int64_t dst_strides[kMaxDims];  // elements
  int64_t src_strides[kMaxDims];  // elements
};

struct Batch {
  int32_t npairs;
  PairMeta pairs[kMaxPairs];
};

template <typename A>
__device__ __forceinline__ A to_acc(float x) { return x; }
template <typename A>
__device__ __forceinline__ A to_acc(double x) { return static_cast<A>(x); }
template <typename A>
__device__ __forceinline__ A to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename A>
__device__ __forceinline__ A to_acc(__half x) { return __half2float(x); }

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A x);
template <>
__device__ __forceinline__ float from_acc<float, float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double, double>(double x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float x) { return __float2half_rn(x); }

template <typename T, int N>
struct alignas(sizeof(T) * N) VecT {
  T v[N];
};

// Elements of dst per 16-byte vector.
template <typename T>
__host__ __device__ constexpr int vec_width() { return static_cast<int>(16 / sizeof(T)); }

// Offsets (in elements) of work unit u: outer dims decomposed row-major; `inner_mul` is the
// number of elements per unit along the innermost dim (the vector width, or 1).
__device__ __forceinline__ void unit_offsets(const PairMeta& p, int64_t u, int64_t inner_mul, int64_t& od,
                                             int64_t& os) {
  const int last = p.ndim - 1;
  int64_t rem = u;
  const int64_t i_in = rem % p.sizes[last];
  rem /= p.sizes[last];
  od = i_in * inner_mul * p.dst_strides[last];
  os = i_in * inner_mul * p.src_strides[last];
  for (int k = last - 1; k >= 0; --k) {
    const int64_t idx = rem % p.sizes[k];
    rem /= p.sizes[k];
    od += idx * p.dst_strides[k];
    os += idx * p.src_strides[k];
  }
}

template <typename T, typename U>
__device__ __forceinline__ void run_vectorized(const PairMeta& p) {
  using A = typename Acc<T>::type;
  constexpr int N = vec_width<T>();
  using VD = VecT<T, N>;
  using VS = VecT<U, N>;
  T* __restrict__ d = static_cast<T*>(p.dst);
  const U* __restrict__ s = static_cast<const U*>(p.src);
  const A alpha = static_cast<A>(p.alpha);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p.ndim == 1) {  // flat: no index math
    VD* dv = reinterpret_cast<VD*>(d);
    const VS* sv = reinterpret_cast<const VS*>(s);
    for (; u < p.units; u += stride) {
      VD a = dv[u];
      const VS b = sv[u];
#pragma unroll
      for (int j = 0; j < N; ++j) a.v[j] = from_acc<T, A>(to_acc<A>(a.v[j]) + to_acc<A>(b.v[j]) * alpha);
      dv[u] = a;
    }
    return;
  }
  for (; u < p.units; u += stride) {
    int64_t od, os;
    unit_offsets(p, u, N, od, os);
    VD a = *reinterpret_cast<VD*>(d + od);
    const VS b = *reinterpret_cast<const VS*>(s + os);
#pragma unroll
    for (int j = 0; j < N; ++j) a.v[j] = from_acc<T, A>(to_acc<A>(a.v[j]) + to_acc<A>(b.v[j]) * alpha);
    *reinterpret_cast<VD*>(d + od) = a;
  }
}

template <typename T, typename U>
__device__ __forceinline__ void run_scalar(const PairMeta& p) {
  using A = typename Acc<T>::type;
  T* d = static_cast<T*>(p.dst);
  const U* s = static_cast<const U*>(p.src);
  const A alpha = static_cast<A>(p.alpha);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < p.units; u += stride) {
    int64_t od, os;
    unit_offsets(p, u, 1, od, os);
    d[od] = from_acc<T, A>(to_acc<A>(d[od]) + to_acc<A>(s[os]) * alpha);
  }
}

// dst += alpha * src for every pair of the batch; grid = (x, npairs).
template <typename T, typename U>
__global__ void __launch_bounds__(kThreads) axpy_inplace_batch_kernel(const __grid_constant__ Batch batch) {
  const PairMeta& p = batch.pairs[blockIdx.y];
  if (p.vec) {
    run_vectorized<T, U>(p);
  } else {
    run_scalar<T, U>(p);
  }
}

}  // namespace cuda
}  // namespace revkern
