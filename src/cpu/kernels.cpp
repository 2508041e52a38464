// SPDX-License-Identifier: MIT
// CPU kernels of the pysbn core (OpenMP). Contracts: src/include/pysbn/core.hpp.
//
// How the work is laid out
// - Channel-major (N, C, L): each thread takes a contiguous range of the N*C planes x[n, c, :]
//   and walks it in memory order, keeping lane accumulators per channel (a channel's planes
//   in one thread's range are consecutive n). The per-thread results are merged per channel in
//   thread order (deterministic for a given thread count).
// - Channels-last (N*L rows of C values), and channel-major with L == 1: each thread takes a
//   contiguous range of rows and vectorises across channels. With C < 64 a "super-row" of k
//   consecutive rows (W = k*C lanes, lane j is channel j % C) keeps the vectors full.
// - Statistics: each block of values that fits in L1 is reduced in the accumulation type from
//   deviations d = x - m to a shift m near its mean, M2 = sum d^2 - (sum d)^2 / n, so there is
//   no cancellation at large offsets. Channel-major ranges take one pass per channel with m =
//   the mean of the channel's first block in the range; channels-last blocks one pass with
//   m = the running lane means; either is verified and redone exactly (per-block shifts,
//   corrected two-pass) when the data's mean turns out far from m. Blocks, ranges and threads
//   are merged with Chan's formula in double.
// - Second passes (normalize after moments, backward_elemt after backward_reduce) cover the same
//   range as the first pass, in chunks of about 1 MiB taken last chunk first, each chunk walked
//   forwards: they meet the first pass's last data in cache first, and the streams stay
//   ascending. (Walking the whole range backwards won on a Zen 5 VM but lost 3x on a Zen 4 VM,
//   whose prefetchers do not follow descending streams: channels-last normalize of
//   (64,256,14,14) took 3.0 ms backwards and 0.9 ms forwards on one thread.)
// - Activations are fused into the elementwise loops: normalize writes act(z) with z formed as
//   the identity's y, (x - hi) * a + b; backward_reduce and backward_elemt form z again with the
//   same coefficients and expression (so the same value) and use g = act'(z) * dy where they used
//   dy. Each activation is a functor type and the loops are templates on it; with the identity
//   functor they are the loops without activations, and its backward forms no z. float uses the
//   branch-free exp/Phi helpers below, which vectorise (glibc's expf/erff would not without
//   -ffast-math); SiLU/GELU normalize of float32 (32,64,56,56) on one Zen 4 thread: 1.2-1.4x and
//   1.8x the identity's time (compute-bound there: about 45 vector ops per element for GELU).
#include "backend.hpp"
#include "common.hpp"

#include <pysbn/core.hpp>
#include <pysbn/error.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif
#include <cstdlib>

namespace pysbn::cpu {
namespace {

// ---- constants ---------------------------------------------------------------------------------
constexpr int64_t kBlock = 4096;          // values per statistics block (16 KiB of float: in L1)
constexpr int64_t kMinPerThread = 16384;  // below this many values per thread, use fewer threads
constexpr int64_t kWideLanes = 64;        // channels-last: widen rows to at least this many lanes

// ---- element types -----------------------------------------------------------------------------
using f16 = _Float16;
struct bf16 {
  uint16_t bits;
};

template <class T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <class T>
using acc_t = typename AccOf<T>::type;

inline float ld(float v) { return v; }
inline double ld(double v) { return v; }
inline float ld(f16 v) { return static_cast<float>(v); }
inline float ld(bf16 v)
{
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <class T>
inline T st(acc_t<T> v);
template <>
inline float st<float>(float v) { return v; }
template <>
inline double st<double>(double v) { return v; }
template <>
inline f16 st<f16>(float v) { return static_cast<f16>(v); }
template <>
inline bf16 st<bf16>(float v)
{
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) { return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)}; }  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16{static_cast<uint16_t>(u >> 16)};
}

// Parameters (weight, bias, running stats, grads) as double for the per-channel set-up code.
template <class P>
inline double ldp(const void* p, int64_t i)
{
  return static_cast<double>(ld(static_cast<const P*>(p)[i]));
}
template <class P>
inline void stp(void* p, int64_t i, double v)
{
  static_cast<P*>(p)[i] = st<P>(static_cast<acc_t<P>>(v));
}

template <class F>
void dispatch_dtype(DType d, F&& f)
{
  switch (d) {
    case DType::Float32: f(float{}); return;
    case DType::Float64: f(double{}); return;
    case DType::Float16: f(f16{}); return;
    case DType::BFloat16: f(bf16{}); return;
  }
}

// ---- activations -------------------------------------------------------------------------------
// One functor type per activation: fwd(z) = act(z) and grad(z, dy) = act'(z) * dy, torch's
// formulas (ReLU, LeakyReLU and Hardswish backward select as torch's kernels do, so z = NaN keeps
// dy where torch keeps it). The kernels are templates on the functor; ActIdentity's members are
// the identity, and `if constexpr (F::kIdentity)` keeps the code without an activation as it was.
// float uses the branch-free helpers below, which vectorise inside `omp simd` loops (glibc's
// expf/erff/tanhf are calls that keep a loop scalar unless -ffast-math); double uses <cmath>.

#if defined(__GNUC__)
#define PYSBN_INLINE inline __attribute__((always_inline))
#else
#define PYSBN_INLINE inline
#endif

