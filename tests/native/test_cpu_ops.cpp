// SPDX-License-Identifier: MIT
// Tests of every pysbn op on the CPU (Exec{Device::CPU, threads}) against a reference written
// here: plain loops in long double over the dequantised inputs (two-pass moments), never the
// kernels' own output and never hard-coded numbers. Covers both layouts, the four dtypes
// (float16 / bfloat16 held as bit patterns, with conversions written below), mixed-precision
// parameters, odd and empty shapes, 1-3 threads, large offsets, both EpsModes (including the
// dropped variance term of clamped channels in backward_elemt), the running stats (momentum and
// cumulative with num_batches_tracked), the composites (batch_norm_forward with and without a
// given record, batch_norm_backward), a two-replica sync chain against one batch norm over the
// whole batch, and the argument errors (named, and nothing written). Statistics buffers are
// float64 (the contract); their tolerances follow the accumulation type inside the kernels.
#include <gtest/gtest.h>
#include <pysbn/core.hpp>

#include "act_reference.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <iomanip>
#include <limits>
#include <ostream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using pysbn::Act;
using pysbn::Activation;
using pysbn::Affine;
using pysbn::AffineGrad;
using pysbn::Device;
using pysbn::DType;
using pysbn::EpsMode;
using pysbn::Exec;
using pysbn::Geometry;
using pysbn::Layout;
using pysbn::RunningStats;
using pysbn::TensorView;
using ld = long double;

constexpr std::array<int, 3> kThreads = {1, 2, 3};
constexpr double kTiny = std::numeric_limits<double>::min();

// ---- float16 / bfloat16 <-> float, round to nearest even ---------------------------------------

uint32_t bits_of(float f)
{
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

float float_of(uint32_t u)
{
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

uint16_t float_to_half(float f)
{
  const uint32_t x = bits_of(f);
  const auto sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) { return sign | 0x7e00u; }   // NaN
  if (ax >= 0x477ff000u) { return sign | 0x7c00u; }  // >= 65520 (past max + half ulp): inf
  if (ax < 0x38800000u) {                            // below 2^-14: subnormal (or zero)
    // Scaling by 2^24 is exact; nearbyint rounds to nearest even in the default mode. A result
    // of 1024 is the bit pattern of the smallest normal, which is the right answer.
    const float units = std::nearbyint(float_of(ax) * 16777216.0f);
    return sign | static_cast<uint16_t>(units);
  }
  ax += 0x0fffu + ((ax >> 13) & 1u);  // round to nearest, ties to even (carry may bump exponent)
  ax -= 112u << 23;                   // rebias the exponent, 127 -> 15
  return sign | static_cast<uint16_t>(ax >> 13);
}

float half_to_float(uint16_t h)
{
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  float v;
  if (exp == 0x1f) {
    v = mant ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant), -24);
  } else {
    v = std::ldexp(static_cast<float>(mant | 0x400u), static_cast<int>(exp) - 25);
  }
  return (h & 0x8000u) ? -v : v;
}

/// half_to_float of every bit pattern, for the hot read path of the tests.
float half_to_float_fast(uint16_t h)
{
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t i = 0; i < 65536u; ++i) { t[i] = half_to_float(static_cast<uint16_t>(i)); }
    return t;
  }();
  return table[h];
}

uint16_t float_to_bf16(float f)
{
  uint32_t x = bits_of(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) { return static_cast<uint16_t>((x >> 16) | 0x0040u); }
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

float bf16_to_float(uint16_t b) { return float_of(static_cast<uint32_t>(b) << 16); }

// ---- typed host buffers -------------------------------------------------------------------------

std::string dtype_str(DType d)
{
  switch (d) {
    case DType::Float32: return "f32";
    case DType::Float64: return "f64";
    case DType::Float16: return "f16";
    case DType::BFloat16: return "bf16";
  }
  return "bad";
}

/// A dense buffer of `n` elements of `dtype`, read and written as double. Storage is doubles so
/// every element type is aligned, and it holds at least one element so data() is never null.
class Buf {
 public:
  Buf() = default;
  Buf(DType t, int64_t n)
    : t_(t), n_(n),
      store_(static_cast<size_t>((std::max<int64_t>(n, 1) * pysbn::dtype_size(t) + 7) / 8), 0.0)
  {
  }

  DType dtype() const { return t_; }
  int64_t size() const { return n_; }
  void* data() { return store_.data(); }
  const void* data() const { return store_.data(); }
  void* ptr(int64_t i) { return bytes() + i * pysbn::dtype_size(t_); }

  double get(int64_t i) const
  {
    const unsigned char* p = bytes() + i * pysbn::dtype_size(t_);
    switch (t_) {
      case DType::Float64: { double v; std::memcpy(&v, p, 8); return v; }
      case DType::Float32: { float v; std::memcpy(&v, p, 4); return v; }
      case DType::Float16: { uint16_t v; std::memcpy(&v, p, 2); return half_to_float_fast(v); }
      case DType::BFloat16: { uint16_t v; std::memcpy(&v, p, 2); return bf16_to_float(v); }
    }
    return std::nan("");
  }

  /// Stores v rounded to the element type (half types via float: the double rounding only
  /// shapes the test data, whose dequantised values are what the reference reads).
  void set(int64_t i, double v)
  {
    unsigned char* p = bytes() + i * pysbn::dtype_size(t_);
    switch (t_) {
      case DType::Float64: std::memcpy(p, &v, 8); break;
      case DType::Float32: { const auto f = static_cast<float>(v); std::memcpy(p, &f, 4); break; }
      case DType::Float16: {
        const uint16_t h = float_to_half(static_cast<float>(v));
        std::memcpy(p, &h, 2);
        break;
      }
      case DType::BFloat16: {
        const uint16_t h = float_to_bf16(static_cast<float>(v));
        std::memcpy(p, &h, 2);
        break;
      }
    }
  }

  void fill(double v)
  {
    for (int64_t i = 0; i < n_; ++i) { set(i, v); }
  }
  /// Outputs start as NaN so an element the op forgot to write shows up.
  void poison() { fill(std::numeric_limits<double>::quiet_NaN()); }

  std::vector<double> values() const
  {
    std::vector<double> v(static_cast<size_t>(n_));
    for (int64_t i = 0; i < n_; ++i) { v[static_cast<size_t>(i)] = get(i); }
    return v;
  }

 private:
  unsigned char* bytes() { return reinterpret_cast<unsigned char*>(store_.data()); }
  const unsigned char* bytes() const { return reinterpret_cast<const unsigned char*>(store_.data()); }

  DType t_ = DType::Float32;
  int64_t n_ = 0;
  std::vector<double> store_;
};


// ---- tolerances ---------------------------------------------------------------------------------

/// Relative tolerance of a statistic accumulated in `acc`.
double rtol_acc(DType acc) { return acc == DType::Float64 ? 1e-12 : 1e-5; }

/// Absolute floor of a value rounded to `t`: float16 goes subnormal below 2^-14 (spacing 2^-24).
double atol_out(DType t) { return t == DType::Float16 ? 0x1p-24 : kTiny; }

/// Relative tolerance of a value rounded to `t` (elementwise outputs, parameters).
double rtol_out(DType t)
{
  switch (t) {
    case DType::Float64: return 1e-12;
    case DType::Float32: return 1e-5;
    case DType::Float16: return 2e-3;
    case DType::BFloat16: return 1e-2;
  }
  return 0.0;
}

double unit_roundoff(DType t)
{
  switch (t) {
    case DType::Float64: return 0x1p-53;
    case DType::Float32: return 0x1p-24;
    case DType::Float16: return 0x1p-11;
    case DType::BFloat16: return 0x1p-8;
  }
  return 0.0;
}

/// Spacing of `t` at magnitude r (the ulp of a value rounded to t).
double ulp_of(DType t, double r)
{
  r = std::fabs(r);
  switch (t) {
    case DType::Float16: return r < 0x1p-14 ? 0x1p-24 : std::ldexp(1.0, std::ilogb(r) - 10);
    case DType::BFloat16: return r < 0x1p-126 ? 0x1p-133 : std::ldexp(1.0, std::ilogb(r) - 7);
    case DType::Float32: return r < 0x1p-126 ? 0x1p-149 : std::ldexp(1.0, std::ilogb(r) - 23);
    case DType::Float64: return r < 0x1p-1022 ? 0x1p-1074 : std::ldexp(1.0, std::ilogb(r) - 52);
  }
  return 0.0;
}

/// Tolerance of an elementwise output `ref` stored as `t`, computed in the accumulation type
/// from terms of total magnitude `scale`. float16/bfloat16: half an ulp of t (the output is
/// rounded once, to nearest) plus float-level error of the terms; float32/float64: rtol_out.
double tol_out(DType t, double ref, double scale)
{
  const double r = std::fabs(ref);
  if (t == DType::Float16 || t == DType::BFloat16) { return 0.5 * ulp_of(t, r) + 1e-5 * (r + scale); }
  return rtol_out(t) * (r + scale) + kTiny;
}

/// Checks got[i] against ref[i] within tol[i]; reports the first few misses (NaN is a miss).
/// Bit-for-bit equality (NaNs equal when their bits are); reports the first difference.
void expect_same_bits(const std::string& what, const std::vector<double>& got, const std::vector<double>& want)
{
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(double)) != 0) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", expected exactly " << want[i];
      return;
    }
  }
}

void expect_near_all(const std::string& what, const std::vector<double>& got,
                     const std::vector<double>& ref, const std::vector<double>& tol)
{
  ASSERT_EQ(got.size(), ref.size()) << what;
  ASSERT_EQ(got.size(), tol.size()) << what;
  size_t bad = 0;
  std::ostringstream os;
  os << std::setprecision(17);
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(std::fabs(got[i] - ref[i]) <= tol[i])) {
      if (bad < 6) {
        os << "\n  [" << i << "] got " << got[i] << " want " << ref[i] << " (|diff| "
           << std::fabs(got[i] - ref[i]) << " > tol " << tol[i] << ")";
      }
      ++bad;
    }
  }
  if (bad) { ADD_FAILURE() << what << ": " << bad << " of " << got.size() << " outside tolerance" << os.str(); }
}

// ---- reference ----------------------------------------------------------------------------------

int64_t offset_of(const Geometry& g, int64_t n, int64_t c, int64_t l)
{
  return g.layout == Layout::ChannelMajor ? (n * g.c + c) * g.l + l : (n * g.l + l) * g.c + c;
}

int64_t numel(const Geometry& g) { return g.n * g.c * g.l; }

/// Calls f(c, flat offset) for every element, in canonical (n, c, l) order.
template <class F>
void for_each_element(const Geometry& g, F&& f)
{
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t c = 0; c < g.c; ++c) {
      for (int64_t l = 0; l < g.l; ++l) { f(c, offset_of(g, n, c, l)); }
    }
  }
}

/// Two-pass per-channel moments of x in long double, plus the sum of |x| for sum tolerances.
struct RefStats {
  int64_t count = 0;
  std::vector<ld> sum, sum_abs, mean, m2;
};

RefStats ref_stats(const Buf& x, const Geometry& g)
{
  RefStats r;
  const auto C = static_cast<size_t>(g.c);
  r.count = g.n * g.l;
  r.sum.assign(C, 0.0L);
  r.sum_abs.assign(C, 0.0L);
  r.mean.assign(C, 0.0L);
  r.m2.assign(C, 0.0L);
  for_each_element(g, [&](int64_t c, int64_t i) {
    const ld v = x.get(i);
    r.sum[static_cast<size_t>(c)] += v;
    r.sum_abs[static_cast<size_t>(c)] += std::fabs(v);
  });
  if (r.count == 0) { return r; }
  for (size_t c = 0; c < C; ++c) { r.mean[c] = r.sum[c] / static_cast<ld>(r.count); }
  for_each_element(g, [&](int64_t c, int64_t i) {
    const ld d = static_cast<ld>(x.get(i)) - r.mean[static_cast<size_t>(c)];
    r.m2[static_cast<size_t>(c)] += d * d;
  });
  return r;
}

/// Tolerances of a moments record [count, mean, m2] in `acc` against `r`.
std::vector<double> moments_tol(const RefStats& r, DType acc)
{
  const double rt = rtol_acc(acc), u = unit_roundoff(acc);
  const size_t C = r.mean.size();
  std::vector<double> tol(2 * C + 1, 0.0);
  for (size_t c = 0; c < C; ++c) {
    const double mean = static_cast<double>(std::fabs(r.mean[c]));
    const double sd = r.count ? std::sqrt(static_cast<double>(r.m2[c]) / static_cast<double>(r.count)) : 0.0;
    tol[1 + c] = rt * (mean + sd) + kTiny;
    // The floor: in acc precision a deviation from the mean is only known to about u * |mean|,
    // which moves m2 = sum d^2 by up to 2 u |mean| sum |d| <= 2 u |mean| sqrt(count * m2).
    const double e = u * mean, cnt = static_cast<double>(r.count);
    tol[1 + C + c] = rt * static_cast<double>(r.m2[c]) + 4.0 * e * std::sqrt(cnt * static_cast<double>(r.m2[c])) +
                     4.0 * cnt * e * e + kTiny;
  }
  return tol;
}

std::vector<double> moments_ref(const RefStats& r)
{
  const size_t C = r.mean.size();
  std::vector<double> v(2 * C + 1);
  v[0] = static_cast<double>(r.count);
  for (size_t c = 0; c < C; ++c) {
    v[1 + c] = static_cast<double>(r.mean[c]);
    v[1 + C + c] = static_cast<double>(r.m2[c]);
  }
  return v;
}

/// x[n, c, l] = mu[c] + sigma[c] * N(0, 1), rounded to dtype, filled in canonical order so the
/// logical tensor does not depend on the layout.
Buf random_input(DType t, const Geometry& g, std::mt19937& rng, const std::vector<double>& mu,
                 const std::vector<double>& sigma)
{
  Buf x(t, numel(g));
  std::normal_distribution<double> nd(0.0, 1.0);
  for_each_element(g, [&](int64_t c, int64_t i) {
    x.set(i, mu[static_cast<size_t>(c)] + sigma[static_cast<size_t>(c)] * nd(rng));
  });
  return x;
}

Buf random_uniform(DType t, int64_t n, std::mt19937& rng, double lo, double hi, bool random_sign = false)
{
  Buf b(t, n);
  std::uniform_real_distribution<double> ud(lo, hi);
  std::bernoulli_distribution coin(0.5);
  for (int64_t i = 0; i < n; ++i) {
    const double v = ud(rng);
    b.set(i, random_sign && coin(rng) ? -v : v);
  }
  return b;
}


/// Statistics buffers (moments records, mean, invstd, grad sums, count) are float64 for every
/// input dtype. Outputs start as NaN so an element the op forgot to write shows up.
std::vector<double> nans(int64_t n)
{
  return std::vector<double>(static_cast<size_t>(n), std::numeric_limits<double>::quiet_NaN());
}

/// The CPU with `t` OpenMP threads.
Exec cpu_exec(int t) { return Exec{Device::CPU, t, nullptr}; }

/// The batch statistics [count, mean[C], m2[C], invstd[C]] (see core.hpp) from their parts.
std::vector<double> make_stats(double count, const std::vector<double>& mean, const std::vector<double>& m2,
                               const std::vector<double>& invstd)
{
  std::vector<double> s{count};
  s.insert(s.end(), mean.begin(), mean.end());
  s.insert(s.end(), m2.begin(), m2.end());
  s.insert(s.end(), invstd.begin(), invstd.end());
  return s;
}

/// Slices of a float64 buffer: [begin, begin + n).
std::vector<double> slice(const std::vector<double>& v, int64_t begin, int64_t n)
{
  return std::vector<double>(v.begin() + begin, v.begin() + begin + n);
}

/// mean[C] and invstd[C] of the batch statistics.
std::vector<double> stats_mean(const std::vector<double>& s, int64_t c) { return slice(s, 1, c); }
std::vector<double> stats_invstd(const std::vector<double>& s, int64_t c) { return slice(s, 1 + 2 * c, c); }

// ---- the op cases -------------------------------------------------------------------------------

struct OpCase {
  DType dtype;
  DType param;
  Layout layout;
  int64_t n, c, l;
};

std::ostream& operator<<(std::ostream& os, const OpCase& p)
{
  return os << dtype_str(p.dtype) << "/param " << dtype_str(p.param) << "/"
            << (p.layout == Layout::ChannelMajor ? "ChannelMajor" : "ChannelsLast") << " (N=" << p.n
            << ", C=" << p.c << ", L=" << p.l << ")";
}

std::string op_case_name(const ::testing::TestParamInfo<OpCase>& info)
{
  const OpCase& p = info.param;
  return dtype_str(p.dtype) + "_p" + dtype_str(p.param) +
         (p.layout == Layout::ChannelMajor ? "_CM_" : "_CL_") + std::to_string(p.n) + "x" +
         std::to_string(p.c) + "x" + std::to_string(p.l);
}

/// The dtype / param_dtype pairs the contract allows for elementwise ops.
std::vector<std::array<DType, 2>> all_combos()
{
  return {{DType::Float32, DType::Float32},  {DType::Float64, DType::Float64},
          {DType::Float16, DType::Float16},  {DType::Float16, DType::Float32},
          {DType::BFloat16, DType::BFloat16}, {DType::BFloat16, DType::Float32}};
}

std::vector<OpCase> op_cases()
{
  // Odd sizes on purpose: singletons, C = 1, L = 1, C = 4097 with a small N*L, sizes off the
  // multiples of 8/16; every dtype / param_dtype pair.
  const std::vector<std::array<int64_t, 3>> small = {{2, 3, 5},  {1, 1, 1},    {1, 6, 1},  {7, 1, 13},
                                                     {2, 4097, 3}, {6, 17, 23}, {4, 9, 130}, {13, 24, 1}};
  // Big enough (N*C*L >= 32768) for the kernels to use several threads: N*L = 32800,
  // channel-major with L above one 4096-value statistics block, channel-major with L == 1,
  // C = 4097. The param dtype does not meet the threading, so fewer pairs keep the run short.
  const std::vector<std::array<int64_t, 3>> big = {{32, 3, 1025}, {3, 2, 9001}, {3, 40, 350}, {2500, 17, 1}, {5, 4097, 2}};
  std::vector<OpCase> out;
  for (const auto& dp : all_combos()) {
    const bool big_too = dp[0] == DType::Float32 || dp[0] == DType::Float64 ||
                         (dp[0] == DType::Float16 && dp[1] == DType::Float32) ||
                         (dp[0] == DType::BFloat16 && dp[1] == DType::BFloat16);
    for (Layout lay : {Layout::ChannelMajor, Layout::ChannelsLast}) {
      for (const auto& s : small) { out.push_back({dp[0], dp[1], lay, s[0], s[1], s[2]}); }
      if (!big_too) { continue; }
      for (const auto& s : big) { out.push_back({dp[0], dp[1], lay, s[0], s[1], s[2]}); }
      // Over 1 MiB per thread: the second passes (normalize, backward_elemt) visit their range
      // in several chunks, the last one first.
      if (dp[0] == DType::Float32 && dp[1] == DType::Float32) { out.push_back({dp[0], dp[1], lay, 8, 16, 4100}); }
    }
  }
  return out;
}

uint32_t seed_of(const OpCase& p)
{
  return static_cast<uint32_t>(1000003u * static_cast<uint32_t>(p.n) + 10007u * static_cast<uint32_t>(p.c) +
                               101u * static_cast<uint32_t>(p.l) + 17u * static_cast<uint32_t>(p.dtype) +
                               5u * static_cast<uint32_t>(p.param) + static_cast<uint32_t>(p.layout) + 12345u);
}

class CpuOps : public ::testing::TestWithParam<OpCase> {
 protected:
  void SetUp() override
  {
    const OpCase& p = GetParam();
    g_ = Geometry{p.n, p.c, p.l, p.layout};
    acc_ = pysbn::acc_dtype(p.dtype);
    rng_.seed(seed_of(p));
    std::uniform_real_distribution<double> mu(-3.0, 3.0), sd(0.25, 2.0);
    std::vector<double> mus(static_cast<size_t>(p.c)), sds(static_cast<size_t>(p.c));
    for (int64_t c = 0; c < p.c; ++c) {
      mus[static_cast<size_t>(c)] = mu(rng_);
      sds[static_cast<size_t>(c)] = sd(rng_);
    }
    x_ = random_input(p.dtype, g_, rng_, mus, sds);
    dy_ = random_input(p.dtype, g_, rng_, std::vector<double>(mus.size(), 0.0), std::vector<double>(mus.size(), 1.0));
    ref_ = ref_stats(x_, g_);
    // mean and invstd = 1/sqrt(var + 1e-5) from the reference: inputs of the elementwise ops,
    // so those are tested independently of moments/finalize.
    mean_.resize(static_cast<size_t>(p.c));
    invstd_.resize(static_cast<size_t>(p.c));
    m2_.resize(static_cast<size_t>(p.c));
    for (size_t c = 0; c < mean_.size(); ++c) {
      mean_[c] = static_cast<double>(ref_.mean[c]);
      m2_[c] = static_cast<double>(ref_.m2[c]);
      const ld var = ref_.count ? ref_.m2[c] / static_cast<ld>(ref_.count) : 0.0L;
      invstd_[c] = static_cast<double>(1.0L / std::sqrt(var + 1e-5L));
    }
    // The batch statistics of those. m2 is NaN: normalize, backward_reduce and backward_elemt
    // in eps mode Plus read only the count, the mean and invstd (the contract).
    stats_ = make_stats(static_cast<double>(ref_.count), mean_, nans(p.c), invstd_);
  }

