// SPDX-License-Identifier: MIT
/**
 * @file core.hpp
 * @brief The whole op set of the pysbn native core: per-channel batch-norm statistics and
 *        elementwise kernels on raw pointers. Knows nothing of Python or torch.
 *
 * Conventions shared by every op
 * ------------------------------
 * - The input is viewed as (N, C, L): N samples, C channels, L = product of the spatial dims
 *   (L = 1 for (N, C) input). `Geometry::layout` says where element (n, c, l) lives:
 *     - Layout::ChannelMajor  (contiguous NC, NCL, NCHW, NCDHW):  offset (n*C + c)*L + l
 *     - Layout::ChannelsLast  (torch channels_last / channels_last_3d): offset (n*L + l)*C + c
 *   All tensors of one call (x, y, dy, dx) share that geometry and layout and are dense.
 * - `DType` names the element type of x, y, dy, dx. Inside the kernels, values accumulate in
 *   `acc_dtype(dtype)`: double for Float64, float for Float32, Float16 and BFloat16.
 * - Per-channel statistics are float64 for every input dtype: the moments record, mean, invstd,
 *   the grad-sums record, counts and sum_ft's output. They are O(C), so this costs nothing, and
 *   it keeps the merge across replicas exact: a float32 mean at offset 1e4 has an ulp of 1e-3,
 *   which Chan's merge would turn into a variance error above 1e-5. Elementwise kernels split a
 *   float64 mean into a high and a low part in the accumulation type, (x - hi) - lo, so outputs
 *   at large offsets are as accurate as the input allows.
 *   Parameters (weight, bias, running_mean, running_var, grad_weight, grad_bias) have their own
 *   `param_dtype`: equal to `dtype`, or Float32 when dtype is Float16/BFloat16 (mixed precision).
 * - A *moments record* is 2C+1 doubles: [count, mean[0..C), m2[0..C)], where count is the
 *   number of values per channel and m2 the sum of squared deviations from the mean. It is the
 *   per-replica payload of the forward sync; `merge_moments` reduces k records to one.
 * - A *grad-sums record* is 2C doubles: [sum_dy[0..C), sum_dy_xmu[0..C)], the payload of the
 *   backward sync (summed elementwise across replicas).
 * - Statistics are never raw sum and sum of squares in input precision: each block of values
 *   is reduced from deviations to a shift near its mean (the corrected two-pass scheme, or one
 *   pass shifted by the running mean and verified, redone in two passes when the shift is far),
 *   and blocks and threads are merged with Chan's formula in double.
 * - CPU ops run on host memory with OpenMP, `num_threads` threads (>= 1); results do not
 *   depend on the thread count beyond rounding. CUDA ops run on device memory, asynchronously
 *   on the `stream` passed (a cudaStream_t as void*, nullptr = legacy default stream), never
 *   allocate device memory and never synchronise the host.
 * - Bad arguments throw std::invalid_argument whose message names the argument; CUDA failures
 *   and CUDA ops in a build without CUDA throw std::runtime_error.
 */
#pragma once

#include <cstdint>

