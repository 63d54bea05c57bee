// Accumulation type of the revkern kernels, shared by the CPU (revkern_ops.cpp) and CUDA
// (revkern_kernels.cuh) paths: float for every element type, double for double. No torch here,
// so the CUDA header stays compilable on its own.
#pragma once

namespace revkern {

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

}  // namespace revkern