PYSBN_INLINE float fmadd(float a, float b, float c)
{
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

/// The rounding error of p = fl(a * b): a * b = p + prod_err(a, b, p) exactly (finite values).
PYSBN_INLINE float prod_err(float a, float b, float p)
{
#ifdef __FMA__
  return std::fma(a, b, -p);
#else  // Dekker: split a and b into 12-bit halves whose products are exact
  const float ca = 4097.0f * a, cb = 4097.0f * b;
  const float ah = ca - (ca - a), bh = cb - (cb - b), al = a - ah, bl = b - bh;
  return ((ah * bh - p) + ah * bl + al * bh) + al * bl;
#endif
}

PYSBN_INLINE uint32_t bits_of(float f)
{
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
PYSBN_INLINE float float_of(uint32_t u)
{
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// sign bit of s set ? a : b, on the bits. (A float select compiles to a compare into an
/// AVX-512 mask and a masked move; on a Zen 4 two such clamps cost as much as the exp
/// polynomial, the bitwise form next to nothing.) s = +-0 takes either side, so both must agree
/// there.
PYSBN_INLINE float select_neg(float s, float a, float b)
{
  const auto m = static_cast<uint32_t>(static_cast<int32_t>(bits_of(s)) >> 31);
  return float_of((bits_of(a) & m) | (bits_of(b) & ~m));
}
inline double select_neg(double s, double a, double b) { return std::signbit(s) ? a : b; }

/// sign(v) * min(|v|, m) (m >= 0) on the bits (the magnitudes of non-negative floats order as
/// their bits). NaN becomes +-m: the activations below keep NaN through their factor z instead.
PYSBN_INLINE float clamp_mag(float v, float m)
{
  const uint32_t b = bits_of(v), a = b & 0x7fffffffu, mb = bits_of(m);
  return float_of((a < mb ? a : mb) | (b & 0x80000000u));
}
inline double clamp_mag(double v, double) { return v; }  // std::exp takes any argument

/// e^(hi + lo) 2^-kOff in float for |hi| <= 174 - 1.1 kOff (clamp_mag first: e^174 is inf,
/// e^-174 is 0), lo a small correction of the argument (e.g. the rounding error of hi).
/// n = round(hi / ln 2), r = hi - n ln 2 + lo (Cody-Waite: n * 0.693359375 is exact), e^r by
/// Cephes' expf polynomial, 2^(n - kOff) applied as two exponent-field factors so subnormal
/// results and the overflow to inf come out right. Within 1 ulp (2 in the subnormal range); NaN
/// propagates.
template <int kOff = 0>
PYSBN_INLINE float exp_acc(float hi, float lo = 0.0f)
{
  constexpr float kShift = 0x1.8p23f;  // adding it rounds to an integer (|n| < 2^22)
  const float kn = fmadd(hi, 1.44269504088896341f, kShift);
  const float n = kn - kShift;
  float r = fmadd(n, -0.693359375f, hi);
  r = fmadd(n, 2.12194440e-4f, r) + lo;
  float p = 1.9875691500e-4f;
  p = fmadd(p, r, 1.3981999507e-3f);
  p = fmadd(p, r, 8.3334519073e-3f);
  p = fmadd(p, r, 4.1665795894e-2f);
  p = fmadd(p, r, 1.6666665459e-1f);
  p = fmadd(p, r, 5.0000001201e-1f);
  p = fmadd(p, r * r, r) + 1.0f;
  // n from kn's low mantissa bits (no float -> int conversion, which NaN would make undefined)
  const auto ni = static_cast<int32_t>(bits_of(kn) - bits_of(kShift)) - kOff;
  const int32_t n1 = ni >> 1, n2 = ni - n1;
  const float s1 = float_of(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = float_of(static_cast<uint32_t>(n2 + 127) << 23);
  return p * s1 * s2;
}
inline double exp_acc(double v) { return std::exp(v); }

/// The standard normal distribution at z: cdf = Phi(z) and e = e^(-z^2/2) (the density times
/// sqrt(2 pi)). Phi from c = erfc(|z|/sqrt 2) / 2 = e * w * R(w), w = 1 / (1 + 0.35 |z|), R a
/// degree-8 fit (relative error about 1e-7 where e is not 0): Phi(z) = c for z < 0 and 1 - c
/// otherwise is accurate to a few ulp relative also in the far left tail, where
/// 1 + erf(z/sqrt 2) cancels. e from the exact square (|z|/2) * |z| = hh + hl. |z| is clamped
/// at 14.5, where e is 0 already; NaN leaves cdf finite (the callers' factor z keeps it).
PYSBN_INLINE void normal_acc(float z, float& cdf, float& e)
{
  const float a = float_of(std::min(bits_of(z) & 0x7fffffffu, bits_of(14.5f)));  // min(|z|, 14.5)
  const float h = 0.5f * a, hh = h * a;
  e = exp_acc(-hh, -prod_err(h, a, hh));
  const float w = 1.0f / fmadd(0.35f, a, 1.0f);
  float q = -2.916381881e-02f;
  q = fmadd(q, w, 1.440602839e-01f);
  q = fmadd(q, w, -2.559008300e-01f);
  q = fmadd(q, w, 1.593917608e-01f);
  q = fmadd(q, w, -2.326305024e-02f);
  q = fmadd(q, w, 1.055744737e-01f);
  q = fmadd(q, w, 1.198155805e-01f);
  q = fmadd(q, w, 1.398643255e-01f);
  q = fmadd(q, w, 1.396212578e-01f);
  const float c = e * (w * q);
  cdf = select_neg(z, c, 1.0f - c);
}
inline void normal_acc(double z, double& cdf, double& e)
{
  // erfc(-t) with t = z / sqrt 2 = th + tl: the rounding error tl of th would cost |z|^2 ulp
  // in the left tail; erfc(-th - tl) = erfc(-th) + tl * 2/sqrt(pi) e^(-th^2), to first order.
  // Likewise e^-(z^2/2) from the exact square hh + hl. (No corrections at inf: inf - inf.)
  constexpr double kHi = 0.70710678118654757, kLo = -4.8336466567264567e-17;  // 1/sqrt 2
  const double th = z * kHi, h = 0.5 * z, hh = h * z;
  const bool finite = std::isfinite(hh);
  const double tl = finite ? std::fma(z, kHi, -th) + z * kLo : 0.0;
  const double hl = finite ? std::fma(h, z, -hh) : 0.0;
  e = std::exp(-hh) * (1.0 - hl);
  cdf = 0.5 * std::erfc(-th) + tl * (std::exp(-th * th) * 0.56418958354775628695);
}

template <class A>
struct ActIdentity {
  static constexpr bool kIdentity = true;
  PYSBN_INLINE A fwd(A z) const { return z; }
  PYSBN_INLINE A grad(A, A dy) const { return dy; }
};

template <class A>
struct ActReLU {
  static constexpr bool kIdentity = false;
  PYSBN_INLINE A fwd(A z) const { return z < A(0) ? A(0) : z; }      // clamp_min: NaN stays
  PYSBN_INLINE A grad(A z, A dy) const { return z <= A(0) ? A(0) : dy; }  // threshold_backward
};

template <class A>
struct ActLeakyReLU {
  static constexpr bool kIdentity = false;
  A slope;
  // slope * z formed unconditionally: a load under the condition keeps the loops scalar
  PYSBN_INLINE A fwd(A z) const
  {
    const A neg = z * slope;
    return z > A(0) ? z : neg;
  }
  PYSBN_INLINE A grad(A z, A dy) const
  {
    const A neg = dy * slope;
    return z > A(0) ? dy : neg;
  }
};

/// s = sigmoid(v) and s (1 - s) from e = e^-|v| <= 1, which never overflows: with
/// r = 1 / (1 + e), s = r for v >= 0 and e r for v < 0, and s (1 - s) = e r^2 either way; no
/// cancellation (1 - s would lose the digits of s (1 - s) as s -> 1).
template <class A>
PYSBN_INLINE void sigmoid_pair(A v, A& s, A& sq)
{
  const A e = exp_acc(-clamp_mag(std::fabs(v), A(174))), r = A(1) / (A(1) + e);
  s = select_neg(v, e, A(1)) * r;
  sq = (e * r) * r;
}

/// z * sigmoid(v) = z / (1 + e^-v) as (z / (2^-40 + e^-v 2^-40)) 2^-40: e^-v 2^-40 overflows
/// only where the result underflows (v < -116), so the product keeps its digits down to the
/// subnormals (z / (1 + e^-v) is -0 from v < -88.7 on), at the cost of one multiply.
PYSBN_INLINE float mul_sigmoid(float z, float v)
{
  constexpr float kTiny = 0x1p-40f;
  return z / (kTiny + exp_acc<40>(clamp_mag(-v, 130.0f))) * kTiny;
}
inline double mul_sigmoid(double z, double v)
{
  const double e = std::exp(-std::fabs(v));
  return z * ((v < 0 ? e : 1.0) / (1.0 + e));
}

/// z * sigmoid(z) (torch: z / (1 + e^-z)); act' = s (1 + z (1 - s)) = s + z s (1 - s).
template <class A>
struct ActSiLU {
  static constexpr bool kIdentity = false;
  PYSBN_INLINE A fwd(A z) const { return mul_sigmoid(z, z); }
  PYSBN_INLINE A grad(A z, A dy) const
  {
    A s, sq;
    sigmoid_pair(z, s, sq);
    return dy * (s + z * sq);
  }
};

/// z Phi(z); act' = Phi(z) + z phi(z).
template <class A>
struct ActGELU {
  static constexpr bool kIdentity = false;
  PYSBN_INLINE A fwd(A z) const
  {
    A cdf, e;
    normal_acc(z, cdf, e);
    return z * cdf;
  }
  PYSBN_INLINE A grad(A z, A dy) const
  {
    A cdf, e;
    normal_acc(z, cdf, e);
    return dy * (cdf + z * (e * A(0.39894228040143267794)));
  }
};

/// 0.5 z (1 + tanh u), u = k (z + 0.044715 z^3), k = sqrt(2/pi), written as z s with
/// s = (1 + tanh u) / 2 = sigmoid(2u): no cancellation for u << 0. act' (torch's
/// gelu_backward, tanh) = 0.5 (1 + t) + 0.5 z (1 - t^2) k (1 + 3 * 0.044715 z^2) with
/// 1 + t = 2 s and 1 - t^2 = 4 s (1 - s).
template <class A>
struct ActGELUTanh {
  static constexpr bool kIdentity = false;
  static constexpr A kBeta = A(0.79788456080286535588), kKappa = A(0.044715);
  PYSBN_INLINE A fwd(A z) const { return mul_sigmoid(z, A(2) * (kBeta * (z + kKappa * (z * z * z)))); }
  PYSBN_INLINE A grad(A z, A dy) const
  {
    const A zz = z * z;
    A s, sq;
    sigmoid_pair(A(2) * (kBeta * (z + kKappa * (zz * z))), s, sq);
    return dy * (s + A(2) * z * sq * (kBeta * (A(1) + A(3) * kKappa * zz)));
  }
};

/// z * min(max(z + 3, 0), 6) / 6 (NaN stays NaN, as with std::max/min); act' as torch's
/// hardswish_backward: 0 below -3, z/3 + 1/2 on [-3, 3], 1 above.
template <class A>
struct ActHardswish {
  static constexpr bool kIdentity = false;
  PYSBN_INLINE A fwd(A z) const
  {
    A t = z + A(3);
    t = t < A(0) ? A(0) : t;
    t = A(6) < t ? A(6) : t;
    return z * t / A(6);
  }
  PYSBN_INLINE A grad(A z, A dy) const
  {
    return z < A(-3) ? A(0) : (z <= A(3) ? dy * (z / A(3) + A(0.5)) : dy);
  }
};

/// Calls f(functor) for the activation `act` in the accumulation type A.
template <class A, class F>
void dispatch_act(const Act& act, F&& f)
{
  switch (act.kind) {
    case Activation::Identity: f(ActIdentity<A>{}); return;
    case Activation::ReLU: f(ActReLU<A>{}); return;
    case Activation::LeakyReLU: f(ActLeakyReLU<A>{static_cast<A>(act.negative_slope)}); return;
    case Activation::SiLU: f(ActSiLU<A>{}); return;
    case Activation::GELU: f(ActGELU<A>{}); return;
    case Activation::GELUTanh: f(ActGELUTanh<A>{}); return;
    case Activation::Hardswish: f(ActHardswish<A>{}); return;
  }
}

// ---- threading ---------------------------------------------------------------------------------
template <class F>
void parallel(int nt, F&& f)
{
#ifdef _OPENMP
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    f(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  f(0, 1);
}

inline int threads_for(int requested, int64_t work)
{
  int64_t by_work = std::max<int64_t>(1, work / kMinPerThread);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(requested, by_work)));
}

inline void split(int64_t total, int part, int parts, int64_t& begin, int64_t& end)
{
  begin = total * part / parts;
  end = total * (part + 1) / parts;
}

// ---- statistics helpers ------------------------------------------------------------------------
/// Running (count, mean, M2) in double; Chan's merge.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, double mb, double m2b)
  {
    if (nb <= 0) { return; }
    double nab = n + nb;
    double delta = mb - mean;
    if (!std::isfinite(delta)) {  // a non-finite mean on either side (inf - inf is NaN): the
      // weighted sum gives +-inf or NaN as a plain sum would; the spread is undefined.
      mean = (n * mean + nb * mb) / nab;
      m2 = std::numeric_limits<double>::quiet_NaN();
      n = nab;
      return;
    }
    mean += delta * (nb / nab);
    m2 += m2b + delta * delta * (n * nb / nab);
    n = nab;
  }
  void merge(const Moments& o) { merge(o.n, o.mean, o.m2); }
};

/// out[c].merge(nb, mean[c], m2[c]) for every channel, when every out[c] holds the same count
/// (channels that saw the same rows): the merge weights are computed once, not per channel.
inline void merge_uniform(std::vector<Moments>& out, double nb, const double* mean, const double* m2)
{
  if (nb <= 0 || out.empty()) { return; }
  const double na = out[0].n, nab = na + nb, wb = nb / nab, wab = na * nb / nab;
  const int64_t c_n = static_cast<int64_t>(out.size());
  for (int64_t c = 0; c < c_n; ++c) {
    Moments& o = out[c];
    const double delta = mean[c] - o.mean;
    o.mean += delta * wb;
    o.m2 += m2[c] + delta * delta * wab;
    o.n = nab;
  }
}

// Contiguous reductions keep kAccLanes independent partial sums (4 AVX-512 registers of float):
// one accumulator would make every loop wait on the latency of its previous add.
constexpr int64_t kAccLanes = 64;

/// Sum of the kAccLanes partial sums, folded pairwise (vector adds, not a serial chain).
template <class A>
inline A fold(A* acc)
{
  for (int64_t half = kAccLanes / 2; half >= 1; half /= 2) {
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) { acc[j] += acc[j + half]; }
  }
  return acc[0];
}

/// Returns sum over i < len of f(i), with kAccLanes independent partial sums.
template <class A, class F>
inline A lane_sum(int64_t len, F&& f)
{
  A acc[kAccLanes] = {};
  int64_t i = 0;
  for (; i + kAccLanes <= len; i += kAccLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kAccLanes; ++j) { acc[j] += f(i + j); }
  }
  A tail = 0;
  for (; i < len; ++i) { tail += f(i); }
  return fold(acc) + tail;
}