namespace pysbn {

/// Element types of x, y, dy, dx (and of parameters).
enum class DType : int32_t { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

/// Where element (n, c, l) lives; see the file comment.
enum class Layout : int32_t { ChannelMajor = 0, ChannelsLast = 1 };

/// How the inverse std is formed from the biased variance.
enum class EpsMode : int32_t {
  Plus = 0,   ///< invstd = 1 / sqrt(var + eps), as nn.BatchNorm
  Clamp = 1,  ///< invstd = 1 / sqrt(max(var, eps)), as the seed (vacancy's SyncBN)
};

/// The canonical (N, C, L) view of a dense tensor.
struct Geometry {
  int64_t n = 0;
  int64_t c = 0;
  int64_t l = 1;
  Layout layout = Layout::ChannelMajor;
};

/// Accumulation type of an element type: Float64 for Float64, Float32 otherwise.
constexpr DType acc_dtype(DType d) { return d == DType::Float64 ? DType::Float64 : DType::Float32; }

/// Size in bytes of one element of `d`.
constexpr int64_t dtype_size(DType d)
{
  return d == DType::Float64 ? 8 : (d == DType::Float32 ? 4 : 2);
}

/// Version string of the core ("major.minor.patch").
const char* version();
/// True when the core was compiled with CUDA kernels.
bool built_with_cuda();
/// True when the CPU kernels were compiled with OpenMP.
bool built_with_openmp();
/// Semicolon-separated CUDA architectures compiled in ("" without CUDA).
const char* cuda_architectures();

namespace cpu {

/// sum_ft: out[c] = sum over (n, l) of x (float64; blockwise sums in the accumulation type,
/// merged in double); the seed's helper.
void sum_ft(const void* x, DType dtype, Geometry g, double* out, int num_threads);

/// moments: writes the moments record [count = N*L, mean[C], m2[C]] of x to `stats`.
/// Stable per cache block (see above), Chan merge in double. count = 0 gives mean = m2 = 0.
void moments(const void* x, DType dtype, Geometry g, double* stats, int num_threads);

/// merge_moments: Chan's parallel merge of k moments records (k*(2C+1) doubles, back to back)
/// into one record `out` (which must not alias the inputs). Exact for unequal and zero counts:
/// records with count 0 contribute nothing. Throws on a negative count.
void merge_moments(int64_t k, int64_t c, const double* records, double* out);

/// finalize: from one moments record, writes mean[C] and invstd[C] with `mode`, and, when
/// running_mean / running_var are not null (both or neither), updates them in place (param dtype):
///   running_mean = (1 - factor) * running_mean + factor * mean
///   running_var  = (1 - factor) * running_var  + factor * m2 / (count - 1)   (unbiased)
/// `factor` is momentum, or 1 / num_batches_tracked for the cumulative average. When
/// count == 0 the running stats are left untouched, mean = 0 and var = 0. count == 1 makes the
/// unbiased variance m2 / 0 (NaN): callers reject that batch first, as nn.BatchNorm does.
void finalize(int64_t c, const double* stats, double eps, EpsMode mode, double* mean, double* invstd,
              void* running_mean, void* running_var, DType param_dtype, double factor);

/// normalize: y = (x - mean[c]) * invstd[c] * weight[c] + bias[c]; weight and bias may each be
/// null (meaning 1 and 0). weight/bias are param dtype.
void normalize(const void* x, DType dtype, Geometry g, const double* mean, const double* invstd,
               const void* weight, const void* bias, DType param_dtype, void* y, int num_threads);

/// backward_reduce: writes the grad-sums record [sum_dy[C], sum_dy_xmu[C]] to `sums`,
/// sum_dy_xmu = sum of dy * (x - mean[c]); when not null, grad_weight[c] = sum_dy_xmu * invstd[c]
/// and grad_bias[c] = sum_dy (param dtype). These are local sums; sync them before the elemt.
void backward_reduce(const void* dy, const void* x, DType dtype, Geometry g, const double* mean,
                     const double* invstd, double* sums, void* grad_weight, void* grad_bias,
                     DType param_dtype, int num_threads);

/// backward_elemt: dx = (dy - sum_dy/count - (x - mean) * invstd^2 * sum_dy_xmu/count) * invstd * w
/// with the global grad-sums record `sums` and the global count `count` (one double, e.g. the
/// count slot of the merged moments record); weight may be null (w = 1). A global count of 0
/// means there are no elements anywhere, so there is nothing to write.
void backward_elemt(const void* dy, const void* x, DType dtype, Geometry g, const double* mean,
                    const double* invstd, const void* weight, DType param_dtype, const double* sums,
                    const double* count, void* dx, int num_threads);

/// fused_forward: the training forward of a member with nothing to synchronise, in one call:
/// moments (into `stats`, 2C+1 doubles), mean[C] and invstd[C] (as finalize), y (as normalize),
/// then, when not null, the running-stat update (as finalize, dtype `running_dtype`) and
/// ++*num_batches_tracked. Every argument is checked before anything is written, and the
/// running statistics and the counter are written last, so a throw leaves them as they were.
/// stats, mean and invstd must not overlap each other or x/y.
void fused_forward(const void* x, DType dtype, Geometry g, const void* weight, const void* bias, DType param_dtype,
                   double eps, EpsMode mode, double* stats, double* mean, double* invstd, void* running_mean,
                   void* running_var, DType running_dtype, double factor, int64_t* num_batches_tracked, void* y,
                   int num_threads);

/// fused_backward: backward_reduce into `sums` (2C doubles; grad_weight / grad_bias when not
/// null) then, when dx is not null, backward_elemt with those local sums and `count` (one
/// double): the backward of fused_forward, with nothing to synchronise.
void fused_backward(const void* dy, const void* x, DType dtype, Geometry g, const double* mean,
                    const double* invstd, const void* weight, DType param_dtype, const double* count, double* sums,
                    void* grad_weight, void* grad_bias, void* dx, int num_threads);

}  // namespace cpu

namespace cuda {

// Same contracts as the cpu:: ops, on device pointers (on the current device), enqueued on
// `stream` (cudaStream_t). In a build without CUDA each throws std::runtime_error.
// Differences that come from never reading device data on the host: merge_moments treats a
// record with a count <= 0 as empty instead of throwing, and backward_elemt with a global
// count of 0 writes dx = 0.

void sum_ft(const void* x, DType dtype, Geometry g, double* out, void* stream);
void moments(const void* x, DType dtype, Geometry g, double* stats, void* stream);
void merge_moments(int64_t k, int64_t c, const double* records, double* out, void* stream);
void finalize(int64_t c, const double* stats, double eps, EpsMode mode, double* mean, double* invstd,
              void* running_mean, void* running_var, DType param_dtype, double factor, void* stream);
void normalize(const void* x, DType dtype, Geometry g, const double* mean, const double* invstd,
               const void* weight, const void* bias, DType param_dtype, void* y, void* stream);
void backward_reduce(const void* dy, const void* x, DType dtype, Geometry g, const double* mean,
                     const double* invstd, double* sums, void* grad_weight, void* grad_bias,
                     DType param_dtype, void* stream);
void backward_elemt(const void* dy, const void* x, DType dtype, Geometry g, const double* mean,
                    const double* invstd, const void* weight, DType param_dtype, const double* sums,
                    const double* count, void* dx, void* stream);

void fused_forward(const void* x, DType dtype, Geometry g, const void* weight, const void* bias, DType param_dtype,
                   double eps, EpsMode mode, double* stats, double* mean, double* invstd, void* running_mean,
                   void* running_var, DType running_dtype, double factor, int64_t* num_batches_tracked, void* y,
                   void* stream);
void fused_backward(const void* dy, const void* x, DType dtype, Geometry g, const double* mean,
                    const double* invstd, const void* weight, DType param_dtype, const double* count, double* sums,
                    void* grad_weight, void* grad_bias, void* dx, void* stream);

}  // namespace cuda

}  // namespace pysbn
