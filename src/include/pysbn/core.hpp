// SPDX-License-Identifier: MIT
/**
 * @file core.hpp
 * @brief The whole op set of the pysbn native core: per-channel batch-norm statistics and
 *        elementwise kernels on small typed views. Knows nothing of Python or torch.
 *
 * Conventions shared by every op
 * ------------------------------
 * - An input is a `TensorView`: a dense tensor viewed as (N, C, L): N samples, C channels,
 *   L = product of the spatial dims (L = 1 for (N, C) input). `Geometry::layout` says where
 *   element (n, c, l) lives:
 *     - Layout::ChannelMajor  (contiguous NC, NCL, NCHW, NCDHW):  offset (n*C + c)*L + l
 *     - Layout::ChannelsLast  (torch channels_last / channels_last_3d): offset (n*L + l)*C + c
 *   Every tensor of one call (x, y, dy, dx) shares x's geometry, layout and dtype; outputs are
 *   plain pointers to dense memory of that shape.
 * - `DType` names the element type. Inside the kernels values accumulate in
 *   `acc_dtype(dtype)`: double for Float64, float for Float32, Float16 and BFloat16.
 * - Per-channel statistics are float64 for every input dtype. They are O(C), so this costs
 *   nothing, and it keeps the merge across replicas exact: a float32 mean at offset 1e4 has an
 *   ulp of 1e-3, which Chan's merge would turn into a variance error above 1e-5. Elementwise
 *   kernels split a float64 mean into a high and a low part in the accumulation type,
 *   (x - hi) - lo, so outputs at large offsets are as accurate as the input allows.
 * - Three float64 buffers carry the statistics (sizes below: `record_size`, `stats_size`,
 *   `sums_size`):
 *     - a *moments record* [count, mean[C], m2[C]] (count = values per channel, m2 = sum of
 *       squared deviations from the mean): the per-member payload of the forward sync;
 *       `merge_moments` reduces k records to one;
 *     - the *batch statistics* of a layer call, [count, mean[C], m2[C], invstd[C]]: a record
 *       followed by the inverse std that `finalize` derives from it. The backward ops read the
 *       count, the mean and the invstd (and m2 in eps mode Clamp) from it;
 *     - a *grad-sums record* [sum_dy[C], sum_dy_xmu[C]]: the payload of the backward sync
 *       (summed elementwise across members).
 * - Parameters (`Affine`: weight, bias; their gradients `AffineGrad`) have their own dtype:
 *   the input dtype, or Float32 for Float16/BFloat16 input (mixed precision). Running
 *   statistics (`RunningStats`) may have any supported dtype.
 * - An optional activation (`Act`) follows the affine map: y = act(z), z = (x - mean) * invstd
 *   * weight + bias. The backward ops recompute z from x and the statistics and apply act'(z)
 *   to dy first, so z is never stored.
 * - Statistics are never raw sum and sum of squares in input precision: each block of values
 *   is reduced from deviations to a shift near its mean (the corrected two-pass scheme, or one
 *   pass shifted and verified, redone in two passes when the shift is far), and blocks and
 *   threads are merged with Chan's formula in double.
 * - `Exec` says where an op runs. Device::CPU: host memory, OpenMP with `num_threads` threads
 *   (>= 1); results do not depend on the thread count beyond rounding. Device::CUDA: device
 *   memory of the current device, enqueued asynchronously on `stream` (a cudaStream_t as void*,
 *   nullptr = legacy default stream); no CUDA op allocates device memory or synchronises the
 *   host, so every count is read on the device.
 * - Every argument is checked before anything is written. Bad arguments throw
 *   std::invalid_argument whose message names the op and the argument; CUDA failures, and
 *   Device::CUDA in a build without CUDA, throw std::runtime_error.
 */
#pragma once

#include <cstdint>