/// Two sums at once: (sum f1(i), sum f2(i)) where f(i, u, v) sets u = f1(i), v = f2(i).
template <class A, class F>
inline void lane_sum2(int64_t len, A& out1, A& out2, F&& f)
{
  A a1[kAccLanes] = {}, a2[kAccLanes] = {};
  int64_t i = 0;
  for (; i + kAccLanes <= len; i += kAccLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kAccLanes; ++j) {
      A u, v;
      f(i + j, u, v);
      a1[j] += u;
      a2[j] += v;
    }
  }
  A t1 = 0, t2 = 0;
  for (; i < len; ++i) {
    A u, v;
    f(i, u, v);
    t1 += u;
    t2 += v;
  }
  out1 = fold(a1) + t1;
  out2 = fold(a2) + t2;
}

/// Two running sums over a stream of contiguous segments (the planes of one channel): kAccLanes
/// lanes in the accumulation type that persist across segments (a short plane costs no fold),
/// flushed into double every kBlock values so each lane adds few values in low precision.
template <class A, int64_t Lanes = kAccLanes>
struct Stream2 {
  double s1 = 0, s2 = 0;
  A a1[Lanes] = {}, a2[Lanes] = {};
  A t1 = 0, t2 = 0;  // the segments' tails
  int64_t pending = 0;

  /// Adds f(i) -> (u, v) for i < len (len <= kBlock).
  template <class F>
  void add(int64_t len, F&& f)
  {
    A l1[Lanes], l2[Lanes];  // local copies: provably not aliased by the data
    for (int64_t j = 0; j < Lanes; ++j) {
      l1[j] = a1[j];
      l2[j] = a2[j];
    }
    int64_t i = 0;
    for (; i + Lanes <= len; i += Lanes) {
#pragma omp simd
      for (int64_t j = 0; j < Lanes; ++j) {
        A u, v;
        f(i + j, u, v);
        l1[j] += u;
        l2[j] += v;
      }
    }
    // The tail (< Lanes values) goes to scalar sums, not into the lanes: scalar stores into an
    // array that is then copied with vector loads stall store-to-load forwarding (measured:
    // most of the time of small planes on a Zen 4).
    A r1 = 0, r2 = 0;
    for (; i < len; ++i) {
      A u, v;
      f(i, u, v);
      r1 += u;
      r2 += v;
    }
    t1 += r1;
    t2 += r2;
    for (int64_t j = 0; j < Lanes; ++j) {
      a1[j] = l1[j];
      a2[j] = l2[j];
    }
    pending += len;
    if (pending >= kBlock) { flush(); }
  }

  void flush()
  {
    double u1 = static_cast<double>(t1), u2 = static_cast<double>(t2);
    for (int64_t j = 0; j < Lanes; ++j) {
      u1 += static_cast<double>(a1[j]);
      u2 += static_cast<double>(a2[j]);
    }
    s1 += u1;
    s2 += u2;
    std::fill(a1, a1 + Lanes, A(0));
    std::fill(a2, a2 + Lanes, A(0));
    t1 = t2 = A(0);
    pending = 0;
  }
};

/// Corrected two-pass moments of one contiguous block (fits in L1), in the accumulation type.
template <class T>
inline void block_moments(const T* x, int64_t len, double& mean, double& m2)
{
  using A = acc_t<T>;
  const A s = lane_sum<A>(len, [&](int64_t i) { return static_cast<A>(ld(x[i])); });
  const A m = s / static_cast<A>(len);
  A sd, sdd;
  lane_sum2<A>(len, sd, sdd, [&](int64_t i, A& u, A& v) {
    u = ld(x[i]) - m;
    v = u * u;
  });
  mean = static_cast<double>(m) + static_cast<double>(sd) / static_cast<double>(len);
  m2 = std::max(0.0, static_cast<double>(sdd) - static_cast<double>(sd) * static_cast<double>(sd) / len);
}

/// The check of the one-pass shifted schemes. With s1 = sum(x - K) and s2 = sum((x - K)^2) over
/// n values, the one-pass result is kept when the mean is within 2 std of the shift K:
/// d^2 n <= 4 M2 with d = s1 / n and M2 = s2 - s1 d, i.e. 5 s1^2 <= 4 n s2 (no division). That
/// bounds the rounding error of M2 at about 5 ulp of the sums. False for NaN (then: redo exactly).
inline bool near_shift(double s1, double s2, double n) { return 5.0 * s1 * s1 <= 4.0 * n * s2; }

/// Moments of one block in one pass, shifted by `shift` (the channel's running mean): with
/// d = x - shift, M2 = sum d^2 - (sum d)^2 / n. This loses precision only when the block mean is
/// far from the shift relative to the block's spread, so such blocks (mean more than 2 std from
/// the shift, bounding the rounding error by ~5 ulp) are redone with the two-pass scheme.
template <class T>
inline void block_moments_shifted(const T* x, int64_t len, double shift, double& mean, double& m2)
{
  using A = acc_t<T>;
  const A k = static_cast<A>(shift);
  A sd, sdd;
  lane_sum2<A>(len, sd, sdd, [&](int64_t i, A& u, A& v) {
    u = ld(x[i]) - k;
    v = u * u;
  });
  const double n = static_cast<double>(len);
  if (!near_shift(sd, sdd, n)) {
    block_moments(x, len, mean, m2);
    return;
  }
  const double d = static_cast<double>(sd) / n;
  mean = static_cast<double>(k) + d;
  m2 = static_cast<double>(sdd) - static_cast<double>(sd) * d;
}

