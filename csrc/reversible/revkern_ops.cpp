// The `revkern` op library: schemas, validation, CPU kernels and Meta (fake) kernels.
// The CUDA kernels live in revkern_cuda.cu and register themselves for the CUDA key.
//
//   revkern::coupling_add_(x, fx)                  x += fx
//   revkern::reconstruct_(y, fy, dy, grad)         y -= fy; dy += grad        (one pass)
//   revkern::reconstruct_multi_(ys, fys, dys, gs)  the same over lists          (one pass)
//
// All ops mutate their first (and third) arguments in place and return nothing, so that
// torch.compile can functionalize them (auto_functionalized) and opcheck accepts them.
#include "revkern.h"
#include "revkern_acc.h"

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <type_traits>

#ifdef REVKERN_PYTHON_MODULE
#include <Python.h>
#endif

namespace revkern {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace

bool kernel_supports(at::ScalarType dst, at::ScalarType src) {
  if (dst == src) return is_supported_float(dst);
  return dst == at::kFloat && (src == at::kBFloat16 || src == at::kHalf);
}

void validate(const char* op, at::TensorList dsts, at::TensorList srcs) {
  const std::string o(op);
  REVKERN_CHECK(dsts.size() == srcs.size(), o + ": lists differ in length (" + std::to_string(dsts.size()) + " vs " +
                                                std::to_string(srcs.size()) + ")");
  for (size_t i = 0; i < dsts.size(); ++i) {
    const at::Tensor& d = dsts[i];
    const at::Tensor& s = srcs[i];
    const std::string at_i = " at position " + std::to_string(i);
    REVKERN_CHECK(d.defined() && s.defined(), o + ": undefined tensor" + at_i);
    REVKERN_CHECK(d.sizes() == s.sizes(), o + ": shape mismatch" + at_i + ": " + shape_str(d.sizes()) + " vs " +
                                              shape_str(s.sizes()) + " (no broadcasting)");
    REVKERN_CHECK(d.device() == s.device(), o + ": device mismatch" + at_i + ": " + d.device().str() + " vs " +
                                                s.device().str());
    REVKERN_CHECK(is_supported_float(d.scalar_type()) && is_supported_float(s.scalar_type()),
                  o + ": dtypes must be float32/float64/bfloat16/float16, got " + c10::toString(d.scalar_type()) +
                      " and " + c10::toString(s.scalar_type()));
    if (i > 0) {
      REVKERN_CHECK(d.device() == dsts[0].device(), o + ": all tensors must be on one device (" + d.device().str() +
                                                        " vs " + dsts[0].device().str() + ")");
    }
  }
}

std::vector<Update> make_updates(const char* op, at::TensorList dsts, at::TensorList srcs, double alpha,
                                 std::vector<Update> into) {
  validate(op, dsts, srcs);
  for (size_t i = 0; i < dsts.size(); ++i) {
    REVKERN_CHECK(into.empty() || dsts[i].device() == into.front().dst.device(),
                  std::string(op) + ": all tensors must be on one device");
    // Pairs the kernels do not instantiate (e.g. a bfloat16 dst with a float32 src) are applied
    // with ATen's add_ by the backends, which keeps ATen's rounding exactly.
    into.push_back(Update{dsts[i], srcs[i], alpha});
  }
  return into;
}

void check_overlaps(const std::vector<Update>& ups) {
  for (size_t i = 0; i < ups.size(); ++i) {
    const Update& u = ups[i];
    if (u.dst.numel() == 0) continue;
    at::assert_no_internal_overlap(u.dst);
    at::assert_no_partial_overlap(u.dst, u.src);
    for (size_t j = 0; j < i; ++j) {
      if (ups[j].dst.numel() == 0) continue;
      auto st = at::get_overlap_status(u.dst, ups[j].dst);
      REVKERN_CHECK(st != at::MemOverlapStatus::Full && st != at::MemOverlapStatus::Partial,
                    "revkern: two destination tensors of one call overlap in memory");
    }
    // The updates of one call run concurrently: no src may read another update's dst.
    for (size_t j = 0; j < ups.size(); ++j) {
      if (j == i || ups[j].src.numel() == 0) continue;
      auto st = at::get_overlap_status(u.dst, ups[j].src);
      REVKERN_CHECK(st != at::MemOverlapStatus::Full && st != at::MemOverlapStatus::Partial,
                    "revkern: an input of one update overlaps the destination of another in the same call");
    }
  }
}

Layout coalesce(const Update& u) {
  Layout L;
  const auto sizes = u.dst.sizes();
  const auto ds = u.dst.strides();
  const auto ss = u.src.strides();
  std::vector<int64_t> dims;
  for (int64_t k = 0; k < (int64_t)sizes.size(); ++k) {
    if (sizes[k] != 1) dims.push_back(k);
  }
  if (dims.empty()) {
    L.ndim = 1;
    L.sizes[0] = 1;
    L.dst_strides[0] = 1;
    L.src_strides[0] = 1;
    return L;
  }
  // Outermost first: by dst stride, then src stride, descending (stable: ties keep their order).
  std::stable_sort(dims.begin(), dims.end(), [&](int64_t a, int64_t b) {
    if (ds[a] != ds[b]) return ds[a] > ds[b];
    return ss[a] > ss[b];
  });
  int64_t cs = sizes[dims[0]], cd = ds[dims[0]], cr = ss[dims[0]];
  std::vector<std::array<int64_t, 3>> out;
  for (size_t i = 1; i < dims.size(); ++i) {
    const int64_t k = dims[i];
    if (cd == ds[k] * sizes[k] && cr == ss[k] * sizes[k]) {
      cs *= sizes[k];
      cd = ds[k];
      cr = ss[k];
    } else {
      out.push_back({cs, cd, cr});
      cs = sizes[k];
      cd = ds[k];
      cr = ss[k];
    }
  }
  out.push_back({cs, cd, cr});
  if ((int)out.size() > kMaxDims) {
    L.overflow = true;
    return L;
  }
  L.ndim = (int)out.size();
  for (int i = 0; i < L.ndim; ++i) {
    L.sizes[i] = out[i][0];
    L.dst_strides[i] = out[i][1];
    L.src_strides[i] = out[i][2];
  }
  return L;
}

// ------------------------------------------------------------------------------------------------
// CPU kernels
// ------------------------------------------------------------------------------------------------
namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel_for task

// d[i] += alpha * s[i] over a contiguous run; arithmetic in float (double for double).
template <typename T, typename U>
void contig_run(T* d, const U* s, int64_t n, double alpha_d) {
  if constexpr (std::is_same_v<T, U> && (std::is_same_v<T, float> || std::is_same_v<T, double>)) {
    using V = at::vec::Vectorized<T>;
    const V va(static_cast<T>(alpha_d));
    int64_t i = 0;
    for (; i + 2 * V::size() <= n; i += 2 * V::size()) {
      V a0 = V::loadu(d + i), a1 = V::loadu(d + i + V::size());
      V b0 = V::loadu(s + i), b1 = V::loadu(s + i + V::size());
      (a0 + b0 * va).store(d + i);
      (a1 + b1 * va).store(d + i + V::size());
    }
    for (; i < n; i += V::size()) {
      const int64_t m = std::min<int64_t>(V::size(), n - i);
      (V::loadu(d + i, m) + V::loadu(s + i, m) * va).store(d + i, m);
    }
  } else {
    // Reduced precision (or mixed): widen a chunk to float, update vectorized, narrow back
    // (round to nearest even, as ATen's own ops do).
    using V = at::vec::Vectorized<float>;
    constexpr int64_t kChunk = 256;
    alignas(64) float bd[kChunk];
    alignas(64) float bs[kChunk];
    const V va(static_cast<float>(alpha_d));
    for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
      const int64_t m = std::min(kChunk, n - i0);
      at::vec::convert(d + i0, bd, m);
      at::vec::convert(s + i0, bs, m);
      int64_t i = 0;
      for (; i + V::size() <= m; i += V::size()) {
        (V::loadu(bd + i) + V::loadu(bs + i) * va).store(bd + i);
      }
      for (; i < m; ++i) bd[i] = bd[i] + bs[i] * static_cast<float>(alpha_d);
      at::vec::convert(bd, d + i0, m);
    }
  }
}

