// CUDA backend of the `revkern` ops: builds the launch batches and registers the CUDA kernels.
// Uses only c10/cuda headers (stream, guard), not ATen/cuda (which pulls in cuBLAS/cuSPARSE
// headers), so this file also compiles against a CPU build of torch with a bare CUDA toolkit.
#include "revkern.h"
#include "revkern_kernels.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <type_traits>

namespace revkern {
namespace {

namespace kc = revkern::cuda;

template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};

static_assert(sizeof(c10::BFloat16) == sizeof(__nv_bfloat16), "bf16 layout");
static_assert(sizeof(c10::Half) == sizeof(__half), "fp16 layout");

int sm_count(int device) {
  static std::mutex mu;
  static std::map<int, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  cache[device] = n;
  return n;
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Fills `m` for update `u` (coalesced layout L); picks the vectorized mode where legal.
template <typename T, typename U>
void fill_meta(kc::PairMeta& m, const Update& u, const Layout& L) {
  constexpr int N = kc::vec_width<typename CudaType<T>::type>();
  m.dst = u.dst.data_ptr();
  m.src = u.src.data_ptr();
  m.alpha = u.alpha;
  m.ndim = L.ndim;
  for (int k = 0; k < L.ndim; ++k) {
    m.sizes[k] = L.sizes[k];
    m.dst_strides[k] = L.dst_strides[k];
    m.src_strides[k] = L.src_strides[k];
  }
  const int last = L.ndim - 1;
  bool vec = L.dst_strides[last] == 1 && L.src_strides[last] == 1 && L.sizes[last] % N == 0 &&
             aligned(m.dst, N * sizeof(T)) && aligned(m.src, N * sizeof(U));
  for (int k = 0; vec && k < last; ++k) {
    vec = L.dst_strides[k] % N == 0 && L.src_strides[k] % N == 0;
  }
  m.vec = vec ? 1 : 0;
  if (vec) m.sizes[last] /= N;
  int64_t units = 1;
  for (int k = 0; k < L.ndim; ++k) units *= m.sizes[k];
  m.units = units;
}

template <typename T, typename U>
void launch_batch(const kc::Batch& b, int64_t max_units, int device, cudaStream_t stream) {
  using CT = typename CudaType<T>::type;
  using CU = typename CudaType<U>::type;
  const int64_t want = (max_units + kc::kThreads - 1) / kc::kThreads;
  // Enough resident blocks to saturate memory bandwidth; the grid-stride loop does the rest.
  const int64_t cap = std::max<int64_t>(1, (int64_t)sm_count(device) * 8 / std::max(1, b.npairs / 2));
  const dim3 grid((unsigned)std::max<int64_t>(1, std::min(want, cap)), (unsigned)b.npairs);
  kc::axpy_inplace_batch_kernel<CT, CU><<<grid, kc::kThreads, 0, stream>>>(b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cuda_apply(const std::vector<Update>& ups) {
  if (ups.empty()) return;
  const c10::Device dev = ups.front().dst.device();
  c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();

  // Group by (dst dtype, src dtype): one launch per group (more only past kMaxPairs pairs).
  std::map<std::pair<int, int>, std::vector<std::pair<const Update*, Layout>>> groups;
  for (const Update& u : ups) {
    REVKERN_CHECK(u.dst.is_cuda() && u.src.is_cuda(), "revkern: expected CUDA tensors");
    if (u.dst.numel() == 0) continue;
    Layout L = coalesce(u);
    if (L.overflow || !kernel_supports(u.dst.scalar_type(), u.src.scalar_type())) {
      u.dst.add_(u.src, u.alpha);
      continue;
    }
    groups[{(int)u.dst.scalar_type(), (int)u.src.scalar_type()}].emplace_back(&u, L);
  }
  for (auto& kv : groups) {
    const auto dt = static_cast<at::ScalarType>(kv.first.first);
    const auto st = static_cast<at::ScalarType>(kv.first.second);
    dispatch_dtypes(dt, st, [&](auto* tp, auto* up) {
      using T = std::remove_pointer_t<decltype(tp)>;
      using U = std::remove_pointer_t<decltype(up)>;
      const auto& items = kv.second;
      for (size_t i0 = 0; i0 < items.size(); i0 += kc::kMaxPairs) {
        kc::Batch b{};
        int64_t max_units = 0;
        b.npairs = (int32_t)std::min<size_t>(kc::kMaxPairs, items.size() - i0);
        for (int j = 0; j < b.npairs; ++j) {
          fill_meta<T, U>(b.pairs[j], *items[i0 + j].first, items[i0 + j].second);
          max_units = std::max(max_units, b.pairs[j].units);
        }
        launch_batch<T, U>(b, max_units, dev.index(), stream);
      }
    });
  }
}

}  // namespace
}  // namespace revkern

TORCH_LIBRARY_IMPL(revkern, CUDA, m) {
  m.impl("coupling_add_", &revkern::coupling_add_impl<&revkern::cuda_apply>);
  m.impl("reconstruct_", &revkern::reconstruct_impl<&revkern::cuda_apply>);
  m.impl("reconstruct_multi_", &revkern::reconstruct_multi_impl<&revkern::cuda_apply>);
}
