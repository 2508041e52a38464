// SPDX-License-Identifier: MIT
// CUDA kernels of the pysbn core (the cuda:: ops of core.hpp).
//
// Every op is one kernel launch on the caller's stream; nothing allocates device memory and
// nothing waits on the host. Two kernel shapes cover all ops:
//   - reductions (sum_ft, moments, backward_reduce): each channel is reduced by ONE block, so
//     no global workspace is needed. Channel-major input: one block per channel walks the N
//     planes of L values. Channels-last input: a block owns a tile of channels (threads along
//     C, coalesced) and walks the N*L rows; rows are merged in the block through shared memory.
//     Limitation: with few channels (C below the SM count, or C*elem below 32 B per SM for
//     channels-last) part of the GPU idles; a workspace parameter or thread-block clusters
//     would lift this later.
//   - elementwise (normalize, backward_elemt): a 2-D grid over a rows x cols view of the input
//     whose per-channel coefficients are formed once per row (channel-major) or once per
//     column (channels-last), with grid-stride loops.
// Both vectorise with 16-byte loads when the innermost extent is a multiple of the vector width
// and all pointers are 16-byte aligned; otherwise a scalar instantiation runs.
// Channel-major input with L == 1 is the channels-last layout, and runs as such.
// Values accumulate in acc_t<T> per thread (moments: shifted by the channel's first value,
// corrected two-pass per batch, Chan into the thread's state); threads are merged in double
// and every per-channel statistic is written as double (core.hpp).
// Activations are fused as in the CPU kernels: normalize applies act(z) to z = ((x - hi) - lo)
// * scale + shift, and backward_reduce / backward_elemt recompute z with the same expression
// (so the same value) and use g = act'(z) * dy in place of dy. Each activation is a functor
// type (template parameter of NormalizeOp, GradOp and BackwardElemtOp); the identity's code is
// the code without activations (its backward forms no z). CUDA math in Acc precision.
#include "backend.hpp"
#include "common.hpp"

#include <pysbn/core.hpp>
#include <pysbn/error.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

namespace pysbn::cuda {

namespace {

// ---- constants ---------------------------------------------------------------------------------

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kReduceThreads = 512;  // threads of a reduction block (a multiple of kWarp)
constexpr int kEltThreads = 256;     // threads of an elementwise block
constexpr int kUnroll = 4;           // vectors loaded per thread before any is used (ILP)
constexpr int kVecBytes = 16;        // widest load
constexpr int kSectorBytes = 32;     // DRAM/L2 sector: below this per row, loads waste bandwidth
constexpr int kMaxGridY = 65535;
constexpr int kSmallThreads = 256;   // threads of the O(C) kernels

// ---- element types ---------------------------------------------------------------------------

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
};
template <> struct Cvt<double> {
  static __device__ __forceinline__ double to(double v) { return v; }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ __half to(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 to(float v) { return __float2bfloat16_rn(v); }
};

/// V consecutive elements moved by one load or store.
template <typename T, int V> struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

/// Parameters (weight, bias, running stats) have a runtime dtype; they are read O(C) times
/// or once per row, so a uniform switch is cheaper than more template instantiations.
template <typename Acc>
__device__ __forceinline__ Acc load_param(const void* p, DType d, int64_t i)
{
  switch (d) {
    case DType::Float64: return static_cast<Acc>(static_cast<const double*>(p)[i]);
    case DType::Float16: return static_cast<Acc>(__half2float(static_cast<const __half*>(p)[i]));
    case DType::BFloat16:
      return static_cast<Acc>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    default: return static_cast<Acc>(static_cast<const float*>(p)[i]);
  }
}

__device__ __forceinline__ void store_param(void* p, DType d, int64_t i, double v)
{
  switch (d) {
    case DType::Float64: static_cast<double*>(p)[i] = v; break;
    case DType::Float16: static_cast<__half*>(p)[i] = __double2half(v); break;
    case DType::BFloat16:
      static_cast<__nv_bfloat16*>(p)[i] = __double2bfloat16(v);
      break;
    default: static_cast<float*>(p)[i] = static_cast<float>(v); break;
  }
}

// ---- merged partials: warp/block reduction ---------------------------------------------------

/// A thread's partial result, widened to double for merging: (mean, m2, count) for moments,
/// (sum0, sum1, unused) for the sums.
struct Triple {
  double a, b, n;
};

__device__ __forceinline__ Triple shfl_down(const Triple& t, int off)
{
  return {__shfl_down_sync(kFullMask, t.a, off), __shfl_down_sync(kFullMask, t.b, off),
          __shfl_down_sync(kFullMask, t.n, off)};
}

/// Chan's parallel merge of (mean, m2, count) y into x; exact for unequal counts, empty sets
/// contribute nothing.
__device__ __forceinline__ void chan_merge(Triple& x, const Triple& y)
{
  if (y.n <= 0) { return; }
  if (x.n <= 0) {
    x = y;
    if (!isfinite(y.a)) { x.b = CUDART_NAN; }  // as below: no spread around a non-finite mean
    return;
  }
  const double n = x.n + y.n;
  const double d = y.a - x.a;
  if (!isfinite(d)) {  // a non-finite mean on either side: the weighted sum gives +-inf or NaN
    x.a = (x.n * x.a + y.n * y.a) / n;  // as a plain sum would; the spread is undefined
    x.b = CUDART_NAN;
    x.n = n;
    return;
  }
  const double r = y.n / n;
  x.a += d * r;
  x.b += y.b + d * d * x.n * r;
  x.n = n;
}

/// Merges the Triples of one channel held by all threads of a 1-D block (blockDim.x a
/// multiple of kWarp); the result is valid in thread 0. Fixed order, hence deterministic.
template <class Op> __device__ Triple block_reduce(Triple t, Triple* smem)
{
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) { Op::combine(t, shfl_down(t, off)); }
  if (lane == 0) { smem[warp] = t; }
  __syncthreads();
  if (warp == 0) {
    t = lane < nwarps ? smem[lane] : Triple{0.0, 0.0, 0.0};
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) { Op::combine(t, shfl_down(t, off)); }
  }
  __syncthreads();  // smem is reused by the next channel
  return t;
}

/// A double per-channel centre (a mean, or a shift) as hi + lo in the accumulation type:
/// (x - hi) - lo keeps the digits of x - mean that a single rounded mean would lose when
/// |mean| >> std (for double, lo is 0).
template <typename Acc> struct Center {
  Acc hi = 0, lo = 0;
};

template <typename Acc> __device__ __forceinline__ Center<Acc> split_center(double m)
{
  const Acc hi = static_cast<Acc>(m);
  return {hi, static_cast<Acc>(m - static_cast<double>(hi))};
}