template <typename T, typename U>
void strided_run(T* d, int64_t dst, const U* s, int64_t sst, int64_t n, double alpha_d) {
  using acc_t = typename Acc<T>::type;
  const acc_t alpha = static_cast<acc_t>(alpha_d);
  for (int64_t i = 0; i < n; ++i) {
    T& x = d[i * dst];
    x = static_cast<T>(static_cast<acc_t>(x) + static_cast<acc_t>(s[i * sst]) * alpha);
  }
}

template <typename T, typename U>
void cpu_apply_one(const Update& u, const Layout& L) {
  T* d = reinterpret_cast<T*>(u.dst.data_ptr());
  const U* s = reinterpret_cast<const U*>(u.src.data_ptr());
  const int last = L.ndim - 1;
  const int64_t inner = L.sizes[last];
  const int64_t dsi = L.dst_strides[last], ssi = L.src_strides[last];
  const bool contig = dsi == 1 && ssi == 1;
  auto run = [&](T* dp, const U* sp, int64_t n) {
    if (contig) {
      contig_run<T, U>(dp, sp, n, u.alpha);
    } else {
      strided_run<T, U>(dp, dsi, sp, ssi, n, u.alpha);
    }
  };
  if (L.ndim == 1) {
    at::parallel_for(0, inner, kGrain, [&](int64_t b, int64_t e) { run(d + b * dsi, s + b * ssi, e - b); });
    return;
  }
  int64_t rows = 1;
  for (int k = 0; k < last; ++k) rows *= L.sizes[k];
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1));
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      int64_t rem = r, od = 0, os = 0;
      for (int k = last - 1; k >= 0; --k) {
        const int64_t idx = rem % L.sizes[k];
        rem /= L.sizes[k];
        od += idx * L.dst_strides[k];
        os += idx * L.src_strides[k];
      }
      run(d + od, s + os, inner);
    }
  });
}