/// A float64 mean as hi + lo in the accumulation type: (x - hi) - lo is accurate to the
/// precision of x even at large offsets (x - hi is exact when x is close to hi).
template <class A>
struct SplitMean {
  std::vector<A> hi, lo;
  SplitMean(const double* mean, int64_t c) : hi(c), lo(c)
  {
    for (int64_t i = 0; i < c; ++i) {
      hi[i] = static_cast<A>(mean[i]);
      lo[i] = static_cast<A>(mean[i] - static_cast<double>(hi[i]));
    }
  }
};

/// The per-channel coefficients of z = (x - hi) * a + b, with the low part of the mean folded
/// into b: the forward's y (identity) and every recomputation of z in the backward ops use
/// these, so z is the same value, bit for bit, in all of them.
template <class A, class P>
void z_coefficients(const SplitMean<A>& sm, const double* invstd, const void* weight, const void* bias,
                    std::vector<A>& a, std::vector<A>& b)
{
  const auto C = static_cast<int64_t>(sm.hi.size());
  a.resize(static_cast<size_t>(C));
  b.resize(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    const double ac = invstd[c] * (weight ? ldp<P>(weight, c) : 1.0);
    a[c] = static_cast<A>(ac);
    b[c] = static_cast<A>((bias ? ldp<P>(bias, c) : 0.0) - static_cast<double>(sm.lo[c]) * ac);
  }
}

// ---- channel-major plan ------------------------------------------------------------------------
/// Channel-major inputs are walked in memory order: thread t takes a contiguous range of the N*C
/// planes (plane p = n*C + c, L values each) and keeps accumulators per channel. Walking one
/// channel's planes at a time (stride C*L between planes) restarts the hardware prefetchers at
/// every plane: 2.4-4x slower than the contiguous walk on a Zen 4 VM (per-channel sums of
/// (32,64,56,56) and (64,256,14,14), one thread).
constexpr int64_t kChanLanes = 32;  // per-channel lanes: 2 AVX-512 registers of float

inline int cm_threads(const Geometry& g, int num_threads)
{
  const int64_t planes = g.n * g.c;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads_for(num_threads, planes * g.l), planes)));
}

/// Calls f(n, c, offset of plane (n, c)) for this thread's planes, in memory order.
template <class F>
inline void cm_for_planes(const Geometry& g, int tid, int nt, F&& f)
{
  int64_t pb, pe;
  split(g.n * g.c, tid, nt, pb, pe);
  // (n, c) stepped along, not divided out per plane: a 64-bit division per plane costs as much
  // as reducing a small plane.
  int64_t n = pb / g.c, c = pb % g.c;
  for (int64_t p = pb; p < pe; ++p) {
    f(n, c, p * g.l);
    if (++c == g.c) {
      c = 0;
      ++n;
    }
  }
}

/// Like cm_for_planes, but the range is cut into chunks of about kTailChunkBytes, visited last
/// chunk first, each chunk in memory order: a second pass over data the first pass just read
/// (normalize after moments, backward_elemt after backward_reduce) then starts with what is
/// still in the cache, and every stream still runs forwards. Measured on the Zen 4 VM, fused
/// forward+backward, 2 threads: 5-18% faster on 12-26 MB inputs, neutral on 103 MB.
constexpr int64_t kTailChunkBytes = int64_t{1} << 20;
template <class F>
inline void cm_for_planes_tail_first(const Geometry& g, int64_t elem_bytes, int tid, int nt, F&& f)
{
  int64_t pb, pe;
  split(g.n * g.c, tid, nt, pb, pe);
  const int64_t per = std::max<int64_t>(1, kTailChunkBytes / std::max<int64_t>(1, g.l * elem_bytes));
  for (int64_t hi = pe; hi > pb;) {
    const int64_t lo = std::max(pb, hi - per);
    int64_t n = lo / g.c, c = lo % g.c;
    for (int64_t p = lo; p < hi; ++p) {
      f(n, c, p * g.l);
      if (++c == g.c) {
        c = 0;
        ++n;
      }
    }
    hi = lo;
  }
}

// ---- channels-last row loops -------------------------------------------------------------------
// Accumulators for a tile of kTile lanes stay in registers across the rows of a block; the
// generic loop (accumulators in memory) handles the last partial tile. With `in_memory`, every
// lane's accumulator stays in memory (L1) and each row is read once: wide rows (W > kTile) then
// cost one pass over the block instead of W / kTile passes, which wins on large inputs (see
// mem_rows()) and loses on small ones, where the tile passes hit L1/L2 anyway.
constexpr int64_t kTile = 64;

/// acc[j] += f(r, j) for r < nrows, j < w, where f reads row r lane j.
template <class A, class F>
inline void rows_accumulate(int64_t nrows, int64_t w, A* acc, F&& f, bool in_memory = false)
{
  if (in_memory) {
    for (int64_t r = 0; r < nrows; ++r) {
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) { acc[j] += f(r, j); }
    }
    return;
  }
  int64_t j0 = 0;
  for (; j0 + kTile <= w; j0 += kTile) {
    A t[kTile];
    for (int64_t jj = 0; jj < kTile; ++jj) { t[jj] = acc[j0 + jj]; }
    for (int64_t r = 0; r < nrows; ++r) {
#pragma omp simd
      for (int64_t jj = 0; jj < kTile; ++jj) { t[jj] += f(r, j0 + jj); }
    }
    for (int64_t jj = 0; jj < kTile; ++jj) { acc[j0 + jj] = t[jj]; }
  }
  for (int64_t r = 0; r < nrows; ++r) {
#pragma omp simd
    for (int64_t j = j0; j < w; ++j) { acc[j] += f(r, j); }
  }
}

/// Two sums at once: a1[j] += f1(r, j), a2[j] += f2(r, j).
template <class A, class F>
inline void rows_accumulate2(int64_t nrows, int64_t w, A* a1, A* a2, F&& f, bool in_memory = false)
{
  if (in_memory) {
    for (int64_t r = 0; r < nrows; ++r) {
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        A u, v;
        f(r, j, u, v);
        a1[j] += u;
        a2[j] += v;
      }
    }
    return;
  }
  int64_t j0 = 0;
  for (; j0 + kTile <= w; j0 += kTile) {
    A t1[kTile], t2[kTile];
    for (int64_t jj = 0; jj < kTile; ++jj) {
      t1[jj] = a1[j0 + jj];
      t2[jj] = a2[j0 + jj];
    }
    for (int64_t r = 0; r < nrows; ++r) {
#pragma omp simd
      for (int64_t jj = 0; jj < kTile; ++jj) {
        A u, v;
        f(r, j0 + jj, u, v);
        t1[jj] += u;
        t2[jj] += v;
      }
    }
    for (int64_t jj = 0; jj < kTile; ++jj) {
      a1[j0 + jj] = t1[jj];
      a2[j0 + jj] = t2[jj];
    }
  }
  for (int64_t r = 0; r < nrows; ++r) {
#pragma omp simd
    for (int64_t j = j0; j < w; ++j) {
      A u, v;
      f(r, j, u, v);
      a1[j] += u;
      a2[j] += v;
    }
  }
}

// ---- channels-last plan ------------------------------------------------------------------------
/// Rows of C values; k rows form a super-row of W = k*C lanes (lane j is channel j % C).
struct ClPlan {
  int64_t rows = 0;   // N*L (or N when channel-major with L == 1)
  int64_t k = 1;      // rows per super-row
  int64_t w = 0;      // lanes per super-row
  int64_t block = 1;  // super-rows per statistics block
  int nt = 1;
};

inline ClPlan cl_plan(const Geometry& g, int num_threads)
{
  ClPlan p;
  p.rows = g.n * g.l;
  p.k = g.c >= kWideLanes ? 1 : (kWideLanes + g.c - 1) / g.c;
  p.w = p.k * g.c;
  // At least 64 super-rows per block: the per-lane work of a block (shift check, Chan merge)
  // is then small next to the block's data, also for wide rows (BN1d with many channels).
  p.block = std::max<int64_t>(64, 2 * kBlock / std::max<int64_t>(p.w, 1));
  p.nt = threads_for(num_threads, g.n * g.c * g.l);
  // Each thread should get at least a few super-rows; otherwise fewer threads.
  p.nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(p.nt, p.rows / std::max<int64_t>(p.k, 1))));
  return p;
}