// ---- activations -----------------------------------------------------------------------------
// fwd(z) = act(z), grad(z, dy) = act'(z) * dy, torch's definitions and backward formulas
// (ReLU's threshold_backward, LeakyReLU's and Hardswish's selects: z = NaN passes dy where torch
// passes it), in forms that do not cancel: sigmoid(v) and sigmoid(v) (1 - sigmoid(v)) from
// e^-|v| <= 1 (no overflow, no 1 - s), Phi(z) = erfc(-z/sqrt 2) / 2.

__device__ __forceinline__ float m_exp(float v) { return expf(v); }
__device__ __forceinline__ double m_exp(double v) { return exp(v); }
__device__ __forceinline__ float m_erfc(float v) { return erfcf(v); }
__device__ __forceinline__ double m_erfc(double v) { return erfc(v); }
__device__ __forceinline__ float m_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double m_fma(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float m_abs(float v) { return fabsf(v); }
__device__ __forceinline__ double m_abs(double v) { return fabs(v); }

/// s = sigmoid(v) and sq = s (1 - s): with e = e^-|v| and r = 1 / (1 + e), s = r (v >= 0) or
/// e r (v < 0), and s (1 - s) = e r^2.
template <typename Acc> __device__ __forceinline__ void sigmoid_pair(Acc v, Acc& s, Acc& sq)
{
  const Acc e = m_exp(-m_abs(v)), r = Acc(1) / (Acc(1) + e);
  s = v < Acc(0) ? e * r : r;
  sq = (e * r) * r;
}

/// Phi(z) and e^(-z^2/2). erfc(-t), t = z / sqrt 2 = th + tl: the rounding error tl of th
/// would cost |z|^2 ulp in the left tail; erfc(-th - tl) = erfc(-th) + tl 2/sqrt(pi) e^(-th^2)
/// to first order. Likewise e^-(z^2/2) from the exact square hh + hl. No corrections at inf.
template <typename Acc> __device__ __forceinline__ void normal_parts(Acc z, Acc& cdf, Acc& e)
{
  // 1/sqrt 2 = k_hi + k_lo: for double the low part of the double; for float, of the float
  constexpr double kInvSqrt2 = 0.70710678118654757, kInvSqrt2Lo = -4.8336466567264567e-17;
  const Acc k_hi = Acc(kInvSqrt2);
  const Acc k_lo = sizeof(Acc) == sizeof(double) ? Acc(kInvSqrt2Lo)
                                                 : Acc((kInvSqrt2 - static_cast<double>(k_hi)) + kInvSqrt2Lo);
  const Acc th = z * k_hi, h = Acc(0.5) * z, hh = h * z;
  const bool finite = isfinite(hh);
  const Acc tl = finite ? m_fma(z, k_hi, -th) + z * k_lo : Acc(0);
  const Acc hl = finite ? m_fma(h, z, -hh) : Acc(0);
  e = m_exp(-hh) * (Acc(1) - hl);
  cdf = Acc(0.5) * m_erfc(-th) + tl * (m_exp(-th * th) * Acc(0.56418958354775628695));
}

template <typename Acc> struct ActIdentity {
  static constexpr bool kIdentity = true;
  __device__ __forceinline__ Acc fwd(Acc z) const { return z; }
  __device__ __forceinline__ Acc grad(Acc, Acc dy) const { return dy; }
};

template <typename Acc> struct ActReLU {
  static constexpr bool kIdentity = false;
  __device__ __forceinline__ Acc fwd(Acc z) const { return z < Acc(0) ? Acc(0) : z; }  // NaN stays
  __device__ __forceinline__ Acc grad(Acc z, Acc dy) const { return z <= Acc(0) ? Acc(0) : dy; }
};

template <typename Acc> struct ActLeakyReLU {
  static constexpr bool kIdentity = false;
  Acc slope;
  __device__ __forceinline__ Acc fwd(Acc z) const { return z > Acc(0) ? z : z * slope; }
  __device__ __forceinline__ Acc grad(Acc z, Acc dy) const { return z > Acc(0) ? dy : dy * slope; }
};

/// z sigmoid(z); act' = s + z s (1 - s).
template <typename Acc> struct ActSiLU {
  static constexpr bool kIdentity = false;
  __device__ __forceinline__ Acc fwd(Acc z) const
  {
    Acc s, sq;
    sigmoid_pair(z, s, sq);
    return z * s;
  }
  __device__ __forceinline__ Acc grad(Acc z, Acc dy) const
  {
    Acc s, sq;
    sigmoid_pair(z, s, sq);
    return dy * (s + z * sq);
  }
};

/// z Phi(z); act' = Phi(z) + z phi(z).
template <typename Acc> struct ActGELU {
  static constexpr bool kIdentity = false;
  __device__ __forceinline__ Acc fwd(Acc z) const
  {
    Acc cdf, e;
    normal_parts(z, cdf, e);
    return z * cdf;
  }
  __device__ __forceinline__ Acc grad(Acc z, Acc dy) const
  {
    Acc cdf, e;
    normal_parts(z, cdf, e);
    return dy * (cdf + z * (e * Acc(0.39894228040143267794)));
  }
};

/// 0.5 z (1 + tanh u) = z sigmoid(2u), u = k (z + 0.044715 z^3), k = sqrt(2/pi); act' (torch's
/// gelu_backward, tanh) = 0.5 (1 + t) + 0.5 z (1 - t^2) k (1 + 3 * 0.044715 z^2) with 1 + t = 2 s,
/// 1 - t^2 = 4 s (1 - s).
template <typename Acc> struct ActGELUTanh {
  static constexpr bool kIdentity = false;
  __device__ __forceinline__ Acc fwd(Acc z) const
  {
    const Acc beta = Acc(0.79788456080286535588), kappa = Acc(0.044715);
    Acc s, sq;
    sigmoid_pair(Acc(2) * (beta * (z + kappa * (z * z * z))), s, sq);
    return z * s;
  }
  __device__ __forceinline__ Acc grad(Acc z, Acc dy) const
  {
    const Acc beta = Acc(0.79788456080286535588), kappa = Acc(0.044715);
    const Acc zz = z * z;
    Acc s, sq;
    sigmoid_pair(Acc(2) * (beta * (z + kappa * (zz * z))), s, sq);
    return dy * (s + Acc(2) * z * sq * (beta * (Acc(1) + Acc(3) * kappa * zz)));
  }
};

/// z * min(max(z + 3, 0), 6) / 6; act' 0 below -3, z/3 + 1/2 on [-3, 3], 1 above.
template <typename Acc> struct ActHardswish {
  static constexpr bool kIdentity = false;
  __device__ __forceinline__ Acc fwd(Acc z) const
  {
    Acc t = z + Acc(3);
    t = t < Acc(0) ? Acc(0) : t;
    t = Acc(6) < t ? Acc(6) : t;
    return z * t / Acc(6);
  }
  __device__ __forceinline__ Acc grad(Acc z, Acc dy) const
  {
    return z < Acc(-3) ? Acc(0) : (z <= Acc(3) ? dy * (z / Acc(3) + Acc(0.5)) : dy);
  }
};

// ---- reduction ops ---------------------------------------------------------------------------
// An op folds a batch of K values of one channel (`valid` of them present) into a per-thread
// State, widens the State to a Triple, merges Triples, and writes a channel's result.
// `center(args, c, first)` gives the op's per-channel centre, of type Op::Ctr (first = the
// channel's first value).

/// Sums pairwise-ish: a batch in Acc, batches into a double per thread, threads in double.
template <typename Acc> struct SumOp {
  static constexpr int kInputs = 1;
  static constexpr bool kNeedsFirst = false;
  using Ctr = Center<Acc>;
  struct Args {
    double* out;
  };
  struct State {
    double s = 0.0;
  };
  static __device__ __forceinline__ Center<Acc> center(const Args&, int64_t, Acc) { return {}; }
  template <int K>
  static __device__ __forceinline__ void add(State& st, const Acc (&x)[K], const Acc (&)[K], int valid,
                                             const Center<Acc>&)
  {
    Acc s = 0;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      if (i < valid) { s += x[i]; }
    }
    st.s += s;
  }
  static __device__ __forceinline__ Triple triple(const State& st) { return {st.s, 0.0, 0.0}; }
  static __device__ __forceinline__ void combine(Triple& x, const Triple& y) { x.a += y.a; }
  static __device__ __forceinline__ void write_once(const Args&) {}
  static __device__ __forceinline__ void write(const Args& a, int64_t c, const Triple& t, const Center<Acc>&)
  {
    a.out[c] = t.a;
  }
};