namespace pysbn {

/// Element types of x, y, dy, dx (and of parameters and running statistics).
enum class DType : int32_t { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

/// Where element (n, c, l) lives; see the file comment.
enum class Layout : int32_t { ChannelMajor = 0, ChannelsLast = 1 };

/// How the inverse std is formed from the biased variance.
enum class EpsMode : int32_t {
  Plus = 0,   ///< invstd = 1 / sqrt(var + eps), as nn.BatchNorm
  Clamp = 1,  ///< invstd = 1 / sqrt(max(var, eps)), as the seed (vacancy's SyncBN)
};

/// The device an op runs on.
enum class Device : int32_t { CPU = 0, CUDA = 1 };

/// The activation applied after the affine map (torch's definitions).
enum class Activation : int32_t {
  Identity = 0,   ///< act(z) = z
  ReLU = 1,       ///< max(z, 0)
  LeakyReLU = 2,  ///< z > 0 ? z : negative_slope * z
  SiLU = 3,       ///< z * sigmoid(z)
  GELU = 4,       ///< z * Phi(z) (erf form, nn.GELU())
  GELUTanh = 5,   ///< nn.GELU(approximate="tanh")
  Hardswish = 6,  ///< z * relu6(z + 3) / 6
};

/// The canonical (N, C, L) shape of a dense tensor and its layout.
struct Geometry {
  int64_t n = 0;
  int64_t c = 0;
  int64_t l = 1;
  Layout layout = Layout::ChannelMajor;
};

/// A dense input tensor: where its values are, their type, and the (N, C, L) view.
struct TensorView {
  const void* data = nullptr;
  DType dtype = DType::Float32;
  Geometry geometry;
};

/// Where and how an op runs (see the file comment).
struct Exec {
  Device device = Device::CPU;
  int num_threads = 1;     ///< CPU: OpenMP threads (>= 1)
  void* stream = nullptr;  ///< CUDA: the cudaStream_t to enqueue on
};

/// Affine parameters, C values each; null means weight 1, bias 0.
struct Affine {
  const void* weight = nullptr;
  const void* bias = nullptr;
  DType dtype = DType::Float32;  ///< the param dtype (see the file comment)
};

/// Gradients of the affine parameters, C values each; null means not wanted.
struct AffineGrad {
  void* weight = nullptr;
  void* bias = nullptr;
  DType dtype = DType::Float32;
};

/// The activation after the affine map.
struct Act {
  Activation kind = Activation::Identity;
  double negative_slope = 0.01;  ///< LeakyReLU only
};

/// Running statistics updated in place (mean and var both or neither), C values each:
///   running_mean = (1 - f) * running_mean + f * mean
///   running_var  = (1 - f) * running_var  + f * m2 / (count - 1)   (unbiased)
/// with f = momentum, or, when `cumulative`, 1 / num_batches_tracked after its increment
/// (nn.BatchNorm's momentum=None). `num_batches_tracked` (one int64, may be null unless
/// cumulative) is incremented by one; all of this happens only when count > 0, except the
/// increment, which happens whenever a counter is given (as nn.BatchNorm).
struct RunningStats {
  void* mean = nullptr;
  void* var = nullptr;
  DType dtype = DType::Float32;
  double momentum = 0.1;
  bool cumulative = false;
  int64_t* num_batches_tracked = nullptr;
};

/// Size, in doubles, of a moments record: [count, mean[C], m2[C]].
constexpr int64_t record_size(int64_t c) { return 2 * c + 1; }
/// Size, in doubles, of the batch statistics: [count, mean[C], m2[C], invstd[C]].
constexpr int64_t stats_size(int64_t c) { return 3 * c + 1; }
/// Size, in doubles, of a grad-sums record: [sum_dy[C], sum_dy_xmu[C]].
constexpr int64_t sums_size(int64_t c) { return 2 * c; }

/// Accumulation type of an element type: Float64 for Float64, Float32 otherwise.
constexpr DType acc_dtype(DType d) { return d == DType::Float64 ? DType::Float64 : DType::Float32; }

/// Size in bytes of one element of `d`.
constexpr int64_t dtype_size(DType d) { return d == DType::Float64 ? 8 : (d == DType::Float32 ? 4 : 2); }

/// Version string of the core ("major.minor.patch").
const char* version();
/// True when the core was compiled with CUDA kernels.
bool built_with_cuda();
/// True when the CPU kernels were compiled with OpenMP.
bool built_with_openmp();
/// Semicolon-separated CUDA architectures compiled in ("" without CUDA).
const char* cuda_architectures();

// ---- the ops -----------------------------------------------------------------------------------

/// sum_ft: out[c] = sum over (n, l) of x, C doubles (blockwise sums in the accumulation type,
/// merged in double); the seed's helper.
void sum_ft(const TensorView& x, double* out, const Exec& exec);

/// moments: the moments record of x, [count = N*L, mean[C], m2[C]]. count = 0 gives zeros.
void moments(const TensorView& x, double* record, const Exec& exec);

/// merge_moments: Chan's parallel merge of k >= 1 records (k * record_size(c) doubles, back to
/// back) into `record` (which must not alias them). Exact for unequal counts; a record with a
/// count <= 0 contributes nothing (a negative count is an error on the CPU, where it is seen).
void merge_moments(int64_t k, int64_t c, const double* records, double* record, const Exec& exec);

/// finalize: the batch statistics `stats` (stats_size(c)) of a moments record `record` (which
/// may be the first record_size(c) values of `stats` itself): the record, then
/// invstd = 1 / sqrt(var + eps) (Plus) or 1 / sqrt(max(var, eps)) (Clamp), var = m2 / count
/// (0 when count == 0); then the running-stat update. count == 1 makes the unbiased variance
/// m2 / 0: callers reject that batch first, as nn.BatchNorm does.
void finalize(int64_t c, const double* record, double eps, EpsMode mode, double* stats, const RunningStats& running,
              const Exec& exec);

/// normalize: y = act((x - mean[c]) * invstd[c] * weight[c] + bias[c]) with mean and invstd
/// from the batch statistics `stats`.
void normalize(const TensorView& x, const double* stats, const Affine& affine, const Act& act, void* y,
               const Exec& exec);

/// batch_norm_forward: the training forward of a layer in one call: `stats` from the global
/// moments record `record` (finalize), or, when `record` is null, from x's own moments (a member
/// with nothing to synchronise); then y (normalize); then the running-stat update, last.
void batch_norm_forward(const TensorView& x, const double* record, double eps, EpsMode mode, const Affine& affine,
                        const Act& act, double* stats, void* y, const RunningStats& running, const Exec& exec);

/// backward_reduce: the local grad-sums record `sums` of g = act'(z) * dy (g = dy without an
/// activation): sum_dy = sum g, sum_dy_xmu = sum g * (x - mean); and, when not null,
/// grad.weight[c] = sum_dy_xmu * invstd[c], grad.bias[c] = sum_dy. Synchronise `sums` (sum
/// across members) before backward_elemt.
void backward_reduce(const TensorView& x, const void* dy, const double* stats, const Affine& affine, const Act& act,
                     double* sums, const AffineGrad& grad, const Exec& exec);

/// backward_elemt: dx = (g - sum_dy/count - (x - mean) * invstd^2 * sum_dy_xmu/count) * invstd
/// * weight, g = act'(z) * dy, with the global grad-sums record `sums` and the global count of
/// `stats`. Eps mode Clamp drops the variance term of channels whose variance is below eps
/// (their invstd does not depend on it). A global count of 0 means there are no values anywhere:
/// nothing to write when x has none; otherwise (an inconsistent call) dx = 0 where x and dy are
/// finite (NaN where they are not: the coefficients are zeroed, not the result).
void backward_elemt(const TensorView& x, const void* dy, const double* stats, double eps, EpsMode mode,
                    const Affine& affine, const Act& act, const double* sums, void* dx, const Exec& exec);

/// batch_norm_backward: backward_reduce into `sums` (and `grad`), then, when dx is not null,
/// backward_elemt with those local sums: the backward of a member with nothing to synchronise.
/// `sums` (2C doubles of scratch) may be null on the CPU.
void batch_norm_backward(const TensorView& x, const void* dy, const double* stats, double eps, EpsMode mode,
                         const Affine& affine, const Act& act, double* sums, const AffineGrad& grad, void* dx,
                         const Exec& exec);

}  // namespace pysbn