/// Splits this thread's rows into super-row blocks and a tail of fewer than k rows; calls
/// f(first_row, n_rows, width) with width = W for super-row blocks and C for tail rows.
/// Whether the row reductions keep every lane's accumulator in memory (one pass per block)
/// rather than kTile lanes in registers (W / kTile passes). Measured on the Zen 4 VM, one thread,
/// interleaved: backward_reduce of (64,256,14,14) 2.7x, (64,128,28,28) 1.7x, (16,512,14,14)
/// 1.8x faster in memory; moments 1.5x faster for W = 128 and 256 but 0.8x for W = 512; both
/// slower on inputs under a million values (BN1d (256,512): 0.6-0.8x).
inline bool mem_rows(const ClPlan& p, int64_t values, bool moments)
{
  if (p.w <= kTile || values < (int64_t{1} << 20)) { return false; }
  return !moments || p.w <= 256;
}

template <class F>
inline void cl_for_blocks(const ClPlan& p, int64_t c, int tid, int nt, F&& f)
{
  int64_t rb, re;
  split(p.rows, tid, nt, rb, re);
  int64_t nsuper = (re - rb) / p.k;
  int64_t nblocks = (nsuper + p.block - 1) / p.block;
  int64_t tail_first = rb + nsuper * p.k, tail_rows = re - tail_first;
  for (int64_t b = 0; b < nblocks; ++b) {
    int64_t s0 = b * p.block, s1 = std::min(nsuper, s0 + p.block);
    f(rb + s0 * p.k, s1 - s0, p.w);
  }
  if (tail_rows > 0) { f(tail_first, tail_rows, c); }
}

/// cl_for_blocks for second passes: the blocks in chunks of about kTailChunkBytes, the last
/// chunk (with the tail rows) first, each chunk in memory order (see cm_for_planes_tail_first).
template <class F>
inline void cl_for_blocks_tail_first(const ClPlan& p, int64_t c, int64_t elem_bytes, int tid, int nt, F&& f)
{
  int64_t rb, re;
  split(p.rows, tid, nt, rb, re);
  const int64_t nsuper = (re - rb) / p.k;
  const int64_t nblocks = (nsuper + p.block - 1) / p.block;
  const int64_t tail_first = rb + nsuper * p.k, tail_rows = re - tail_first;
  const int64_t per = std::max<int64_t>(1, kTailChunkBytes / std::max<int64_t>(1, p.block * p.w * elem_bytes));
  if (tail_rows > 0 && nblocks == 0) { f(tail_first, tail_rows, c); }
  for (int64_t hi = nblocks; hi > 0;) {
    const int64_t lo = std::max<int64_t>(0, hi - per);
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t s0 = b * p.block, s1 = std::min(nsuper, s0 + p.block);
      f(rb + s0 * p.k, s1 - s0, p.w);
    }
    if (hi == nblocks && tail_rows > 0) { f(tail_first, tail_rows, c); }
    hi = lo;
  }
}

inline bool use_rows(const Geometry& g) { return g.layout == Layout::ChannelsLast || g.l == 1; }

/// Per-channel coefficient arrays replicated to W lanes (lane j <- channel j % C).
template <class A>
inline std::vector<A> replicate(const std::vector<A>& per_channel, int64_t w)
{
  std::vector<A> out(static_cast<size_t>(w));
  const int64_t c = static_cast<int64_t>(per_channel.size());
  // Whole copies (w is a multiple of c): a j % c per lane costs an integer division each,
  // which was most of the set-up time of the small-batch ops (BN1d (256, 512): ~2 us a call).
  for (int64_t j0 = 0; j0 < w; j0 += c) { std::copy(per_channel.begin(), per_channel.end(), out.begin() + j0); }
  return out;
}

// ================================================================================================
// moments
// ================================================================================================
/// Moments of one task (channel c, samples [nb, ne)) exactly, block by block: each block
/// shifted by the running mean and verified (block_moments_shifted), merged with Chan.
template <class T>
Moments task_moments_blockwise(const T* x, const Geometry& g, int64_t c, int64_t nb, int64_t ne)
{
  Moments acc;
  for (int64_t n = nb; n < ne; ++n) {
    const T* plane = x + (n * g.c + c) * g.l;
    for (int64_t i = 0; i < g.l; i += kBlock) {
      const int64_t len = std::min(kBlock, g.l - i);
      double m, m2;
      block_moments_shifted(plane + i, len, acc.n > 0 ? acc.mean : static_cast<double>(ld(plane[i])), m, m2);
      acc.merge(static_cast<double>(len), m, m2);
    }
  }
  return acc;
}

template <class T>
void moments_cm(const T* x, const Geometry& g, std::vector<Moments>& out, int num_threads)
{
  using A = acc_t<T>;
  using Lanes = Stream2<A, kChanLanes>;
  const int64_t C = g.c, L = g.l;
  const int nt0 = cm_threads(g, num_threads);
  std::vector<Moments> part(static_cast<size_t>(nt0) * C);
  parallel(nt0, [&](int tid, int nt) {
    // Per channel, one pass over this thread's planes of it (consecutive n: the range is
    // contiguous), shifted by K = the mean of the first block seen: the planes stream through
    // persistent lanes (no per-plane fold or merge, which dominates small planes). Kept when
    // the mean is within 2 std of K; otherwise that channel's range is redone exactly.
    std::vector<Lanes> acc(C);
    std::vector<A> k(C);
    std::vector<int64_t> nb(C, -1), ne(C, -1);
    cm_for_planes(g, tid, nt, [&](int64_t n, int64_t c, int64_t off) {
      const T* plane = x + off;
      if (nb[c] < 0) {
        const int64_t len0 = std::min(kBlock, L);
        k[c] = lane_sum<A>(len0, [&](int64_t i) { return static_cast<A>(ld(plane[i])); }) / static_cast<A>(len0);
        nb[c] = n;
      }
      ne[c] = n + 1;
      const A kc = k[c];
      Lanes& a = acc[c];
      for (int64_t i = 0; i < L; i += kBlock) {
        const T* b = plane + i;
        a.add(std::min(kBlock, L - i), [&](int64_t j, A& u, A& v) {
          u = ld(b[j]) - kc;
          v = u * u;
        });
      }
    });
    Moments* mine = part.data() + static_cast<size_t>(tid) * C;
    for (int64_t c = 0; c < C; ++c) {
      if (nb[c] < 0) { continue; }
      Lanes& a = acc[c];
      a.flush();
      const double cnt = static_cast<double>((ne[c] - nb[c]) * L), d = a.s1 / cnt;
      const double m2 = a.s2 - a.s1 * d;
      if (near_shift(a.s1, a.s2, cnt)) {
        mine[c] = Moments{cnt, static_cast<double>(k[c]) + d, std::max(0.0, m2)};
      } else {
        mine[c] = task_moments_blockwise(x, g, c, nb[c], ne[c]);
      }
    }
  });
  for (int t = 0; t < nt0; ++t) {
    for (int64_t c = 0; c < C; ++c) { out[c].merge(part[static_cast<size_t>(t) * C + c]); }
  }
}