/// Moments: values are shifted by the channel's first value (x - first is exact for values
/// near each other, so float keeps the digits that matter when |mean| >> std); each batch is
/// reduced with the corrected two-pass scheme and folded into the thread's state with Chan's
/// formula.
template <typename Acc> struct MomentsOp {
  static constexpr int kInputs = 1;
  static constexpr bool kNeedsFirst = true;
  using Ctr = Center<Acc>;
  struct Args {
    double* stats;
    int64_t c;
    double count;
  };
  struct State {
    Acc n = 0, mean = 0, m2 = 0;  // of the shifted values
  };
  static __device__ __forceinline__ Center<Acc> center(const Args&, int64_t, Acc first)
  {
    // A non-finite first value would turn every x - first into NaN: no shift then, and the
    // channel's mean comes out +-inf or NaN as a plain sum's does (nn.BatchNorm's).
    return {isfinite(first) ? first : Acc(0), Acc(0)};
  }
  template <int K>
  static __device__ __forceinline__ void add(State& st, const Acc (&x)[K], const Acc (&)[K], int valid,
                                             const Center<Acc>& shift)
  {
    Acc y[K];
    Acc sum = 0;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      y[i] = x[i] - shift.hi;
      if (i < valid) { sum += y[i]; }
    }
    const Acc kb = static_cast<Acc>(valid);
    const Acc inv = Acc(1) / kb;
    const Acc mb0 = sum * inv;
    if (!isfinite(mb0)) {  // +-inf or NaN in the batch: merged as a weighted sum (see chan_merge)
      const Acc n = st.n + kb;
      st.mean = (st.n * st.mean + kb * mb0) / n;
      st.m2 = static_cast<Acc>(CUDART_NAN);
      st.n = n;
      return;
    }
    Acc s = 0, q = 0;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      if (i < valid) {
        const Acc d = y[i] - mb0;
        s += d;
        q += d * d;
      }
    }
    const Acc mb = mb0 + s * inv;
    const Acc m2b_raw = q - s * s * inv;  // >= 0 up to rounding
    const Acc m2b = m2b_raw > Acc(0) ? m2b_raw : Acc(0);
    const Acc n = st.n + kb;
    const Acc r = kb / n;
    const Acc d = mb - st.mean;
    if (!isfinite(d)) {  // the state's mean is +-inf or NaN (or d overflowed the float range)
      st.mean = (st.n * st.mean + kb * mb) / n;
      st.m2 = static_cast<Acc>(CUDART_NAN);
      st.n = n;
      return;
    }
    st.mean += d * r;
    st.m2 += m2b + d * d * st.n * r;
    st.n = n;
  }
  static __device__ __forceinline__ Triple triple(const State& st) { return {st.mean, st.m2, st.n}; }
  static __device__ __forceinline__ void combine(Triple& x, const Triple& y) { chan_merge(x, y); }
  static __device__ __forceinline__ void write_once(const Args& a) { a.stats[0] = a.count; }
  static __device__ __forceinline__ void write(const Args& a, int64_t c, const Triple& t,
                                               const Center<Acc>& shift)
  {
    a.stats[1 + c] = static_cast<double>(shift.hi) + t.a;
    a.stats[1 + a.c + c] = t.b;
  }
};

/// z's coefficients next to the split mean, z = ((x - hi) - lo) * scale + shift, and the
/// activation (the reduction kernels hand the centre to add()).
template <typename Acc, class F> struct ZCenter {
  Center<Acc> mean;
  Acc scale = 0, shift = 0;
  F act;
};