  /// x as the ops see it.
  TensorView xv() const { return TensorView{x_.data(), GetParam().dtype, g_}; }

  Geometry g_;
  DType acc_ = DType::Float32;  // the accumulation type inside the kernels: sets the tolerances
  std::mt19937 rng_;
  Buf x_, dy_;
  RefStats ref_;
  std::vector<double> mean_, invstd_, m2_, stats_;
};

TEST_P(CpuOps, SumFtMatchesDoubleSum)
{
  const OpCase& p = GetParam();
  std::vector<double> ref(static_cast<size_t>(p.c)), tol(ref.size());
  for (size_t c = 0; c < ref.size(); ++c) {
    ref[c] = static_cast<double>(ref_.sum[c]);
    tol[c] = rtol_acc(acc_) * static_cast<double>(ref_.sum_abs[c]) + kTiny;
  }
  std::vector<double> first;
  for (int t : kThreads) {
    SCOPED_TRACE("num_threads=" + std::to_string(t));
    std::vector<double> out = nans(p.c);
    pysbn::sum_ft(xv(), out.data(), cpu_exec(t));
    expect_near_all("sum_ft", out, ref, tol);
    if (first.empty()) { first = out; } else { expect_near_all("sum_ft vs 1 thread", out, first, tol); }
  }
}

TEST_P(CpuOps, MomentsMatchTwoPassReference)
{
  const OpCase& p = GetParam();
  const std::vector<double> ref = moments_ref(ref_), tol = moments_tol(ref_, acc_);
  std::vector<double> first;
  for (int t : kThreads) {
    SCOPED_TRACE("num_threads=" + std::to_string(t));
    std::vector<double> st = nans(pysbn::record_size(p.c));
    pysbn::moments(xv(), st.data(), cpu_exec(t));
    EXPECT_EQ(st[0], static_cast<double>(p.n * p.l)) << "count";
    expect_near_all("moments", st, ref, tol);
    if (first.empty()) { first = st; } else { expect_near_all("moments vs 1 thread", st, first, tol); }
  }
}

TEST_P(CpuOps, NormalizeWithAndWithoutAffine)
{
  const OpCase& p = GetParam();
  const Buf w = random_uniform(p.param, p.c, rng_, 0.5, 1.5, true);
  const Buf b = random_uniform(p.param, p.c, rng_, -1.0, 1.0);
  for (int variant = 0; variant < 4; ++variant) {
    const bool has_w = (variant & 1) == 0, has_b = (variant & 2) == 0;
    SCOPED_TRACE(std::string("weight ") + (has_w ? "set" : "null") + ", bias " + (has_b ? "set" : "null"));
    std::vector<double> ref(static_cast<size_t>(numel(g_))), tol(ref.size());
    for_each_element(g_, [&](int64_t c, int64_t i) {
      const auto cc = static_cast<size_t>(c);
      const ld xm = static_cast<ld>(x_.get(i)) - mean_[cc];
      const ld scale = static_cast<ld>(invstd_[cc]) * (has_w ? w.get(c) : 1.0);
      const ld bias = has_b ? b.get(c) : 0.0;
      const ld y = xm * scale + bias;
      ref[static_cast<size_t>(i)] = static_cast<double>(y);
      tol[static_cast<size_t>(i)] =
        tol_out(p.dtype, static_cast<double>(y), static_cast<double>(std::fabs(xm * scale) + std::fabs(bias)));
    });
    std::vector<double> first;
    for (int t : kThreads) {
      SCOPED_TRACE("num_threads=" + std::to_string(t));
      Buf y(p.dtype, numel(g_));
      y.poison();
      pysbn::normalize(xv(), stats_.data(), Affine{has_w ? w.data() : nullptr, has_b ? b.data() : nullptr, p.param},
                       Act{}, y.data(), cpu_exec(t));
      expect_near_all("normalize", y.values(), ref, tol);
      if (first.empty()) { first = y.values(); } else { expect_near_all("normalize vs 1 thread", y.values(), first, tol); }
    }
  }
}

TEST_P(CpuOps, BackwardReduceSumsAndParamGrads)
{
  const OpCase& p = GetParam();
  const auto C = static_cast<size_t>(p.c);
  std::vector<ld> sdy(C, 0.0L), sdx(C, 0.0L), adx(C, 0.0L), ady(C, 0.0L);
  for_each_element(g_, [&](int64_t c, int64_t i) {
    const auto cc = static_cast<size_t>(c);
    const ld d = dy_.get(i), xm = static_cast<ld>(x_.get(i)) - mean_[cc];
    sdy[cc] += d;
    ady[cc] += std::fabs(d);
    sdx[cc] += d * xm;
    adx[cc] += std::fabs(d * xm);
  });
  const double ra = rtol_acc(acc_);
  std::vector<double> ref(2 * C), tol(2 * C), gw_ref(C), gw_tol(C), gb_ref(C), gb_tol(C);
  for (size_t c = 0; c < C; ++c) {
    ref[c] = static_cast<double>(sdy[c]);
    tol[c] = ra * static_cast<double>(ady[c]) + kTiny;
    ref[C + c] = static_cast<double>(sdx[c]);
    tol[C + c] = ra * static_cast<double>(adx[c]) + kTiny;
    gw_ref[c] = static_cast<double>(sdx[c] * static_cast<ld>(invstd_[c]));
    gw_tol[c] = tol[C + c] * invstd_[c] + tol_out(p.param, gw_ref[c], 0.0);
    gb_ref[c] = ref[c];
    gb_tol[c] = tol[c] + tol_out(p.param, gb_ref[c], 0.0);
  }
  for (int variant = 0; variant < 4; ++variant) {
    const bool has_gw = (variant & 1) == 0, has_gb = (variant & 2) == 0;
    SCOPED_TRACE(std::string("grad_weight ") + (has_gw ? "set" : "null") + ", grad_bias " + (has_gb ? "set" : "null"));
    std::vector<double> first;
    for (int t : kThreads) {
      SCOPED_TRACE("num_threads=" + std::to_string(t));
      std::vector<double> sums = nans(pysbn::sums_size(p.c));
      Buf gw(p.param, p.c), gb(p.param, p.c);
      gw.poison();
      gb.poison();
      pysbn::backward_reduce(xv(), dy_.data(), stats_.data(), Affine{}, Act{}, sums.data(),
                             AffineGrad{has_gw ? gw.data() : nullptr, has_gb ? gb.data() : nullptr, p.param},
                             cpu_exec(t));
      expect_near_all("backward_reduce sums", sums, ref, tol);
      if (has_gw) { expect_near_all("grad_weight", gw.values(), gw_ref, gw_tol); }
      if (has_gb) { expect_near_all("grad_bias", gb.values(), gb_ref, gb_tol); }
      if (first.empty()) { first = sums; } else { expect_near_all("sums vs 1 thread", sums, first, tol); }
    }
  }
}

TEST_P(CpuOps, BackwardElemtWithGlobalSumsAndCount)
{
  const OpCase& p = GetParam();
  const Buf w = random_uniform(p.param, p.c, rng_, 0.5, 1.5, true);
  // Global sums and count as after a sync with other replicas: the count is not the local N*L.
  const double count = static_cast<double>(3 * p.n * p.l + 2);
  std::vector<double> sums(static_cast<size_t>(2 * p.c));
  std::normal_distribution<double> nd(0.0, std::sqrt(count));
  for (double& s : sums) { s = nd(rng_); }
  // The global count sits in the statistics; m2 is not read in eps mode Plus (NaN).
  const std::vector<double> stats = make_stats(count, mean_, nans(p.c), invstd_);
  for (bool has_w : {true, false}) {
    SCOPED_TRACE(std::string("weight ") + (has_w ? "set" : "null"));
    std::vector<double> ref(static_cast<size_t>(numel(g_))), tol(ref.size());
    for_each_element(g_, [&](int64_t c, int64_t i) {
      const auto cc = static_cast<size_t>(c);
      const ld is = invstd_[cc], wc = has_w ? w.get(c) : 1.0;
      const ld a = dy_.get(i), b = static_cast<ld>(sums[cc]) / count;
      const ld xm = static_cast<ld>(x_.get(i)) - mean_[cc];
      const ld k = xm * is * is * static_cast<ld>(sums[cc + static_cast<size_t>(p.c)]) / count;
      const ld dx = (a - b - k) * is * wc;
      ref[static_cast<size_t>(i)] = static_cast<double>(dx);
      tol[static_cast<size_t>(i)] =
        tol_out(p.dtype, static_cast<double>(dx),
                static_cast<double>((std::fabs(a) + std::fabs(b) + std::fabs(k)) * std::fabs(is * wc)));
    });
    std::vector<double> first;
    for (int t : kThreads) {
      SCOPED_TRACE("num_threads=" + std::to_string(t));
      Buf dx(p.dtype, numel(g_));
      dx.poison();
      pysbn::backward_elemt(xv(), dy_.data(), stats.data(), 1e-5, EpsMode::Plus,
                            Affine{has_w ? w.data() : nullptr, nullptr, p.param}, Act{}, sums.data(), dx.data(),
                            cpu_exec(t));
      expect_near_all("backward_elemt", dx.values(), ref, tol);
      if (first.empty()) { first = dx.values(); } else { expect_near_all("dx vs 1 thread", dx.values(), first, tol); }
    }
  }
}

/// Eps mode Clamp: a channel whose (global) variance m2/count is below eps has
/// invstd = 1/sqrt(eps), which does not depend on x, so its gradient has no variance term
/// (sum_dy_xmu counts as 0). Channels at or above eps, and every channel in mode Plus, keep it.
TEST_P(CpuOps, BackwardElemtClampDropsTheVarianceTermOfClampedChannels)
{
  const OpCase& p = GetParam();
  const auto C = static_cast<size_t>(p.c);
  const Buf w = random_uniform(p.param, p.c, rng_, 0.5, 1.5, true);
  const double count = static_cast<double>(3 * p.n * p.l + 2), eps = 1e-3;
  std::vector<double> sums(2 * C);
  std::normal_distribution<double> nd(0.0, std::sqrt(count));
  // Global variances cycling through 0, eps/4, eps/2 (clamped), 2 eps and O(1) (not clamped).
  // sum_dy_xmu is of the size the variance gives it (sqrt(count * var)), so that dx stays in
  // the float16 range in mode Plus, where invstd^3 = eps^-1.5 multiplies it.
  std::uniform_real_distribution<double> var_d(0.05, 4.0);
  std::vector<double> m2(C), inv(C);
  std::vector<char> below(C);
  for (size_t c = 0; c < C; ++c) {
    const double v = c % 5 == 0 ? 0.0 : c % 5 == 1 ? eps / 4 : c % 5 == 2 ? eps / 2 : c % 5 == 3 ? 2 * eps : var_d(rng_);
    below[c] = v < eps;
    m2[c] = v * count;
    inv[c] = static_cast<double>(1.0L / std::sqrt(static_cast<ld>(std::max(v, eps))));
    sums[c] = nd(rng_);
    sums[C + c] = nd(rng_) * std::sqrt(v + eps);
  }
  const std::vector<double> stats = make_stats(count, mean_, m2, inv);
  for (EpsMode mode : {EpsMode::Clamp, EpsMode::Plus}) {
    SCOPED_TRACE(mode == EpsMode::Clamp ? "Clamp" : "Plus");
    std::vector<double> ref(static_cast<size_t>(numel(g_))), tol(ref.size());
    for_each_element(g_, [&](int64_t c, int64_t i) {
      const auto cc = static_cast<size_t>(c);
      const bool drop = mode == EpsMode::Clamp && below[cc];
      const ld is = inv[cc], wc = w.get(c);
      const ld a = dy_.get(i), b = static_cast<ld>(sums[cc]) / count;
      const ld xm = static_cast<ld>(x_.get(i)) - mean_[cc];
      const ld k = drop ? 0.0L : xm * is * is * static_cast<ld>(sums[cc + C]) / count;
      const ld dx = (a - b - k) * is * wc;
      ref[static_cast<size_t>(i)] = static_cast<double>(dx);
      tol[static_cast<size_t>(i)] =
        tol_out(p.dtype, static_cast<double>(dx),
                static_cast<double>((std::fabs(a) + std::fabs(b) + std::fabs(k)) * std::fabs(is * wc)));
    });
    for (int t : kThreads) {
      SCOPED_TRACE("num_threads=" + std::to_string(t));
      Buf dx(p.dtype, numel(g_));
      dx.poison();
      pysbn::backward_elemt(xv(), dy_.data(), stats.data(), eps, mode, Affine{w.data(), nullptr, p.param}, Act{},
                            sums.data(), dx.data(), cpu_exec(t));
      expect_near_all("backward_elemt", dx.values(), ref, tol);
    }
  }
}

/// The whole training step of synchronised batch norm, on two replicas holding an uneven split
/// of the batch (the first share may be empty): moments per share -> merge_moments -> finalize
/// -> normalize per share; backward_reduce per share -> sums added (the all-reduce) ->
/// backward_elemt per share with the merged count. Must equal one batch norm over the whole
/// batch with the analytic gradient dx = w*invstd*(dy - mean(dy) - xhat*mean(dy*xhat)).
TEST_P(CpuOps, TwoReplicaChainMatchesBatchNorm)
{
  const OpCase& p = GetParam();
  const int64_t C = p.c, L = p.l, M = p.n * p.l, per = C * L, rec = 2 * C + 1;
  const auto CC = static_cast<size_t>(C);
  const int64_t share[2] = {p.n / 3, p.n - p.n / 3};
  const double eps = 1e-5, momentum = 0.1;
  const Buf w = random_uniform(p.param, C, rng_, 0.5, 1.5, true);
  const Buf b = random_uniform(p.param, C, rng_, -1.0, 1.0);
  const Buf rm0 = random_uniform(p.param, C, rng_, -1.0, 1.0);
  const Buf rv0 = random_uniform(p.param, C, rng_, 0.5, 2.0);

  // Reference batch norm over the whole batch, in long double.
  std::vector<ld> is(CC), sdy(CC, 0.0L), sdxh(CC, 0.0L), ady(CC, 0.0L), adxh(CC, 0.0L);
  for (size_t c = 0; c < CC; ++c) { is[c] = 1.0L / std::sqrt(ref_.m2[c] / static_cast<ld>(M) + static_cast<ld>(eps)); }
  for_each_element(g_, [&](int64_t c, int64_t i) {
    const auto cc = static_cast<size_t>(c);
    const ld d = dy_.get(i), xh = (static_cast<ld>(x_.get(i)) - ref_.mean[cc]) * is[cc];
    sdy[cc] += d;
    ady[cc] += std::fabs(d);
    sdxh[cc] += d * xh;
    adxh[cc] += std::fabs(d * xh);
  });
  const double ra = rtol_acc(acc_), rp = std::max(rtol_out(p.param), ra);
  const size_t E = static_cast<size_t>(numel(g_));
  std::vector<double> y_ref(E), y_tol(E), dx_ref(E), dx_tol(E);
  for_each_element(g_, [&](int64_t c, int64_t i) {
    const auto cc = static_cast<size_t>(c);
    const auto ii = static_cast<size_t>(i);
    const ld wc = w.get(c), bc = b.get(c), x = x_.get(i), d = dy_.get(i), m = static_cast<ld>(M);
    const ld xh = (x - ref_.mean[cc]) * is[cc];
    // The kernels' mean and invstd carry accumulation-type error relative to the spread and
    // magnitude of x, hence (|x - mean| + |mean|) * invstd as the scale of xhat.
    const ld xs = (std::fabs(x - ref_.mean[cc]) + std::fabs(ref_.mean[cc])) * is[cc];
    const ld y = xh * wc + bc;
    y_ref[ii] = static_cast<double>(y);
    y_tol[ii] = tol_out(p.dtype, static_cast<double>(y), static_cast<double>(xs * std::fabs(wc) + std::fabs(bc)));
    const ld dx = wc * is[cc] * (d - sdy[cc] / m - xh * sdxh[cc] / m);
    dx_ref[ii] = static_cast<double>(dx);
    const ld dx_terms = std::fabs(wc * is[cc]) * (std::fabs(d) + std::fabs(sdy[cc] / m) + xs * std::fabs(sdxh[cc]) / m);
    dx_tol[ii] = tol_out(p.dtype, static_cast<double>(dx), static_cast<double>(dx_terms));
  });
  std::vector<double> mean_ref(CC), mean_tol(CC), is_ref(CC), is_tol(CC), gw_ref(CC), gw_tol(CC), gb_ref(CC),
    gb_tol(CC), rm_ref(CC), rm_tol(CC), rv_ref(CC), rv_tol(CC);
  const std::vector<double> mtol = moments_tol(ref_, acc_);
  for (size_t c = 0; c < CC; ++c) {
    mean_ref[c] = static_cast<double>(ref_.mean[c]);
    mean_tol[c] = mtol[1 + c];
    is_ref[c] = static_cast<double>(is[c]);
    is_tol[c] = ra * is_ref[c] + kTiny;
    const double absmean = static_cast<double>(std::fabs(ref_.mean[c]));
    const double sd = std::sqrt(static_cast<double>(ref_.m2[c]) / static_cast<double>(std::max<int64_t>(M, 1)));
    gw_ref[c] = static_cast<double>(sdxh[c]);
    gw_tol[c] = rp * (static_cast<double>(adxh[c]) + absmean * static_cast<double>(is[c] * ady[c])) + atol_out(p.param);
    gb_ref[c] = static_cast<double>(sdy[c]);
    gb_tol[c] = rp * static_cast<double>(ady[c]) + atol_out(p.param);
    const auto ci = static_cast<int64_t>(c);
    rm_ref[c] = (1.0 - momentum) * rm0.get(ci) + momentum * mean_ref[c];
    rm_tol[c] = rp * (std::fabs((1.0 - momentum) * rm0.get(ci)) + momentum * (absmean + sd)) + atol_out(p.param);
    const double unbiased = M > 1 ? static_cast<double>(ref_.m2[c] / static_cast<ld>(M - 1)) : 0.0;
    rv_ref[c] = (1.0 - momentum) * rv0.get(ci) + momentum * unbiased;
    rv_tol[c] = rp * (std::fabs((1.0 - momentum) * rv0.get(ci)) + momentum * unbiased) + atol_out(p.param);
  }

  for (int t : kThreads) {
    SCOPED_TRACE("num_threads=" + std::to_string(t));
    const Exec ex = cpu_exec(t);
    std::vector<double> records = nans(2 * rec), merged = nans(rec), stats = nans(pysbn::stats_size(C));
    std::vector<double> local = nans(2 * 2 * C), global(static_cast<size_t>(2 * C));
    Buf rm = rm0, rv = rv0;
    Buf y(p.dtype, numel(g_)), dx(p.dtype, numel(g_)), gw(p.param, 2 * C), gb(p.param, 2 * C);
    y.poison();
    dx.poison();
    auto share_view = [&](int64_t start, int r) {
      return TensorView{x_.ptr(start * per), p.dtype, Geometry{share[r], C, L, p.layout}};
    };
    int64_t start = 0;
    for (int r = 0; r < 2; ++r) {
      pysbn::moments(share_view(start, r), records.data() + r * rec, ex);
      start += share[r];
    }
    pysbn::merge_moments(2, C, records.data(), merged.data(), ex);
    ASSERT_EQ(merged[0], static_cast<double>(M));
    // count == 1 would make the unbiased variance m2 / 0: no running stats then (as nn.BatchNorm).
    const RunningStats running = M > 1 ? RunningStats{rm.data(), rv.data(), p.param, momentum} : RunningStats{};
    pysbn::finalize(C, merged.data(), eps, EpsMode::Plus, stats.data(), running, ex);
    expect_same_bits("stats: the merged record in front", slice(stats, 0, rec), merged);
    const Affine affine{w.data(), b.data(), p.param};
    start = 0;
    for (int r = 0; r < 2; ++r) {
      pysbn::normalize(share_view(start, r), stats.data(), affine, Act{}, y.ptr(start * per), ex);
      pysbn::backward_reduce(share_view(start, r), dy_.ptr(start * per), stats.data(), affine, Act{},
                             local.data() + r * 2 * C, AffineGrad{gw.ptr(r * C), gb.ptr(r * C), p.param}, ex);
      start += share[r];
    }
    for (size_t i = 0; i < global.size(); ++i) { global[i] = local[i] + local[global.size() + i]; }  // the all-reduce
    start = 0;
    for (int r = 0; r < 2; ++r) {
      pysbn::backward_elemt(share_view(start, r), dy_.ptr(start * per), stats.data(), eps, EpsMode::Plus, affine,
                            Act{}, global.data(), dx.ptr(start * per), ex);
      start += share[r];
    }
    std::vector<double> gw_sum(CC), gb_sum(CC);
    for (size_t c = 0; c < CC; ++c) {
      const auto ci = static_cast<int64_t>(c);
      gw_sum[c] = gw.get(ci) + gw.get(C + ci);
      gb_sum[c] = gb.get(ci) + gb.get(C + ci);
    }
    expect_near_all("mean", stats_mean(stats, C), mean_ref, mean_tol);
    expect_near_all("invstd", stats_invstd(stats, C), is_ref, is_tol);
    expect_near_all("y", y.values(), y_ref, y_tol);
    expect_near_all("dx", dx.values(), dx_ref, dx_tol);
    expect_near_all("grad_weight (summed over replicas)", gw_sum, gw_ref, gw_tol);
    expect_near_all("grad_bias (summed over replicas)", gb_sum, gb_ref, gb_tol);
    if (M > 1) {
      expect_near_all("running_mean", rm.values(), rm_ref, rm_tol);
      expect_near_all("running_var", rv.values(), rv_ref, rv_tol);
    }
  }
}