template <class T>
void moments_rows(const T* x, const Geometry& g, std::vector<Moments>& out, int num_threads)
{
  using A = acc_t<T>;
  const ClPlan p = cl_plan(g, num_threads);
  const bool mem = mem_rows(p, g.n * g.c * g.l, true);
  const int64_t C = g.c;
  // Per thread: lane moments of the super-rows (W lanes) and of the tail rows (C lanes).
  std::vector<double> lane_mean(p.nt * (p.w + C)), lane_m2(p.nt * (p.w + C));
  std::vector<double> cnt_super(p.nt, 0.0), cnt_tail(p.nt, 0.0);
  parallel(p.nt, [&](int tid, int nt) {
    std::vector<A> s(p.w), sd(p.w), sdd(p.w);
    double* mean_s = lane_mean.data() + tid * (p.w + C);
    double* m2_s = lane_m2.data() + tid * (p.w + C);
    double* mean_t = mean_s + p.w;
    double* m2_t = m2_s + p.w;
    std::fill(mean_s, mean_s + p.w + C, 0.0);
    std::fill(m2_s, m2_s + p.w + C, 0.0);
    cl_for_blocks(p, C, tid, nt, [&](int64_t r0, int64_t nrows, int64_t w) {
      const T* xb = x + r0 * C;
      A* ps = s.data();  // per-lane shift: the block mean, or the lanes' running mean
      A* psd = sd.data();
      A* psdd = sdd.data();
      const bool tail = p.k > 1 && w == C;  // with k == 1 there are no tail rows
      double* lm = tail ? mean_t : mean_s;
      double* l2 = tail ? m2_t : m2_s;
      double& na = tail ? cnt_tail[tid] : cnt_super[tid];
      const double nbd = static_cast<double>(nrows);
      auto deviations = [&] {
        std::fill(psd, psd + w, A(0));
        std::fill(psdd, psdd + w, A(0));
        rows_accumulate2(
            nrows, w, psd, psdd,
            [&](int64_t r, int64_t j, A& u, A& v) {
              u = ld(xb[r * w + j]) - ps[j];
              v = u * u;
            },
            mem && w == p.w);
      };
      // One pass shifted by the running lane means when there are some; kept only if every
      // lane's block mean is within 2 std of its shift (see block_moments_shifted).
      bool shifted = na > 0;
      if (shifted) {
        for (int64_t j = 0; j < w; ++j) { ps[j] = static_cast<A>(lm[j]); }
        deviations();
        int64_t far = 0;
#pragma omp simd reduction(+ : far)
        for (int64_t j = 0; j < w; ++j) { far += !near_shift(psd[j], psdd[j], nbd); }
        shifted = far == 0;
      }
      if (!shifted) {  // corrected two-pass: block means, then deviations from them
        std::fill(ps, ps + w, A(0));
        rows_accumulate(
            nrows, w, ps, [&](int64_t r, int64_t j) { return static_cast<A>(ld(xb[r * w + j])); }, mem && w == p.w);
        const A inv = A(1) / static_cast<A>(nrows);
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) { ps[j] *= inv; }
        deviations();
      }
      // Chan merge of this block into the lane moments; the count is the same for every lane.
      const double nb = static_cast<double>(nrows), nab = na + nb;
      const double inv_nb = 1.0 / nb, wb = nb / nab, wab = na * nb / nab;
      for (int64_t j = 0; j < w; ++j) {
        const double sd_j = static_cast<double>(psd[j]);
        const double mb = static_cast<double>(ps[j]) + sd_j * inv_nb;
        const double m2b = std::max(0.0, static_cast<double>(psdd[j]) - sd_j * sd_j * inv_nb);
        const double delta = mb - lm[j];
        lm[j] += delta * wb;
        l2[j] += m2b + delta * delta * wab;
      }
      na = nab;
    });
  });
  // Every lane of one thread's super-rows (and of its tail) has the same count, so every
  // channel's merge takes the same weights: computed once per group of C lanes.
  for (int t = 0; t < p.nt; ++t) {
    const double* mean_s = lane_mean.data() + t * (p.w + C);
    const double* m2_s = lane_m2.data() + t * (p.w + C);
    for (int64_t j0 = 0; j0 < p.w; j0 += C) { merge_uniform(out, cnt_super[t], mean_s + j0, m2_s + j0); }
    merge_uniform(out, cnt_tail[t], mean_s + p.w, m2_s + p.w);
  }
}

// ================================================================================================
// normalize
// ================================================================================================
template <class T, class P, class F>
void normalize_impl(const T* x, const Geometry& g, const double* mean, const double* invstd,
                    const void* weight, const void* bias, F act, T* y, int num_threads)
{
  using A = acc_t<T>;
  const int64_t C = g.c;
  // y = act((x - hi) * a + (bias - lo * a)): x - hi is exact near the mean, and the low part of
  // the mean folds into the constant term (three coefficients per channel).
  const SplitMean<A> sm(mean, C);
  std::vector<A> a, b;
  z_coefficients<A, P>(sm, invstd, weight, bias, a, b);
  if (!use_rows(g)) {
    parallel(cm_threads(g, num_threads), [&](int tid, int nt) {
      const F f = act;
      cm_for_planes_tail_first(g, sizeof(T), tid, nt, [&](int64_t, int64_t c, int64_t off) {
        const A mh = sm.hi[c], ac = a[c], bc = b[c];
        const T* __restrict xp = x + off;
        T* __restrict yp = y + off;
#pragma omp simd
        for (int64_t l = 0; l < g.l; ++l) { yp[l] = st<T>(f.fwd((ld(xp[l]) - mh) * ac + bc)); }
      });
    });
    return;
  }
  const ClPlan p = cl_plan(g, num_threads);
  const std::vector<A> hw = replicate(sm.hi, p.w), aw = replicate(a, p.w), bw = replicate(b, p.w);
  parallel(p.nt, [&](int tid, int nt) {
    const F f = act;
    const A* __restrict ph = hw.data();
    const A* __restrict pa = aw.data();
    const A* __restrict pb = bw.data();
    cl_for_blocks_tail_first(p, C, sizeof(T), tid, nt, [&](int64_t r0, int64_t nrows, int64_t w) {
      for (int64_t i = 0; i < nrows; ++i) {
        const int64_t off = r0 * C + i * w;
        const T* __restrict xr = x + off;
        T* __restrict yr = y + off;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) { yr[j] = st<T>(f.fwd((ld(xr[j]) - ph[j]) * pa[j] + pb[j])); }
      }
    });
  });
}

// ================================================================================================
// backward_reduce (and sum_ft: the same walk with dy only)
// ================================================================================================
/// Per-channel sums of g and of g * (x - mean) in double, g = act'(z) * dy (dy itself for the
/// identity, which never forms z); x may be null (sum of dy only, identity). za, zb: z's
/// coefficients per channel (z_coefficients), read only with an activation.
template <class T, class F = ActIdentity<acc_t<T>>>
void grad_sums(const T* dy, const T* x, const Geometry& g, const SplitMean<acc_t<T>>& sm,
               std::vector<double>& sum_dy, std::vector<double>& sum_dy_xmu, int num_threads, F act = F{},
               const acc_t<T>* za = nullptr, const acc_t<T>* zb = nullptr)
{
  using A = acc_t<T>;
  const int64_t C = g.c;
  if (!use_rows(g)) {
    using Lanes = Stream2<A, kChanLanes>;
    const int nt0 = cm_threads(g, num_threads);
    std::vector<double> part(static_cast<size_t>(nt0) * 2 * C, 0.0);
    parallel(nt0, [&](int tid, int nt) {
      [[maybe_unused]] const F f = act;
      std::vector<Lanes> acc(C);
      cm_for_planes(g, tid, nt, [&](int64_t, int64_t c, int64_t off) {
        const A mh = sm.hi[c], ml = sm.lo[c];
        Lanes& a = acc[c];
        for (int64_t i = 0; i < g.l; i += kBlock) {
          const int64_t len = std::min(kBlock, g.l - i);
          const T* d = dy + off + i;
          if (x) {
            const T* xp = x + off + i;
            if constexpr (F::kIdentity) {
              a.add(len, [&](int64_t l, A& u, A& v) {
                u = ld(d[l]);
                v = u * ((ld(xp[l]) - mh) - ml);
              });
            } else {
              const A ac = za[c], bc = zb[c];
              a.add(len, [&](int64_t l, A& u, A& v) {
                const A xh = ld(xp[l]) - mh;
                u = f.grad(xh * ac + bc, ld(d[l]));
                v = u * (xh - ml);
              });
            }
          } else {
            a.add(len, [&](int64_t l, A& u, A& v) {
              u = ld(d[l]);
              v = 0;
            });
          }
        }
      });
      double* mine = part.data() + static_cast<size_t>(tid) * 2 * C;
      for (int64_t c = 0; c < C; ++c) {
        acc[c].flush();
        mine[c] = acc[c].s1;
        mine[C + c] = acc[c].s2;
      }
    });
    for (int t = 0; t < nt0; ++t) {
      const double* q = part.data() + static_cast<size_t>(t) * 2 * C;
      for (int64_t c = 0; c < C; ++c) {
        sum_dy[c] += q[c];
        sum_dy_xmu[c] += q[C + c];
      }
    }
    return;
  }
  const ClPlan p = cl_plan(g, num_threads);
  const bool mem = mem_rows(p, g.n * g.c * g.l, false);
  const std::vector<A> hw = replicate(sm.hi, p.w), lw = replicate(sm.lo, p.w);
  std::vector<A> aw, bw;  // z's coefficients per lane (with an activation)
  if constexpr (!F::kIdentity) {
    aw = replicate(std::vector<A>(za, za + C), p.w);
    bw = replicate(std::vector<A>(zb, zb + C), p.w);
  }
  std::vector<double> lanes(static_cast<size_t>(p.nt) * 2 * p.w, 0.0);
  parallel(p.nt, [&](int tid, int nt) {
    [[maybe_unused]] const F f = act;
    std::vector<A> b1(p.w), b2(p.w);
    double* l1 = lanes.data() + static_cast<size_t>(tid) * 2 * p.w;
    double* l2 = l1 + p.w;
    const A* ph = hw.data();
    const A* pl = lw.data();
    [[maybe_unused]] const A* pa = aw.data();
    [[maybe_unused]] const A* pb = bw.data();
    cl_for_blocks(p, C, tid, nt, [&](int64_t r0, int64_t nrows, int64_t w) {
      A* q1 = b1.data();
      A* q2 = b2.data();
      std::fill(q1, q1 + w, A(0));
      std::fill(q2, q2 + w, A(0));
      const T* d = dy + r0 * C;
      if (x) {
        const T* xb = x + r0 * C;
        if constexpr (F::kIdentity) {
          rows_accumulate2(nrows, w, q1, q2, [&](int64_t r, int64_t j, A& u, A& v) {
            u = ld(d[r * w + j]);
            v = u * ((ld(xb[r * w + j]) - ph[j]) - pl[j]);
          }, mem && w == p.w);
        } else {
          rows_accumulate2(nrows, w, q1, q2, [&](int64_t r, int64_t j, A& u, A& v) {
            const A xh = ld(xb[r * w + j]) - ph[j];
            u = f.grad(xh * pa[j] + pb[j], ld(d[r * w + j]));
            v = u * (xh - pl[j]);
          }, mem && w == p.w);
        }
      } else {
        rows_accumulate(
            nrows, w, q1, [&](int64_t r, int64_t j) { return static_cast<A>(ld(d[r * w + j])); }, mem && w == p.w);
      }
      for (int64_t j = 0; j < w; ++j) {
        l1[j] += q1[j];
        l2[j] += q2[j];
      }
    });
  });
  for (int t = 0; t < p.nt; ++t) {
    const double* l1 = lanes.data() + static_cast<size_t>(t) * 2 * p.w;
    for (int64_t j0 = 0; j0 < p.w; j0 += C) {
      for (int64_t c = 0; c < C; ++c) {
        sum_dy[c] += l1[j0 + c];
        sum_dy_xmu[c] += l1[p.w + j0 + c];
      }
    }
  }
}