/// backward_reduce: sums of g and g * (x - mean), g = act'(z) * dy (dy for the identity);
/// input 0 is dy, input 1 is x.
template <typename Acc, class F> struct GradOp {
  static constexpr int kInputs = 2;
  static constexpr bool kNeedsFirst = false;
  using Ctr = ZCenter<Acc, F>;
  struct Args {
    const double* mean;
    const double* invstd;
    double* sums;
    void* grad_weight;
    void* grad_bias;
    DType pd;
    int64_t c;
    const void* weight;  // z's affine parameters (read with an activation only)
    const void* bias;
    DType apd;
    F act;
  };
  struct State {
    double s_dy = 0.0, s_dy_xmu = 0.0;
  };
  static __device__ __forceinline__ Ctr center(const Args& a, int64_t c, Acc)
  {
    Ctr k{split_center<Acc>(a.mean[c]), Acc(0), Acc(0), a.act};
    if constexpr (!F::kIdentity) {  // as NormalizeOp::coef forms them
      const double w = a.weight != nullptr ? load_param<double>(a.weight, a.apd, c) : 1.0;
      k.scale = static_cast<Acc>(a.invstd[c] * w);
      k.shift = static_cast<Acc>(a.bias != nullptr ? load_param<double>(a.bias, a.apd, c) : 0.0);
    }
    return k;
  }
  template <int K>
  static __device__ __forceinline__ void add(State& st, const Acc (&dy)[K], const Acc (&x)[K], int valid,
                                             const Ctr& k)
  {
    Acc s0 = 0, s1 = 0;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      if (i < valid) {
        if constexpr (F::kIdentity) {
          s0 += dy[i];
          s1 += dy[i] * ((x[i] - k.mean.hi) - k.mean.lo);
        } else {
          const Acc xm = (x[i] - k.mean.hi) - k.mean.lo;
          const Acc g = k.act.grad(m_fma(xm, k.scale, k.shift), dy[i]);  // z as NormalizeOp's
          s0 += g;
          s1 += g * xm;
        }
      }
    }
    st.s_dy += s0;
    st.s_dy_xmu += s1;
  }
  static __device__ __forceinline__ Triple triple(const State& st) { return {st.s_dy, st.s_dy_xmu, 0.0}; }
  static __device__ __forceinline__ void combine(Triple& x, const Triple& y)
  {
    x.a += y.a;
    x.b += y.b;
  }
  static __device__ __forceinline__ void write_once(const Args&) {}
  static __device__ __forceinline__ void write(const Args& a, int64_t c, const Triple& t, const Ctr&)
  {
    a.sums[c] = t.a;
    a.sums[a.c + c] = t.b;
    if (a.grad_weight != nullptr) { store_param(a.grad_weight, a.pd, c, t.b * a.invstd[c]); }
    if (a.grad_bias != nullptr) { store_param(a.grad_bias, a.pd, c, t.a); }
  }
};

// ---- elementwise ops -------------------------------------------------------------------------
// Coefficients are formed in double from the double statistics, then rounded to Acc once.

/// y = act(((x - hi) - lo) * (invstd * w) + b); input 0 is x. (x - mean) first: x * scale +
/// (b - mean * scale) would cancel catastrophically at |mean| >> std.
template <typename Acc, class F> struct NormalizeOp {
  static constexpr int kInputs = 1;
  struct Args {
    const double* mean;
    const double* invstd;
    const void* weight;
    const void* bias;
    DType pd;
    F act;
  };
  struct Coef {
    Center<Acc> mean;
    Acc scale, shift;
    F act;
  };
  static __device__ __forceinline__ Coef coef(const Args& a, int64_t c)
  {
    const double w = a.weight != nullptr ? load_param<double>(a.weight, a.pd, c) : 1.0;
    const double b = a.bias != nullptr ? load_param<double>(a.bias, a.pd, c) : 0.0;
    return {split_center<Acc>(a.mean[c]), static_cast<Acc>(a.invstd[c] * w), static_cast<Acc>(b), a.act};
  }
  static __device__ __forceinline__ Acc apply(const Coef& k, Acc x, Acc)
  {
    // z with an explicit fma, as the backward ops form it: the same z bit for bit (an activation's
    // mask at a threshold must not depend on how the compiler contracts each site).
    return k.act.fwd(m_fma((x - k.mean.hi) - k.mean.lo, k.scale, k.shift));
  }
};

/// dx = (g - sum_dy/n - (x - mean) * invstd^2 * sum_dy_xmu/n) * invstd * w, g = act'(z) * dy
/// with z formed as NormalizeOp forms it (g = dy for the identity); input 0 is dy, input 1 is x.
/// n is read from device memory (no host sync); n == 0 (no elements anywhere) writes dx = 0
/// rather than leaving it undefined.
template <typename Acc, class F> struct BackwardElemtOp {
  static constexpr int kInputs = 2;
  struct Args {
    const double* mean;
    const double* invstd;
    const void* weight;
    DType pd;
    const double* sums;
    const double* count;
    int64_t c;
    const double* clamp_m2;  // eps mode Clamp: the record's m2 (else null)
    double eps;
    const void* bias;  // z's shift (read with an activation only)
    F act;
  };
  struct CoefIdentity {
    Center<Acc> mean;
    Acc mean_dy, k_xmu, scale;
  };
  struct CoefAct {
    Center<Acc> mean;
    Acc mean_dy, k_xmu, scale, shift;  // scale is also z's: invstd * w
    F act;
  };
  // The identity keeps the coefficients it had (a larger struct changed the double kernels' code).
  using Coef = std::conditional_t<F::kIdentity, CoefIdentity, CoefAct>;
  static __device__ __forceinline__ Coef coef(const Args& a, int64_t c)
  {
    const double n = *a.count;
    if (!(n > 0.0)) {
      if constexpr (F::kIdentity) {
        return {Center<Acc>{}, Acc(0), Acc(0), Acc(0)};
      } else {
        return {Center<Acc>{}, Acc(0), Acc(0), Acc(0), Acc(0), a.act};
      }
    }
    const double is = a.invstd[c];
    const double w = a.weight != nullptr ? load_param<double>(a.weight, a.pd, c) : 1.0;
    // Eps mode Clamp: a channel with var < eps has invstd = 1/sqrt(eps): no variance term.
    const bool clamped = a.clamp_m2 != nullptr && a.clamp_m2[c] / n < a.eps;
    if constexpr (F::kIdentity) {
      return {split_center<Acc>(a.mean[c]), static_cast<Acc>(a.sums[c] / n),
              static_cast<Acc>(clamped ? 0.0 : is * is * a.sums[a.c + c] / n), static_cast<Acc>(is * w)};
    } else {
      const double b = a.bias != nullptr ? load_param<double>(a.bias, a.pd, c) : 0.0;
      return {split_center<Acc>(a.mean[c]), static_cast<Acc>(a.sums[c] / n),
              static_cast<Acc>(clamped ? 0.0 : is * is * a.sums[a.c + c] / n), static_cast<Acc>(is * w),
              static_cast<Acc>(b), a.act};
    }
  }
  static __device__ __forceinline__ Acc apply(const Coef& k, Acc dy, Acc x)
  {
    if constexpr (F::kIdentity) {
      return (dy - k.mean_dy - ((x - k.mean.hi) - k.mean.lo) * k.k_xmu) * k.scale;
    } else {
      const Acc xm = (x - k.mean.hi) - k.mean.lo;
      const Acc g = k.act.grad(m_fma(xm, k.scale, k.shift), dy);  // z as NormalizeOp's
      return (g - k.mean_dy - xm * k.k_xmu) * k.scale;
    }
  }
};

// ---- kernels ---------------------------------------------------------------------------------