/// batch_norm_forward without a record is moments -> finalize -> normalize (+ running stats,
/// + the counter) in one call: bit for bit the composed ops, which the tests above check
/// against references.
TEST_P(CpuOps, BatchNormForwardIsTheComposedOps)
{
  const OpCase& p = GetParam();
  const Buf w = random_uniform(p.param, p.c, rng_, 0.5, 1.5, true);
  const Buf b = random_uniform(p.param, p.c, rng_, -1.0, 1.0);
  const Buf rm0 = random_uniform(p.param, p.c, rng_, -1.0, 1.0), rv0 = random_uniform(p.param, p.c, rng_, 0.5, 2.0);
  const EpsMode mode = p.c % 2 ? EpsMode::Plus : EpsMode::Clamp;
  for (int variant = 0; variant < 2; ++variant) {
    const bool full = variant == 0;  // affine + running stats + counter, or none of them
    SCOPED_TRACE(full ? "affine, running stats, counter" : "no affine, no running stats, no counter");
    const Affine affine = full ? Affine{w.data(), b.data(), p.param} : Affine{nullptr, nullptr, p.param};
    for (int t : kThreads) {
      SCOPED_TRACE("num_threads=" + std::to_string(t));
      const Exec ex = cpu_exec(t);
      std::vector<double> rec_ref = nans(pysbn::record_size(p.c)), st_ref = nans(pysbn::stats_size(p.c));
      Buf y_ref(p.dtype, numel(g_)), rm_ref = rm0, rv_ref = rv0;
      int64_t counter_ref = 41;
      pysbn::moments(xv(), rec_ref.data(), ex);
      pysbn::finalize(p.c, rec_ref.data(), 1e-3, mode, st_ref.data(),
                      full ? RunningStats{rm_ref.data(), rv_ref.data(), p.param, 0.25, false, &counter_ref}
                           : RunningStats{},
                      ex);
      pysbn::normalize(xv(), st_ref.data(), affine, Act{}, y_ref.data(), ex);

      std::vector<double> st = nans(pysbn::stats_size(p.c));
      Buf y(p.dtype, numel(g_)), rm = rm0, rv = rv0;
      y.poison();
      int64_t counter = 41;
      pysbn::batch_norm_forward(xv(), nullptr, 1e-3, mode, affine, Act{}, st.data(), y.data(),
                                full ? RunningStats{rm.data(), rv.data(), p.param, 0.25, false, &counter}
                                     : RunningStats{},
                                ex);
      expect_same_bits("stats", st, st_ref);
      expect_same_bits("y", y.values(), y_ref.values());
      expect_same_bits("running_mean", rm.values(), rm_ref.values());
      expect_same_bits("running_var", rv.values(), rv_ref.values());
      EXPECT_EQ(counter, full ? 42 : 41);
      EXPECT_EQ(counter, counter_ref);
    }
  }
}

/// batch_norm_forward with a (global) moments record is finalize of that record -> normalize:
/// x's own moments are not used. The record here has another count, other means and other m2
/// than x, so a result computed from x shows up.
TEST_P(CpuOps, BatchNormForwardWithARecordIsFinalizeThenNormalize)
{
  const OpCase& p = GetParam();
  const auto C = static_cast<size_t>(p.c);
  const Buf w = random_uniform(p.param, p.c, rng_, 0.5, 1.5, true);
  const Buf b = random_uniform(p.param, p.c, rng_, -1.0, 1.0);
  const Buf rm0 = random_uniform(p.param, p.c, rng_, -1.0, 1.0), rv0 = random_uniform(p.param, p.c, rng_, 0.5, 2.0);
  const EpsMode mode = p.c % 2 ? EpsMode::Clamp : EpsMode::Plus;
  std::vector<double> record(static_cast<size_t>(pysbn::record_size(p.c)));
  record[0] = static_cast<double>(3 * p.n * p.l + 2);
  for (size_t c = 0; c < C; ++c) {
    record[1 + c] = mean_[c] + 0.75;
    record[1 + C + c] = (m2_[c] + 1.0) * 2.5;
  }
  const std::vector<double> record0 = record;
  for (int variant = 0; variant < 3; ++variant) {
    // 0: affine, running stats with a momentum and a counter; 1: the cumulative average;
    // 2: no affine, no running stats, no counter.
    SCOPED_TRACE("variant " + std::to_string(variant));
    const Affine affine = variant < 2 ? Affine{w.data(), b.data(), p.param} : Affine{nullptr, nullptr, p.param};
    auto running = [&](Buf& rm, Buf& rv, int64_t* counter) {
      if (variant == 2) { return RunningStats{}; }
      return RunningStats{rm.data(), rv.data(), p.param, 0.25, variant == 1, counter};
    };
    for (int t : kThreads) {
      SCOPED_TRACE("num_threads=" + std::to_string(t));
      const Exec ex = cpu_exec(t);
      std::vector<double> st_ref = nans(pysbn::stats_size(p.c));
      Buf y_ref(p.dtype, numel(g_)), rm_ref = rm0, rv_ref = rv0;
      int64_t counter_ref = 6;
      pysbn::finalize(p.c, record.data(), 1e-3, mode, st_ref.data(), running(rm_ref, rv_ref, &counter_ref), ex);
      pysbn::normalize(xv(), st_ref.data(), affine, Act{}, y_ref.data(), ex);

      std::vector<double> st = nans(pysbn::stats_size(p.c));
      Buf y(p.dtype, numel(g_)), rm = rm0, rv = rv0;
      y.poison();
      int64_t counter = 6;
      pysbn::batch_norm_forward(xv(), record.data(), 1e-3, mode, affine, Act{}, st.data(), y.data(),
                                running(rm, rv, &counter), ex);
      expect_same_bits("record (an input)", record, record0);
      expect_same_bits("stats: the record in front", slice(st, 0, pysbn::record_size(p.c)), record0);
      expect_same_bits("stats", st, st_ref);
      expect_same_bits("y", y.values(), y_ref.values());
      expect_same_bits("running_mean", rm.values(), rm_ref.values());
      expect_same_bits("running_var", rv.values(), rv_ref.values());
      EXPECT_EQ(counter, variant < 2 ? 7 : 6);
      EXPECT_EQ(counter, counter_ref);
    }
  }
}

