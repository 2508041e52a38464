// SPDX-License-Identifier: MIT
// The cuda:: entry points of a build without CUDA: each throws a clear error.
#include <pysbn/core.hpp>
#include <pysbn/error.hpp>

namespace pysbn::cuda {

namespace {
[[noreturn]] void no_cuda(const char* op)
{
  PYSBN_FAIL(std::string("cuda::") + op +
             ": pysbn was built without CUDA; rebuild with a CUDA compiler (PYSBN_WITH_CUDA=ON)");
}
}  // namespace

void sum_ft(const void*, DType, Geometry, double*, void*) { no_cuda("sum_ft"); }
void moments(const void*, DType, Geometry, double*, void*) { no_cuda("moments"); }
void merge_moments(int64_t, int64_t, const double*, double*, void*) { no_cuda("merge_moments"); }
void finalize(int64_t, const double*, double, EpsMode, double*, double*, void*, void*, DType, double, void*)
{
  no_cuda("finalize");
}
void normalize(const void*, DType, Geometry, const double*, const double*, const void*, const void*, DType,
               void*, void*)
{
  no_cuda("normalize");
}
void backward_reduce(const void*, const void*, DType, Geometry, const double*, const double*, double*, void*,
                     void*, DType, void*)
{
  no_cuda("backward_reduce");
}
void backward_elemt(const void*, const void*, DType, Geometry, const double*, const double*, const void*, DType,
                    const double*, const double*, void*, void*)
{
  no_cuda("backward_elemt");
}

void fused_forward(const void*, DType, Geometry, const void*, const void*, DType, double, EpsMode, double*, double*,
                   double*, void*, void*, DType, double, int64_t*, void*, void*)
{
  no_cuda("fused_forward");
}
void fused_backward(const void*, const void*, DType, Geometry, const double*, const double*, const void*, DType,
                    const double*, double*, void*, void*, void*, void*)
{
  no_cuda("fused_backward");
}

}  // namespace pysbn::cuda