/// Channel-major reduction: block b reduces channels b, b + gridDim.x, ...; within a channel the
/// block walks the N*lv vectors (n, l) in steps of blockDim.x, kUnroll vectors per iteration.
template <class Op, typename T, int V>
__global__ void __launch_bounds__(kReduceThreads)
  reduce_cm_kernel(const T* __restrict__ in0, const T* __restrict__ in1, int64_t n_rows, int64_t n_ch,
                   int64_t lv, typename Op::Args args)
{
  using Acc = acc_t<T>;
  using VecT = Vec<T, V>;
  constexpr int K = kUnroll * V;
  __shared__ Triple smem[kReduceThreads / kWarp];

  const auto* a = reinterpret_cast<const VecT*>(in0);
  const auto* b = reinterpret_cast<const VecT*>(in1);
  if (blockIdx.x == 0 && threadIdx.x == 0) { Op::write_once(args); }
  // Incremental (n, l) walk: one division per thread, none in the loop.
  const int64_t step_n = blockDim.x / lv, step_l = blockDim.x % lv;
  const int64_t n_start = threadIdx.x / lv, l_start = threadIdx.x % lv;

  for (int64_t c = blockIdx.x; c < n_ch; c += gridDim.x) {
    Acc first = 0;
    if constexpr (Op::kNeedsFirst) { first = to_acc(a[c * lv].v[0]); }
    const typename Op::Ctr cc = Op::center(args, c, first);
    typename Op::State st;
    int64_t n = n_start, l = l_start;
    while (n < n_rows) {
      Acc x0[K], x1[K];
      int valid = 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (n < n_rows) {
          const int64_t off = (n * n_ch + c) * lv + l;
          const VecT va = a[off];
#pragma unroll
          for (int j = 0; j < V; ++j) { x0[u * V + j] = to_acc(va.v[j]); }
          if constexpr (Op::kInputs == 2) {
            const VecT vb = b[off];
#pragma unroll
            for (int j = 0; j < V; ++j) { x1[u * V + j] = to_acc(vb.v[j]); }
          } else {
#pragma unroll
            for (int j = 0; j < V; ++j) { x1[u * V + j] = Acc(0); }
          }
          valid += V;
          l += step_l;
          n += step_n;
          if (l >= lv) {
            l -= lv;
            ++n;
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) { x0[u * V + j] = x1[u * V + j] = Acc(0); }
        }
      }
      Op::template add<K>(st, x0, x1, valid, cc);
    }
    const Triple t = block_reduce<Op>(Op::triple(st), smem);
    if (threadIdx.x == 0) { Op::write(args, c, t, cc); }
  }
}

/// Channels-last reduction: the block (TX, TY) owns TX vector columns (TX*V channels); thread
/// (tx, ty) walks rows ty, ty + TY, ... of its column, U rows per iteration. The TY
/// partials of each channel are merged inside warps by shuffles, then across warps in smem.
template <class Op, typename T, int V>
__global__ void __launch_bounds__(kReduceThreads)
  reduce_cl_kernel(const T* __restrict__ in0, const T* __restrict__ in1, int64_t n_rows, int64_t cols,
                   typename Op::Args args)
{
  using Acc = acc_t<T>;
  using VecT = Vec<T, V>;
  // Two inputs of 8-wide vectors: half the rows in flight, else the per-thread state spills.
  constexpr int U = (Op::kInputs == 2 && V >= 8) ? kUnroll / 2 : kUnroll;
  __shared__ Triple smem[kReduceThreads / kWarp][kWarp];

  const auto* a = reinterpret_cast<const VecT*>(in0);
  const auto* b = reinterpret_cast<const VecT*>(in1);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int TX = blockDim.x, TY = blockDim.y;  // TX <= kWarp, a power of two
  const int tid = tx + TX * ty;
  const int lane = tid % kWarp, warp = tid / kWarp;
  const int nwarps = (TX * TY) / kWarp;
  if (blockIdx.x == 0 && tid == 0) { Op::write_once(args); }

  for (int64_t col0 = static_cast<int64_t>(blockIdx.x) * TX; col0 < cols;
       col0 += static_cast<int64_t>(gridDim.x) * TX) {
    const int64_t col = col0 + tx;
    const bool active = col < cols;
    typename Op::State st[V];
    typename Op::Ctr cc[V];
    if (active) {
      Acc first[V];
#pragma unroll
      for (int j = 0; j < V; ++j) { first[j] = Acc(0); }
      if constexpr (Op::kNeedsFirst) {
        const VecT v0 = a[col];
#pragma unroll
        for (int j = 0; j < V; ++j) { first[j] = to_acc(v0.v[j]); }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) { cc[j] = Op::center(args, col * V + j, first[j]); }
      for (int64_t r = ty; r < n_rows; r += static_cast<int64_t>(TY) * U) {
        Acc x0[U][V], x1[U][V];
        int valid = 0;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t ru = r + static_cast<int64_t>(u) * TY;
          if (ru < n_rows) {
            const VecT va = a[ru * cols + col];
#pragma unroll
            for (int j = 0; j < V; ++j) { x0[u][j] = to_acc(va.v[j]); }
            if constexpr (Op::kInputs == 2) {
              const VecT vb = b[ru * cols + col];
#pragma unroll
              for (int j = 0; j < V; ++j) { x1[u][j] = to_acc(vb.v[j]); }
            } else {
#pragma unroll
              for (int j = 0; j < V; ++j) { x1[u][j] = Acc(0); }
            }
            valid = u + 1;
          } else {
#pragma unroll
            for (int j = 0; j < V; ++j) { x0[u][j] = x1[u][j] = Acc(0); }
          }
        }
#pragma unroll
        for (int j = 0; j < V; ++j) {
          Acc y0[U], y1[U];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            y0[u] = x0[u][j];
            y1[u] = x1[u][j];
          }
          Op::template add<U>(st[j], y0, y1, valid, cc[j]);
        }
      }
    }
    // One channel of the vector at a time, so smem stays at kReduceThreads Triples.
#pragma unroll
    for (int j = 0; j < V; ++j) {
      Triple t = Op::triple(st[j]);
      for (int off = kWarp / 2; off >= TX; off /= 2) { Op::combine(t, shfl_down(t, off)); }
      if (lane < TX) { smem[warp][lane] = t; }
      __syncthreads();
      if (tid < TX && active) {
        Triple m = smem[0][tid];
        for (int w = 1; w < nwarps; ++w) { Op::combine(m, smem[w][tid]); }
        Op::write(args, col * V + j, m, cc[j]);
      }
      __syncthreads();
    }
  }
}

/// Channels-last elementwise: rows in flight per thread. Two inputs of 8-wide vectors keep 8
/// channels' coefficients in registers too; half the rows keeps occupancy up.
template <class Op, int V> constexpr int elt_rows_unroll() { return (Op::kInputs == 2 && V >= 8) ? 2 : kUnroll; }