// ================================================================================================
// backward_elemt
// ================================================================================================
template <class T, class P, class F>
void elemt_impl(const T* dy, const T* x, const Geometry& g, const double* mean, const double* invstd,
                const void* weight, const void* bias, F act, const double* sums, double cnt, const double* clamp_m2,
                double eps, T* dx, int num_threads)
{
  using A = acc_t<T>;
  const int64_t C = g.c;
  const SplitMean<A> sm(mean, C);
  // dx = g * k1 - (x - mean) * k2 - k3 = g * k1 - (x - hi) * k2 - (k3 - lo * k2), g = dy for
  // the identity, else act'(z) * dy with z = (x - hi) * a + b as normalize forms it.
  std::vector<A> k1(C), k2(C), k3(C), za, zb;
  const double inv_cnt = cnt > 0 ? 1.0 / cnt : 0.0;
  for (int64_t c = 0; c < C; ++c) {
    double is = invstd[c], w = weight ? ldp<P>(weight, c) : 1.0;
    double mdy = sums[c] * inv_cnt, mdyxmu = sums[C + c] * inv_cnt;
    // Eps mode Clamp (clamp_m2 = the record's m2): a channel with var < eps has
    // invstd = 1/sqrt(eps), which does not depend on x: no variance term.
    if (clamp_m2 != nullptr && clamp_m2[c] * inv_cnt < eps) { mdyxmu = 0.0; }
    double c2 = is * is * is * w * mdyxmu;
    // A global count of 0 (inconsistent with values here, but possible in a direct call):
    // dx = 0, as the CUDA kernel writes.
    const double k = cnt > 0 ? is * w : 0.0;
    k1[c] = static_cast<A>(k);
    k2[c] = static_cast<A>(c2);
    k3[c] = static_cast<A>(k * mdy - static_cast<double>(sm.lo[c]) * c2);
  }
  if constexpr (!F::kIdentity) { z_coefficients<A, P>(sm, invstd, weight, bias, za, zb); }
  if (!use_rows(g)) {
    parallel(cm_threads(g, num_threads), [&](int tid, int nt) {
      [[maybe_unused]] const F f = act;
      cm_for_planes_tail_first(g, 2 * sizeof(T), tid, nt, [&](int64_t, int64_t c, int64_t off) {
        const A mh = sm.hi[c], a1 = k1[c], a2 = k2[c], a3 = k3[c];
        const T* __restrict d = dy + off;
        const T* __restrict xp = x + off;
        T* __restrict o = dx + off;
        if constexpr (F::kIdentity) {
#pragma omp simd
          for (int64_t l = 0; l < g.l; ++l) { o[l] = st<T>(ld(d[l]) * a1 - (ld(xp[l]) - mh) * a2 - a3); }
        } else {
          const A ac = za[c], bc = zb[c];
#pragma omp simd
          for (int64_t l = 0; l < g.l; ++l) {
            const A xh = ld(xp[l]) - mh;
            o[l] = st<T>(f.grad(xh * ac + bc, ld(d[l])) * a1 - xh * a2 - a3);
          }
        }
      });
    });
    return;
  }
  const ClPlan p = cl_plan(g, num_threads);
  const std::vector<A> hw = replicate(sm.hi, p.w), w1 = replicate(k1, p.w), w2 = replicate(k2, p.w),
                       w3 = replicate(k3, p.w);
  std::vector<A> aw, bw;
  if constexpr (!F::kIdentity) {
    aw = replicate(za, p.w);
    bw = replicate(zb, p.w);
  }
  parallel(p.nt, [&](int tid, int nt) {
    [[maybe_unused]] const F f = act;
    const A* __restrict qh = hw.data();
    const A* __restrict q1 = w1.data();
    const A* __restrict q2 = w2.data();
    const A* __restrict q3 = w3.data();
    [[maybe_unused]] const A* __restrict qa = aw.data();
    [[maybe_unused]] const A* __restrict qb = bw.data();
    cl_for_blocks_tail_first(p, C, 2 * sizeof(T), tid, nt, [&](int64_t r0, int64_t nrows, int64_t w) {
      // One row per pass. (Two rows per pass, sharing the coefficient loads, was faster on a
      // Zen 5 and 1.7x slower on a Zen 4 VM: 3.4 vs 2.0 ms for (64,256,14,14), one thread.)
      for (int64_t i = 0; i < nrows; ++i) {
        const int64_t off = r0 * C + i * w;
        const T* __restrict d = dy + off;
        const T* __restrict xr = x + off;
        T* __restrict o = dx + off;
        if constexpr (F::kIdentity) {
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) { o[j] = st<T>(ld(d[j]) * q1[j] - (ld(xr[j]) - qh[j]) * q2[j] - q3[j]); }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            const A xh = ld(xr[j]) - qh[j];
            o[j] = st<T>(f.grad(xh * qa[j] + qb[j], ld(d[j])) * q1[j] - xh * q2[j] - q3[j]);
          }
        }
      }
    });
  });
}

// ---- output memory -----------------------------------------------------------------------------
/// Large outputs (y, dx) are usually fresh allocations that the kernel maps page by page on the
/// first write: 25k faults for 100 MB, more time than the op itself. Advising transparent huge
/// pages on the 2 MiB-aligned interior first makes that 512 times fewer faults (measured: a
/// fresh 103 MB write, 27 ms -> 6 ms). A hint only: memory that is already mapped is unchanged.
/// PYSBN_NO_HUGEPAGE=1 turns it off.
void advise_huge_pages(void* p, int64_t bytes)
{
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr int64_t kHuge = int64_t(1) << 21;
  static const bool disabled = [] {
    const char* v = std::getenv("PYSBN_NO_HUGEPAGE");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  if (disabled || bytes < 2 * kHuge) { return; }
  const auto begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t a = (begin + kHuge - 1) & ~static_cast<uintptr_t>(kHuge - 1);
  const uintptr_t e = (begin + static_cast<uintptr_t>(bytes)) & ~static_cast<uintptr_t>(kHuge - 1);
  if (e > a) { madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE); }  // failure is harmless
#else
  (void)p;
  (void)bytes;
#endif
}

// ---- parameter dtype dispatch ------------------------------------------------------------------
template <class T, class F>
void dispatch_param(DType param_dtype, F&& f)
{
  if constexpr (std::is_same_v<T, f16> || std::is_same_v<T, bf16>) {
    if (param_dtype == DType::Float32) {
      f(float{});
      return;
    }
  }
  f(T{});
}

/// Calls f(T{}, P{}) for the input element type T and the parameter type P.
template <class F>
void dispatch_io(DType dtype, DType param_dtype, F&& f)
{
  dispatch_dtype(dtype, [&](auto tag) {
    dispatch_param<decltype(tag)>(param_dtype, [&](auto ptag) { f(tag, ptag); });
  });
}

/// mean, invstd, m2 and the count of the batch statistics (see core.hpp).
struct StatsParts {
  double count;
  const double* mean;
  const double* m2;
  const double* invstd;
  StatsParts(const double* stats, int64_t c)
      : count(stats[0]), mean(stats + 1), m2(stats + 1 + c), invstd(stats + 1 + 2 * c)
  {
  }
};

}  // namespace

// ================================================================================================
// the back-end primitives (src/backend.hpp); arguments were checked by src/ops.cpp
// ================================================================================================
void sum_ft(const TensorView& x, double* out, const Exec& exec)
{
  const Geometry& g = x.geometry;
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    std::vector<double> s(g.c, 0.0), unused(g.c, 0.0);
    if (detail::numel(g) > 0) {
      const std::vector<double> zero(g.c, 0.0);
      grad_sums<T>(static_cast<const T*>(x.data), nullptr, g, SplitMean<acc_t<T>>(zero.data(), g.c), s, unused,
                   exec.num_threads);
    }
    std::copy(s.begin(), s.end(), out);
  });
}