/// batch_norm_backward is backward_reduce -> backward_elemt with the local sums and the count
/// of the statistics.
TEST_P(CpuOps, BatchNormBackwardIsTheComposedOps)
{
  const OpCase& p = GetParam();
  const Buf w = random_uniform(p.param, p.c, rng_, 0.5, 1.5, true);
  // The statistics of x itself (local count); in mode Clamp, channels with var < eps (N*L = 1)
  // drop their variance term.
  const std::vector<double> stats = make_stats(static_cast<double>(p.n * p.l), mean_, m2_, invstd_);
  const double eps = 1e-3;
  const EpsMode mode = p.c % 2 ? EpsMode::Plus : EpsMode::Clamp;
  for (int variant = 0; variant < 3; ++variant) {
    // 0: everything; 1: no weight, no grad_bias; 2: no dx (parameter gradients only)
    SCOPED_TRACE("variant " + std::to_string(variant));
    const Affine affine{variant == 1 ? nullptr : w.data(), nullptr, p.param};
    for (int t : kThreads) {
      SCOPED_TRACE("num_threads=" + std::to_string(t));
      const Exec ex = cpu_exec(t);
      std::vector<double> sums_ref = nans(pysbn::sums_size(p.c));
      Buf gw_ref(p.param, p.c), gb_ref(p.param, p.c), dx_ref(p.dtype, numel(g_));
      pysbn::backward_reduce(xv(), dy_.data(), stats.data(), affine, Act{}, sums_ref.data(),
                             AffineGrad{gw_ref.data(), variant == 1 ? nullptr : gb_ref.data(), p.param}, ex);
      pysbn::backward_elemt(xv(), dy_.data(), stats.data(), eps, mode, affine, Act{}, sums_ref.data(), dx_ref.data(),
                            ex);

      std::vector<double> sums = nans(pysbn::sums_size(p.c));
      Buf gw(p.param, p.c), gb(p.param, p.c), dx(p.dtype, numel(g_));
      gw.poison();
      gb.poison();
      dx.poison();
      pysbn::batch_norm_backward(xv(), dy_.data(), stats.data(), eps, mode, affine, Act{}, sums.data(),
                                 AffineGrad{gw.data(), variant == 1 ? nullptr : gb.data(), p.param},
                                 variant == 2 ? nullptr : dx.data(), ex);
      expect_same_bits("sums", sums, sums_ref);
      expect_same_bits("grad_weight", gw.values(), gw_ref.values());
      if (variant != 1) { expect_same_bits("grad_bias", gb.values(), gb_ref.values()); }
      if (variant != 2) {
        expect_same_bits("dx", dx.values(), dx_ref.values());
      } else {
        for (double v : dx.values()) { ASSERT_TRUE(std::isnan(v)) << "dx was written though it is null"; }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuOps, ::testing::ValuesIn(op_cases()), op_case_name);

// ---- fused activations --------------------------------------------------------------------------
// Every activation through normalize, backward_reduce, backward_elemt and the composites, against
// act_reference.hpp in long double: z = (x - mean) * invstd * w + b from the same rounded inputs.
// The tolerances are a few units of the accumulation type's roundoff relative to the terms of
// each result, plus what an error in z (a few roundoffs of z's terms, s_z) does to it: act'(z)
// s_z for y, act''(z) s_z for g = act'(z) dy, and the whole jump of act' for an element whose z
// lies within that error of a kink (ReLU, LeakyReLU at 0, Hardswish at -3 and 3).

/// Tolerance of an elementwise result `ref` stored as t, computed in t's accumulation type from
/// terms of total magnitude `scale` (which includes |ref|'s own terms): 8 roundoffs of the
/// accumulation type, plus half an ulp of t for float16/bfloat16 (the output's rounding).
double tol_act(DType t, double ref, double scale)
{
  double tol = 8.0 * unit_roundoff(pysbn::acc_dtype(t)) * (std::fabs(ref) + scale) + kTiny;
  if (t == DType::Float16 || t == DType::BFloat16) { tol += 0.5 * ulp_of(t, ref); }
  return tol;
}

struct ActCase {
  OpCase op;
  Activation act;
};

std::ostream& operator<<(std::ostream& os, const ActCase& p) { return os << act_ref::name(p.act) << " " << p.op; }

std::string act_case_name(const ::testing::TestParamInfo<ActCase>& info)
{
  return std::string(act_ref::name(info.param.act)) + "_" +
         op_case_name(::testing::TestParamInfo<OpCase>(info.param.op, info.index));
}

/// Odd shapes for every dtype / param dtype pair and layout; a few threaded ones (N*C*L >= 32768:
/// channel-major planes, channels-last row blocks, the chunked second passes).
std::vector<ActCase> act_cases(bool wide_types_only)
{
  const std::vector<std::array<int64_t, 3>> small = {{1, 1, 1},   {2, 3, 5},  {7, 1, 13},
                                                     {13, 24, 1}, {6, 17, 23}, {4, 9, 130}};
  const std::vector<std::array<int64_t, 3>> big = {{3, 40, 350}, {2500, 17, 1}};
  std::vector<ActCase> out;
  for (Activation a : act_ref::kAll) {
    for (const auto& dp : all_combos()) {
      const bool wide = dp[0] == DType::Float32 || dp[0] == DType::Float64;
      if (wide_types_only && !wide) { continue; }
      const bool big_too = wide || (dp[0] == DType::Float16 && dp[1] == DType::Float32);
      for (Layout lay : {Layout::ChannelMajor, Layout::ChannelsLast}) {
        for (const auto& s : small) { out.push_back({{dp[0], dp[1], lay, s[0], s[1], s[2]}, a}); }
        if (!big_too) { continue; }
        for (const auto& s : big) { out.push_back({{dp[0], dp[1], lay, s[0], s[1], s[2]}, a}); }
        if (dp[0] == DType::Float32) { out.push_back({{dp[0], dp[1], lay, 8, 16, 4100}, a}); }
      }
    }
  }
  return out;
}

class ActOps : public ::testing::TestWithParam<ActCase> {
 protected:
  void SetUp() override
  {
    const OpCase& p = GetParam().op;
    g_ = Geometry{p.n, p.c, p.l, p.layout};
    act_ = Act{GetParam().act, 0.1};
    slope_ = act_ref::slope_in(act_, p.dtype);
    ua_ = unit_roundoff(pysbn::acc_dtype(p.dtype));
    ra_ = rtol_acc(pysbn::acc_dtype(p.dtype));
    rng_.seed(seed_of(p) + 7919u * static_cast<uint32_t>(GetParam().act));
    std::uniform_real_distribution<double> mu(-3.0, 3.0), sd(0.25, 2.0);
    std::vector<double> mus(static_cast<size_t>(p.c)), sds(static_cast<size_t>(p.c));
    for (int64_t c = 0; c < p.c; ++c) {
      mus[static_cast<size_t>(c)] = mu(rng_);
      sds[static_cast<size_t>(c)] = sd(rng_);
    }
    x_ = random_input(p.dtype, g_, rng_, mus, sds);
    dy_ = random_input(p.dtype, g_, rng_, std::vector<double>(mus.size(), 0.0), std::vector<double>(mus.size(), 1.0));
    // z = xhat * w + b over about [-5, 5]: both sides of every kink, the tails of the smooth ones
    w_ = random_uniform(p.param, p.c, rng_, 0.5, 2.0, true);
    b_ = random_uniform(p.param, p.c, rng_, -1.5, 1.5);
    ref_ = ref_stats(x_, g_);
    mean_.resize(static_cast<size_t>(p.c));
    invstd_.resize(static_cast<size_t>(p.c));
    m2_.resize(static_cast<size_t>(p.c));
    for (size_t c = 0; c < mean_.size(); ++c) {
      mean_[c] = static_cast<double>(ref_.mean[c]);
      m2_[c] = static_cast<double>(ref_.m2[c]);
      const ld var = ref_.count ? ref_.m2[c] / static_cast<ld>(ref_.count) : 0.0L;
      invstd_[c] = static_cast<double>(1.0L / std::sqrt(var + 1e-5L));
    }
    stats_ = make_stats(static_cast<double>(ref_.count), mean_, nans(p.c), invstd_);
  }

  TensorView xv() const { return TensorView{x_.data(), GetParam().op.dtype, g_}; }
  Affine affine(bool on = true) const
  {
    return on ? Affine{w_.data(), b_.data(), GetParam().op.param} : Affine{nullptr, nullptr, GetParam().op.param};
  }

  /// z of element i (channel c) from the statistics `mean`, `invstd`, and s_z, its terms.
  struct Z {
    ld z, xm, s;
  };
  Z z_of(int64_t c, int64_t i, const double* mean, const double* invstd, bool with_affine = true) const
  {
    const ld xm = static_cast<ld>(x_.get(i)) - mean[c];
    const ld t = xm * invstd[c] * (with_affine ? w_.get(c) : 1.0);
    const ld b = with_affine ? b_.get(c) : 0.0;
    return {t + b, xm, std::fabs(t) + std::fabs(b)};
  }

  /// The error bound of the kernel's g = act'(z) dy: its rounding, what the error in z does
  /// through act'', and a whole jump of act' for z within that error of a kink.
  double g_err(ld z, ld s_z, ld dy) const
  {
    const act_ref::Value v = act_ref::eval(act_.kind, slope_, z);
    const ld dz = 8.0L * ua_ * s_z;
    ld dist, jump;
    act_ref::kink(act_.kind, slope_, z, dist, jump);
    const ld kink = dist <= dz + 1e-300L ? jump * std::fabs(dy) : 0.0L;
    return static_cast<double>(8.0L * ua_ * std::fabs(dy) * (v.dterms + std::fabs(v.d2) * s_z) + kink);
  }

  Geometry g_;
  Act act_;
  ld slope_ = 0;
  double ua_ = 0, ra_ = 0;
  std::mt19937 rng_;
  Buf x_, dy_, w_, b_;
  RefStats ref_;
  std::vector<double> mean_, invstd_, m2_, stats_;
};

/// y = act(z) with and without the affine parameters; then batch_norm_forward: its statistics
/// against the two-pass reference and y against act(z) of those statistics.
TEST_P(ActOps, ForwardMatchesLongDoubleReference)
{
  const OpCase& p = GetParam().op;
  for (bool with_affine : {true, false}) {
    SCOPED_TRACE(with_affine ? "weight and bias" : "no affine");
    std::vector<double> ref(static_cast<size_t>(numel(g_))), tol(ref.size());
    for_each_element(g_, [&](int64_t c, int64_t i) {
      const Z z = z_of(c, i, mean_.data(), invstd_.data(), with_affine);
      const act_ref::Value v = act_ref::eval(act_.kind, slope_, z.z);
      ref[static_cast<size_t>(i)] = static_cast<double>(v.y);
      tol[static_cast<size_t>(i)] = tol_act(p.dtype, static_cast<double>(v.y), static_cast<double>(std::fabs(v.d) * z.s));
    });
    for (int t : kThreads) {
      SCOPED_TRACE("num_threads=" + std::to_string(t));
      Buf y(p.dtype, numel(g_));
      y.poison();
      pysbn::normalize(xv(), stats_.data(), affine(with_affine), act_, y.data(), cpu_exec(t));
      expect_near_all("normalize", y.values(), ref, tol);
    }
  }
  for (EpsMode mode : {EpsMode::Plus, EpsMode::Clamp}) {
    SCOPED_TRACE(mode == EpsMode::Plus ? "batch_norm_forward, Plus" : "batch_norm_forward, Clamp");
    for (int t : {1, 3}) {
      SCOPED_TRACE("num_threads=" + std::to_string(t));
      std::vector<double> st = nans(pysbn::stats_size(p.c));
      Buf y(p.dtype, numel(g_));
      y.poison();
      pysbn::batch_norm_forward(xv(), nullptr, 1e-3, mode, affine(), act_, st.data(), y.data(), RunningStats{},
                                cpu_exec(t));
      expect_near_all("stats", slice(st, 0, pysbn::record_size(p.c)), moments_ref(ref_),
                      moments_tol(ref_, pysbn::acc_dtype(p.dtype)));
      const std::vector<double> mean = stats_mean(st, p.c), invstd = stats_invstd(st, p.c);
      std::vector<double> ref(static_cast<size_t>(numel(g_))), tol(ref.size());
      for_each_element(g_, [&](int64_t c, int64_t i) {
        const Z z = z_of(c, i, mean.data(), invstd.data());
        const act_ref::Value v = act_ref::eval(act_.kind, slope_, z.z);
        ref[static_cast<size_t>(i)] = static_cast<double>(v.y);
        tol[static_cast<size_t>(i)] =
          tol_act(p.dtype, static_cast<double>(v.y), static_cast<double>(std::fabs(v.d) * z.s));
      });
      expect_near_all("y", y.values(), ref, tol);
    }
  }
}

/// backward_reduce (sums, grad_weight, grad_bias) and backward_elemt (global sums and count),
/// g = act'(z) dy with z from the statistics and the affine parameters.
TEST_P(ActOps, BackwardMatchesLongDoubleReference)
{
  const OpCase& p = GetParam().op;
  const auto C = static_cast<size_t>(p.c);
  std::vector<ld> s1(C, 0.0L), s2(C, 0.0L);
  std::vector<double> t1(C, 0.0), t2(C, 0.0);
  for_each_element(g_, [&](int64_t c, int64_t i) {
    const auto cc = static_cast<size_t>(c);
    const Z z = z_of(c, i, mean_.data(), invstd_.data());
    const ld dy = dy_.get(i), g = act_ref::grad(act_.kind, slope_, z.z, dy);
    const double err = g_err(z.z, z.s, dy);
    s1[cc] += g;
    s2[cc] += g * z.xm;
    t1[cc] += ra_ * static_cast<double>(std::fabs(g)) + err;
    t2[cc] += static_cast<double>(ra_ * std::fabs(g * z.xm) + err * std::fabs(z.xm));
  });
  std::vector<double> ref(2 * C), tol(2 * C), gw_ref(C), gw_tol(C), gb_ref(C), gb_tol(C);
  for (size_t c = 0; c < C; ++c) {
    ref[c] = static_cast<double>(s1[c]);
    tol[c] = t1[c] + kTiny;
    ref[C + c] = static_cast<double>(s2[c]);
    tol[C + c] = t2[c] + kTiny;
    gw_ref[c] = static_cast<double>(s2[c] * static_cast<ld>(invstd_[c]));
    gw_tol[c] = tol[C + c] * invstd_[c] + tol_out(p.param, gw_ref[c], 0.0);
    gb_ref[c] = ref[c];
    gb_tol[c] = tol[c] + tol_out(p.param, gb_ref[c], 0.0);
  }
  for (int t : kThreads) {
    SCOPED_TRACE("backward_reduce, num_threads=" + std::to_string(t));
    std::vector<double> sums = nans(pysbn::sums_size(p.c));
    Buf gw(p.param, p.c), gb(p.param, p.c);
    gw.poison();
    gb.poison();
    pysbn::backward_reduce(xv(), dy_.data(), stats_.data(), affine(), act_, sums.data(),
                           AffineGrad{gw.data(), gb.data(), p.param}, cpu_exec(t));
    expect_near_all("sums", sums, ref, tol);
    expect_near_all("grad_weight", gw.values(), gw_ref, gw_tol);
    expect_near_all("grad_bias", gb.values(), gb_ref, gb_tol);
  }

  // backward_elemt with global sums and count, as after a sync
  const double count = static_cast<double>(3 * p.n * p.l + 2);
  std::vector<double> sums(2 * C);
  std::normal_distribution<double> nd(0.0, std::sqrt(count));
  for (double& s : sums) { s = nd(rng_); }
  const std::vector<double> stats = make_stats(count, mean_, nans(p.c), invstd_);
  std::vector<double> dref(static_cast<size_t>(numel(g_))), dtol(dref.size());
  for_each_element(g_, [&](int64_t c, int64_t i) {
    const auto cc = static_cast<size_t>(c);
    const Z z = z_of(c, i, mean_.data(), invstd_.data());
    const ld dy = dy_.get(i), g = act_ref::grad(act_.kind, slope_, z.z, dy);
    const ld is = invstd_[cc], isw = is * w_.get(c);
    const ld b = static_cast<ld>(sums[cc]) / count, k = z.xm * is * is * static_cast<ld>(sums[C + cc]) / count;
    const ld dx = (g - b - k) * isw;
    dref[static_cast<size_t>(i)] = static_cast<double>(dx);
    dtol[static_cast<size_t>(i)] =
      tol_act(p.dtype, static_cast<double>(dx),
              static_cast<double>((std::fabs(g) + std::fabs(b) + std::fabs(k)) * std::fabs(isw))) +
      g_err(z.z, z.s, dy) * static_cast<double>(std::fabs(isw));
  });
  for (int t : kThreads) {
    SCOPED_TRACE("backward_elemt, num_threads=" + std::to_string(t));
    Buf dx(p.dtype, numel(g_));
    dx.poison();
    pysbn::backward_elemt(xv(), dy_.data(), stats.data(), 1e-5, EpsMode::Plus, affine(), act_, sums.data(), dx.data(),
                          cpu_exec(t));
    expect_near_all("dx", dx.values(), dref, dtol);
  }
}

/// batch_norm_backward (local sums and count; in mode Clamp, channels with var < eps drop the
/// variance term) against the reference.
TEST_P(ActOps, BatchNormBackwardMatchesLongDoubleReference)
{
  const OpCase& p = GetParam().op;
  const auto C = static_cast<size_t>(p.c);
  const double eps = 1e-3, n = static_cast<double>(p.n * p.l);
  const std::vector<double> stats = make_stats(n, mean_, m2_, invstd_);
  for (EpsMode mode : {EpsMode::Plus, EpsMode::Clamp}) {
    SCOPED_TRACE(mode == EpsMode::Plus ? "Plus" : "Clamp");
    std::vector<ld> s1(C, 0.0L), s2(C, 0.0L);
    std::vector<double> t1(C, 0.0), t2(C, 0.0);
    for_each_element(g_, [&](int64_t c, int64_t i) {
      const auto cc = static_cast<size_t>(c);
      const Z z = z_of(c, i, mean_.data(), invstd_.data());
      const ld dy = dy_.get(i), g = act_ref::grad(act_.kind, slope_, z.z, dy);
      const double err = g_err(z.z, z.s, dy);
      s1[cc] += g;
      s2[cc] += g * z.xm;
      t1[cc] += ra_ * static_cast<double>(std::fabs(g)) + err;
      t2[cc] += static_cast<double>(ra_ * std::fabs(g * z.xm) + err * std::fabs(z.xm));
    });
    std::vector<double> ref(2 * C), tol(2 * C), gw_ref(C), gw_tol(C), gb_ref(C), gb_tol(C);
    for (size_t c = 0; c < C; ++c) {
      ref[c] = static_cast<double>(s1[c]);
      tol[c] = t1[c] + kTiny;
      ref[C + c] = static_cast<double>(s2[c]);
      tol[C + c] = t2[c] + kTiny;
      gw_ref[c] = static_cast<double>(s2[c] * static_cast<ld>(invstd_[c]));
      gw_tol[c] = tol[C + c] * invstd_[c] + tol_out(p.param, gw_ref[c], 0.0);
      gb_ref[c] = ref[c];
      gb_tol[c] = tol[c] + tol_out(p.param, gb_ref[c], 0.0);
    }
    std::vector<double> dref(static_cast<size_t>(numel(g_))), dtol(dref.size());
    for_each_element(g_, [&](int64_t c, int64_t i) {
      const auto cc = static_cast<size_t>(c);
      const Z z = z_of(c, i, mean_.data(), invstd_.data());
      const ld dy = dy_.get(i), g = act_ref::grad(act_.kind, slope_, z.z, dy);
      const bool drop = mode == EpsMode::Clamp && m2_[cc] / n < eps;
      const ld is = invstd_[cc], isw = is * w_.get(c);
      const ld b = s1[cc] / n, k = drop ? 0.0L : z.xm * is * is * s2[cc] / n;
      const ld dx = (g - b - k) * isw;
      dref[static_cast<size_t>(i)] = static_cast<double>(dx);
      const double sums_err = t1[cc] / n + (drop ? 0.0 : static_cast<double>(std::fabs(z.xm * is * is)) * t2[cc] / n);
      dtol[static_cast<size_t>(i)] =
        tol_act(p.dtype, static_cast<double>(dx),
                static_cast<double>((std::fabs(g) + std::fabs(b) + std::fabs(k)) * std::fabs(isw))) +
        (g_err(z.z, z.s, dy) + sums_err) * static_cast<double>(std::fabs(isw));
    });
    for (int t : {1, 3}) {
      SCOPED_TRACE("num_threads=" + std::to_string(t));
      std::vector<double> sums = nans(pysbn::sums_size(p.c));
      Buf gw(p.param, p.c), gb(p.param, p.c), dx(p.dtype, numel(g_));
      gw.poison();
      gb.poison();
      dx.poison();
      pysbn::batch_norm_backward(xv(), dy_.data(), stats.data(), eps, mode, affine(), act_, sums.data(),
                                 AffineGrad{gw.data(), gb.data(), p.param}, dx.data(), cpu_exec(t));
      expect_near_all("sums", sums, ref, tol);
      expect_near_all("grad_weight", gw.values(), gw_ref, gw_tol);
      expect_near_all("grad_bias", gb.values(), gb_ref, gb_tol);
      expect_near_all("dx", dx.values(), dref, dtol);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, ActOps, ::testing::ValuesIn(act_cases(false)), act_case_name);

/// The fused ops are the unfused chain: normalize with the identity gives the same z, so
/// batch_norm_forward with an activation is act(z) of it, and batch_norm_backward with an
/// activation is batch_norm_backward with the identity of g = act'(z) dy (torch's derivative,
/// here in long double, rounded to the dtype). No error in z separates the two: the tolerances
/// are the activation's own rounding and g's rounding to the dtype. float32 / float64 only (z
/// rounded to a 16-bit type is not the kernels' z).
using ActChain = ActOps;

TEST_P(ActChain, FusedOpsAreNormalizeThenTheDerivativeChain)
{
  const OpCase& p = GetParam().op;
  const auto C = static_cast<size_t>(p.c);
  const double eps = 1e-3;
  const Exec ex = cpu_exec(2);
  std::vector<double> st = nans(pysbn::stats_size(p.c));
  Buf y(p.dtype, numel(g_)), z(p.dtype, numel(g_));
  pysbn::batch_norm_forward(xv(), nullptr, eps, EpsMode::Plus, affine(), act_, st.data(), y.data(), RunningStats{}, ex);
  pysbn::normalize(xv(), st.data(), affine(), Act{}, z.data(), ex);
  std::vector<double> yref(static_cast<size_t>(numel(g_))), ytol(yref.size());
  Buf g(p.dtype, numel(g_));
  std::vector<double> gerr(yref.size());
  for_each_element(g_, [&](int64_t, int64_t i) {
    const ld zi = z.get(i);
    const act_ref::Value v = act_ref::eval(act_.kind, slope_, zi);
    yref[static_cast<size_t>(i)] = static_cast<double>(v.y);
    ytol[static_cast<size_t>(i)] = tol_act(p.dtype, static_cast<double>(v.y), static_cast<double>(std::fabs(zi * v.d)));
    const ld dy = dy_.get(i), gi = act_ref::grad(act_.kind, slope_, zi, dy);
    g.set(i, static_cast<double>(gi));
    gerr[static_cast<size_t>(i)] = std::fabs(g.get(i) - static_cast<double>(gi)) +
                                   static_cast<double>(8.0L * ua_ * std::fabs(dy) * (v.dterms + std::fabs(zi * v.d2)));
  });
  expect_near_all("y: batch_norm_forward(act) vs act(normalize)", y.values(), yref, ytol);

  // backward: the fused op vs the identity op on g
  std::vector<double> sums = nans(pysbn::sums_size(p.c)), sums_c = nans(pysbn::sums_size(p.c));
  Buf gw(p.param, p.c), gb(p.param, p.c), dx(p.dtype, numel(g_));
  Buf gw_c(p.param, p.c), gb_c(p.param, p.c), dx_c(p.dtype, numel(g_));
  pysbn::batch_norm_backward(xv(), dy_.data(), st.data(), eps, EpsMode::Plus, affine(), act_, sums.data(),
                             AffineGrad{gw.data(), gb.data(), p.param}, dx.data(), ex);
  pysbn::batch_norm_backward(xv(), g.data(), st.data(), eps, EpsMode::Plus, affine(), Act{}, sums_c.data(),
                             AffineGrad{gw_c.data(), gb_c.data(), p.param}, dx_c.data(), ex);
  const std::vector<double> mean = stats_mean(st, p.c), invstd = stats_invstd(st, p.c);
  const double n = st[0];
  std::vector<double> t1(C, 0.0), t2(C, 0.0);
  for_each_element(g_, [&](int64_t c, int64_t i) {
    const auto cc = static_cast<size_t>(c), ii = static_cast<size_t>(i);
    const double xm = std::fabs(x_.get(i) - mean[cc]);
    t1[cc] += 2 * ra_ * std::fabs(g.get(i)) + gerr[ii];
    t2[cc] += (2 * ra_ * std::fabs(g.get(i)) + gerr[ii]) * xm;
  });
  std::vector<double> stol(2 * C), gwtol(C), gbtol(C);
  for (size_t c = 0; c < C; ++c) {
    stol[c] = t1[c] + kTiny;
    stol[C + c] = t2[c] + kTiny;
    gwtol[c] = t2[c] * invstd[c] + 2 * tol_out(p.param, gw_c.get(static_cast<int64_t>(c)), 0.0);
    gbtol[c] = t1[c] + 2 * tol_out(p.param, gb_c.get(static_cast<int64_t>(c)), 0.0);
  }
  expect_near_all("sums", sums, sums_c, stol);
  expect_near_all("grad_weight", gw.values(), gw_c.values(), gwtol);
  expect_near_all("grad_bias", gb.values(), gb_c.values(), gbtol);
  std::vector<double> dxtol(static_cast<size_t>(numel(g_)));
  for_each_element(g_, [&](int64_t c, int64_t i) {
    const auto cc = static_cast<size_t>(c);
    const double is = invstd[cc], isw = std::fabs(is * w_.get(c)), xm = std::fabs(x_.get(i) - mean[cc]);
    const double terms = std::fabs(g.get(i)) + std::fabs(sums_c[cc] / n) + xm * is * is * std::fabs(sums_c[C + cc] / n);
    dxtol[static_cast<size_t>(i)] = 2 * tol_act(p.dtype, dx_c.get(i), terms * isw) +
                                    (gerr[static_cast<size_t>(i)] + t1[cc] / n + xm * is * is * t2[cc] / n) * isw;
  });
  expect_near_all("dx", dx.values(), dx_c.values(), dxtol);
  if (act_.kind == Activation::Identity || act_.kind == Activation::ReLU) {
    // act(z) is z or 0 exactly, and with dy = 1 and no sums to subtract, g = [z > 0] shows in dx
    // (non-zero exactly there) and in sum_dy (the count per channel): all three must see the z
    // of normalize, bit for bit. (The sums and dx of the fused op and the chain need not agree
    // to the bit otherwise: the compiler may fuse g's multiplies into FMAs differently.)
    std::vector<double> relu_z = z.values();
    for (double& v : relu_z) { v = act_.kind == Activation::ReLU && v < 0 ? 0.0 : v; }
    expect_same_bits("y, exactly", y.values(), relu_z);
    Buf ones(p.dtype, numel(g_)), dx1(p.dtype, numel(g_));
    ones.fill(1.0);
    const std::vector<double> no_sums(2 * C, 0.0);
    std::vector<double> s1 = nans(pysbn::sums_size(p.c)), count_pos(C, 0.0), nonzero(static_cast<size_t>(numel(g_)));
    pysbn::backward_reduce(xv(), ones.data(), st.data(), affine(), act_, s1.data(), AffineGrad{}, ex);
    pysbn::backward_elemt(xv(), ones.data(), st.data(), eps, EpsMode::Plus, affine(), act_, no_sums.data(), dx1.data(),
                          ex);
    std::vector<double> got_nonzero(nonzero.size());
    for_each_element(g_, [&](int64_t c, int64_t i) {
      const bool pos = act_.kind == Activation::Identity || z.get(i) > 0;
      count_pos[static_cast<size_t>(c)] += pos ? 1.0 : 0.0;
      nonzero[static_cast<size_t>(i)] = pos ? 1.0 : 0.0;
      got_nonzero[static_cast<size_t>(i)] = dx1.get(i) != 0.0 ? 1.0 : 0.0;
    });
    expect_same_bits("sum_dy of dy = 1: the count of z > 0", slice(s1, 0, p.c), count_pos);
    expect_same_bits("dx != 0 exactly where z > 0", got_nonzero, nonzero);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, ActChain, ::testing::ValuesIn(act_cases(true)), act_case_name);

/// Sweep of z over the whole range (the grid, tiny and huge magnitudes) through the public ops:
/// with mean 0, invstd 1 and no affine, z = x exactly, so normalize gives act(x) and
/// backward_elemt with zero sums and dy = 1 gives act'(x). Checked against long double to a few
/// ulp: y within 4 eps |y|, act' within 4 eps of the size of its terms; GELUTanh also within
/// 4 eps |z act'| (|z y''|): u = k (z + 0.044715 z^3) is rounded in the dtype, and e^-2u carries
/// that error times |2u| (torch's own float formula loses y entirely there: 1 + tanh u = 0).
template <class T>
void sweep_activations(DType dt)
{
  std::vector<T> z;
  for (int i = -40000; i <= 40000; ++i) { z.push_back(static_cast<T>(i * 5e-4)); }  // [-20, 20]
  for (int i = 0; i <= 2000; ++i) {
    const T v = static_cast<T>(std::pow(10.0, -30.0 + i * 48.0 / 2000));  // 1e-30 .. 1e18
    z.push_back(v);
    z.push_back(-v);
  }
  const auto n = static_cast<int64_t>(z.size());
  const Geometry g{1, 1, n, Layout::ChannelMajor};
  const std::vector<double> stats{static_cast<double>(n), 0.0, 1.0, 1.0}, zero_sums{0.0, 0.0};
  const double eps = std::numeric_limits<T>::epsilon(), tiny = std::numeric_limits<T>::denorm_min();
  std::vector<T> y(z.size()), ones(z.size(), T(1)), d(z.size());
  for (Activation a : act_ref::kAll) {
    SCOPED_TRACE(act_ref::name(a));
    const Act act{a, 0.01};
    const ld slope = act_ref::slope_in(act, dt);
    pysbn::normalize(TensorView{z.data(), dt, g}, stats.data(), Affine{}, act, y.data(), Exec{});
    pysbn::backward_elemt(TensorView{z.data(), dt, g}, ones.data(), stats.data(), 1e-5, EpsMode::Plus, Affine{}, act,
                          zero_sums.data(), d.data(), Exec{});
    const bool tanh_form = a == Activation::GELUTanh;
    std::vector<double> got_y(z.size()), got_d(z.size()), ref_y(z.size()), ref_d(z.size()), tol_y(z.size()),
      tol_d(z.size());
    double worst_y = 0, worst_d = 0;
    for (size_t i = 0; i < z.size(); ++i) {
      const ld zi = z[i];
      const act_ref::Value v = act_ref::eval(a, slope, zi);
      got_y[i] = static_cast<double>(y[i]);
      got_d[i] = static_cast<double>(d[i]);
      ref_y[i] = static_cast<double>(v.y);
      ref_d[i] = static_cast<double>(act_ref::grad(a, slope, zi, 1.0L));
      // Results in the subnormal range: a factor that underflowed carries up to half a
      // subnormal spacing, times what multiplies it afterwards (|z|, and ~0.2 |z|^3 in
      // GELUTanh's act'); beyond |z| ~ 110 every such result is 0.
      const double za = std::min(std::fabs(static_cast<double>(z[i])), 128.0);
      const double floor = 4 * tiny * (1 + za + (tanh_form ? 0.2 * za * za * za : 0.0));
      tol_y[i] = 4 * eps * static_cast<double>(std::fabs(v.y) + (tanh_form ? std::fabs(zi * v.d) : 0.0L)) + floor;
      tol_d[i] = 4 * eps * static_cast<double>(v.dterms + (tanh_form ? std::fabs(zi * v.d2) : 0.0L)) + floor;
      const double normal = std::numeric_limits<T>::min();
      if (std::fabs(v.y) > normal) { worst_y = std::max(worst_y, std::fabs(got_y[i] - ref_y[i]) / std::fabs(ref_y[i])); }
      if (v.dterms > normal) {
        worst_d = std::max(worst_d, std::fabs(got_d[i] - ref_d[i]) / static_cast<double>(v.dterms));
      }
    }
    expect_near_all("act(z)", got_y, ref_y, tol_y);
    expect_near_all("act'(z)", got_d, ref_d, tol_d);
    ::testing::Test::RecordProperty(std::string(act_ref::name(a)) + "_max_rel_err_y", std::to_string(worst_y));
    ::testing::Test::RecordProperty(std::string(act_ref::name(a)) + "_max_rel_err_dact", std::to_string(worst_d));
  }
}

TEST(ActivationAccuracy, Float32SweepIsWithinAFewUlp) { sweep_activations<float>(DType::Float32); }
TEST(ActivationAccuracy, Float64SweepIsWithinAFewUlp) { sweep_activations<double>(DType::Float64); }

/// NaN and +-inf in x, with finite statistics: the other elements and channels keep their
/// values; a non-finite element gives what torch's formulas give at z = NaN, +inf, -inf (NaN
/// propagates; act(+inf) = +inf; act(-inf) is 0, -inf or NaN (-inf * 0)), and so do the sums of
/// its channel and its dx. Channel 0 is clean; channel 1 holds a NaN, 2 a +inf, 3 a -inf.
TEST(ActivationNonFinite, NaNAndInfInXBehaveAsTorchsFormulas)
{
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  auto same_class = [](const std::string& what, const std::vector<double>& got, const std::vector<double>& ref,
                       const std::vector<double>& tol) {
    ASSERT_EQ(got.size(), ref.size());
    for (size_t i = 0; i < got.size(); ++i) {
      if (std::isnan(ref[i])) {
        EXPECT_TRUE(std::isnan(got[i])) << what << "[" << i << "] = " << got[i] << ", expected NaN";
      } else if (std::isinf(ref[i])) {
        EXPECT_EQ(got[i], ref[i]) << what << "[" << i << "]";
      } else {
        EXPECT_NEAR(got[i], ref[i], tol[i]) << what << "[" << i << "]";
      }
    }
  };
  for (DType dt : {DType::Float32, DType::Float64, DType::BFloat16}) {
    for (Layout lay : {Layout::ChannelMajor, Layout::ChannelsLast}) {
      const Geometry g{3, 4, 5, lay};
      const int64_t C = g.c;
      std::mt19937 rng(17);
      const Buf x0 = random_input(dt, g, rng, std::vector<double>(C, 0.5), std::vector<double>(C, 1.0));
      const Buf dy = random_input(dt, g, rng, std::vector<double>(C, 0.0), std::vector<double>(C, 1.0));
      const DType pt = dt == DType::BFloat16 ? DType::Float32 : dt;
      Buf w(pt, C), b(pt, C);
      for (int64_t c = 0; c < C; ++c) {
        w.set(c, 0.75 + 0.25 * static_cast<double>(c));
        b.set(c, 0.25 - 0.125 * static_cast<double>(c));
      }
      Buf x = x0;
      x.set(offset_of(g, 1, 1, 2), nan);
      x.set(offset_of(g, 2, 2, 0), inf);
      x.set(offset_of(g, 0, 3, 4), -inf);
      const std::vector<double> mean{0.5, 0.4, 0.6, 0.3}, invstd{1.1, 0.9, 1.2, 0.8};
      const double count = 15.0;
      const std::vector<double> stats = make_stats(count, mean, nans(C), invstd);
      const std::vector<double> gsums{1.5, -2.0, 0.5, 3.0, -1.0, 2.5, -0.5, 1.25};
      for (Activation a : act_ref::kAll) {
        SCOPED_TRACE(std::string(act_ref::name(a)) + " " + dtype_str(dt) +
                     (lay == Layout::ChannelMajor ? " ChannelMajor" : " ChannelsLast"));
        const Act act{a, 0.1};
        const ld slope = act_ref::slope_in(act, dt);
        const double ua = unit_roundoff(pysbn::acc_dtype(dt));
        std::vector<double> yref(static_cast<size_t>(numel(g))), ytol(yref.size()), dref(yref.size()),
          dtol(yref.size());
        std::vector<ld> s1(C, 0.0L), s2(C, 0.0L);
        std::vector<double> stol(2 * C, 0.0);
        // the tolerances of the finite results, from the finite terms only
        auto fin = [](ld v) { return std::isfinite(v) ? static_cast<double>(v) : 0.0; };
        for_each_element(g, [&](int64_t c, int64_t i) {
          const auto cc = static_cast<size_t>(c), ii = static_cast<size_t>(i);
          const ld xm = static_cast<ld>(x.get(i)) - mean[cc], t = xm * invstd[cc] * w.get(c), bc = b.get(c);
          const ld z = t + bc, s_z = std::fabs(t) + std::fabs(bc);
          const act_ref::Value v = act_ref::eval(a, slope, z);
          yref[ii] = static_cast<double>(v.y);
          ytol[ii] = tol_act(dt, fin(v.y), fin(std::fabs(v.d) * s_z));
          const ld gi = act_ref::grad(a, slope, z, dy.get(i));
          s1[cc] += gi;
          s2[cc] += gi * xm;
          const double gtol = 8 * ua * fin(std::fabs(dy.get(i)) * (v.dterms + std::fabs(v.d2) * s_z));
          stol[cc] += 1e-5 * fin(std::fabs(gi)) + gtol;
          stol[C + cc] += 1e-5 * fin(std::fabs(gi * xm)) + gtol * fin(std::fabs(xm));
          const ld is = invstd[cc], isw = is * w.get(c);
          const ld bb = gsums[cc] / count, k = xm * is * is * gsums[C + cc] / count;
          dref[ii] = static_cast<double>((gi - bb - k) * isw);
          dtol[ii] = tol_act(dt, fin(dref[ii]), fin((std::fabs(gi) + std::fabs(bb) + std::fabs(k)) * isw)) +
                     gtol * static_cast<double>(isw);
        });
        const TensorView xv{x.data(), dt, g};
        const Affine affine{w.data(), b.data(), pt};
        Buf y(dt, numel(g));
        pysbn::normalize(xv, stats.data(), affine, act, y.data(), Exec{});
        same_class("y", y.values(), yref, ytol);
        std::vector<double> sref(2 * C), sums = nans(2 * C);
        for (int64_t c = 0; c < C; ++c) {
          sref[static_cast<size_t>(c)] = static_cast<double>(s1[static_cast<size_t>(c)]);
          sref[static_cast<size_t>(C + c)] = static_cast<double>(s2[static_cast<size_t>(c)]);
        }
        pysbn::backward_reduce(xv, dy.data(), stats.data(), affine, act, sums.data(), AffineGrad{}, Exec{});
        same_class("sums", sums, sref, stol);
        Buf dx(dt, numel(g));
        pysbn::backward_elemt(xv, dy.data(), stats.data(), 1e-5, EpsMode::Plus, affine, act, gsums.data(), dx.data(),
                              Exec{});
        same_class("dx", dx.values(), dref, dtol);
      }
    }
  }
}

/// With the identity, the ops are the formulas they were before activations existed, bit for
/// bit (the kernels' arithmetic, replayed here in the accumulation type):
/// y = (x - hi) * a + b with hi + lo = mean, a = invstd * w, b = bias - lo * a, and
/// dx = dy * k1 - (x - hi) * k2 - k3; act.negative_slope does not matter to it. The compiler
/// may fuse a multiply and an add of these into an FMA (GCC does by default in C++ where the
/// target has FMA), so each element must be one of the few ways of rounding the formula.
template <class T>
void identity_bits(DType dt)
{
  auto bits_among = [](const std::string& what, const std::vector<double>& got,
                       const std::vector<std::vector<double>>& ways) {
    for (size_t i = 0; i < got.size(); ++i) {
      bool ok = false;
      for (const auto& w : ways) { ok = ok || std::memcmp(&got[i], &w[i], sizeof(double)) == 0; }
      if (!ok) {
        ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", not the formula's rounding (e.g. " << ways[0][i]
                      << ")";
        return;
      }
    }
  };
  for (Layout lay : {Layout::ChannelMajor, Layout::ChannelsLast}) {
    for (const Geometry& g0 : {Geometry{5, 7, 33}, Geometry{3, 70, 1}, Geometry{4, 3, 1100}}) {
      Geometry g = g0;
      g.layout = lay;
      SCOPED_TRACE(dtype_str(dt) + (lay == Layout::ChannelMajor ? " ChannelMajor" : " ChannelsLast"));
      const int64_t C = g.c;
      std::mt19937 rng(5);
      const Buf x = random_input(dt, g, rng, std::vector<double>(C, 1e3 + 1.0 / 3.0), std::vector<double>(C, 0.5));
      const Buf dy = random_input(dt, g, rng, std::vector<double>(C, 0.0), std::vector<double>(C, 1.0));
      const Buf w = random_uniform(dt, C, rng, 0.5, 1.5, true), b = random_uniform(dt, C, rng, -1.0, 1.0);
      std::vector<double> mean(C), invstd(C), sums(2 * C);
      std::uniform_real_distribution<double> u(0.5, 2.0);
      for (int64_t c = 0; c < C; ++c) {
        mean[c] = 1e3 + 1.0 / 3.0 + 0.01 * static_cast<double>(c);
        invstd[c] = u(rng);
        sums[c] = u(rng) - 1.0;
        sums[C + c] = u(rng) - 1.0;
      }
      const double count = static_cast<double>(g.n * g.l) + 3.0;
      const std::vector<double> stats = make_stats(count, mean, nans(C), invstd);
      const auto n = static_cast<size_t>(numel(g));
      std::vector<std::vector<double>> yways(2, std::vector<double>(n)), dways(3, std::vector<double>(n));
      for_each_element(g, [&](int64_t c, int64_t i) {
        const auto ii = static_cast<size_t>(i);
        const T hi = static_cast<T>(mean[c]), lo = static_cast<T>(mean[c] - static_cast<double>(hi));
        const double ac = invstd[c] * w.get(c);
        const T a = static_cast<T>(ac), bb = static_cast<T>(b.get(c) - static_cast<double>(lo) * ac);
        const T xh = static_cast<T>(x.get(i)) - hi, dv = static_cast<T>(dy.get(i));
        const T ya = xh * a;
        yways[0][ii] = static_cast<double>(static_cast<T>(ya + bb));
        yways[1][ii] = static_cast<double>(static_cast<T>(std::fma(xh, a, bb)));
        const double inv_cnt = 1.0 / count, is = invstd[c], wc = w.get(c);
        const double c2 = is * is * is * wc * (sums[C + c] * inv_cnt);
        const T k1 = static_cast<T>(is * wc), k2 = static_cast<T>(c2);
        const T k3 = static_cast<T>(is * wc * (sums[c] * inv_cnt) - static_cast<double>(lo) * c2);
        const T p1 = dv * k1, p2 = xh * k2;
        dways[0][ii] = static_cast<double>(static_cast<T>(p1 - p2 - k3));
        dways[1][ii] = static_cast<double>(static_cast<T>(std::fma(dv, k1, -p2) - k3));
        dways[2][ii] = static_cast<double>(static_cast<T>(std::fma(-xh, k2, p1) - k3));
      });
      std::vector<double> first_y, first_dx;
      for (double slope : {0.01, 7.0}) {
        const Act act{Activation::Identity, slope};
        Buf y(dt, numel(g)), dx(dt, numel(g));
        pysbn::normalize(TensorView{x.data(), dt, g}, stats.data(), Affine{w.data(), b.data(), dt}, act, y.data(),
                         cpu_exec(2));
        pysbn::backward_elemt(TensorView{x.data(), dt, g}, dy.data(), stats.data(), 1e-5, EpsMode::Plus,
                              Affine{w.data(), b.data(), dt}, act, sums.data(), dx.data(), cpu_exec(2));
        bits_among("y", y.values(), yways);
        bits_among("dx", dx.values(), dways);
        if (first_y.empty()) {
          first_y = y.values();
          first_dx = dx.values();
        } else {
          expect_same_bits("y, another negative_slope", y.values(), first_y);
          expect_same_bits("dx, another negative_slope", dx.values(), first_dx);
        }
      }
    }
  }
}

TEST(ActivationIdentity, Float32IsTheFormulaBitForBit) { identity_bits<float>(DType::Float32); }
TEST(ActivationIdentity, Float64IsTheFormulaBitForBit) { identity_bits<double>(DType::Float64); }

// ---- empty inputs -------------------------------------------------------------------------------

TEST(CpuOpsEmpty, ZeroCountGivesZeroMomentsAndSums)
{
  const std::vector<double> zero3(3, 0.0), zero6(6, 0.0), zero7(7, 0.0);
  // The batch statistics [count 0, mean 0.5, m2 0, invstd 2.0] and no grad sums.
  const std::vector<double> stats = make_stats(0.0, std::vector<double>(3, 0.5), zero3, std::vector<double>(3, 2.0));
  const std::vector<double> no_sums(6, 0.0);
  for (const auto& dp : all_combos()) {
    const DType dt = dp[0], pt = dp[1];
    for (Layout lay : {Layout::ChannelMajor, Layout::ChannelsLast}) {
      for (const auto& s : std::vector<std::array<int64_t, 2>>{{0, 5}, {4, 0}}) {
        const Geometry g{s[0], 3, s[1], lay};
        SCOPED_TRACE(dtype_str(dt) + "/" + dtype_str(pt) + " N=" + std::to_string(g.n) + " L=" + std::to_string(g.l) +
                     (lay == Layout::ChannelMajor ? " CM" : " CL"));
        Buf x(dt, 1), dy(dt, 1), w(pt, 3), b(pt, 3);
        w.fill(1.5);
        b.fill(0.25);
        const TensorView xv{x.data(), dt, g};
        for (int t : kThreads) {
          const Exec ex = cpu_exec(t);
          std::vector<double> st = nans(7);
          pysbn::moments(xv, st.data(), ex);
          expect_near_all("moments of nothing", st, zero7, zero7);
          st = nans(7);
          // x may be null when there is no element.
          EXPECT_NO_THROW(pysbn::moments(TensorView{nullptr, dt, g}, st.data(), ex));
          expect_near_all("moments of nothing (x null)", st, zero7, zero7);
          std::vector<double> sum = nans(3);
          pysbn::sum_ft(xv, sum.data(), ex);
          expect_near_all("sum_ft of nothing", sum, zero3, zero3);
          EXPECT_NO_THROW(pysbn::normalize(xv, stats.data(), Affine{w.data(), b.data(), pt}, Act{}, x.data(), ex));
          std::vector<double> sums = nans(6);
          Buf gw(pt, 3), gb(pt, 3);
          gw.poison();
          gb.poison();
          pysbn::backward_reduce(TensorView{x.data(), dt, g}, dy.data(), stats.data(), Affine{w.data(), b.data(), pt},
                                 Act{}, sums.data(), AffineGrad{gw.data(), gb.data(), pt}, ex);
          expect_near_all("backward_reduce of nothing", sums, zero6, zero6);
          expect_near_all("grad_weight of nothing", gw.values(), zero3, zero3);
          expect_near_all("grad_bias of nothing", gb.values(), zero3, zero3);
          EXPECT_NO_THROW(pysbn::backward_elemt(xv, dy.data(), stats.data(), 1e-5, EpsMode::Plus,
                                                Affine{w.data(), nullptr, pt}, Act{}, no_sums.data(), x.data(), ex));
        }
      }
    }
  }
}

TEST(CpuOpsEmpty, ZeroChannelsWritesOnlyTheCount)
{
  for (Layout lay : {Layout::ChannelMajor, Layout::ChannelsLast}) {
    const Geometry g{4, 0, 3, lay};
    Buf x(DType::Float32, 1);
    std::vector<double> st = nans(1);
    pysbn::moments(TensorView{x.data(), DType::Float32, g}, st.data(), cpu_exec(2));
    EXPECT_EQ(st[0], 12.0);
    const std::vector<double> recs = {5.0, 7.0};
    std::vector<double> merged = nans(1);
    pysbn::merge_moments(2, 0, recs.data(), merged.data(), cpu_exec(1));
    EXPECT_EQ(merged[0], 12.0);
  }
}

/// Backward on an empty local share (other replicas hold the batch): the local sums are zero
/// and nothing is read from dy/x; the elemt has nothing to write.
TEST(CpuOpsEmpty, EmptyShareContributesZeroSums)
{
  const Geometry g{0, 4, 7, Layout::ChannelsLast};
  const std::vector<double> stats = make_stats(50.0, std::vector<double>(4, 1.0), std::vector<double>(4, 10.0),
                                               std::vector<double>(4, 1.0));
  const std::vector<double> global(8, 3.0);
  std::vector<double> sums = nans(8);
  const TensorView xv{nullptr, DType::Float64, g};
  const Affine no_affine{nullptr, nullptr, DType::Float64};
  pysbn::backward_reduce(xv, nullptr, stats.data(), no_affine, Act{}, sums.data(), AffineGrad{}, cpu_exec(1));
  expect_near_all("sums", sums, std::vector<double>(8, 0.0), std::vector<double>(8, 0.0));
  EXPECT_NO_THROW(pysbn::backward_elemt(xv, nullptr, stats.data(), 1e-5, EpsMode::Plus, no_affine, Act{},
                                        global.data(), nullptr, cpu_exec(1)));
  // batch_norm_forward of an empty share with the global record: the statistics (and the
  // running stats) come from the record; there is no y to write.
  const std::vector<double> record = slice(stats, 0, 9);
  std::vector<double> st = nans(13), st_ref = nans(13);
  Buf rm(DType::Float64, 4), rv(DType::Float64, 4), rm_ref(DType::Float64, 4), rv_ref(DType::Float64, 4);
  rm.fill(0.5);
  rv.fill(2.0);
  rm_ref = rm;
  rv_ref = rv;
  int64_t counter = 0, counter_ref = 0;
  pysbn::finalize(4, record.data(), 1e-5, EpsMode::Plus, st_ref.data(),
                  RunningStats{rm_ref.data(), rv_ref.data(), DType::Float64, 0.1, false, &counter_ref}, cpu_exec(1));
  pysbn::batch_norm_forward(xv, record.data(), 1e-5, EpsMode::Plus, no_affine, Act{}, st.data(), nullptr,
                            RunningStats{rm.data(), rv.data(), DType::Float64, 0.1, false, &counter}, cpu_exec(2));
  expect_same_bits("stats", st, st_ref);
  expect_same_bits("running_mean", rm.values(), rm_ref.values());
  expect_same_bits("running_var", rv.values(), rv_ref.values());
  EXPECT_EQ(counter, 1);
  EXPECT_NE(rm.get(0), 0.5) << "the global record has values: the running stats move";
}

// ---- merge_moments ------------------------------------------------------------------------------

struct MergeCase {
  const char* name;
  int64_t c;
  std::vector<int64_t> counts;
  double offset;
};

std::ostream& operator<<(std::ostream& os, const MergeCase& m) { return os << m.name; }

class MergeMoments : public ::testing::TestWithParam<MergeCase> {};

TEST_P(MergeMoments, MatchesMomentsOfTheConcatenation)
{
  const MergeCase& p = GetParam();
  const auto k = static_cast<int64_t>(p.counts.size());
  const int64_t C = p.c, rec = 2 * C + 1;
  std::mt19937 rng(4242u + static_cast<uint32_t>(k) * 31u + static_cast<uint32_t>(C));
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> shift(-2.0, 2.0);
  // Each record summarises its own chunk of data (two-pass in long double); the reference is
  // the two-pass moments of all chunks concatenated.
  std::vector<double> records(static_cast<size_t>(k * rec));
  std::vector<std::vector<ld>> all(static_cast<size_t>(C));
  for (int64_t r = 0; r < k; ++r) {
    const int64_t n = p.counts[static_cast<size_t>(r)];
    double* rr = records.data() + r * rec;
    rr[0] = static_cast<double>(n);
    for (int64_t c = 0; c < C; ++c) {
      const double mu = p.offset + shift(rng), sd = 0.5 + 0.1 * static_cast<double>(c % 7);
      std::vector<ld> v(static_cast<size_t>(n));
      ld s = 0.0L;
      for (auto& e : v) {
        e = mu + sd * nd(rng);
        s += e;
      }
      const ld mean = n ? s / static_cast<ld>(n) : 0.0L;
      ld m2 = 0.0L;
      for (ld e : v) { m2 += (e - mean) * (e - mean); }
      rr[1 + c] = static_cast<double>(mean);
      rr[1 + C + c] = static_cast<double>(m2);
      all[static_cast<size_t>(c)].insert(all[static_cast<size_t>(c)].end(), v.begin(), v.end());
    }
  }
  RefStats cat;
  for (int64_t n : p.counts) { cat.count += n; }
  cat.mean.assign(static_cast<size_t>(C), 0.0L);
  cat.m2.assign(static_cast<size_t>(C), 0.0L);
  for (size_t c = 0; c < static_cast<size_t>(C); ++c) {
    ld s = 0.0L;
    for (ld e : all[c]) { s += e; }
    cat.mean[c] = cat.count ? s / static_cast<ld>(cat.count) : 0.0L;
    for (ld e : all[c]) { cat.m2[c] += (e - cat.mean[c]) * (e - cat.mean[c]); }
  }
  std::vector<double> out = nans(rec);
  pysbn::merge_moments(k, C, records.data(), out.data(), cpu_exec(1));
  EXPECT_EQ(out[0], static_cast<double>(cat.count));
  expect_near_all("merge vs concatenation", out, moments_ref(cat), moments_tol(cat, DType::Float64));
}

std::vector<MergeCase> merge_cases()
{
  std::vector<int64_t> many(64);
  std::mt19937 rng(7u);
  std::uniform_int_distribution<int64_t> cnt(0, 40);
  for (auto& n : many) { n = cnt(rng) < 8 ? 0 : cnt(rng); }
  return {{"uneven_with_empty", 3, {5, 0, 17, 1, 0, 100}, 0.0},
          {"k1", 5, {42}, 1.5},
          {"k1_empty", 2, {0}, 0.0},
          {"all_empty", 2, {0, 0, 0}, 0.0},
          {"leading_empty", 4, {0, 9}, -3.0},
          {"singletons", 4, {1, 1, 1, 1, 1, 1, 1}, 0.5},
          {"very_uneven", 2, {100000, 3}, 2.0},
          {"offset_1e4", 3, {300, 0, 1000, 7}, 1e4},
          {"offset_1e6", 3, {300, 0, 1000, 7}, 1e6},
          {"many_records", 33, many, 1.0},
          {"wide", 4097, {3, 0, 2}, 0.0}};
}

INSTANTIATE_TEST_SUITE_P(Records, MergeMoments, ::testing::ValuesIn(merge_cases()),
                         [](const ::testing::TestParamInfo<MergeCase>& i) { return std::string(i.param.name); });

TEST(MergeMomentsEdge, SingleRecordIsReproduced)
{
  const std::vector<double> in = {9.0, 1.25, -3.5, 1e4 + 0.1, 2.5, 0.0, 123.75};
  std::vector<double> out = nans(7), tol(7);
  pysbn::merge_moments(1, 3, in.data(), out.data(), cpu_exec(1));
  for (size_t i = 0; i < 7; ++i) { tol[i] = 2.0 * unit_roundoff(DType::Float64) * std::fabs(in[i]); }
  expect_near_all("k = 1", out, in, tol);
}

/// A count-0 record contributes nothing, whatever its mean and m2 slots hold.
TEST(MergeMomentsEdge, ZeroCountRecordContributesNothing)
{
  const std::vector<double> in = {0.0, 123.0, 456.0, 4.0, 2.0, 8.0};
  std::vector<double> out = nans(3);
  pysbn::merge_moments(2, 1, in.data(), out.data(), cpu_exec(1));
  expect_near_all("zero-count record", out, {4.0, 2.0, 8.0}, {0.0, 1e-15, 1e-14});
}

// ---- non-finite input ---------------------------------------------------------------------------

/// The flat index of x[n, c, l] in g's layout.
int64_t flat_index(const Geometry& g, int64_t n, int64_t c, int64_t l)
{
  return g.layout == Layout::ChannelsLast ? (n * g.l + l) * g.c + c : (n * g.c + c) * g.l + l;
}

/// +-inf or NaN in channel 0 (at its first, a middle or its last value, in every path: rows,
/// channel-major blocks, several threads): its mean is what a plain sum gives (+inf, -inf,
/// NaN for NaN or for +inf with -inf) as nn.BatchNorm's, its M2 is NaN, and the other channels
/// are those of the same input without the bad values.
TEST(MomentsNonFinite, ChannelMeanIsThatOfAPlainSum)
{
  const double inf = std::numeric_limits<double>::infinity();
  const struct {
    const char* name;
    std::vector<double> values;
    int sign;  // +1: +inf, -1: -inf, 0: NaN
  } bad[] = {{"+inf", {inf}, 1}, {"-inf", {-inf}, -1}, {"nan", {std::nan("")}, 0}, {"+inf,-inf", {inf, -inf}, 0},
             {"+inf,+inf", {inf, inf}, 1}};
  const Geometry shapes[] = {{8, 3, 16}, {4, 3, 4900}, {300, 5, 1}, {2, 2, 70000}};
  std::mt19937 rng(99);
  for (DType t : {DType::Float32, DType::Float64, DType::Float16, DType::BFloat16}) {
    for (Layout lay : {Layout::ChannelMajor, Layout::ChannelsLast}) {
      for (Geometry g : shapes) {
        g.layout = lay;
        const std::vector<double> mu(static_cast<size_t>(g.c), 1.5), sd(static_cast<size_t>(g.c), 0.5);
        const Buf clean = random_input(t, g, rng, mu, sd);
        const int64_t m = g.n * g.l;
        for (const auto& b : bad) {
          for (int64_t at : {int64_t{0}, m / 2, m - static_cast<int64_t>(b.values.size())}) {
            Buf x = clean;
            for (size_t k = 0; k < b.values.size(); ++k) {
              const int64_t r = at + static_cast<int64_t>(k);
              x.set(flat_index(g, r / g.l, 0, r % g.l), b.values[k]);
            }
            for (int threads : {1, 2}) {
              SCOPED_TRACE(dtype_str(t) + " " + b.name + " at " + std::to_string(at) + " (" +
                           std::to_string(g.n) + "," + std::to_string(g.c) + "," + std::to_string(g.l) +
                           (lay == Layout::ChannelsLast ? ") channels-last" : ")") + " threads " +
                           std::to_string(threads));
              std::vector<double> got = nans(pysbn::record_size(g.c)), ref = nans(pysbn::record_size(g.c));
              pysbn::moments(TensorView{x.data(), t, g}, got.data(), cpu_exec(threads));
              pysbn::moments(TensorView{clean.data(), t, g}, ref.data(), cpu_exec(threads));
              EXPECT_EQ(got[0], static_cast<double>(m));
              if (b.sign == 0) {
                EXPECT_TRUE(std::isnan(got[1])) << got[1];
              } else {
                EXPECT_EQ(got[1], b.sign * inf);
              }
              EXPECT_TRUE(std::isnan(got[1 + g.c])) << "m2 " << got[1 + g.c];
              // Other channels: as accurate as without the bad values (not bit for bit: a
              // channels-last block whose shift check fails in one lane redoes all its lanes).
              const double rt = t == DType::Float64 ? 1e-12 : 1e-5;
              for (int64_t c = 1; c < g.c; ++c) {
                EXPECT_NEAR(got[1 + c], ref[1 + c], rt * std::fabs(ref[1 + c])) << "mean, channel " << c;
                EXPECT_NEAR(got[1 + g.c + c], ref[1 + g.c + c], rt * ref[1 + g.c + c]) << "m2, channel " << c;
              }
            }
          }
        }
      }
    }
  }
}

/// Records whose means are +-inf or NaN merge as the weighted sums of the means: +inf with a
/// finite record stays +inf, +inf with -inf is NaN; M2 is NaN; the finite channel is exact.
TEST(MomentsNonFinite, MergeOfNonFiniteRecordsIsThePlainSum)
{
  const double inf = std::numeric_limits<double>::infinity();
  // Two channels: channel 0 carries the case, channel 1 is finite in both records.
  const struct {
    double a, b;
    int sign;
  } cases[] = {{inf, 2.0, 1}, {2.0, -inf, -1}, {inf, -inf, 0}, {std::nan(""), 1.0, 0}, {inf, inf, 1}};
  for (const auto& k : cases) {
    const std::vector<double> in = {3.0, k.a, 1.0, 0.5, 2.0, /**/ 5.0, k.b, 3.0, 0.25, 1.0};
    std::vector<double> out = nans(5);
    pysbn::merge_moments(2, 2, in.data(), out.data(), cpu_exec(1));
    SCOPED_TRACE(std::to_string(k.a) + " with " + std::to_string(k.b));
    EXPECT_EQ(out[0], 8.0);
    if (k.sign == 0) {
      EXPECT_TRUE(std::isnan(out[1])) << out[1];
    } else {
      EXPECT_EQ(out[1], k.sign * inf);
    }
    EXPECT_TRUE(std::isnan(out[3])) << out[3];
    EXPECT_DOUBLE_EQ(out[2], (3.0 * 1.0 + 5.0 * 3.0) / 8.0);
    EXPECT_DOUBLE_EQ(out[4], 2.0 + 1.0 + 2.0 * 2.0 * 3.0 * 5.0 / 8.0);
  }
}

/// finalize keeps a NaN variance (a channel holding inf or NaN) NaN in both eps modes; a lone
/// record with a non-finite mean merges to NaN spread.
TEST(MomentsNonFinite, FinalizeAndLoneRecordKeepNaN)
{
  const double inf = std::numeric_limits<double>::infinity();
  for (EpsMode mode : {EpsMode::Plus, EpsMode::Clamp}) {
    const std::vector<double> rec = {4.0, inf, 1.5, std::nan(""), 2.0};
    std::vector<double> st = nans(7);
    pysbn::finalize(2, rec.data(), 1e-3, mode, st.data(), RunningStats{}, cpu_exec(1));
    EXPECT_TRUE(std::isnan(st[5])) << st[5];
    EXPECT_DOUBLE_EQ(st[6], 1.0 / std::sqrt((mode == EpsMode::Plus ? 0.5 + 1e-3 : 0.5)));
  }
  const std::vector<double> one = {4.0, inf, 1.5, 0.5, 2.0};
  std::vector<double> out = nans(5);
  pysbn::merge_moments(1, 2, one.data(), out.data(), cpu_exec(1));
  EXPECT_EQ(out[1], inf);
  EXPECT_TRUE(std::isnan(out[3])) << out[3];
  EXPECT_DOUBLE_EQ(out[4], 2.0);
}

// ---- finalize -----------------------------------------------------------------------------------

struct FinalizeCase {
  DType param;
  EpsMode mode;
  int64_t c;
};

std::ostream& operator<<(std::ostream& os, const FinalizeCase& f)
{
  return os << "param " << dtype_str(f.param) << "/" << (f.mode == EpsMode::Plus ? "Plus" : "Clamp") << "/C=" << f.c;
}

class Finalize : public ::testing::TestWithParam<FinalizeCase> {
 protected:
  /// A moments record whose channels cycle through var = 0, eps/2, eps, 2 eps and O(1) values,
  /// so that Plus and Clamp give clearly different invstd.
  std::vector<double> make_record(double count, double eps, std::mt19937& rng) const
  {
    const int64_t C = GetParam().c;
    std::vector<double> st(static_cast<size_t>(2 * C + 1));
    std::uniform_real_distribution<double> mean(-5.0, 5.0), var(0.01, 4.0);
    st[0] = count;
    for (int64_t c = 0; c < C; ++c) {
      double v = 0.0;
      switch (c % 5) {
        case 0: v = 0.0; break;
        case 1: v = eps / 2; break;
        case 2: v = eps; break;
        case 3: v = 2 * eps; break;
        default: v = var(rng); break;
      }
      st[static_cast<size_t>(1 + c)] = count > 0 ? mean(rng) + (c % 3 == 0 ? 100.0 : 0.0) : 0.0;
      st[static_cast<size_t>(1 + C + c)] = count > 0 ? v * count : 0.0;
    }
    return st;
  }

  double ref_invstd(double var, double eps) const
  {
    const ld v = GetParam().mode == EpsMode::Plus ? static_cast<ld>(var) + eps : std::max<ld>(var, eps);
    return static_cast<double>(1.0L / std::sqrt(v));
  }

  /// References and tolerances of running stats rm0, rv0 updated with `factor` from `st`.
  void running_ref(const std::vector<double>& st, const Buf& rm0, const Buf& rv0, double factor,
                   std::vector<double>& rm_ref, std::vector<double>& rm_tol, std::vector<double>& rv_ref,
                   std::vector<double>& rv_tol) const
  {
    const FinalizeCase& p = GetParam();
    const auto C = static_cast<size_t>(p.c);
    const double rd = 1e-13, count = st[0];  // finalize works in float64
    rm_ref.resize(C);
    rm_tol.resize(C);
    rv_ref.resize(C);
    rv_tol.resize(C);
    for (size_t c = 0; c < C; ++c) {
      const auto ci = static_cast<int64_t>(c);
      const double m = st[1 + c], m2 = st[1 + C + c];
      rm_ref[c] = static_cast<double>((1.0L - factor) * rm0.get(ci) + static_cast<ld>(factor) * m);
      rm_tol[c] = tol_out(p.param, rm_ref[c], std::fabs((1.0 - factor) * rm0.get(ci)) + std::fabs(factor * m)) +
                  rd * std::fabs(rm_ref[c]);
      const ld unbiased = static_cast<ld>(m2) / (count - 1.0);
      rv_ref[c] = static_cast<double>((1.0L - factor) * rv0.get(ci) + static_cast<ld>(factor) * unbiased);
      rv_tol[c] = tol_out(p.param, rv_ref[c], std::fabs(rv_ref[c])) + rd * std::fabs(rv_ref[c]);
    }
  }
};

TEST_P(Finalize, InvstdAndRunningStats)
{
  const FinalizeCase& p = GetParam();
  const auto C = static_cast<size_t>(p.c);
  const int64_t R = pysbn::record_size(p.c);
  std::mt19937 rng(99u + static_cast<uint32_t>(p.c) + 7u * static_cast<uint32_t>(p.param) +
                   3u * static_cast<uint32_t>(p.mode));
  const double rd = 1e-13;  // finalize works in float64
  for (double count : {2.0, 37.0, 100000.0}) {
    for (double eps : {1e-5, 1e-3}) {
      for (double factor : {0.1, 1.0, 1.0 / 3.0}) {
        SCOPED_TRACE("count=" + std::to_string(count) + " eps=" + std::to_string(eps) + " factor=" + std::to_string(factor));
        const std::vector<double> st = make_record(count, eps, rng);
        const Buf rm0 = random_uniform(p.param, p.c, rng, -2.0, 2.0), rv0 = random_uniform(p.param, p.c, rng, 0.1, 3.0);
        std::vector<double> mean_ref(C), mean_tol(C, 0.0), is_ref(C), is_tol(C), rm_ref, rm_tol, rv_ref, rv_tol;
        for (size_t c = 0; c < C; ++c) {
          const double m = st[1 + c], m2 = st[1 + C + c];
          mean_ref[c] = m;
          is_ref[c] = ref_invstd(m2 / count, eps);
          is_tol[c] = rd * is_ref[c];
        }
        running_ref(st, rm0, rv0, factor, rm_ref, rm_tol, rv_ref, rv_tol);
        std::vector<double> stats = nans(pysbn::stats_size(p.c));
        Buf rm = rm0, rv = rv0;
        pysbn::finalize(p.c, st.data(), eps, p.mode, stats.data(), RunningStats{rm.data(), rv.data(), p.param, factor},
                        cpu_exec(1));
        expect_same_bits("stats: the record in front", slice(stats, 0, R), st);
        expect_near_all("mean", stats_mean(stats, p.c), mean_ref, mean_tol);
        expect_near_all("invstd", stats_invstd(stats, p.c), is_ref, is_tol);
        expect_near_all("running_mean", rm.values(), rm_ref, rm_tol);
        expect_near_all("running_var", rv.values(), rv_ref, rv_tol);

        // Same without running stats.
        const std::vector<double> with_running = stats;
        stats = nans(pysbn::stats_size(p.c));
        pysbn::finalize(p.c, st.data(), eps, p.mode, stats.data(), RunningStats{}, cpu_exec(1));
        expect_near_all("mean (no running stats)", stats_mean(stats, p.c), mean_ref, mean_tol);
        expect_near_all("invstd (no running stats)", stats_invstd(stats, p.c), is_ref, is_tol);
        expect_same_bits("stats (no running stats)", stats, with_running);
      }
    }
  }
}

/// The record may be the first record_size(c) values of the statistics buffer itself (as in
/// batch_norm_forward without a record): the same bits as from a separate record.
TEST_P(Finalize, RecordMayAliasTheStats)
{
  const FinalizeCase& p = GetParam();
  const int64_t R = pysbn::record_size(p.c);
  std::mt19937 rng(17u + static_cast<uint32_t>(p.c));
  for (double count : {0.0, 2.0, 1000.0}) {
    SCOPED_TRACE("count=" + std::to_string(count));
    const double eps = 1e-3;
    const std::vector<double> record = make_record(count, eps, rng);
    const Buf rm0 = random_uniform(p.param, p.c, rng, -2.0, 2.0), rv0 = random_uniform(p.param, p.c, rng, 0.1, 3.0);
    std::vector<double> st_ref = nans(pysbn::stats_size(p.c));
    Buf rm_ref = rm0, rv_ref = rv0;
    pysbn::finalize(p.c, record.data(), eps, p.mode, st_ref.data(),
                    RunningStats{rm_ref.data(), rv_ref.data(), p.param, 0.3}, cpu_exec(1));
    std::vector<double> st = nans(pysbn::stats_size(p.c));
    std::copy(record.begin(), record.end(), st.begin());
    Buf rm = rm0, rv = rv0;
    pysbn::finalize(p.c, st.data(), eps, p.mode, st.data(), RunningStats{rm.data(), rv.data(), p.param, 0.3},
                    cpu_exec(1));
    expect_same_bits("stats (aliased) vs stats", st, st_ref);
    expect_same_bits("stats: the record in front", slice(st, 0, R), record);
    expect_same_bits("running_mean", rm.values(), rm_ref.values());
    expect_same_bits("running_var", rv.values(), rv_ref.values());
  }
}

TEST_P(Finalize, ZeroCountLeavesRunningStatsUntouched)
{
  const FinalizeCase& p = GetParam();
  std::mt19937 rng(5u);
  const double eps = 1e-5;
  const std::vector<double> st = make_record(0.0, eps, rng);
  const Buf rm0 = random_uniform(p.param, p.c, rng, -2.0, 2.0), rv0 = random_uniform(p.param, p.c, rng, 0.1, 3.0);
  for (bool cumulative : {false, true}) {
    SCOPED_TRACE(cumulative ? "cumulative" : "momentum");
    std::vector<double> stats = nans(pysbn::stats_size(p.c));
    Buf rm = rm0, rv = rv0;
    int64_t counter = 3;
    pysbn::finalize(p.c, st.data(), eps, p.mode, stats.data(),
                    RunningStats{rm.data(), rv.data(), p.param, 0.1, cumulative, &counter}, cpu_exec(1));
    const std::vector<double> zero(static_cast<size_t>(p.c), 0.0);
    EXPECT_EQ(stats[0], 0.0);
    expect_near_all("mean", stats_mean(stats, p.c), zero, zero);
    // var = 0: both modes give 1/sqrt(eps).
    expect_near_all("invstd", stats_invstd(stats, p.c), std::vector<double>(zero.size(), 1.0 / std::sqrt(eps)),
                    std::vector<double>(zero.size(), 1e-13 / std::sqrt(eps)));
    expect_near_all("running_mean untouched", rm.values(), rm0.values(), zero);
    expect_near_all("running_var untouched", rv.values(), rv0.values(), zero);
    // The counter counts the batch all the same (nn.BatchNorm's num_batches_tracked).
    EXPECT_EQ(counter, 4);
  }
}

/// RunningStats.cumulative: the factor is 1 / num_batches_tracked after its increment (the
/// cumulative moving average, nn.BatchNorm's momentum=None); the momentum is not used (NaN
/// here). Without cumulative, a given counter is incremented and the momentum is the factor.
TEST_P(Finalize, CumulativeAverageUsesTheCounter)
{
  const FinalizeCase& p = GetParam();
  std::mt19937 rng(31u + static_cast<uint32_t>(p.c) + 7u * static_cast<uint32_t>(p.param));
  const double eps = 1e-5;
  for (int64_t before : {int64_t{0}, int64_t{4}, int64_t{99}}) {
    for (bool cumulative : {true, false}) {
      SCOPED_TRACE("num_batches_tracked=" + std::to_string(before) + (cumulative ? " cumulative" : " momentum 0.2"));
      const std::vector<double> st = make_record(37.0, eps, rng);
      const Buf rm0 = random_uniform(p.param, p.c, rng, -2.0, 2.0), rv0 = random_uniform(p.param, p.c, rng, 0.1, 3.0);
      const double factor = cumulative ? 1.0 / static_cast<double>(before + 1) : 0.2;
      std::vector<double> rm_ref, rm_tol, rv_ref, rv_tol;
      running_ref(st, rm0, rv0, factor, rm_ref, rm_tol, rv_ref, rv_tol);
      std::vector<double> stats = nans(pysbn::stats_size(p.c));
      Buf rm = rm0, rv = rv0;
      int64_t counter = before;
      const double momentum = cumulative ? std::nan("") : 0.2;
      pysbn::finalize(p.c, st.data(), eps, p.mode, stats.data(),
                      RunningStats{rm.data(), rv.data(), p.param, momentum, cumulative, &counter}, cpu_exec(1));
      EXPECT_EQ(counter, before + 1);
      expect_near_all("running_mean", rm.values(), rm_ref, rm_tol);
      expect_near_all("running_var", rv.values(), rv_ref, rv_tol);
    }
  }
  // A counter without running statistics still counts; the statistics are as without it.
  const std::vector<double> st = make_record(37.0, eps, rng);
  std::vector<double> stats = nans(pysbn::stats_size(p.c)), stats_ref = nans(pysbn::stats_size(p.c));
  int64_t counter = 10;
  pysbn::finalize(p.c, st.data(), eps, p.mode, stats.data(),
                  RunningStats{nullptr, nullptr, p.param, 0.1, false, &counter}, cpu_exec(1));
  pysbn::finalize(p.c, st.data(), eps, p.mode, stats_ref.data(), RunningStats{}, cpu_exec(1));
  EXPECT_EQ(counter, 11);
  expect_same_bits("stats", stats, stats_ref);
  pysbn::finalize(p.c, st.data(), eps, p.mode, stats.data(),
                  RunningStats{nullptr, nullptr, p.param, std::nan(""), true, &counter}, cpu_exec(1));
  EXPECT_EQ(counter, 12);
}

std::vector<FinalizeCase> finalize_cases()
{
  std::vector<FinalizeCase> out;
  for (DType pt : {DType::Float32, DType::Float64, DType::Float16, DType::BFloat16}) {
    for (EpsMode m : {EpsMode::Plus, EpsMode::Clamp}) {
      for (int64_t c : {1, 7, 4097}) { out.push_back({pt, m, c}); }
    }
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Modes, Finalize, ::testing::ValuesIn(finalize_cases()),
                         [](const ::testing::TestParamInfo<FinalizeCase>& i) {
                           return "p" + dtype_str(i.param.param) + (i.param.mode == EpsMode::Plus ? "_Plus_" : "_Clamp_") +
                                  std::to_string(i.param.c);
                         });

// ---- large offsets ------------------------------------------------------------------------------

struct OffsetCase {
  DType dtype;
  Layout layout;
};

std::ostream& operator<<(std::ostream& os, const OffsetCase& o)
{
  return os << dtype_str(o.dtype) << (o.layout == Layout::ChannelMajor ? "/ChannelMajor" : "/ChannelsLast");
}

class LargeOffset : public ::testing::TestWithParam<OffsetCase> {};

/// x = offset + N(0, 1) with shape (32, 64, 28, 28): float32 at 1e4, float64 at 1e6. Raw sum and
/// sum-of-squares would lose the variance entirely; the two-pass/Chan scheme must keep it, also
/// through two uneven shares and merge_moments, and the elementwise ops must keep the digits
/// of x - mean.
TEST_P(LargeOffset, VarianceAndOutputsKeepTheirDigits)
{
  const OffsetCase& p = GetParam();
  const bool f64 = p.dtype == DType::Float64;
  const double offset = f64 ? 1e6 : 1e4, rvar = f64 ? 1e-9 : 1e-5;
  const Geometry g{32, 64, 28 * 28, p.layout};
  const int64_t C = g.c, rec = 2 * C + 1;
  std::mt19937 rng(2024u + static_cast<uint32_t>(p.layout));
  const Buf x = random_input(p.dtype, g, rng, std::vector<double>(64, offset), std::vector<double>(64, 1.0));
  const RefStats ref = ref_stats(x, g);
  std::vector<double> var_ref(64), var_tol(64), mean_ref(64), mean_tol(64);
  for (size_t c = 0; c < 64; ++c) {
    var_ref[c] = static_cast<double>(ref.m2[c] / static_cast<ld>(ref.count));
    var_tol[c] = rvar * var_ref[c];
    mean_ref[c] = static_cast<double>(ref.mean[c]);
    mean_tol[c] = rvar;  // relative to the standard deviation (1)
  }
  auto check = [&](const std::vector<double>& st, const std::string& what) {
    std::vector<double> var(64), mean(64);
    for (size_t c = 0; c < 64; ++c) {
      mean[c] = st[1 + c];
      var[c] = st[1 + 64 + c] / st[0];
    }
    expect_near_all(what + " mean", mean, mean_ref, mean_tol);
    expect_near_all(what + " variance", var, var_ref, var_tol);
  };
  for (int t : {1, 2}) {
    SCOPED_TRACE("num_threads=" + std::to_string(t));
    std::vector<double> st = nans(rec);
    pysbn::moments(TensorView{x.data(), p.dtype, g}, st.data(), cpu_exec(t));
    EXPECT_EQ(st[0], 32.0 * 784.0);
    check(st, "moments");
  }
  const int64_t per = C * g.l, n0 = 11;
  std::vector<double> recs = nans(2 * rec), merged = nans(rec);
  Buf xs = x;
  pysbn::moments(TensorView{xs.ptr(0), p.dtype, Geometry{n0, C, g.l, p.layout}}, recs.data(), cpu_exec(2));
  pysbn::moments(TensorView{xs.ptr(n0 * per), p.dtype, Geometry{g.n - n0, C, g.l, p.layout}}, recs.data() + rec,
                 cpu_exec(2));
  pysbn::merge_moments(2, C, recs.data(), merged.data(), cpu_exec(1));
  check(merged, "merged shares");

  // normalize at the offset: (x - mean) * invstd * w + b, exactly as the contract writes it.
  const double ro = rtol_out(p.dtype);
  std::vector<double> invstd(64);
  Buf w(p.dtype, C), b(p.dtype, C), y(p.dtype, numel(g));
  for (int64_t c = 0; c < C; ++c) {
    invstd[static_cast<size_t>(c)] = 1.0 / std::sqrt(var_ref[static_cast<size_t>(c)] + 1e-5);
    w.set(c, 0.5 + 0.01 * static_cast<double>(c));
    b.set(c, -0.25);
  }
  y.poison();
  // The batch statistics: the full count, the reference mean, m2 unread (NaN), invstd.
  const std::vector<double> stats = make_stats(static_cast<double>(ref.count), mean_ref, nans(C), invstd);
  pysbn::normalize(TensorView{x.data(), p.dtype, g}, stats.data(), Affine{w.data(), b.data(), p.dtype}, Act{}, y.data(),
                   cpu_exec(2));
  std::vector<double> y_ref(static_cast<size_t>(numel(g))), y_tol(y_ref.size());
  for_each_element(g, [&](int64_t c, int64_t i) {
    const auto cc = static_cast<size_t>(c);
    const ld s = static_cast<ld>(invstd[cc]) * w.get(c);
    const ld v = (static_cast<ld>(x.get(i)) - mean_ref[cc]) * s + b.get(c);
    y_ref[static_cast<size_t>(i)] = static_cast<double>(v);
    y_tol[static_cast<size_t>(i)] =
      ro * static_cast<double>(std::fabs(v) + std::fabs(v - b.get(c)) + std::fabs(b.get(c))) + kTiny;
  });
  expect_near_all("normalize at offset", y.values(), y_ref, y_tol);

  // backward_elemt at the offset, with the sums of the data and the full count.
  const Buf dy = random_input(p.dtype, g, rng, std::vector<double>(64, 0.0), std::vector<double>(64, 1.0));
  std::vector<ld> sdy(64, 0.0L), sdx(64, 0.0L);
  for_each_element(g, [&](int64_t c, int64_t i) {
    const auto cc = static_cast<size_t>(c);
    sdy[cc] += dy.get(i);
    sdx[cc] += static_cast<ld>(dy.get(i)) * (static_cast<ld>(x.get(i)) - mean_ref[cc]);
  });
  std::vector<double> sums(128);
  for (size_t c = 0; c < 64; ++c) {
    sums[c] = static_cast<double>(sdy[c]);
    sums[64 + c] = static_cast<double>(sdx[c]);
  }
  const double count = static_cast<double>(ref.count);
  Buf dx(p.dtype, numel(g));
  dx.poison();
  ASSERT_EQ(stats[0], count);
  pysbn::backward_elemt(TensorView{x.data(), p.dtype, g}, dy.data(), stats.data(), 1e-5, EpsMode::Plus,
                        Affine{w.data(), nullptr, p.dtype}, Act{}, sums.data(), dx.data(), cpu_exec(2));
  std::vector<double> dx_ref(y_ref.size()), dx_tol(y_ref.size());
  for_each_element(g, [&](int64_t c, int64_t i) {
    const auto cc = static_cast<size_t>(c);
    const ld is = invstd[cc], wc = w.get(c), a = dy.get(i), bb = static_cast<ld>(sums[cc]) / count;
    const ld k = (static_cast<ld>(x.get(i)) - mean_ref[cc]) * is * is * static_cast<ld>(sums[64 + cc]) / count;
    const ld v = (a - bb - k) * is * wc;
    dx_ref[static_cast<size_t>(i)] = static_cast<double>(v);
    dx_tol[static_cast<size_t>(i)] =
      ro * static_cast<double>(std::fabs(v) + (std::fabs(a) + std::fabs(bb) + std::fabs(k)) * std::fabs(is * wc)) + kTiny;
  });
  expect_near_all("backward_elemt at offset", dx.values(), dx_ref, dx_tol);
}

INSTANTIATE_TEST_SUITE_P(Shapes, LargeOffset,
                         ::testing::Values(OffsetCase{DType::Float32, Layout::ChannelMajor},
                                           OffsetCase{DType::Float32, Layout::ChannelsLast},
                                           OffsetCase{DType::Float64, Layout::ChannelMajor},
                                           OffsetCase{DType::Float64, Layout::ChannelsLast}),
                         [](const ::testing::TestParamInfo<OffsetCase>& i) {
                           return dtype_str(i.param.dtype) + (i.param.layout == Layout::ChannelMajor ? "_CM" : "_CL");
                         });

/// A constant channel has variance 0: m2 must come out (essentially) zero and never negative.
TEST(Moments, ConstantInputHasNoNegativeVariance)
{
  for (DType dt : {DType::Float32, DType::Float64, DType::Float16, DType::BFloat16}) {
    for (Layout lay : {Layout::ChannelMajor, Layout::ChannelsLast}) {
      const Geometry g{17, 3, 1001, lay};
      Buf x(dt, numel(g));
      for_each_element(g, [&](int64_t c, int64_t i) { x.set(i, c == 0 ? 1e4 + 0.1 : (c == 1 ? -3.3 : 0.7)); });
      for (int t : kThreads) {
        std::vector<double> st = nans(7);
        pysbn::moments(TensorView{x.data(), dt, g}, st.data(), cpu_exec(t));
        for (int64_t c = 0; c < 3; ++c) {
          const double m = x.get(offset_of(g, 0, c, 0));
          const double u = unit_roundoff(pysbn::acc_dtype(dt));
          const auto cc = static_cast<size_t>(c);
          EXPECT_NEAR(st[1 + cc], m, 4 * u * std::fabs(m)) << dtype_str(dt) << " c=" << c;
          EXPECT_GE(st[4 + cc], 0.0) << dtype_str(dt) << " c=" << c;
          EXPECT_LE(st[4 + cc] / st[0], 16 * (u * m) * (u * m)) << dtype_str(dt) << " c=" << c;
        }
      }
    }
  }
}

// ---- the conversions of this file ---------------------------------------------------------------

TEST(TestHelpers, HalfAndBfloat16Conversions)
{
  EXPECT_EQ(float_to_half(1.0f), 0x3c00);
  EXPECT_EQ(float_to_half(-2.0f), 0xc000);
  EXPECT_EQ(float_to_half(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_half(65519.0f), 0x7bff);
  EXPECT_EQ(float_to_half(65520.0f), 0x7c00);
  EXPECT_EQ(float_to_half(0x1p-24f), 0x0001);
  EXPECT_EQ(float_to_half(0x1p-25f), 0x0000);           // tie to even (0)
  EXPECT_EQ(float_to_half(0x1.8p-24f), 0x0002);         // tie to even (2)
  EXPECT_EQ(float_to_half(0.1f), 0x2e66);
  EXPECT_EQ(float_to_half(1.0f + 0x1p-11f), 0x3c00);    // tie to even (down)
  EXPECT_EQ(float_to_half(1.0f + 0x1.8p-10f), 0x3c02);  // tie to even (up)
  EXPECT_EQ(half_to_float(0x3555), 0x1.554p-2f);
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const auto hh = static_cast<uint16_t>(h);
    if ((hh & 0x7c00u) == 0x7c00u && (hh & 0x3ffu)) { continue; }  // NaN payloads
    ASSERT_EQ(float_to_half(half_to_float(hh)), hh) << std::hex << h;
    ASSERT_EQ(float_to_bf16(bf16_to_float(hh)), hh) << std::hex << h;
  }
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(1.0f + 0x1p-8f), 0x3f80);     // tie to even (down)
  EXPECT_EQ(float_to_bf16(1.0f + 0x1.8p-7f), 0x3f82);   // tie to even (up)
  EXPECT_EQ(float_to_bf16(3.0e38f), 0x7f62);
  EXPECT_TRUE(std::isnan(half_to_float(float_to_half(std::nanf("")))));
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
}

// ---- argument errors ----------------------------------------------------------------------------

/// True when `msg` mentions `word` as a whole identifier.
bool names(const std::string& msg, const std::string& word)
{
  auto ident = [](char ch) { return std::isalnum(static_cast<unsigned char>(ch)) || ch == '_'; };
  for (size_t pos = msg.find(word); pos != std::string::npos; pos = msg.find(word, pos + 1)) {
    const bool left = pos == 0 || !ident(msg[pos - 1]);
    const bool right = pos + word.size() >= msg.size() || !ident(msg[pos + word.size()]);
    if (left && right) { return true; }
  }
  return false;
}

template <class F>
void expect_invalid(const std::string& what, std::initializer_list<const char*> words, F&& f)
{
  try {
    f();
    ADD_FAILURE() << what << ": expected std::invalid_argument, nothing thrown";
  } catch (const std::invalid_argument& e) {
    bool ok = false;
    for (const char* w : words) { ok = ok || names(e.what(), w); }
    EXPECT_TRUE(ok) << what << ": message does not name the argument: " << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": expected std::invalid_argument, got another exception: " << e.what();
  }
}

/// A valid call of each op on the fixture's buffers, with `exec` and `act` as given.
struct OpCall {
  std::string name;
  bool takes_act;
  std::function<void()> call;
};

class Errors : public ::testing::Test {
 protected:
  static constexpr int64_t C = 3;
  const Geometry g{2, C, 4, Layout::ChannelMajor};
  const DType f = DType::Float32;
  const Exec ex{};  // the CPU, one thread
  Buf x{DType::Float32, 24}, dy{DType::Float32, 24}, out{DType::Float32, 24};
  Buf w{DType::Float32, C}, b{DType::Float32, C}, gw{DType::Float32, C}, gb{DType::Float32, C};
  Buf rm{DType::Float32, C}, rv{DType::Float32, C};
  // A moments record, two records back to back, the batch statistics, grad sums, sum_ft output.
  std::vector<double> rec, recs, st, sums = std::vector<double>(2 * C, 11.0), sum_out = std::vector<double>(C, 13.0);
  int64_t counter = 7;

  void SetUp() override
  {
    const std::vector<double> zero(C, 0.0), eight(C, 8.0), one(C, 1.0);
    st = make_stats(8.0, zero, eight, one);
    rec = slice(st, 0, 2 * C + 1);
    recs = rec;
    recs.insert(recs.end(), rec.begin(), rec.end());
    for (int64_t i = 0; i < 24; ++i) {
      x.set(i, 0.25 * static_cast<double>(i % 7));
      dy.set(i, 1.0 - 0.125 * static_cast<double>(i % 5));
    }
    out.fill(-7.0);
    w.fill(1.5);
    b.fill(0.5);
    gw.fill(-3.0);
    gb.fill(-4.0);
    rm.fill(0.5);
    rv.fill(2.0);
  }

  TensorView xv() const { return TensorView{x.data(), f, g}; }
  RunningStats running() { return RunningStats{rm.data(), rv.data(), f, 0.1, false, &counter}; }
  Affine affine() const { return Affine{w.data(), b.data(), f}; }
  AffineGrad grad() { return AffineGrad{gw.data(), gb.data(), f}; }

  /// Every op once, valid but for `e` and `act`.
  std::vector<OpCall> every_op(const Exec& e, const Act& act = Act{})
  {
    return {
      {"sum_ft", false, [=] { pysbn::sum_ft(xv(), sum_out.data(), e); }},
      {"moments", false, [=] { pysbn::moments(xv(), rec.data(), e); }},
      {"merge_moments", false, [=] { pysbn::merge_moments(2, C, recs.data(), rec.data(), e); }},
      {"finalize", false, [=] { pysbn::finalize(C, rec.data(), 1e-5, EpsMode::Plus, st.data(), running(), e); }},
      {"normalize", true, [=] { pysbn::normalize(xv(), st.data(), affine(), act, out.data(), e); }},
      {"batch_norm_forward", true,
       [=] {
         pysbn::batch_norm_forward(xv(), nullptr, 1e-5, EpsMode::Plus, affine(), act, st.data(), out.data(), running(),
                                   e);
       }},
      {"batch_norm_forward (record)", true,
       [=] {
         pysbn::batch_norm_forward(xv(), rec.data(), 1e-5, EpsMode::Clamp, affine(), act, st.data(), out.data(),
                                   running(), e);
       }},
      {"backward_reduce", true,
       [=] { pysbn::backward_reduce(xv(), dy.data(), st.data(), affine(), act, sums.data(), grad(), e); }},
      {"backward_elemt", true,
       [=] {
         pysbn::backward_elemt(xv(), dy.data(), st.data(), 1e-5, EpsMode::Clamp, affine(), act, sums.data(),
                               out.data(), e);
       }},
      {"batch_norm_backward", true,
       [=] {
         pysbn::batch_norm_backward(xv(), dy.data(), st.data(), 1e-5, EpsMode::Plus, affine(), act, sums.data(), grad(),
                                    out.data(), e);
       }},
    };
  }

  /// Every buffer an op of this fixture may write, in one vector (the counter as a double).
  std::vector<double> outputs(std::initializer_list<const Buf*> extra = {}) const
  {
    std::vector<double> v;
    for (const Buf* bb : {&out, &gw, &gb, &rm, &rv}) {
      const auto e = bb->values();
      v.insert(v.end(), e.begin(), e.end());
    }
    for (const Buf* bb : extra) {
      const auto e = bb->values();
      v.insert(v.end(), e.begin(), e.end());
    }
    for (const auto* d : {&rec, &recs, &st, &sums, &sum_out}) { v.insert(v.end(), d->begin(), d->end()); }
    v.push_back(static_cast<double>(counter));
    return v;
  }

  /// expect_invalid, and that the rejected call wrote nothing (outputs and `extra` unchanged).
  template <class F>
  void rejected(const std::string& what, std::initializer_list<const char*> words, F&& fn,
                std::initializer_list<const Buf*> extra = {})
  {
    const std::vector<double> before = outputs(extra);
    expect_invalid(what, words, fn);
    expect_same_bits(what + ": outputs after the rejected call", outputs(extra), before);
  }
};

/// The control of the tests below: each op of every_op is valid as it stands.
TEST_F(Errors, TheBaselineCallsAreValid)
{
  for (const OpCall& op : every_op(ex)) { EXPECT_NO_THROW(op.call()) << op.name; }
}

TEST_F(Errors, NullPointersAreNamed)
{
  const TensorView no_x{nullptr, f, g};
  rejected("sum_ft x", {"x"}, [&] { pysbn::sum_ft(no_x, sum_out.data(), ex); });
  rejected("sum_ft out", {"out"}, [&] { pysbn::sum_ft(xv(), nullptr, ex); });
  rejected("moments x", {"x"}, [&] { pysbn::moments(no_x, rec.data(), ex); });
  rejected("moments record", {"record"}, [&] { pysbn::moments(xv(), nullptr, ex); });
  rejected("merge_moments records", {"records"}, [&] { pysbn::merge_moments(2, C, nullptr, rec.data(), ex); });
  rejected("merge_moments record", {"record"}, [&] { pysbn::merge_moments(2, C, recs.data(), nullptr, ex); });
  rejected("finalize record", {"record"},
           [&] { pysbn::finalize(C, nullptr, 1e-5, EpsMode::Plus, st.data(), running(), ex); });
  rejected("finalize stats", {"stats"},
           [&] { pysbn::finalize(C, rec.data(), 1e-5, EpsMode::Plus, nullptr, running(), ex); });
  rejected("normalize x", {"x"}, [&] { pysbn::normalize(no_x, st.data(), affine(), Act{}, out.data(), ex); });
  rejected("normalize stats", {"stats"}, [&] { pysbn::normalize(xv(), nullptr, affine(), Act{}, out.data(), ex); });
  rejected("normalize y", {"y"}, [&] { pysbn::normalize(xv(), st.data(), affine(), Act{}, nullptr, ex); });
  for (const double* record : {static_cast<const double*>(nullptr), static_cast<const double*>(rec.data())}) {
    const std::string tag = record ? " (record given)" : "";
    rejected("batch_norm_forward x" + tag, {"x"}, [&] {
      pysbn::batch_norm_forward(no_x, record, 1e-5, EpsMode::Plus, affine(), Act{}, st.data(), out.data(), running(),
                                ex);
    });
    rejected("batch_norm_forward stats" + tag, {"stats"}, [&] {
      pysbn::batch_norm_forward(xv(), record, 1e-5, EpsMode::Plus, affine(), Act{}, nullptr, out.data(), running(), ex);
    });
    rejected("batch_norm_forward y" + tag, {"y"}, [&] {
      pysbn::batch_norm_forward(xv(), record, 1e-5, EpsMode::Plus, affine(), Act{}, st.data(), nullptr, running(), ex);
    });
  }
  rejected("backward_reduce dy", {"dy"},
           [&] { pysbn::backward_reduce(xv(), nullptr, st.data(), affine(), Act{}, sums.data(), grad(), ex); });
  rejected("backward_reduce x", {"x"},
           [&] { pysbn::backward_reduce(no_x, dy.data(), st.data(), affine(), Act{}, sums.data(), grad(), ex); });
  rejected("backward_reduce stats", {"stats"},
           [&] { pysbn::backward_reduce(xv(), dy.data(), nullptr, affine(), Act{}, sums.data(), AffineGrad{}, ex); });
  rejected("backward_reduce sums", {"sums"},
           [&] { pysbn::backward_reduce(xv(), dy.data(), st.data(), affine(), Act{}, nullptr, grad(), ex); });
  // With no values the statistics are needed only for grad_weight (sum_dy_xmu * invstd).
  const TensorView empty{nullptr, f, Geometry{0, C, 4, Layout::ChannelMajor}};
  rejected("backward_reduce stats (empty x, grad_weight wanted)", {"stats"}, [&] {
    pysbn::backward_reduce(empty, nullptr, nullptr, affine(), Act{}, sums.data(), AffineGrad{gw.data(), nullptr, f}, ex);
  });
  EXPECT_NO_THROW(
    pysbn::backward_reduce(empty, nullptr, nullptr, affine(), Act{}, sums.data(), AffineGrad{nullptr, gb.data(), f}, ex));
  expect_near_all("sums of an empty x", sums, std::vector<double>(2 * C, 0.0), std::vector<double>(2 * C, 0.0));
  expect_near_all("grad_bias of an empty x", gb.values(), std::vector<double>(C, 0.0), std::vector<double>(C, 0.0));
  rejected("backward_elemt dy", {"dy"}, [&] {
    pysbn::backward_elemt(xv(), nullptr, st.data(), 1e-5, EpsMode::Plus, affine(), Act{}, sums.data(), out.data(), ex);
  });
  rejected("backward_elemt x", {"x"}, [&] {
    pysbn::backward_elemt(no_x, dy.data(), st.data(), 1e-5, EpsMode::Plus, affine(), Act{}, sums.data(), out.data(), ex);
  });
  rejected("backward_elemt stats", {"stats"}, [&] {
    pysbn::backward_elemt(xv(), dy.data(), nullptr, 1e-5, EpsMode::Plus, affine(), Act{}, sums.data(), out.data(), ex);
  });
  rejected("backward_elemt sums", {"sums"}, [&] {
    pysbn::backward_elemt(xv(), dy.data(), st.data(), 1e-5, EpsMode::Plus, affine(), Act{}, nullptr, out.data(), ex);
  });
  rejected("backward_elemt dx", {"dx"}, [&] {
    pysbn::backward_elemt(xv(), dy.data(), st.data(), 1e-5, EpsMode::Plus, affine(), Act{}, sums.data(), nullptr, ex);
  });
}

TEST_F(Errors, BadGeometryDtypeLayoutAndThreads)
{
  for (int which = 0; which < 3; ++which) {
    Geometry bad = g;
    (which == 0 ? bad.n : which == 1 ? bad.c : bad.l) = -1;
    const TensorView xb{x.data(), f, bad};
    const std::string tag = std::string(" (negative ") + "NCL"[which] + ")";
    // The argument is the geometry; a message naming it or the offending extent will do.
    auto named = [&](const std::string& what, auto fn) {
      rejected(what + tag, {"geometry", "g", "N", "C", "L", "n", "c", "l"}, fn);
    };
    named("sum_ft", [&] { pysbn::sum_ft(xb, sum_out.data(), ex); });
    named("moments", [&] { pysbn::moments(xb, rec.data(), ex); });
    named("normalize", [&] { pysbn::normalize(xb, st.data(), affine(), Act{}, out.data(), ex); });
    named("batch_norm_forward", [&] {
      pysbn::batch_norm_forward(xb, nullptr, 1e-5, EpsMode::Plus, affine(), Act{}, st.data(), out.data(), running(), ex);
    });
    named("backward_reduce",
          [&] { pysbn::backward_reduce(xb, dy.data(), st.data(), affine(), Act{}, sums.data(), grad(), ex); });
    named("backward_elemt", [&] {
      pysbn::backward_elemt(xb, dy.data(), st.data(), 1e-5, EpsMode::Plus, affine(), Act{}, sums.data(), out.data(), ex);
    });
    named("batch_norm_backward", [&] {
      pysbn::batch_norm_backward(xb, dy.data(), st.data(), 1e-5, EpsMode::Plus, affine(), Act{}, sums.data(), grad(),
                                 out.data(), ex);
    });
  }
  const TensorView bad_dtype{x.data(), static_cast<DType>(7), g};
  const Affine no_affine{nullptr, nullptr, static_cast<DType>(7)};
  rejected("moments dtype", {"dtype"}, [&] { pysbn::moments(bad_dtype, rec.data(), ex); });
  rejected("sum_ft dtype", {"dtype"}, [&] { pysbn::sum_ft(bad_dtype, sum_out.data(), ex); });
  rejected("normalize dtype", {"dtype"},
           [&] { pysbn::normalize(bad_dtype, st.data(), no_affine, Act{}, out.data(), ex); });
  rejected("batch_norm_forward dtype", {"dtype"}, [&] {
    pysbn::batch_norm_forward(bad_dtype, nullptr, 1e-5, EpsMode::Plus, no_affine, Act{}, st.data(), out.data(),
                              running(), ex);
  });
  rejected("backward_reduce dtype", {"dtype"}, [&] {
    pysbn::backward_reduce(bad_dtype, dy.data(), st.data(), no_affine, Act{}, sums.data(), AffineGrad{}, ex);
  });
  Geometry bad_layout = g;
  bad_layout.layout = static_cast<Layout>(5);
  const TensorView xl{x.data(), f, bad_layout};
  rejected("moments layout", {"layout"}, [&] { pysbn::moments(xl, rec.data(), ex); });
  rejected("normalize layout", {"layout"}, [&] { pysbn::normalize(xl, st.data(), affine(), Act{}, out.data(), ex); });
  rejected("backward_elemt layout", {"layout"}, [&] {
    pysbn::backward_elemt(xl, dy.data(), st.data(), 1e-5, EpsMode::Plus, affine(), Act{}, sums.data(), out.data(), ex);
  });
}

/// Exec: num_threads >= 1 on the CPU, and a device that exists.
TEST_F(Errors, BadExec)
{
  for (int t : {0, -1}) {
    for (const OpCall& op : every_op(Exec{Device::CPU, t, nullptr})) {
      rejected(op.name + " num_threads=" + std::to_string(t), {"num_threads"}, op.call);
    }
  }
  for (int d : {2, -1, 7}) {
    for (const OpCall& op : every_op(Exec{static_cast<Device>(d), 1, nullptr})) {
      rejected(op.name + " device=" + std::to_string(d), {"exec.device", "device"}, op.call);
    }
  }
}

/// Device::CUDA in a build without CUDA: std::runtime_error from every op, nothing written.
TEST_F(Errors, CudaExecWithoutCuda)
{
  if (pysbn::built_with_cuda()) { GTEST_SKIP() << "built with CUDA (host buffers cannot go to the CUDA ops)"; }
  for (const OpCall& op : every_op(Exec{Device::CUDA, 1, nullptr})) {
    const std::vector<double> before = outputs();
    try {
      op.call();
      ADD_FAILURE() << op.name << ": expected std::runtime_error, nothing thrown";
    } catch (const std::invalid_argument& e) {
      ADD_FAILURE() << op.name << ": expected std::runtime_error, got std::invalid_argument: " << e.what();
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("without CUDA"), std::string::npos) << op.name << ": " << e.what();
      EXPECT_TRUE(names(e.what(), "CUDA")) << e.what();
    }
    expect_same_bits(op.name + ": outputs", outputs(), before);
  }
}

/// The activation kinds outside the enum are rejected by name (the activations themselves are
/// tested with their kernels).
TEST_F(Errors, OutOfRangeActivationIsRejected)
{
  for (int kind : {99, -1}) {
    for (const OpCall& op : every_op(ex, Act{static_cast<Activation>(kind)})) {
      if (!op.takes_act) { continue; }
      rejected(op.name + " act.kind=" + std::to_string(kind), {"act.kind", "act"}, op.call);
    }
  }
}

TEST_F(Errors, OverflowingGeometryIsRejected)
{
  // N*C*L would overflow int64 (undefined behaviour in every size computation downstream).
  const int64_t big = int64_t{1} << 40;
  for (const Geometry bad : {Geometry{big, big, 1, Layout::ChannelMajor}, Geometry{1, big, big, Layout::ChannelsLast},
                             Geometry{big, 2, big, Layout::ChannelMajor}}) {
    const TensorView xb{x.data(), f, bad};
    rejected("moments", {"geometry"}, [&] { pysbn::moments(xb, rec.data(), ex); });
    rejected("sum_ft", {"geometry"}, [&] { pysbn::sum_ft(xb, sum_out.data(), ex); });
    rejected("normalize", {"geometry"}, [&] { pysbn::normalize(xb, st.data(), affine(), Act{}, out.data(), ex); });
    rejected("batch_norm_forward", {"geometry"}, [&] {
      pysbn::batch_norm_forward(xb, nullptr, 1e-5, EpsMode::Plus, affine(), Act{}, st.data(), out.data(), running(), ex);
    });
    rejected("backward_reduce", {"geometry"},
             [&] { pysbn::backward_reduce(xb, dy.data(), st.data(), affine(), Act{}, sums.data(), grad(), ex); });
    rejected("backward_elemt", {"geometry"}, [&] {
      pysbn::backward_elemt(xb, dy.data(), st.data(), 1e-5, EpsMode::Plus, affine(), Act{}, sums.data(), out.data(), ex);
    });
    rejected("batch_norm_backward", {"geometry"}, [&] {
      pysbn::batch_norm_backward(xb, dy.data(), st.data(), 1e-5, EpsMode::Plus, affine(), Act{}, sums.data(), grad(),
                                 out.data(), ex);
    });
  }
  // A zero extent makes the product 0 however large the others are: valid (nothing to do).
  EXPECT_NO_THROW(pysbn::moments(TensorView{nullptr, f, Geometry{0, C, int64_t{1} << 62, Layout::ChannelMajor}},
                                 rec.data(), ex));
}

TEST_F(Errors, BadParamDtype)
{
  // (input dtype, param dtype) pairs outside "equal, or float32 for float16/bfloat16 input".
  const std::vector<std::array<DType, 2>> bad = {{DType::Float32, DType::Float64},
                                                 {DType::Float64, DType::Float32},
                                                 {DType::Float32, DType::Float16},
                                                 {DType::Float16, DType::BFloat16},
                                                 {DType::BFloat16, DType::Float16},
                                                 {DType::Float16, DType::Float64},
                                                 {DType::Float32, static_cast<DType>(9)}};
  for (const auto& dp : bad) {
    const DType dt = dp[0], pt = dp[1];
    const std::string tag = " " + dtype_str(dt) + "/" + dtype_str(pt);
    Buf xx(dt, 24), dd(dt, 24), yy(dt, 24), pw(DType::Float64, C), pb(DType::Float64, C), qw(DType::Float64, C),
      qb(DType::Float64, C);
    for (Buf* bb : {&xx, &dd, &yy, &pw, &pb, &qw, &qb}) { bb->fill(0.75); }
    const TensorView xt{xx.data(), dt, g};
    const Affine bad_affine{pw.data(), pb.data(), pt};
    const AffineGrad bad_grad{qw.data(), qb.data(), pt};
    const Affine no_affine{nullptr, nullptr, dt};
    const AffineGrad no_grad{nullptr, nullptr, dt};
    const std::initializer_list<const Buf*> written = {&yy, &qw, &qb};
    rejected("normalize" + tag, {"affine"},
             [&] { pysbn::normalize(xt, st.data(), bad_affine, Act{}, yy.data(), ex); }, written);
    rejected("batch_norm_forward" + tag, {"affine"}, [&] {
      pysbn::batch_norm_forward(xt, nullptr, 1e-5, EpsMode::Plus, bad_affine, Act{}, st.data(), yy.data(), running(),
                                ex);
    }, written);
    rejected("backward_reduce affine" + tag, {"affine"}, [&] {
      pysbn::backward_reduce(xt, dd.data(), st.data(), bad_affine, Act{}, sums.data(), no_grad, ex);
    }, written);
    rejected("backward_reduce grad" + tag, {"grad"}, [&] {
      pysbn::backward_reduce(xt, dd.data(), st.data(), no_affine, Act{}, sums.data(), bad_grad, ex);
    }, written);
    rejected("backward_elemt" + tag, {"affine"}, [&] {
      pysbn::backward_elemt(xt, dd.data(), st.data(), 1e-5, EpsMode::Plus, Affine{pw.data(), nullptr, pt}, Act{},
                            sums.data(), yy.data(), ex);
    }, written);
    rejected("batch_norm_backward grad" + tag, {"grad"}, [&] {
      pysbn::batch_norm_backward(xt, dd.data(), st.data(), 1e-5, EpsMode::Plus, no_affine, Act{}, sums.data(),
                                 bad_grad, yy.data(), ex);
    }, written);
  }
}

TEST_F(Errors, MergeAndFinalizeArguments)
{
  for (int64_t k : {0, -1}) {
    rejected("merge_moments k=" + std::to_string(k), {"k"},
             [&] { pysbn::merge_moments(k, C, recs.data(), rec.data(), ex); });
  }
  rejected("merge_moments c < 0", {"c", "C"}, [&] { pysbn::merge_moments(2, -1, recs.data(), rec.data(), ex); });
  recs[2 * C + 1] = -1.0;  // the second record's count
  rejected("merge_moments negative count", {"count"}, [&] { pysbn::merge_moments(2, C, recs.data(), rec.data(), ex); });

  rejected("finalize c < 0", {"c", "C"},
           [&] { pysbn::finalize(-1, rec.data(), 1e-5, EpsMode::Plus, st.data(), running(), ex); });
  rejected("finalize mode", {"mode"},
           [&] { pysbn::finalize(C, rec.data(), 1e-5, static_cast<EpsMode>(7), st.data(), running(), ex); });
  rejected("finalize running.dtype", {"running.dtype"}, [&] {
    pysbn::finalize(C, rec.data(), 1e-5, EpsMode::Plus, st.data(),
                    RunningStats{rm.data(), rv.data(), static_cast<DType>(9), 0.1, false, &counter}, ex);
  });
  for (double eps : {-1e-5, std::nan(""), std::numeric_limits<double>::infinity()}) {
    rejected("finalize eps=" + std::to_string(eps), {"eps"},
             [&] { pysbn::finalize(C, rec.data(), eps, EpsMode::Plus, st.data(), running(), ex); });
  }
  rejected("finalize momentum NaN", {"running.momentum", "momentum"}, [&] {
    pysbn::finalize(C, rec.data(), 1e-5, EpsMode::Plus, st.data(),
                    RunningStats{rm.data(), rv.data(), f, std::nan(""), false, &counter}, ex);
  });
  // Running stats come both or neither (the contract's words).
  rejected("finalize running.var without running.mean", {"running.mean", "running.var"}, [&] {
    pysbn::finalize(C, rec.data(), 1e-5, EpsMode::Plus, st.data(), RunningStats{nullptr, rv.data(), f}, ex);
  });
  rejected("finalize running.mean without running.var", {"running.mean", "running.var"}, [&] {
    pysbn::finalize(C, rec.data(), 1e-5, EpsMode::Plus, st.data(), RunningStats{rm.data(), nullptr, f}, ex);
  });
  // The cumulative average needs the counter it divides by.
  rejected("finalize cumulative without num_batches_tracked", {"running.num_batches_tracked", "running.cumulative"}, [&] {
    pysbn::finalize(C, rec.data(), 1e-5, EpsMode::Plus, st.data(),
                    RunningStats{rm.data(), rv.data(), f, 0.1, true, nullptr}, ex);
  });
}

/// A throwing batch_norm_forward writes nothing: the statistics, y, the running statistics and
/// the counter stay.
TEST_F(Errors, BatchNormForwardChecksEverythingBeforeWriting)
{
  auto call = [&](const void* xp, DType pd, EpsMode mode, DType rd, void* yp, double eps) {
    pysbn::batch_norm_forward(TensorView{xp, f, g}, nullptr, eps, mode, Affine{w.data(), b.data(), pd}, Act{},
                              st.data(), yp, RunningStats{rm.data(), rv.data(), rd, 0.1, false, &counter}, ex);
  };
  rejected("batch_norm_forward y", {"y"}, [&] { call(x.data(), f, EpsMode::Plus, f, nullptr, 1e-5); });
  rejected("batch_norm_forward x", {"x"}, [&] { call(nullptr, f, EpsMode::Plus, f, out.data(), 1e-5); });
  rejected("batch_norm_forward affine dtype", {"affine"},
           [&] { call(x.data(), DType::Float64, EpsMode::Plus, f, out.data(), 1e-5); });
  rejected("batch_norm_forward running.dtype", {"running.dtype"},
           [&] { call(x.data(), f, EpsMode::Plus, static_cast<DType>(9), out.data(), 1e-5); });
  rejected("batch_norm_forward mode", {"mode"}, [&] { call(x.data(), f, static_cast<EpsMode>(5), f, out.data(), 1e-5); });
  rejected("batch_norm_forward eps", {"eps"}, [&] { call(x.data(), f, EpsMode::Plus, f, out.data(), -1.0); });
  rejected("batch_norm_forward running stats both or neither", {"running.mean", "running.var"}, [&] {
    pysbn::batch_norm_forward(xv(), nullptr, 1e-5, EpsMode::Plus, Affine{nullptr, nullptr, f}, Act{}, st.data(),
                              out.data(), RunningStats{rm.data(), nullptr, f, 0.1, false, &counter}, ex);
  });
  rejected("batch_norm_forward running.momentum", {"running.momentum", "momentum"}, [&] {
    pysbn::batch_norm_forward(xv(), nullptr, 1e-5, EpsMode::Plus, affine(), Act{}, st.data(), out.data(),
                              RunningStats{rm.data(), rv.data(), f, std::nan(""), false, &counter}, ex);
  });
  rejected("batch_norm_forward cumulative without counter", {"running.num_batches_tracked", "running.cumulative"}, [&] {
    pysbn::batch_norm_forward(xv(), nullptr, 1e-5, EpsMode::Plus, affine(), Act{}, st.data(), out.data(),
                              RunningStats{rm.data(), rv.data(), f, 0.1, true, nullptr}, ex);
  });
  rejected("batch_norm_forward record is stats", {"record", "stats"}, [&] {
    pysbn::batch_norm_forward(xv(), st.data(), 1e-5, EpsMode::Plus, affine(), Act{}, st.data(), out.data(), running(),
                              ex);
  });
  rejected("batch_norm_forward num_threads", {"num_threads"}, [&] {
    pysbn::batch_norm_forward(xv(), nullptr, 1e-5, EpsMode::Plus, Affine{nullptr, nullptr, f}, Act{}, st.data(),
                              out.data(), running(), Exec{Device::CPU, 0, nullptr});
  });
  EXPECT_EQ(counter, 7);
  for (int64_t c = 0; c < C; ++c) {
    EXPECT_EQ(rm.get(c), 0.5);
    EXPECT_EQ(rv.get(c), 2.0);
  }
}

/// A zero-size batch: the counter still counts (as nn.BatchNorm's num_batches_tracked), the
/// running statistics stay, mean = 0 and invstd = 1/sqrt(eps).
TEST_F(Errors, BatchNormForwardOnAnEmptyBatch)
{
  const Geometry empty{0, C, 4, Layout::ChannelMajor};
  int64_t tracked = 0;
  st = nans(3 * C + 1);
  pysbn::batch_norm_forward(TensorView{nullptr, f, empty}, nullptr, 0.25, EpsMode::Plus, affine(), Act{}, st.data(),
                            nullptr, RunningStats{rm.data(), rv.data(), f, 0.1, false, &tracked}, cpu_exec(2));
  EXPECT_EQ(tracked, 1);
  EXPECT_EQ(st[0], 0.0);
  for (int64_t c = 0; c < C; ++c) {
    EXPECT_EQ(rm.get(c), 0.5);
    EXPECT_EQ(rv.get(c), 2.0);
    EXPECT_EQ(st[static_cast<size_t>(1 + c)], 0.0);
    EXPECT_EQ(st[static_cast<size_t>(1 + C + c)], 0.0);
    EXPECT_EQ(st[static_cast<size_t>(1 + 2 * C + c)], 2.0);
  }
  // The cumulative average: the counter counts, the running statistics stay.
  pysbn::batch_norm_forward(TensorView{nullptr, f, empty}, nullptr, 0.25, EpsMode::Clamp, affine(), Act{}, st.data(),
                            nullptr, RunningStats{rm.data(), rv.data(), f, 0.1, true, &tracked}, cpu_exec(1));
  EXPECT_EQ(tracked, 2);
  for (int64_t c = 0; c < C; ++c) {
    EXPECT_EQ(rm.get(c), 0.5);
    EXPECT_EQ(rv.get(c), 2.0);
  }
}

TEST_F(Errors, BatchNormBackwardArguments)
{
  rejected("batch_norm_backward stats", {"stats"}, [&] {
    pysbn::batch_norm_backward(xv(), dy.data(), nullptr, 1e-5, EpsMode::Plus, affine(), Act{}, sums.data(), grad(),
                               out.data(), ex);
  });
  {  // On the CPU, sums may be null (the local sums are then the core's own scratch): same bits.
    pysbn::batch_norm_backward(xv(), dy.data(), st.data(), 1e-5, EpsMode::Plus, affine(), Act{}, sums.data(), grad(),
                               out.data(), ex);
    const std::vector<double> with_sums = out.values();
    pysbn::batch_norm_backward(xv(), dy.data(), st.data(), 1e-5, EpsMode::Plus, affine(), Act{}, nullptr, grad(),
                               out.data(), ex);
    expect_same_bits("dx with null sums (CPU scratch)", out.values(), with_sums);
  }
  rejected("batch_norm_backward dy", {"dy"}, [&] {
    pysbn::batch_norm_backward(xv(), nullptr, st.data(), 1e-5, EpsMode::Plus, affine(), Act{}, sums.data(), grad(),
                               out.data(), ex);
  });
  rejected("batch_norm_backward x", {"x"}, [&] {
    pysbn::batch_norm_backward(TensorView{nullptr, f, g}, dy.data(), st.data(), 1e-5, EpsMode::Plus, affine(), Act{},
                               sums.data(), grad(), out.data(), ex);
  });
  rejected("batch_norm_backward mode", {"mode"}, [&] {
    pysbn::batch_norm_backward(xv(), dy.data(), st.data(), 1e-5, static_cast<EpsMode>(3), affine(), Act{}, sums.data(),
                               grad(), out.data(), ex);
  });
  // No dx: parameter gradients only; dx stays as it was.
  const std::vector<double> dx_before = out.values();
  pysbn::batch_norm_backward(xv(), dy.data(), st.data(), 1e-5, EpsMode::Plus, affine(), Act{}, sums.data(), grad(),
                             nullptr, ex);
  expect_same_bits("dx (null: not written)", out.values(), dx_before);
}

}  // namespace