/// Elementwise over a rows x cols (vectors) view. Channels-last: channel = col*V + j, the
/// coefficients live in registers for the whole row loop. Channel-major: channel = row % C,
/// coefficients formed once per row for kUnroll vectors of that row.
template <class Op, typename T, int V, bool CL>
__global__ void __launch_bounds__(kEltThreads, 2)
  elementwise_kernel(const T* in0, const T* in1, T* out, int64_t n_rows, int64_t cols, int64_t n_ch,
                     typename Op::Args args)
{
  // No __restrict__: normalize may run in place (each thread reads its vectors before it
  // writes them, so that is safe).
  using Acc = acc_t<T>;
  using VecT = Vec<T, V>;
  const auto* a = reinterpret_cast<const VecT*>(in0);
  const auto* b = reinterpret_cast<const VecT*>(in1);
  auto* o = reinterpret_cast<VecT*>(out);
  const int64_t TX = blockDim.x, TY = blockDim.y;

  if constexpr (CL) {
    constexpr int U = elt_rows_unroll<Op, V>();
    for (int64_t col = blockIdx.x * TX + threadIdx.x; col < cols; col += gridDim.x * TX) {
      typename Op::Coef k[V];
#pragma unroll
      for (int j = 0; j < V; ++j) { k[j] = Op::coef(args, col * V + j); }
      for (int64_t r = blockIdx.y * TY * U + threadIdx.y; r < n_rows; r += gridDim.y * TY * U) {
        VecT xa[U], xb[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t ru = r + u * TY;
          if (ru < n_rows) {
            xa[u] = a[ru * cols + col];
            if constexpr (Op::kInputs == 2) { xb[u] = b[ru * cols + col]; }
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t ru = r + u * TY;
          if (ru < n_rows) {
            VecT y;
#pragma unroll
            for (int j = 0; j < V; ++j) {
              Acc second = Acc(0);
              if constexpr (Op::kInputs == 2) { second = to_acc(xb[u].v[j]); }
              y.v[j] = Cvt<T>::to(Op::apply(k[j], to_acc(xa[u].v[j]), second));
            }
            o[ru * cols + col] = y;
          }
        }
      }
    }
  } else {
    for (int64_t r = blockIdx.y * TY + threadIdx.y; r < n_rows; r += gridDim.y * TY) {
      // 32-bit modulo when it fits: 64-bit division is a long software sequence.
      const int64_t c = (r <= UINT32_MAX) ? static_cast<int64_t>(static_cast<uint32_t>(r) %
                                                                 static_cast<uint32_t>(n_ch))
                                          : r % n_ch;
      const typename Op::Coef k = Op::coef(args, c);
      const int64_t base = r * cols;
      for (int64_t col = blockIdx.x * TX * kUnroll + threadIdx.x; col < cols; col += gridDim.x * TX * kUnroll) {
        VecT xa[kUnroll], xb[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t cu = col + u * TX;
          if (cu < cols) {
            xa[u] = a[base + cu];
            if constexpr (Op::kInputs == 2) { xb[u] = b[base + cu]; }
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t cu = col + u * TX;
          if (cu < cols) {
            VecT y;
#pragma unroll
            for (int j = 0; j < V; ++j) {
              Acc second = Acc(0);
              if constexpr (Op::kInputs == 2) { second = to_acc(xb[u].v[j]); }
              y.v[j] = Cvt<T>::to(Op::apply(k, to_acc(xa[u].v[j]), second));
            }
            o[base + cu] = y;
          }
        }
      }
    }
  }
}

/// Moments record of an input with no values (N*L == 0) or no channels: [count, 0..., 0...].
__global__ void fill_stats_kernel(double* stats, int64_t n_ch, double count)
{
  const int64_t total = 2 * n_ch + 1;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    stats[i] = i == 0 ? count : 0.0;
  }
}

/// Chan merge of k records, one thread per channel looping over the records in order (O(k*C),
/// coalesced across channels). Thread 0 also writes the total count. Records with count <= 0
/// contribute nothing (a negative count cannot be reported from here without a host sync).
__global__ void merge_moments_kernel(int64_t k, int64_t n_ch, const double* __restrict__ rec,
                                     double* __restrict__ out)
{
  const int64_t stride = 2 * n_ch + 1;
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (tid == 0) {
    double n = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      const double ni = rec[i * stride];
      if (ni > 0) { n += ni; }
    }
    out[0] = n;
  }
  for (int64_t c = tid; c < n_ch; c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Triple t{0.0, 0.0, 0.0};
    for (int64_t i = 0; i < k; ++i) {
      const double* r = rec + i * stride;
      chan_merge(t, Triple{r[1 + c], r[1 + n_ch + c], r[0]});
    }
    out[1 + c] = t.a;
    out[1 + n_ch + c] = t.b;
  }
}

/// The batch statistics from one moments record (copied when it is another buffer) and invstd;
/// the count is read here, on the device, so the host never waits for it.
__global__ void finalize_kernel(int64_t n_ch, const double* record, double eps, EpsMode mode, double* stats)
{
  const double n = record[0];
  const bool has = n > 0;
  const int64_t start = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (record != stats) {
    for (int64_t i = start; i < 2 * n_ch + 1; i += step) { stats[i] = record[i]; }
  }
  for (int64_t c = start; c < n_ch; c += step) {
    const double var = has ? record[1 + n_ch + c] / n : 0.0;
    // (var < eps ? eps : var), not fmax: a NaN variance (a channel holding inf or NaN) stays NaN,
    // as on the CPU (std::max) and in torch's clamp; fmax would return eps.
    const double denom = mode == EpsMode::Clamp ? (var < eps ? eps : var) : var + eps;
    stats[1 + 2 * n_ch + c] = 1.0 / sqrt(denom);
  }
}

/// The running-stat update (and ++num_batches_tracked) from the batch statistics. One block:
/// every thread reads the counter before thread 0 increments it.
__global__ void update_running_kernel(int64_t n_ch, const double* __restrict__ stats, RunningStats r)
{
  int64_t tracked = 0;
  if (r.num_batches_tracked != nullptr) { tracked = *r.num_batches_tracked + 1; }
  __syncthreads();
  if (threadIdx.x == 0 && r.num_batches_tracked != nullptr) { *r.num_batches_tracked = tracked; }
  const double n = stats[0];
  if (r.mean == nullptr || !(n > 0)) { return; }
  const double f = r.cumulative ? 1.0 / static_cast<double>(tracked) : r.momentum;
  for (int64_t c = threadIdx.x; c < n_ch; c += blockDim.x) {
    const double rm = load_param<double>(r.mean, r.dtype, c);
    const double rv = load_param<double>(r.var, r.dtype, c);
    store_param(r.mean, r.dtype, c, (1.0 - f) * rm + f * stats[1 + c]);
    store_param(r.var, r.dtype, c, (1.0 - f) * rv + f * (stats[1 + n_ch + c] / (n - 1.0)));
  }
}