void cpu_apply(const std::vector<Update>& ups) {
  for (const Update& u : ups) {
    if (u.dst.numel() == 0) continue;
    const Layout L = coalesce(u);
    if (L.overflow || !kernel_supports(u.dst.scalar_type(), u.src.scalar_type())) {
      // > kMaxDims unmergeable dims, or a dtype pair without a kernel: let ATen do it
      u.dst.add_(u.src, u.alpha);
      continue;
    }
    dispatch_dtypes(u.dst.scalar_type(), u.src.scalar_type(), [&](auto* tp, auto* up) {
      using T = std::remove_pointer_t<decltype(tp)>;
      using U = std::remove_pointer_t<decltype(up)>;
      cpu_apply_one<T, U>(u, L);
    });
  }
}

// ------------------------------------------------------------------------------------------------
// Meta (fake) kernels: validate only; the ops return nothing and change no metadata.
// ------------------------------------------------------------------------------------------------
void coupling_add_meta(const at::Tensor& x, const at::Tensor& fx) {
  std::vector<at::Tensor> d{x}, s{fx};
  validate("coupling_add_", d, s);
}

void reconstruct_meta(const at::Tensor& y, const at::Tensor& fy, const at::Tensor& dy, const at::Tensor& grad) {
  std::vector<at::Tensor> d1{y}, s1{fy}, d2{dy}, s2{grad};
  validate("reconstruct_", d1, s1);
  validate("reconstruct_", d2, s2);
  REVKERN_CHECK(y.device() == dy.device(), "reconstruct_: all tensors must be on one device");
}

void reconstruct_multi_meta(at::TensorList ys, at::TensorList fys, at::TensorList dys, at::TensorList grads) {
  REVKERN_CHECK(ys.size() == fys.size() && ys.size() == dys.size() && ys.size() == grads.size(),
                "reconstruct_multi_: the four lists must have the same length");
  validate("reconstruct_multi_", ys, fys);
  validate("reconstruct_multi_", dys, grads);
}

// Autograd and ADInplaceOrView kernels (unboxed: these sit on every call's path).
//  * Autograd: the ops are not differentiable (they are meant for no-grad regions: the reversible
//    backward and forward); refuse grad-requiring inputs in grad mode rather than silently cutting
//    the graph, and pass everything else on.
//  * ADInplaceOrView: bump the version counters of the mutated arguments, as ATen's in-place ops
//    do, so autograd notices if a tensor it saved was changed.
using Op4 = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
using Op2 = void(const at::Tensor&, const at::Tensor&);
using OpL = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList);

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

void no_grad_check(const char* op, std::initializer_list<const at::Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return;
  for (const at::Tensor* t : ts) {
    REVKERN_CHECK(!(t->defined() && t->requires_grad()),
                  std::string(op) + " is not differentiable: call it under torch.no_grad() (an argument requires grad)");
  }
}

void no_grad_check_list(const char* op, at::TensorList ts) {
  if (!at::GradMode::is_enabled()) return;
  for (const at::Tensor& t : ts) {
    REVKERN_CHECK(!(t.defined() && t.requires_grad()),
                  std::string(op) + " is not differentiable: call it under torch.no_grad() (an argument requires grad)");
  }
}