/// One channel's (count, mean, M2) by two plain passes in double, element by element: the
/// reference for channels whose fast moments are not finite (see moments).
template <class T>
Moments plain_channel_moments(const T* x, const Geometry& g, int64_t c)
{
  const bool rows = g.layout == Layout::ChannelsLast;
  auto value = [&](int64_t i, int64_t j) {
    return static_cast<double>(ld(rows ? x[(i * g.l + j) * g.c + c] : x[(i * g.c + c) * g.l + j]));
  };
  Moments m;
  m.n = static_cast<double>(g.n * g.l);
  if (!(m.n > 0)) { return m; }
  double sum = 0;
  for (int64_t i = 0; i < g.n; ++i) {
    for (int64_t j = 0; j < g.l; ++j) { sum += value(i, j); }
  }
  m.mean = sum / m.n;
  double m2 = 0;
  for (int64_t i = 0; i < g.n; ++i) {
    for (int64_t j = 0; j < g.l; ++j) {
      const double d = value(i, j) - m.mean;
      m2 += d * d;
    }
  }
  m.m2 = m2;
  return m;
}

void moments(const TensorView& x, double* record, const Exec& exec)
{
  const Geometry& g = x.geometry;
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    std::vector<Moments> m(g.c);
    if (detail::numel(g) > 0) {
      if (use_rows(g)) {
        moments_rows<T>(static_cast<const T*>(x.data), g, m, exec.num_threads);
      } else {
        moments_cm<T>(static_cast<const T*>(x.data), g, m, exec.num_threads);
      }
    }
    // A channel holding +-inf or NaN: the shifted sums above give NaN where a plain sum gives
    // +-inf (inf - inf in a shift or a merge). Recompute those channels (only those; finite
    // input never takes this branch) in double as nn.BatchNorm does: mean = sum / count,
    // which is +-inf or NaN, and M2 from the two-pass sum (NaN around a non-finite mean).
    for (int64_t c = 0; c < g.c; ++c) {
      if (!(std::isfinite(m[c].mean) && std::isfinite(m[c].m2))) {
        m[c] = plain_channel_moments<T>(static_cast<const T*>(x.data), g, c);
      }
    }
    record[0] = static_cast<double>(g.n * g.l);
    for (int64_t c = 0; c < g.c; ++c) {
      record[1 + c] = m[c].mean;
      record[1 + g.c + c] = m[c].m2;
    }
  });
}

void merge_moments(int64_t k, int64_t c, const double* records, double* record, const Exec&)
{
  const int64_t stride = record_size(c);
  double total = 0;
  for (int64_t i = 0; i < k; ++i) {
    PYSBN_EXPECTS(records[i * stride] >= 0,
                  "merge_moments: records[" + std::to_string(i) + "] has a negative count");
    total += records[i * stride];
  }
  std::vector<Moments> m(c);
  for (int64_t i = 0; i < k; ++i) {
    const double* r = records + i * stride;
    for (int64_t j = 0; j < c; ++j) { m[j].merge(r[0], r[1 + j], r[1 + c + j]); }
  }
  record[0] = total;
  for (int64_t j = 0; j < c; ++j) {
    record[1 + j] = m[j].mean;
    record[1 + c + j] = m[j].m2;
  }
}

void finalize(int64_t c, const double* record, double eps, EpsMode mode, double* stats, const Exec&)
{
  if (record != stats) { std::copy(record, record + record_size(c), stats); }
  const double n = stats[0];
  double* invstd = stats + 1 + 2 * c;
  if (!(n > 0)) {  // no values: mean = 0 (written by moments / the merge), var = 0 in both modes
    std::fill(invstd, invstd + c, 1.0 / std::sqrt(eps));
    return;
  }
  // Branch-free loops (they vectorise): var = m2 * (1 / n).
  const double* m2 = stats + 1 + c;
  const double inv_n = 1.0 / n;
  if (mode == EpsMode::Plus) {
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) { invstd[j] = 1.0 / std::sqrt(m2[j] * inv_n + eps); }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) { invstd[j] = 1.0 / std::sqrt(std::max(m2[j] * inv_n, eps)); }
  }
}

void update_running(int64_t c, const double* stats, const RunningStats& r, const Exec&)
{
  int64_t tracked = 0;
  if (r.num_batches_tracked != nullptr) { tracked = ++*r.num_batches_tracked; }
  const double n = stats[0];
  if (r.mean == nullptr || !(n > 0)) { return; }
  const double f = r.cumulative ? 1.0 / static_cast<double>(tracked) : r.momentum;
  dispatch_dtype(r.dtype, [&](auto tag) {
    using P = decltype(tag);
    for (int64_t j = 0; j < c; ++j) {
      stp<P>(r.mean, j, (1 - f) * ldp<P>(r.mean, j) + f * stats[1 + j]);
      stp<P>(r.var, j, (1 - f) * ldp<P>(r.var, j) + f * (stats[1 + c + j] / (n - 1)));
    }
  });
}

void normalize(const TensorView& x, const double* stats, const Affine& affine, const Act& act, void* y,
               const Exec& exec)
{
  const Geometry& g = x.geometry;
  const StatsParts s(stats, g.c);
  advise_huge_pages(y, detail::numel(g) * dtype_size(x.dtype));
  dispatch_io(x.dtype, affine.dtype, [&](auto tag, auto ptag) {
    using T = decltype(tag);
    dispatch_act<acc_t<T>>(act, [&](auto f) {
      normalize_impl<T, decltype(ptag)>(static_cast<const T*>(x.data), g, s.mean, s.invstd, affine.weight,
                                        affine.bias, f, static_cast<T*>(y), exec.num_threads);
    });
  });
}

void backward_reduce(const TensorView& x, const void* dy, const double* stats, const Affine& affine, const Act& act,
                     double* sums, const AffineGrad& grad, const Exec& exec)
{
  const Geometry& g = x.geometry;
  const int64_t c = g.c;
  dispatch_io(x.dtype, affine.dtype, [&](auto tag, auto ptag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    std::vector<double> s1(c, 0.0), s2(c, 0.0);
    if (detail::numel(g) > 0) {
      const SplitMean<A> sm(stats + 1, c);
      const auto* xp = static_cast<const T*>(x.data);
      const auto* dyp = static_cast<const T*>(dy);
      dispatch_act<A>(act, [&](auto f) {
        using F = decltype(f);
        if constexpr (F::kIdentity) {
          grad_sums<T>(dyp, xp, g, sm, s1, s2, exec.num_threads);
        } else {  // z's coefficients, as normalize forms them
          std::vector<A> za, zb;
          z_coefficients<A, decltype(ptag)>(sm, stats + 1 + 2 * c, affine.weight, affine.bias, za, zb);
          grad_sums<T>(dyp, xp, g, sm, s1, s2, exec.num_threads, f, za.data(), zb.data());
        }
      });
    }
    std::copy(s1.begin(), s1.end(), sums);
    std::copy(s2.begin(), s2.end(), sums + c);
  });
  if (grad.weight == nullptr && grad.bias == nullptr) { return; }
  const double* invstd = grad.weight != nullptr ? stats + 1 + 2 * c : nullptr;  // stats may be null otherwise
  dispatch_dtype(grad.dtype, [&](auto tag) {
    using P = decltype(tag);
    for (int64_t j = 0; j < c; ++j) {
      if (grad.weight != nullptr) { stp<P>(grad.weight, j, sums[c + j] * invstd[j]); }
      if (grad.bias != nullptr) { stp<P>(grad.bias, j, sums[j]); }
    }
  });
}

void backward_elemt(const TensorView& x, const void* dy, const double* stats, double eps, EpsMode mode,
                    const Affine& affine, const Act& act, const double* sums, void* dx, const Exec& exec)
{
  const Geometry& g = x.geometry;
  const StatsParts s(stats, g.c);
  advise_huge_pages(dx, detail::numel(g) * dtype_size(x.dtype));
  dispatch_io(x.dtype, affine.dtype, [&](auto tag, auto ptag) {
    using T = decltype(tag);
    dispatch_act<acc_t<T>>(act, [&](auto f) {
      elemt_impl<T, decltype(ptag)>(static_cast<const T*>(dy), static_cast<const T*>(x.data), g, s.mean, s.invstd,
                                    affine.weight, affine.bias, f, sums, s.count,
                                    mode == EpsMode::Clamp ? s.m2 : nullptr, eps, static_cast<T*>(dx),
                                    exec.num_threads);
    });
  });
}

}  // namespace pysbn::cpu