// ---- host launchers --------------------------------------------------------------------------

std::string op_name(const char* op) { return std::string("cuda::") + op; }

void check_cuda(cudaError_t e, const char* op, const char* what)
{
  if (e != cudaSuccess) {
    PYSBN_FAIL(op_name(op) + ": " + what + " failed: " + cudaGetErrorString(e));
  }
}

void check_launch(const char* op) { check_cuda(cudaGetLastError(), op, "kernel launch"); }

int sm_count(const char* op)
{
  int dev = 0, sms = 0;
  check_cuda(cudaGetDevice(&dev), op, "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), op, "cudaDeviceGetAttribute");
  return std::max(sms, 1);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int pow2_ceil(int64_t v, int cap)
{
  int p = 1;
  while (p < cap && p < v) { p *= 2; }
  return p;
}

unsigned grid_dim(int64_t blocks) { return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, INT_MAX)); }

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

/// Channel-major input with L == 1 has the channels-last offsets (n*C + c).
bool as_channels_last(const Geometry& g) { return g.layout == Layout::ChannelsLast || g.l == 1; }

template <typename F> void dispatch(DType d, F&& f)
{
  switch (d) {
    case DType::Float32: f(float{}); return;
    case DType::Float64: f(double{}); return;
    case DType::Float16: f(__half{}); return;
    case DType::BFloat16: f(__nv_bfloat16{}); return;
  }
  PYSBN_FAIL("unsupported dtype");  // unreachable: check_input ran
}

template <class Op, typename T, int V>
void launch_reduce_cm(const T* in0, const T* in1, const Geometry& g, const typename Op::Args& args,
                      cudaStream_t s)
{
  const int64_t lv = g.l / V;
  const int threads = std::max(kWarp, pow2_ceil(ceil_div(g.n * lv, kUnroll), kReduceThreads));
  reduce_cm_kernel<Op, T, V><<<grid_dim(g.c), threads, 0, s>>>(in0, in1, g.n, g.c, lv, args);
}

template <class Op, typename T, int V>
void launch_reduce_cl(const T* in0, const T* in1, int64_t rows, int64_t c, int sms,
                      const typename Op::Args& args, cudaStream_t s)
{
  const int64_t cols = c / V;
  // Narrow the channel tile (down to one 32 B sector per row) while that buys more blocks.
  const int tx_min = std::max<int>(1, kSectorBytes / static_cast<int>(V * sizeof(T)));
  int tx = kWarp;
  while (tx > tx_min && ceil_div(cols, tx) < 2 * static_cast<int64_t>(sms)) { tx /= 2; }
  while (tx > 1 && tx / 2 >= cols) { tx /= 2; }  // never more lanes than columns
  const dim3 block(tx, kReduceThreads / tx);
  reduce_cl_kernel<Op, T, V><<<grid_dim(ceil_div(cols, tx)), block, 0, s>>>(in0, in1, rows, cols, args);
}

/// One reduction launch over a non-empty input; picks layout and vector width.
template <class Op, typename T>
void run_reduce(const char* op, const T* in0, const T* in1, const Geometry& g,
                const typename Op::Args& args, cudaStream_t s)
{
  constexpr int VW = kVecBytes / sizeof(T);
  const bool ok_ptrs = aligned(in0) && (in1 == nullptr || aligned(in1));
  if (as_channels_last(g)) {
    const int sms = sm_count(op);
    const int64_t rows = g.n * g.l;
    if (ok_ptrs && g.c % VW == 0) {
      launch_reduce_cl<Op, T, VW>(in0, in1, rows, g.c, sms, args, s);
    } else {
      launch_reduce_cl<Op, T, 1>(in0, in1, rows, g.c, sms, args, s);
    }
  } else if (ok_ptrs && g.l % VW == 0) {
    launch_reduce_cm<Op, T, VW>(in0, in1, g, args, s);
  } else {
    launch_reduce_cm<Op, T, 1>(in0, in1, g, args, s);
  }
  check_launch(op);
}

template <class Op, typename T, int V>
void launch_elementwise(const T* in0, const T* in1, T* out, const Geometry& g, int sms,
                        const typename Op::Args& args, cudaStream_t s)
{
  const int64_t target_blocks = static_cast<int64_t>(sms) * 16;
  if (as_channels_last(g)) {
    const int64_t rows = g.n * g.l, cols = g.c / V;
    const int tx = pow2_ceil(cols, kEltThreads);
    const int ty = kEltThreads / tx;
    const int64_t gx = ceil_div(cols, tx);
    const int64_t gy = std::min<int64_t>({ceil_div(rows, static_cast<int64_t>(ty) * elt_rows_unroll<Op, V>()),
                                          std::max<int64_t>(1, target_blocks / gx), kMaxGridY});
    elementwise_kernel<Op, T, V, true>
      <<<dim3(grid_dim(gx), grid_dim(gy)), dim3(tx, ty), 0, s>>>(in0, in1, out, rows, cols, g.c, args);
  } else {
    const int64_t rows = g.n * g.c, cols = g.l / V;
    const int tx = pow2_ceil(ceil_div(cols, kUnroll), kEltThreads);
    const int ty = kEltThreads / tx;
    const int64_t gx = ceil_div(cols, static_cast<int64_t>(tx) * kUnroll);
    const int64_t gy =
      std::min<int64_t>({ceil_div(rows, ty), std::max<int64_t>(1, target_blocks / gx), kMaxGridY});
    elementwise_kernel<Op, T, V, false>
      <<<dim3(grid_dim(gx), grid_dim(gy)), dim3(tx, ty), 0, s>>>(in0, in1, out, rows, cols, g.c, args);
  }
}

/// One elementwise launch over a non-empty input; picks vector width.
template <class Op, typename T>
void run_elementwise(const char* op, const T* in0, const T* in1, T* out, const Geometry& g,
                     const typename Op::Args& args, cudaStream_t s)
{
  constexpr int VW = kVecBytes / sizeof(T);
  const bool ok_ptrs = aligned(in0) && aligned(out) && (in1 == nullptr || aligned(in1));
  const int64_t inner = as_channels_last(g) ? g.c : g.l;
  const int sms = sm_count(op);
  if (ok_ptrs && inner % VW == 0) {
    launch_elementwise<Op, T, VW>(in0, in1, out, g, sms, args, s);
  } else {
    launch_elementwise<Op, T, 1>(in0, in1, out, g, sms, args, s);
  }
  check_launch(op);
}

void zero_async(const char* op, void* p, int64_t bytes, cudaStream_t s)
{
  if (p != nullptr && bytes > 0) {
    check_cuda(cudaMemsetAsync(p, 0, static_cast<size_t>(bytes), s), op, "cudaMemsetAsync");
  }
}

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

