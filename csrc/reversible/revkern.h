// Host-side declarations shared by the CPU (revkern_ops.cpp) and CUDA (revkern_cuda.cu)
// halves of the `revkern` extension: the fused in-place updates of the reversible coupling.
//
// Every op of the library is a list of in-place updates `dst += alpha * src` (dst and src the
// same shape, any strides). `reconstruct_` is two of them (y -= fy, dy += grad), `coupling_add_`
// one, `reconstruct_multi_` 2N. A device backend applies a whole list in one launch per
// (dst dtype, src dtype) pair, so the common all-same-dtype case is exactly one launch.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <string>
#include <cstdint>
#include <vector>

namespace revkern {

struct Update {
  at::Tensor dst;  // written in place
  at::Tensor src;  // read only; same sizes as dst; any supported float dtype
  double alpha;    // +1 or -1 in practice
};

// Largest number of dims a strided operand keeps after dims are merged; more falls back to ATen.
constexpr int kMaxDims = 8;

// The iteration space of one update after size-1 dims are dropped, dims sorted by dst stride
// (descending) and mergeable neighbours collapsed. The last dim is the innermost.
struct Layout {
  int ndim = 0;
  std::array<int64_t, kMaxDims> sizes{};
  std::array<int64_t, kMaxDims> dst_strides{};
  std::array<int64_t, kMaxDims> src_strides{};
  bool overflow = false;  // more than kMaxDims dims remain: caller must fall back
};

// Builds the coalesced layout of `u` (numel > 0). Defined in revkern_ops.cpp.
Layout coalesce(const Update& u);

// Validates the lists and turns them into updates (appended to `into`). Defined in revkern_ops.cpp.
std::vector<Update> make_updates(const char* op, at::TensorList dsts, at::TensorList srcs, double alpha,
                                 std::vector<Update> into = {});

// True for (dst, src) dtype pairs the kernels instantiate.
bool kernel_supports(at::ScalarType dst, at::ScalarType src);

}  // namespace revkern

namespace revkern {

// Error messages are built with std::string / std::to_string and handed to TORCH_CHECK as ONE
// string, never streamed through std::ostream in this library: on the GPU image (torch 2.11), an
// integer streamed into an ostringstream from code compiled here crashed (the libstdc++ the
// process loads differs from the one the extension was compiled against). One-argument
// TORCH_CHECK messages take no stream (c10::str passes a single string through).
[[noreturn]] inline void fail(const std::string& msg) {
  TORCH_CHECK(false, msg);
  while (true) {
  }
}
#define REVKERN_CHECK(cond, msg)                 \
  do {                                           \
    if (C10_UNLIKELY(!(cond))) ::revkern::fail(msg); \
  } while (0)

inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Calls f(static_cast<T*>(nullptr), static_cast<U*>(nullptr)) for the (dst, src) dtype pair.
// Instantiated pairs: same dtype for float32/float64/bfloat16/float16, and float32 dst with a
// bfloat16 or float16 src (an fp32 stream updated with an autocast-produced f(x)).
template <typename F>
inline void dispatch_dtypes(at::ScalarType dt, at::ScalarType st, const F& f) {
  if (dt == st) {
    switch (dt) {
      case at::kFloat: return f(static_cast<float*>(nullptr), static_cast<float*>(nullptr));
      case at::kDouble: return f(static_cast<double*>(nullptr), static_cast<double*>(nullptr));
      case at::kBFloat16: return f(static_cast<c10::BFloat16*>(nullptr), static_cast<c10::BFloat16*>(nullptr));
      case at::kHalf: return f(static_cast<c10::Half*>(nullptr), static_cast<c10::Half*>(nullptr));
      default: break;
    }
  } else if (dt == at::kFloat && st == at::kBFloat16) {
    return f(static_cast<float*>(nullptr), static_cast<c10::BFloat16*>(nullptr));
  } else if (dt == at::kFloat && st == at::kHalf) {
    return f(static_cast<float*>(nullptr), static_cast<c10::Half*>(nullptr));
  }
  fail(std::string("revkern: unsupported dtype pair (dst ") + c10::toString(dt) + ", src " + c10::toString(st) + ")");
}

// Throws on internal overlap of a dst, partial overlap of a dst with its src, or any overlap
// between a dst and another update's dst or src (the updates of a call run concurrently).
void check_overlaps(const std::vector<Update>& ups);

// Shape/dtype/device validation shared by every backend (Meta included); no data is touched.
void validate(const char* op, at::TensorList dsts, at::TensorList srcs);

// The op front ends, parameterized by the backend's apply function.
using ApplyFn = void (*)(const std::vector<Update>&);

template <ApplyFn Apply>
void coupling_add_impl(const at::Tensor& x, const at::Tensor& fx) {
  std::vector<at::Tensor> d{x}, s{fx};
  auto ups = make_updates("coupling_add_", d, s, 1.0);
  check_overlaps(ups);
  Apply(ups);
}

template <ApplyFn Apply>
void reconstruct_impl(const at::Tensor& y, const at::Tensor& fy, const at::Tensor& dy, const at::Tensor& grad) {
  std::vector<at::Tensor> d1{y}, s1{fy}, d2{dy}, s2{grad};
  auto ups = make_updates("reconstruct_", d1, s1, -1.0);
  ups = make_updates("reconstruct_", d2, s2, 1.0, std::move(ups));
  check_overlaps(ups);
  Apply(ups);
}

template <ApplyFn Apply>
void reconstruct_multi_impl(at::TensorList ys, at::TensorList fys, at::TensorList dys, at::TensorList grads) {
  REVKERN_CHECK(ys.size() == fys.size() && ys.size() == dys.size() && ys.size() == grads.size(),
                "reconstruct_multi_: the four lists must have the same length (got " + std::to_string(ys.size()) +
                    ", " + std::to_string(fys.size()) + ", " + std::to_string(dys.size()) + ", " +
                    std::to_string(grads.size()) + ")");
  auto ups = make_updates("reconstruct_multi_", ys, fys, -1.0);
  ups = make_updates("reconstruct_multi_", dys, grads, 1.0, std::move(ups));
  check_overlaps(ups);
  Apply(ups);
}

}  // namespace revkern