void bump(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

void coupling_add_autograd(c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& fx) {
  no_grad_check("revkern::coupling_add_", {&x, &fx});
  static const auto op = handle<Op2>("revkern::coupling_add_");
  at::AutoDispatchBelowAutograd guard;
  op.redispatch(ks & c10::after_autograd_keyset, x, fx);
}

void reconstruct_autograd(c10::DispatchKeySet ks, const at::Tensor& y, const at::Tensor& fy, const at::Tensor& dy,
                          const at::Tensor& grad) {
  no_grad_check("revkern::reconstruct_", {&y, &fy, &dy, &grad});
  static const auto op = handle<Op4>("revkern::reconstruct_");
  at::AutoDispatchBelowAutograd guard;
  op.redispatch(ks & c10::after_autograd_keyset, y, fy, dy, grad);
}

void reconstruct_multi_autograd(c10::DispatchKeySet ks, at::TensorList ys, at::TensorList fys, at::TensorList dys,
                                at::TensorList grads) {
  for (at::TensorList l : {ys, fys, dys, grads}) no_grad_check_list("revkern::reconstruct_multi_", l);
  static const auto op = handle<OpL>("revkern::reconstruct_multi_");
  at::AutoDispatchBelowAutograd guard;
  op.redispatch(ks & c10::after_autograd_keyset, ys, fys, dys, grads);
}

void coupling_add_inplace(c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& fx) {
  static const auto op = handle<Op2>("revkern::coupling_add_");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, x, fx);
  }
  bump(x);
}

void reconstruct_inplace(c10::DispatchKeySet ks, const at::Tensor& y, const at::Tensor& fy, const at::Tensor& dy,
                         const at::Tensor& grad) {
  static const auto op = handle<Op4>("revkern::reconstruct_");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, y, fy, dy, grad);
  }
  bump(y);
  bump(dy);
}

void reconstruct_multi_inplace(c10::DispatchKeySet ks, at::TensorList ys, at::TensorList fys, at::TensorList dys,
                               at::TensorList grads) {
  static const auto op = handle<OpL>("revkern::reconstruct_multi_");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, ys, fys, dys, grads);
  }
  for (const at::Tensor& t : ys) bump(t);
  for (const at::Tensor& t : dys) bump(t);
}

}  // namespace
}  // namespace revkern

TORCH_LIBRARY(revkern, m) {
  m.def("coupling_add_(Tensor(a!) x, Tensor fx) -> ()");
  m.def("reconstruct_(Tensor(a!) y, Tensor fy, Tensor(b!) dy, Tensor grad) -> ()");
  m.def("reconstruct_multi_(Tensor(a!)[] ys, Tensor[] fys, Tensor(b!)[] dys, Tensor[] grads) -> ()");
}

TORCH_LIBRARY_IMPL(revkern, CPU, m) {
  m.impl("coupling_add_", &revkern::coupling_add_impl<&revkern::cpu_apply>);
  m.impl("reconstruct_", &revkern::reconstruct_impl<&revkern::cpu_apply>);
  m.impl("reconstruct_multi_", &revkern::reconstruct_multi_impl<&revkern::cpu_apply>);
}

TORCH_LIBRARY_IMPL(revkern, Meta, m) {
  m.impl("coupling_add_", &revkern::coupling_add_meta);
  m.impl("reconstruct_", &revkern::reconstruct_meta);
  m.impl("reconstruct_multi_", &revkern::reconstruct_multi_meta);
}

TORCH_LIBRARY_IMPL(revkern, ADInplaceOrView, m) {
  m.impl("coupling_add_", &revkern::coupling_add_inplace);
  m.impl("reconstruct_", &revkern::reconstruct_inplace);
  m.impl("reconstruct_multi_", &revkern::reconstruct_multi_inplace);
}

TORCH_LIBRARY_IMPL(revkern, Autograd, m) {
  m.impl("coupling_add_", &revkern::coupling_add_autograd);
  m.impl("reconstruct_", &revkern::reconstruct_autograd);
  m.impl("reconstruct_multi_", &revkern::reconstruct_multi_autograd);
}

#ifdef REVKERN_PYTHON_MODULE
// Lets `import reversible._C` load the library (which registers the ops); the module is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "revkern ops (see torch.ops.revkern)", -1,
                                   nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
#endif