/// mean, m2 and invstd of the batch statistics (see core.hpp).
struct StatsParts {
  const double* count;
  const double* mean;
  const double* m2;
  const double* invstd;
  StatsParts(const double* stats, int64_t c) : count(stats), mean(stats + 1), m2(stats + 1 + c), invstd(stats + 1 + 2 * c) {}
};

/// Calls f(functor) for the activation `act` in the accumulation type Acc.
template <typename Acc, typename F> void dispatch_act(const Act& act, F&& f)
{
  switch (act.kind) {
    case Activation::Identity: f(ActIdentity<Acc>{}); return;
    case Activation::ReLU: f(ActReLU<Acc>{}); return;
    case Activation::LeakyReLU: f(ActLeakyReLU<Acc>{static_cast<Acc>(act.negative_slope)}); return;
    case Activation::SiLU: f(ActSiLU<Acc>{}); return;
    case Activation::GELU: f(ActGELU<Acc>{}); return;
    case Activation::GELUTanh: f(ActGELUTanh<Acc>{}); return;
    case Activation::Hardswish: f(ActHardswish<Acc>{}); return;
  }
  PYSBN_FAIL("unsupported activation");  // unreachable: check_act ran
}

}  // namespace

// ---- the back-end primitives (src/backend.hpp); arguments were checked by src/ops.cpp --------

void sum_ft(const TensorView& x, double* out, const Exec& exec)
{
  constexpr const char* op = "sum_ft";
  const Geometry& g = x.geometry;
  if (g.c == 0) { return; }
  const cudaStream_t s = as_stream(exec.stream);
  if (g.n * g.l == 0) {
    zero_async(op, out, g.c * static_cast<int64_t>(sizeof(double)), s);
    return;
  }
  dispatch(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using Op = SumOp<acc_t<T>>;
    run_reduce<Op, T>(op, static_cast<const T*>(x.data), nullptr, g, typename Op::Args{out}, s);
  });
}

void moments(const TensorView& x, double* record, const Exec& exec)
{
  constexpr const char* op = "moments";
  const Geometry& g = x.geometry;
  const int64_t count = g.n * g.l;
  const cudaStream_t s = as_stream(exec.stream);
  if (count == 0 || g.c == 0) {
    const int64_t blocks = ceil_div(record_size(g.c), kSmallThreads);
    fill_stats_kernel<<<grid_dim(blocks), kSmallThreads, 0, s>>>(record, g.c, static_cast<double>(count));
    check_launch(op);
    return;
  }
  dispatch(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using Op = MomentsOp<acc_t<T>>;
    run_reduce<Op, T>(op, static_cast<const T*>(x.data), nullptr, g,
                      typename Op::Args{record, g.c, static_cast<double>(count)}, s);
  });
}

void merge_moments(int64_t k, int64_t c, const double* records, double* record, const Exec& exec)
{
  const unsigned blocks = grid_dim(ceil_div(c, kSmallThreads));  // >= 1: thread 0 writes the count
  merge_moments_kernel<<<blocks, kSmallThreads, 0, as_stream(exec.stream)>>>(k, c, records, record);
  check_launch("merge_moments");
}

void finalize(int64_t c, const double* record, double eps, EpsMode mode, double* stats, const Exec& exec)
{
  const unsigned blocks = grid_dim(ceil_div(record_size(c), kSmallThreads));
  finalize_kernel<<<blocks, kSmallThreads, 0, as_stream(exec.stream)>>>(c, record, eps, mode, stats);
  check_launch("finalize");
}

void update_running(int64_t c, const double* stats, const RunningStats& running, const Exec& exec)
{
  if (running.mean == nullptr && running.num_batches_tracked == nullptr) { return; }
  update_running_kernel<<<1, kSmallThreads, 0, as_stream(exec.stream)>>>(c, stats, running);
  check_launch("update_running");
}

void normalize(const TensorView& x, const double* stats, const Affine& affine, const Act& act, void* y,
               const Exec& exec)
{
  constexpr const char* op = "normalize";
  const Geometry& g = x.geometry;
  const StatsParts sp(stats, g.c);
  const cudaStream_t s = as_stream(exec.stream);
  dispatch(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    dispatch_act<Acc>(act, [&](auto fn) {
      using Op = NormalizeOp<Acc, decltype(fn)>;
      typename Op::Args args{sp.mean, sp.invstd, affine.weight, affine.bias, affine.dtype, fn};
      run_elementwise<Op, T>(op, static_cast<const T*>(x.data), nullptr, static_cast<T*>(y), g, args, s);
    });
  });
}

void backward_reduce(const TensorView& x, const void* dy, const double* stats, const Affine& affine, const Act& act,
                     double* sums, const AffineGrad& grad, const Exec& exec)
{
  constexpr const char* op = "backward_reduce";
  const Geometry& g = x.geometry;
  if (g.c == 0) { return; }
  const cudaStream_t s = as_stream(exec.stream);
  if (g.n * g.l == 0) {
    zero_async(op, sums, sums_size(g.c) * static_cast<int64_t>(sizeof(double)), s);
    zero_async(op, grad.weight, g.c * dtype_size(grad.dtype), s);
    zero_async(op, grad.bias, g.c * dtype_size(grad.dtype), s);
    return;
  }
  const StatsParts sp(stats, g.c);
  dispatch(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    dispatch_act<Acc>(act, [&](auto fn) {
      using Op = GradOp<Acc, decltype(fn)>;
      typename Op::Args args{sp.mean, sp.invstd, sums, grad.weight, grad.bias, grad.dtype, g.c,
                             affine.weight, affine.bias, affine.dtype, fn};
      run_reduce<Op, T>(op, static_cast<const T*>(dy), static_cast<const T*>(x.data), g, args, s);
    });
  });
}

void backward_elemt(const TensorView& x, const void* dy, const double* stats, double eps, EpsMode mode,
                    const Affine& affine, const Act& act, const double* sums, void* dx, const Exec& exec)
{
  constexpr const char* op = "backward_elemt";
  const Geometry& g = x.geometry;
  const StatsParts sp(stats, g.c);
  const cudaStream_t s = as_stream(exec.stream);
  dispatch(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    dispatch_act<Acc>(act, [&](auto fn) {
      using Op = BackwardElemtOp<Acc, decltype(fn)>;
      typename Op::Args args{sp.mean, sp.invstd, affine.weight, affine.dtype, sums, sp.count, g.c,
                             mode == EpsMode::Clamp ? sp.m2 : nullptr, eps, affine.bias, fn};
      run_elementwise<Op, T>(op, static_cast<const T*>(dy), static_cast<const T*>(x.data), static_cast<T*>(dx), g,
                             args, s);
    });
  });
}

}  // namespace pysbn::cuda
