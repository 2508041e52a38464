// SPDX-License-Identifier: MIT
// The primitives each back end implements (pysbn::cpu in src/cpu/kernels.cpp, pysbn::cuda in
// src/cuda/kernels.cu). Not part of the public header: src/ops.cpp checks every argument once,
// for both back ends, then calls these with valid arguments and composes the public ops from
// them. Contracts as in <pysbn/core.hpp>, plus:
//   - finalize writes the record part and invstd of `stats` only; update_running applies the
//     running-stat update of `running` from `stats` (both after normalize, in the composites);
//   - backward_elemt reads the global count from stats[0].
#pragma once

#include <pysbn/core.hpp>

// One declaration list, stated once for both back ends.
#define PYSBN_BACKEND_PRIMITIVES                                                                                     \
  void sum_ft(const TensorView& x, double* out, const Exec& exec);                                                   \
  void moments(const TensorView& x, double* record, const Exec& exec);                                               \
  void merge_moments(int64_t k, int64_t c, const double* records, double* record, const Exec& exec);                 \
  void finalize(int64_t c, const double* record, double eps, EpsMode mode, double* stats, const Exec& exec);         \
  void update_running(int64_t c, const double* stats, const RunningStats& running, const Exec& exec);                \
  void normalize(const TensorView& x, const double* stats, const Affine& affine, const Act& act, void* y,            \
                 const Exec& exec);                                                                                  \
  void backward_reduce(const TensorView& x, const void* dy, const double* stats, const Affine& affine,               \
                       const Act& act, double* sums, const AffineGrad& grad, const Exec& exec);                      \
  void backward_elemt(const TensorView& x, const void* dy, const double* stats, double eps, EpsMode mode,             \
                      const Affine& affine, const Act& act, const double* sums, void* dx, const Exec& exec);

namespace pysbn::cpu {
PYSBN_BACKEND_PRIMITIVES
}  // namespace pysbn::cpu

#ifdef PYSBN_WITH_CUDA
namespace pysbn::cuda {
PYSBN_BACKEND_PRIMITIVES
}  // namespace pysbn::cuda
#endif

#undef PYSBN_BACKEND_PRIMITIVES
