// SPDX-License-Identifier: MIT
// The ops on the GPU (Exec{Device::CUDA, 1, stream}) against float64 host references written
// here (and against the same ops on the CPU where both must agree). Inputs are rounded to their
// dtype on the host first, so the reference sees exactly the values the kernels see. Labelled
// `gpu`; skipped when no CUDA device is present.
#include <gtest/gtest.h>
#include <pysbn/core.hpp>

#include "act_reference.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

using pysbn::Act;
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
using Bytes = std::vector<unsigned char>;

constexpr DType kTypes[] = {DType::Float32, DType::Float64, DType::Float16, DType::BFloat16};
constexpr Layout kLayouts[] = {Layout::ChannelMajor, Layout::ChannelsLast};

/// Odd sizes on purpose: C = 1, L = 1, N = 1, C = 4097, sizes that are not multiples of 4 or 8,
/// and a few that take the vectorised paths.
const Geometry kShapes[] = {
  {1, 1, 1},  {2, 3, 5},    {4, 1, 7},   {3, 5, 1},    {1, 7, 13},  {2, 4097, 3}, {5, 6, 33},
  {8, 16, 64}, {3, 8, 1024}, {7, 130, 9}, {1, 2, 4099}, {64, 3, 1}, {2, 64, 256}, {3, 24, 40},
  {5, 4097, 1}, {2, 5, 3000},
};

// ---- host helpers ----------------------------------------------------------------------------

void check(cudaError_t e, const char* what)
{
  if (e != cudaSuccess) { throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e)); }
}

bool have_device()
{
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return false;
  }
  return n > 0;
}

const char* name(DType d)
{
  switch (d) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
  }
  return "?";
}

std::string describe(DType d, Geometry g)
{
  std::ostringstream s;
  s << name(d) << " " << (g.layout == Layout::ChannelMajor ? "channel-major" : "channels-last") << " (N=" << g.n
    << ", C=" << g.c << ", L=" << g.l << ")";
  return s.str();
}

size_t esize(DType d) { return static_cast<size_t>(pysbn::dtype_size(d)); }

/// The GPU, on `stream`.
Exec on_gpu(void* stream) { return Exec{Device::CUDA, 1, stream}; }

/// The CPU, with `threads` threads.
Exec on_cpu(int threads) { return Exec{Device::CPU, threads, nullptr}; }

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

/// n NaNs: slots an op must not read.
std::vector<double> nans(size_t n) { return std::vector<double>(n, std::numeric_limits<double>::quiet_NaN()); }

bool is_half(DType d) { return d == DType::Float16 || d == DType::BFloat16; }

/// Machine epsilon of an element type.
double eps_of(DType d)
{
  switch (d) {
    case DType::Float64: return std::numeric_limits<double>::epsilon();
    case DType::Float32: return std::numeric_limits<float>::epsilon();
    case DType::Float16: return 9.765625e-4;
    case DType::BFloat16: return 7.8125e-3;
  }
  return 1.0;
}

/// Tolerance of a statistic accumulated in acc_dtype(d).
double stat_tol(DType d) { return pysbn::acc_dtype(d) == DType::Float64 ? 1e-12 : 1e-5; }

/// Tolerance of an output stored in d (its rounding plus a few acc-type ulps).
double out_tol(DType d) { return d == DType::Float64 ? 1e-12 : (d == DType::Float32 ? 1e-5 : 2.0 * eps_of(d)); }

double round_to(double v, DType d)
{
  switch (d) {
    case DType::Float64: return v;
    case DType::Float32: return static_cast<float>(v);
    case DType::Float16: return __half2float(__float2half_rn(static_cast<float>(v)));
    case DType::BFloat16: return __bfloat162float(__float2bfloat16_rn(static_cast<float>(v)));
  }
  return v;
}

Bytes encode(const std::vector<double>& v, DType d)
{
  Bytes out(v.size() * esize(d));
  for (size_t i = 0; i < v.size(); ++i) {
    unsigned char* p = out.data() + i * esize(d);
    switch (d) {
      case DType::Float64: std::memcpy(p, &v[i], 8); break;
      case DType::Float32: {
        const float f = static_cast<float>(v[i]);
        std::memcpy(p, &f, 4);
        break;
      }
      case DType::Float16: {
        const __half h = __float2half_rn(static_cast<float>(v[i]));
        std::memcpy(p, &h, 2);
        break;
      }
      case DType::BFloat16: {
        const __nv_bfloat16 h = __float2bfloat16_rn(static_cast<float>(v[i]));
        std::memcpy(p, &h, 2);
        break;
      }
    }
  }
  return out;
}

Bytes f64(const std::vector<double>& v) { return encode(v, DType::Float64); }

std::vector<double> decode(const Bytes& b, DType d)
{
  std::vector<double> v(b.size() / esize(d));
  for (size_t i = 0; i < v.size(); ++i) {
    const unsigned char* p = b.data() + i * esize(d);
    switch (d) {
      case DType::Float64: std::memcpy(&v[i], p, 8); break;
      case DType::Float32: {
        float f;
        std::memcpy(&f, p, 4);
        v[i] = f;
        break;
      }
      case DType::Float16: {
        __half h;
        std::memcpy(&h, p, 2);
        v[i] = __half2float(h);
        break;
      }
      case DType::BFloat16: {
        __nv_bfloat16 h;
        std::memcpy(&h, p, 2);
        v[i] = __bfloat162float(h);
        break;
      }
    }
  }
  return v;
}

/// A device allocation holding a copy of host bytes, optionally `shift` bytes past a 256-byte
/// aligned base (to force the kernels' unaligned paths).
class Dev {
 public:
  Dev() = default;
  explicit Dev(const Bytes& host, size_t shift = 0) : bytes_(host.size()), shift_(shift)
  {
    if (bytes_ + shift_ > 0) { check(cudaMalloc(&base_, bytes_ + shift_), "cudaMalloc"); }
    if (bytes_ > 0) { check(cudaMemcpy(get(), host.data(), bytes_, cudaMemcpyHostToDevice), "cudaMemcpy H2D"); }
  }
  /// `bytes` of `pattern` (0xff gives NaN in every float type: catches unwritten outputs).
  static Dev filled(size_t bytes, unsigned char pattern) { return Dev(Bytes(bytes, pattern)); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  Dev(Dev&& o) noexcept { *this = std::move(o); }
  Dev& operator=(Dev&& o) noexcept
  {
    std::swap(base_, o.base_);
    std::swap(bytes_, o.bytes_);
    std::swap(shift_, o.shift_);
    return *this;
  }
  ~Dev()
  {
    if (base_ != nullptr) { cudaFree(base_); }
  }
  void* get() const { return bytes_ > 0 ? static_cast<unsigned char*>(base_) + shift_ : nullptr; }
  template <typename T> T* as() const { return static_cast<T*>(get()); }
  Bytes download() const
  {
    Bytes out(bytes_);
    if (bytes_ > 0) { check(cudaMemcpy(out.data(), get(), bytes_, cudaMemcpyDeviceToHost), "cudaMemcpy D2H"); }
    return out;
  }

 private:
  void* base_ = nullptr;
  size_t bytes_ = 0;
  size_t shift_ = 0;
};

int64_t numel(Geometry g) { return g.n * g.c * g.l; }

int64_t at(Geometry g, int64_t n, int64_t c, int64_t l)
{
  return g.layout == Layout::ChannelMajor ? (n * g.c + c) * g.l + l : (n * g.l + l) * g.c + c;
}

/// Values offset + 0.25*(c % 16) + scale*randn, rounded to d, stored at their memory offsets
/// (channels differ, yet products stay far from the float16 range even with C = 4097).
std::vector<double> random_input(Geometry g, DType d, uint32_t seed, double offset = 0.0, double scale = 1.0)
{
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> v(static_cast<size_t>(numel(g)));
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t c = 0; c < g.c; ++c) {
      for (int64_t l = 0; l < g.l; ++l) { v[at(g, n, c, l)] = round_to(offset + 0.25 * (c % 16) + scale * normal(gen), d); }
    }
  }
  return v;
}

std::vector<double> random_vector(size_t n, uint32_t seed, double lo, double hi, DType d)
{
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<double> v(n);
  for (auto& e : v) { e = round_to(u(gen), d); }
  return v;
}

struct Moments {
  double count = 0;
  std::vector<double> mean, m2;
};

/// Two-pass moments in long double.
Moments ref_moments(const std::vector<double>& x, Geometry g)
{
  Moments m;
  m.count = static_cast<double>(g.n * g.l);
  m.mean.assign(g.c, 0.0);
  m.m2.assign(g.c, 0.0);
  if (g.n * g.l == 0) { return m; }
  for (int64_t c = 0; c < g.c; ++c) {
    long double s = 0;
    for (int64_t n = 0; n < g.n; ++n) {
      for (int64_t l = 0; l < g.l; ++l) { s += x[at(g, n, c, l)]; }
    }
    const long double mean = s / m.count;
    long double q = 0;
    for (int64_t n = 0; n < g.n; ++n) {
      for (int64_t l = 0; l < g.l; ++l) {
        const long double d = x[at(g, n, c, l)] - mean;
        q += d * d;
      }
    }
    m.mean[c] = static_cast<double>(mean);
    m.m2[c] = static_cast<double>(q);
  }
  return m;
}

/// Per-channel sum over (n, l) of f(n, c, l), in long double.
template <typename F> std::vector<double> channel_sum(Geometry g, F&& f)
{
  std::vector<double> out(g.c, 0.0);
  for (int64_t c = 0; c < g.c; ++c) {
    long double s = 0;
    for (int64_t n = 0; n < g.n; ++n) {
      for (int64_t l = 0; l < g.l; ++l) { s += f(n, c, l); }
    }
    out[c] = static_cast<double>(s);
  }
  return out;
}

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override
  {
    if (!have_device()) { GTEST_SKIP() << "no CUDA device"; }
    check(cudaStreamCreate(&stream_), "cudaStreamCreate");
  }
  void TearDown() override
  {
    if (stream_ != nullptr) { cudaStreamDestroy(stream_); }
  }
  void* stream() const { return stream_; }
  Exec exec() const { return on_gpu(stream_); }
  void sync() const
  {
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    check(cudaGetLastError(), "kernel");
  }

  /// moments on the GPU of host values; returns the record.
  std::vector<double> run_moments(const std::vector<double>& x, DType d, Geometry g, size_t shift = 0)
  {
    Dev dx(encode(x, d), shift);
    Dev ds = Dev::filled((2 * g.c + 1) * sizeof(double), 0xff);
    pysbn::moments(TensorView{dx.get(), d, g}, ds.as<double>(), exec());
    sync();
    return decode(ds.download(), DType::Float64);
  }

  cudaStream_t stream_ = nullptr;
};

void expect_moments(const std::vector<double>& got, const Moments& ref, DType d, double tol)
{
  const int64_t c_n = static_cast<int64_t>(ref.mean.size());
  ASSERT_EQ(got.size(), static_cast<size_t>(2 * c_n + 1));
  EXPECT_EQ(got[0], ref.count);
  for (int64_t c = 0; c < c_n; ++c) {
    const double spread = ref.count > 0 ? std::sqrt(ref.m2[c] / ref.count) : 0.0;
    // The mean is a double: its error scales with the spread, not with |mean|.
    EXPECT_NEAR(got[1 + c], ref.mean[c], tol * spread + 1e-14 * std::fabs(ref.mean[c]) + 1e-30)
      << "mean, channel " << c << " " << name(d);
    EXPECT_NEAR(got[1 + c_n + c], ref.m2[c], tol * ref.m2[c] + 1e-30) << "m2, channel " << c << " " << name(d);
  }
}

// ---- moments ---------------------------------------------------------------------------------

TEST_F(CudaOps, MomentsMatchFloat64Reference)
{
  uint32_t seed = 1;
  for (DType d : kTypes) {
    for (Layout lay : kLayouts) {
      for (Geometry g : kShapes) {
        g.layout = lay;
        SCOPED_TRACE(describe(d, g));
        const auto x = random_input(g, d, seed++);
        expect_moments(run_moments(x, d, g), ref_moments(x, g), d, stat_tol(d));
      }
    }
  }
}

TEST_F(CudaOps, MomentsUnalignedPointersTakeTheScalarPath)
{
  for (DType d : kTypes) {
    for (Layout lay : kLayouts) {
      Geometry g{4, 16, 64, lay};
      SCOPED_TRACE(describe(d, g));
      const auto x = random_input(g, d, 7);
      expect_moments(run_moments(x, d, g, esize(d)), ref_moments(x, g), d, stat_tol(d));
    }
  }
}

TEST_F(CudaOps, MomentsLargeOffsetFloat32IsStable)
{
  // x = 1e4 + randn in float32: raw sum / sum-of-squares loses the variance entirely here.
  const Geometry shapes[] = {{8, 4, 4096, Layout::ChannelMajor},  {7, 3, 4099, Layout::ChannelMajor},
                             {64, 8, 1024, Layout::ChannelsLast}, {33, 3, 997, Layout::ChannelsLast},
                             {4096, 5, 1, Layout::ChannelMajor},  {2, 2, 300001, Layout::ChannelMajor}};
  for (Geometry g : shapes) {
    SCOPED_TRACE(describe(DType::Float32, g));
    const auto x = random_input(g, DType::Float32, 11, 1e4, 1.0);
    const auto got = run_moments(x, DType::Float32, g);
    const Moments ref = ref_moments(x, g);
    for (int64_t c = 0; c < g.c; ++c) {
      const double var = got[1 + g.c + c] / got[0];
      const double var_ref = ref.m2[c] / ref.count;
      EXPECT_LE(std::fabs(var - var_ref) / var_ref, 1e-5) << "channel " << c;
      EXPECT_NEAR(got[1 + c], ref.mean[c], 1e-5 * std::sqrt(var_ref)) << "channel " << c;
    }
  }
}

TEST_F(CudaOps, MomentsOfEmptyInput)
{
  const Geometry shapes[] = {{0, 3, 4}, {2, 3, 0}, {2, 0, 3}, {0, 0, 0}};
  for (DType d : kTypes) {
    for (Layout lay : kLayouts) {
      for (Geometry g : shapes) {
        g.layout = lay;
        SCOPED_TRACE(describe(d, g));
        const auto got = run_moments({}, d, g);
        ASSERT_EQ(got.size(), static_cast<size_t>(2 * g.c + 1));
        EXPECT_EQ(got[0], static_cast<double>(g.n * g.l));
        for (size_t i = 1; i < got.size(); ++i) { EXPECT_EQ(got[i], 0.0) << i; }
      }
    }
  }
}

/// +-inf or NaN in channel 0 (its first, a middle or its last value): its mean is that of a
/// plain sum (+inf, -inf, NaN for NaN or for +inf with -inf) as nn.BatchNorm's, its M2 is NaN,
/// and the other channels are as accurate as without the bad values.
TEST_F(CudaOps, MomentsOfNonFiniteChannelAreThoseOfAPlainSum)
{
  const double inf = std::numeric_limits<double>::infinity();
  const struct {
    const char* name;
    std::vector<double> values;
    int sign;  // +1: +inf, -1: -inf, 0: NaN
  } bad[] = {{"+inf", {inf}, 1}, {"-inf", {-inf}, -1}, {"nan", {std::nan("")}, 0}, {"+inf,-inf", {inf, -inf}, 0},
             {"+inf,+inf", {inf, inf}, 1}};
  const Geometry shapes[] = {{8, 3, 16}, {4, 3, 4900}, {300, 5, 1}, {2, 2, 70000}};
  uint32_t seed = 5;
  for (DType d : kTypes) {
    for (Layout lay : kLayouts) {
      for (Geometry g : shapes) {
        g.layout = lay;
        const auto clean = random_input(g, d, seed++);
        const auto ref = run_moments(clean, d, g);
        const int64_t m = g.n * g.l;
        for (const auto& b : bad) {
          for (int64_t pos : {int64_t{0}, m / 2, m - static_cast<int64_t>(b.values.size())}) {
            SCOPED_TRACE(describe(d, g) + " " + b.name + " at " + std::to_string(pos));
            auto x = clean;
            for (size_t k = 0; k < b.values.size(); ++k) {
              const int64_t r = pos + static_cast<int64_t>(k);
              x[at(g, r / g.l, 0, r % g.l)] = b.values[k];
            }
            const auto got = run_moments(x, d, g);
            EXPECT_EQ(got[0], static_cast<double>(m));
            if (b.sign == 0) {
              EXPECT_TRUE(std::isnan(got[1])) << got[1];
            } else {
              EXPECT_EQ(got[1], b.sign * inf);
            }
            EXPECT_TRUE(std::isnan(got[1 + g.c])) << "m2 " << got[1 + g.c];
            const double rt = d == DType::Float64 ? 1e-12 : 1e-5;
            for (int64_t c = 1; c < g.c; ++c) {
              EXPECT_NEAR(got[1 + c], ref[1 + c], rt * std::fabs(ref[1 + c]) + 1e-12) << "mean, channel " << c;
              EXPECT_NEAR(got[1 + g.c + c], ref[1 + g.c + c], rt * ref[1 + g.c + c]) << "m2, channel " << c;
            }
          }
        }
      }
    }
  }
}

/// Records whose means are +-inf or NaN merge as the weighted sums of the means; M2 is NaN.
TEST_F(CudaOps, MergeMomentsOfNonFiniteRecordsIsThePlainSum)
{
  const double inf = std::numeric_limits<double>::infinity();
  const struct {
    double a, b;
    int sign;
  } cases[] = {{inf, 2.0, 1}, {2.0, -inf, -1}, {inf, -inf, 0}, {std::nan(""), 1.0, 0}, {inf, inf, 1}};
  for (const auto& k : cases) {
    SCOPED_TRACE(std::to_string(k.a) + " with " + std::to_string(k.b));
    const std::vector<double> in = {3.0, k.a, 1.0, 0.5, 2.0, 5.0, k.b, 3.0, 0.25, 1.0};
    Dev din(encode(in, DType::Float64));
    Dev dout = Dev::filled(5 * sizeof(double), 0xff);
    pysbn::merge_moments(2, 2, din.as<double>(), dout.as<double>(), exec());
    sync();
    const auto out = decode(dout.download(), DType::Float64);
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

/// A lone record with a non-finite mean (k = 1, or beside count-0 records) keeps NaN as its
/// spread, as the CPU merge gives; and finalize keeps a NaN variance NaN in both eps modes
/// (Clamp as max(var, eps) with NaN propagating, as the CPU and torch's clamp do).
TEST_F(CudaOps, NonFiniteRecordsMergeAndFinalizeAsOnTheCpu)
{
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<double> in = {0.0, 5.0, 7.0, 1.0, 1.0, /**/ 4.0, inf, 1.5, 0.5, 2.0};
  for (int64_t k : {int64_t{1}, int64_t{2}}) {
    SCOPED_TRACE("k=" + std::to_string(k));
    const double* first = in.data() + (k == 1 ? 5 : 0);
    std::vector<double> cpu(5);
    pysbn::merge_moments(k, 2, first, cpu.data(), on_cpu(1));
    Dev din(f64(std::vector<double>(first, first + 5 * k)));
    Dev dout = Dev::filled(5 * sizeof(double), 0xff);
    pysbn::merge_moments(k, 2, din.as<double>(), dout.as<double>(), exec());
    sync();
    const auto got = decode(dout.download(), DType::Float64);
    EXPECT_EQ(got[0], 4.0);
    EXPECT_EQ(got[1], inf);
    EXPECT_TRUE(std::isnan(got[3])) << "m2 " << got[3];
    EXPECT_TRUE(std::isnan(cpu[3])) << "CPU m2 " << cpu[3];
    EXPECT_EQ(got[2], cpu[2]);
    EXPECT_EQ(got[4], cpu[4]);
  }
  for (EpsMode mode : {EpsMode::Plus, EpsMode::Clamp}) {
    SCOPED_TRACE(mode == EpsMode::Plus ? "Plus" : "Clamp");
    const std::vector<double> rec = {4.0, inf, 1.5, std::nan(""), 2.0};
    std::vector<double> cpu(7);
    pysbn::finalize(2, rec.data(), 1e-3, mode, cpu.data(), RunningStats{}, on_cpu(1));
    Dev drec(f64(rec));
    Dev dst = Dev::filled(7 * sizeof(double), 0xff);
    pysbn::finalize(2, drec.as<double>(), 1e-3, mode, dst.as<double>(), RunningStats{}, exec());
    sync();
    const auto got = decode(dst.download(), DType::Float64);
    EXPECT_TRUE(std::isnan(got[5])) << "invstd of the NaN-variance channel " << got[5];
    EXPECT_TRUE(std::isnan(cpu[5])) << "CPU invstd " << cpu[5];
    EXPECT_NEAR(got[6], cpu[6], 1e-15 * cpu[6]);
  }
}

// ---- sum_ft ----------------------------------------------------------------------------------

TEST_F(CudaOps, SumMatchesFloat64Reference)
{
  uint32_t seed = 100;
  for (DType d : kTypes) {
    for (Layout lay : kLayouts) {
      for (Geometry g : kShapes) {
        g.layout = lay;
        SCOPED_TRACE(describe(d, g));
        const auto x = random_input(g, d, seed++, 0.5);
        Dev dx(encode(x, d));
        Dev dout = Dev::filled(g.c * sizeof(double), 0xff);
        pysbn::sum_ft(TensorView{dx.get(), d, g}, dout.as<double>(), exec());
        sync();
        const auto got = decode(dout.download(), DType::Float64);
        const auto ref = channel_sum(g, [&](int64_t n, int64_t c, int64_t l) { return x[at(g, n, c, l)]; });
        const auto mag =
          channel_sum(g, [&](int64_t n, int64_t c, int64_t l) { return std::fabs(x[at(g, n, c, l)]); });
        for (int64_t c = 0; c < g.c; ++c) {
          EXPECT_NEAR(got[c], ref[c], stat_tol(d) * mag[c] + 1e-30) << "channel " << c;
        }
      }
    }
  }
}

TEST_F(CudaOps, SumOfEmptyInputIsZero)
{
  for (DType d : kTypes) {
    Geometry g{0, 5, 3, Layout::ChannelMajor};
    Dev dout = Dev::filled(g.c * sizeof(double), 0xff);
    pysbn::sum_ft(TensorView{nullptr, d, g}, dout.as<double>(), exec());
    sync();
    for (double v : decode(dout.download(), DType::Float64)) { EXPECT_EQ(v, 0.0) << name(d); }
  }
}

// ---- merge_moments ---------------------------------------------------------------------------

/// Records from groups of data with the given counts (count-0 records carry NaN garbage, which
/// must not leak into the result), with the moments of the union of the data.
struct MergeCase {
  std::vector<double> records;  // k*(2C+1)
  Moments all;
};

MergeCase make_merge_case(const std::vector<int64_t>& counts, int64_t c_n, uint32_t seed)
{
  MergeCase mc;
  int64_t total = 0;
  for (int64_t k : counts) { total += k; }
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  const Geometry gu{total, c_n, 1, Layout::ChannelsLast};
  std::vector<double> union_x(static_cast<size_t>(total * c_n));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  int64_t row = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    const Geometry gi{counts[i], c_n, 1, Layout::ChannelsLast};
    std::vector<double> xi(static_cast<size_t>(counts[i] * c_n));
    for (int64_t n = 0; n < counts[i]; ++n) {
      for (int64_t c = 0; c < c_n; ++c) {
        // groups with different means and spreads, far from zero
        const double v = 100.0 * (c + 1) + 3.0 * i + (1.0 + i) * normal(gen);
        xi[n * c_n + c] = v;
        union_x[(row + n) * c_n + c] = v;
      }
    }
    row += counts[i];
    const Moments mi = ref_moments(xi, gi);
    mc.records.push_back(static_cast<double>(counts[i]));
    for (int64_t c = 0; c < c_n; ++c) { mc.records.push_back(counts[i] > 0 ? mi.mean[c] : nan); }
    for (int64_t c = 0; c < c_n; ++c) { mc.records.push_back(counts[i] > 0 ? mi.m2[c] : nan); }
  }
  mc.all = ref_moments(union_x, gu);
  return mc;
}

TEST_F(CudaOps, MergeMomentsIsExactForUnequalAndZeroCounts)
{
  const std::vector<std::vector<int64_t>> cases = {
    {0, 1, 7, 1000, 0, 3, 64}, {5}, {0, 0, 9}, {2, 0}, {1, 1, 1, 1}, {20000, 1}, {0, 0, 0},
  };
  for (int64_t c_n : {int64_t{1}, int64_t{5}, int64_t{300}}) {
    uint32_t seed = 5;
    for (const auto& counts : cases) {
      SCOPED_TRACE("C=" + std::to_string(c_n) + " k=" + std::to_string(counts.size()));
      const MergeCase mc = make_merge_case(counts, c_n, seed++);
      const int64_t k = static_cast<int64_t>(counts.size());
      Dev drec(f64(mc.records));
      Dev dout = Dev::filled((2 * c_n + 1) * sizeof(double), 0xff);
      pysbn::merge_moments(k, c_n, drec.as<double>(), dout.as<double>(), exec());
      sync();
      const auto got = decode(dout.download(), DType::Float64);
      EXPECT_EQ(got[0], mc.all.count);
      for (int64_t c = 0; c < c_n; ++c) {
        const double spread = mc.all.count > 0 ? std::sqrt(mc.all.m2[c] / mc.all.count) : 0.0;
        EXPECT_NEAR(got[1 + c], mc.all.mean[c], 1e-12 * (std::fabs(mc.all.mean[c]) + spread)) << "mean " << c;
        EXPECT_NEAR(got[1 + c_n + c], mc.all.m2[c], 1e-10 * mc.all.m2[c] + 1e-30) << "m2 " << c;
      }
    }
  }
}

TEST_F(CudaOps, MergeMomentsOfNothing)
{
  // k = 0: no records is an argument error (k >= 1), rejected before any device work.
  Dev dout = Dev::filled(7 * sizeof(double), 0xff);
  EXPECT_THROW(pysbn::merge_moments(0, 3, nullptr, dout.as<double>(), exec()), std::invalid_argument);
  sync();
  for (double v : decode(dout.download(), DType::Float64)) { EXPECT_TRUE(std::isnan(v)) << "written: " << v; }
  // C = 0: only the counts are merged.
  Dev drec(f64({4.0, 0.0, 6.0}));
  Dev dc = Dev::filled(sizeof(double), 0xff);
  pysbn::merge_moments(3, 0, drec.as<double>(), dc.as<double>(), exec());
  sync();
  EXPECT_EQ(decode(dc.download(), DType::Float64)[0], 10.0);
}

// ---- finalize --------------------------------------------------------------------------------

TEST_F(CudaOps, FinalizeMatchesFormula)
{
  const int64_t c_n = 37;
  for (DType pd : kTypes) {
    for (double count : {0.0, 2.0, 5.0, 1000.0}) {
      for (EpsMode mode : {EpsMode::Plus, EpsMode::Clamp}) {
        for (double eps : {1e-5, 0.3}) {
          for (bool running : {true, false}) {
            SCOPED_TRACE(std::string(name(pd)) + " count=" + std::to_string(count) +
                         " mode=" + std::to_string(static_cast<int>(mode)) + " eps=" + std::to_string(eps) +
                         (running ? " running" : ""));
            std::vector<double> rec{count};
            const auto mean = random_vector(c_n, 1, -3.0, 3.0, DType::Float64);
            // m2/count spans var below and above eps so that the clamp matters
            const auto var = random_vector(c_n, 2, 0.0, 1.0, DType::Float64);
            for (double m : mean) { rec.push_back(m); }
            for (double v : var) { rec.push_back(v * count); }
            const auto rm0 = random_vector(c_n, 3, -1.0, 1.0, pd);
            const auto rv0 = random_vector(c_n, 4, 0.5, 2.0, pd);
            const double factor = 0.1;

            Dev drec(f64(rec));
            Dev dstats = Dev::filled(pysbn::stats_size(c_n) * sizeof(double), 0xff);
            Dev drm(encode(rm0, pd)), drv(encode(rv0, pd));
            const int64_t start = 5;
            Bytes hc(sizeof start);
            std::memcpy(hc.data(), &start, sizeof start);
            Dev counter(hc);
            pysbn::finalize(c_n, drec.as<double>(), eps, mode, dstats.as<double>(),
                            running ? RunningStats{drm.get(), drv.get(), pd, factor, false, counter.as<int64_t>()}
                                    : RunningStats{},
                            exec());
            sync();
            const auto gs = decode(dstats.download(), DType::Float64);
            const auto grm = decode(drm.download(), pd);
            const auto grv = decode(drv.download(), pd);
            int64_t after = 0;
            std::memcpy(&after, counter.download().data(), sizeof after);
            // The record is copied in front of the statistics as it is (a count-0 record too).
            for (size_t i = 0; i < rec.size(); ++i) { EXPECT_EQ(gs[i], rec[i]) << "record slot " << i; }
            // The counter counts every batch, also a count-0 one.
            EXPECT_EQ(after, running ? start + 1 : start) << "num_batches_tracked";
            for (int64_t c = 0; c < c_n; ++c) {
              const double m = count > 0 ? rec[1 + c] : 0.0;
              const double m2 = count > 0 ? rec[1 + c_n + c] : 0.0;
              const double v = count > 0 ? m2 / count : 0.0;
              const double inv = 1.0 / std::sqrt(mode == EpsMode::Plus ? v + eps : std::max(v, eps));
              if (count > 0) { EXPECT_EQ(gs[1 + c], m) << c; }
              EXPECT_NEAR(gs[1 + 2 * c_n + c], inv, 1e-14 * inv) << c;
              double rm = rm0[c], rv = rv0[c];
              if (running && count > 0) {
                rm = (1 - factor) * rm + factor * m;
                rv = (1 - factor) * rv + factor * m2 / (count - 1);
              }
              // One rounding to the parameter dtype, plus double rounding (FMA or not) of the terms.
              const double ptol = eps_of(pd) + 1e-13;
              const double um = count > 0 ? factor * std::fabs(m) : 0.0;
              const double uv = count > 0 ? factor * std::fabs(m2 / (count - 1)) : 0.0;
              EXPECT_NEAR(grm[c], rm, ptol * (std::fabs(rm0[c]) + um) + 1e-300) << "running_mean " << c;
              EXPECT_NEAR(grv[c], rv, ptol * (std::fabs(rv0[c]) + uv) + 1e-300) << "running_var " << c;
            }
          }
        }
      }
    }
  }
}

/// The record may be the front of the statistics buffer itself, and RunningStats.cumulative
/// divides by num_batches_tracked after its increment (the counter counts a count-0 batch too,
/// whose running statistics stay): the same results as the same calls on the CPU, which are
/// tested against references in test_cpu_ops.
TEST_F(CudaOps, FinalizeAliasedAndCumulativeAgreeWithCpu)
{
  const int64_t c_n = 37;
  const size_t stats_n = static_cast<size_t>(pysbn::stats_size(c_n));
  for (DType pd : kTypes) {
    for (double count : {0.0, 5.0, 1000.0}) {
      for (bool cumulative : {true, false}) {
        SCOPED_TRACE(std::string(name(pd)) + " count=" + std::to_string(count) + (cumulative ? " cumulative" : ""));
        std::vector<double> front{count};
        const auto mean = random_vector(c_n, 11, -3.0, 3.0, DType::Float64);
        const auto var = random_vector(c_n, 12, 0.0, 1.0, DType::Float64);
        for (double m : mean) { front.push_back(count > 0 ? m : 0.0); }
        for (double v : var) { front.push_back(v * count); }
        const std::vector<double> rec = front;
        front.resize(stats_n, std::numeric_limits<double>::quiet_NaN());
        const auto rm0 = random_vector(c_n, 13, -1.0, 1.0, pd), rv0 = random_vector(c_n, 14, 0.5, 2.0, pd);
        const double momentum = cumulative ? std::numeric_limits<double>::quiet_NaN() : 0.1;

        std::vector<double> cst = front;
        Bytes crm = encode(rm0, pd), crv = encode(rv0, pd);
        int64_t cctr = 4;
        pysbn::finalize(c_n, cst.data(), 0.3, EpsMode::Clamp, cst.data(),
                        RunningStats{crm.data(), crv.data(), pd, momentum, cumulative, &cctr}, on_cpu(1));

        const int64_t start = 4;
        Bytes hc(sizeof start);
        std::memcpy(hc.data(), &start, sizeof start);
        Dev dst(f64(front)), drm(encode(rm0, pd)), drv(encode(rv0, pd)), counter(hc);
        pysbn::finalize(c_n, dst.as<double>(), 0.3, EpsMode::Clamp, dst.as<double>(),
                        RunningStats{drm.get(), drv.get(), pd, momentum, cumulative, counter.as<int64_t>()}, exec());
        sync();
        int64_t after = 0;
        std::memcpy(&after, counter.download().data(), sizeof after);
        EXPECT_EQ(after, start + 1) << "num_batches_tracked";
        EXPECT_EQ(cctr, start + 1) << "num_batches_tracked (CPU)";
        const auto gs = decode(dst.download(), DType::Float64);
        for (size_t i = 0; i < rec.size(); ++i) { EXPECT_EQ(gs[i], rec[i]) << "record slot " << i; }
        for (size_t i = rec.size(); i < stats_n; ++i) { EXPECT_NEAR(gs[i], cst[i], 1e-14 * cst[i]) << "invstd " << i; }
        const auto grm = decode(drm.download(), pd), grv = decode(drv.download(), pd);
        const auto crmv = decode(crm, pd), crvv = decode(crv, pd);
        for (int64_t c = 0; c < c_n; ++c) {
          if (count == 0) {
            EXPECT_EQ(grm[c], rm0[c]) << "running_mean untouched " << c;
            EXPECT_EQ(grv[c], rv0[c]) << "running_var untouched " << c;
          }
          const double ptol = eps_of(pd) + 1e-13;
          EXPECT_NEAR(grm[c], crmv[c], ptol * (std::fabs(rm0[c]) + std::fabs(rec[1 + c])) + 1e-300) << "running_mean " << c;
          EXPECT_NEAR(grv[c], crvv[c], ptol * (std::fabs(rv0[c]) + std::fabs(crvv[c])) + 1e-300) << "running_var " << c;
        }
      }
    }
  }
}

// ---- normalize -------------------------------------------------------------------------------

/// Parameter dtypes allowed with input dtype d.
std::vector<DType> param_dtypes(DType d)
{
  if (is_half(d)) { return {d, DType::Float32}; }
  return {d};
}

struct NormCase {
  std::vector<double> mean, invstd, weight, bias;  // mean/invstd double, weight/bias in pd
};

NormCase make_norm_case(int64_t c_n, DType pd, uint32_t seed, double offset = 0.0)
{
  NormCase nc{random_vector(c_n, seed, -1.0, 4.0, DType::Float64), random_vector(c_n, seed + 1, 0.3, 2.0, DType::Float64),
              random_vector(c_n, seed + 2, -2.0, 2.0, pd), random_vector(c_n, seed + 3, -1.0, 1.0, pd)};
  for (double& m : nc.mean) { m += offset; }
  return nc;
}

/// The batch statistics of a NormCase: the count of g, its mean and invstd, m2 unread (NaN).
std::vector<double> norm_stats(const NormCase& nc, Geometry g)
{
  return make_stats(static_cast<double>(g.n * g.l), nc.mean, nans(nc.mean.size()), nc.invstd);
}

/// normalize on the GPU of host values, y returned decoded.
std::vector<double> run_normalize(void* stream, const std::vector<double>& x, DType d, Geometry g, const NormCase& nc,
                                  DType pd, bool use_w, bool use_b, size_t shift = 0)
{
  Dev dx(encode(x, d), shift), dstats(f64(norm_stats(nc, g)));
  Dev dw(encode(nc.weight, pd)), db(encode(nc.bias, pd));
  Dev dy(Bytes(x.size() * esize(d), 0xff), shift);
  pysbn::normalize(TensorView{dx.get(), d, g}, dstats.as<double>(),
                   Affine{use_w ? dw.get() : nullptr, use_b ? db.get() : nullptr, pd}, Act{}, dy.get(), on_gpu(stream));
  check(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
  return decode(dy.download(), d);
}

/// Counts (and reports the first few) y values off the float64 reference by more than tol.
int64_t check_normalize(const std::vector<double>& y, const std::vector<double>& x, Geometry g, const NormCase& nc,
                        bool use_w, bool use_b, double tol)
{
  int64_t bad = 0;
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t c = 0; c < g.c; ++c) {
      const double w = use_w ? nc.weight[c] : 1.0, b = use_b ? nc.bias[c] : 0.0;
      for (int64_t l = 0; l < g.l; ++l) {
        const int64_t i = at(g, n, c, l);
        const double ref = (x[i] - nc.mean[c]) * nc.invstd[c] * w + b;
        if (!(std::fabs(y[i] - ref) <= tol * (1.0 + std::fabs(ref))) && bad++ < 5) {
          ADD_FAILURE() << "y at (" << n << ", " << c << ", " << l << "): " << y[i] << " vs " << ref;
        }
      }
    }
  }
  return bad;
}

TEST_F(CudaOps, NormalizeMatchesFloat64Reference)
{
  uint32_t seed = 200;
  for (DType d : kTypes) {
    for (DType pd : param_dtypes(d)) {
      for (Layout lay : kLayouts) {
        int variant = 0;
        for (Geometry g : kShapes) {
          g.layout = lay;
          const bool use_w = variant % 2 == 0, use_b = variant % 3 != 2;
          ++variant;
          SCOPED_TRACE(describe(d, g) + " param " + name(pd) + (use_w ? " weight" : "") + (use_b ? " bias" : ""));
          const auto x = random_input(g, d, seed++);
          const NormCase nc = make_norm_case(g.c, pd, seed++);
          const auto y = run_normalize(stream(), x, d, g, nc, pd, use_w, use_b);
          EXPECT_EQ(check_normalize(y, x, g, nc, use_w, use_b, out_tol(d)), 0);
        }
      }
    }
  }
}

TEST_F(CudaOps, NormalizeLargeOffsetFloat32)
{
  // x = 1e4 + randn and a double mean near 1e4: a float mean alone would be off by up to
  // 5e-4 (half an ulp at 1e4); the hi/lo split keeps y to float precision.
  for (Layout lay : kLayouts) {
    Geometry g{16, 5, 257, lay};
    SCOPED_TRACE(describe(DType::Float32, g));
    const auto x = random_input(g, DType::Float32, 41, 1e4);
    NormCase nc = make_norm_case(g.c, DType::Float32, 42, 1e4);
    for (double& m : nc.mean) { m += 1.0 / 3.0; }  // not representable in float
    const auto y = run_normalize(stream(), x, DType::Float32, g, nc, DType::Float32, true, true);
    EXPECT_EQ(check_normalize(y, x, g, nc, true, true, 1e-6), 0);
  }
}

TEST_F(CudaOps, NormalizeUnalignedPointersTakeTheScalarPath)
{
  for (DType d : kTypes) {
    for (Layout lay : kLayouts) {
      Geometry g{4, 16, 64, lay};
      SCOPED_TRACE(describe(d, g));
      const auto x = random_input(g, d, 21);
      const NormCase nc = make_norm_case(g.c, d, 22);
      const auto y = run_normalize(stream(), x, d, g, nc, d, true, false, esize(d));
      EXPECT_EQ(check_normalize(y, x, g, nc, true, false, out_tol(d)), 0);
    }
  }
}

TEST_F(CudaOps, NormalizeEmptyInputIsANoOp)
{
  Geometry g{0, 3, 5, Layout::ChannelMajor};
  EXPECT_NO_THROW(pysbn::normalize(TensorView{nullptr, DType::Float32, g}, nullptr, Affine{}, Act{}, nullptr, exec()));
  sync();
}

// ---- backward_reduce -------------------------------------------------------------------------

TEST_F(CudaOps, BackwardReduceMatchesFloat64Reference)
{
  uint32_t seed = 300;
  for (DType d : kTypes) {
    for (DType pd : param_dtypes(d)) {
      for (Layout lay : kLayouts) {
        int variant = 0;
        for (Geometry g : kShapes) {
          g.layout = lay;
          const bool grads = variant++ % 2 == 0;
          const size_t shift = variant % 5 == 0 ? esize(d) : 0;  // now and then unaligned
          SCOPED_TRACE(describe(d, g) + " param " + name(pd) + (grads ? " grads" : "") + (shift ? " unaligned" : ""));
          const auto x = random_input(g, d, seed++, 1.0);
          const auto dy = random_input(g, d, seed++, -0.5);
          const NormCase nc = make_norm_case(g.c, pd, seed++);
          Dev ddy(encode(dy, d), shift), dx(encode(x, d)), dstats(f64(norm_stats(nc, g)));
          Dev dsums = Dev::filled(2 * g.c * sizeof(double), 0xff);
          Dev dgw = Dev::filled(g.c * esize(pd), 0xff), dgb = Dev::filled(g.c * esize(pd), 0xff);
          pysbn::backward_reduce(TensorView{dx.get(), d, g}, ddy.get(), dstats.as<double>(), Affine{}, Act{},
                                 dsums.as<double>(),
                                 AffineGrad{grads ? dgw.get() : nullptr, grads ? dgb.get() : nullptr, pd}, exec());
          sync();
          const auto sums = decode(dsums.download(), DType::Float64);
          const auto gw = decode(dgw.download(), pd);
          const auto gb = decode(dgb.download(), pd);
          auto dyv = [&](int64_t n, int64_t c, int64_t l) { return dy[at(g, n, c, l)]; };
          auto dyx = [&](int64_t n, int64_t c, int64_t l) {
            const int64_t i = at(g, n, c, l);
            return dy[i] * (x[i] - nc.mean[c]);
          };
          const auto s_dy = channel_sum(g, dyv);
          const auto s_dyx = channel_sum(g, dyx);
          const auto m_dy = channel_sum(g, [&](int64_t n, int64_t c, int64_t l) { return std::fabs(dyv(n, c, l)); });
          const auto m_dyx = channel_sum(g, [&](int64_t n, int64_t c, int64_t l) { return std::fabs(dyx(n, c, l)); });
          const double tol = stat_tol(d);
          for (int64_t c = 0; c < g.c; ++c) {
            EXPECT_NEAR(sums[c], s_dy[c], tol * m_dy[c] + 1e-30) << "sum_dy " << c;
            EXPECT_NEAR(sums[g.c + c], s_dyx[c], tol * m_dyx[c] + 1e-30) << "sum_dy_xmu " << c;
            if (grads) {
              const double rw = s_dyx[c] * nc.invstd[c];
              EXPECT_NEAR(gw[c], rw, tol * m_dyx[c] * nc.invstd[c] + eps_of(pd) * std::fabs(rw) + 1e-30)
                << "grad_weight " << c;
              EXPECT_NEAR(gb[c], s_dy[c], tol * m_dy[c] + eps_of(pd) * std::fabs(s_dy[c]) + 1e-30) << "grad_bias " << c;
            }
          }
        }
      }
    }
  }
}

TEST_F(CudaOps, BackwardReduceOfEmptyInputIsZero)
{
  for (DType d : kTypes) {
    Geometry g{0, 4, 3, Layout::ChannelsLast};
    Dev dsums = Dev::filled(2 * g.c * sizeof(double), 0xff);
    Dev dgw = Dev::filled(g.c * esize(d), 0xff), dgb = Dev::filled(g.c * esize(d), 0xff);
    // grad_weight = sum_dy_xmu * invstd needs the statistics, even with no values.
    Dev dstats(f64(make_stats(0.0, std::vector<double>(g.c, 0.0), std::vector<double>(g.c, 0.0),
                              std::vector<double>(g.c, 1.0))));
    pysbn::backward_reduce(TensorView{nullptr, d, g}, nullptr, dstats.as<double>(), Affine{}, Act{}, dsums.as<double>(),
                           AffineGrad{dgw.get(), dgb.get(), d}, exec());
    sync();
    for (double v : decode(dsums.download(), DType::Float64)) { EXPECT_EQ(v, 0.0) << name(d); }
    for (double v : decode(dgw.download(), d)) { EXPECT_EQ(v, 0.0) << name(d); }
    for (double v : decode(dgb.download(), d)) { EXPECT_EQ(v, 0.0) << name(d); }
  }
}

// ---- backward_elemt --------------------------------------------------------------------------

TEST_F(CudaOps, BackwardElemtMatchesFloat64Reference)
{
  uint32_t seed = 400;
  for (DType d : kTypes) {
    for (DType pd : param_dtypes(d)) {
      for (Layout lay : kLayouts) {
        int variant = 0;
        for (Geometry g : kShapes) {
          g.layout = lay;
          const bool use_w = variant++ % 2 == 1;
          const size_t shift = variant % 5 == 0 ? esize(d) : 0;  // now and then unaligned
          SCOPED_TRACE(describe(d, g) + " param " + name(pd) + (use_w ? " weight" : "") + (shift ? " unaligned" : ""));
          const auto x = random_input(g, d, seed++, 1.0);
          const auto dy = random_input(g, d, seed++, -0.5);
          const NormCase nc = make_norm_case(g.c, pd, seed++);
          // global sums and count, as after the sync (the count exceeds the local N*L)
          const double count = static_cast<double>(3 * g.n * g.l + 1);
          std::vector<double> sums = random_vector(g.c, seed++, -0.5 * count, 0.5 * count, DType::Float64);
          const auto s2 = random_vector(g.c, seed++, -0.5 * count, 0.5 * count, DType::Float64);
          sums.insert(sums.end(), s2.begin(), s2.end());
          // The global count in the statistics; m2 is not read in eps mode Plus (NaN).
          Dev ddy(encode(dy, d)), dx(encode(x, d), shift);
          Dev dstats(f64(make_stats(count, nc.mean, nans(nc.mean.size()), nc.invstd)));
          Dev dw(encode(nc.weight, pd)), dsums(f64(sums));
          Dev ddx(Bytes(x.size() * esize(d), 0xff), shift);
          pysbn::backward_elemt(TensorView{dx.get(), d, g}, ddy.get(), dstats.as<double>(), 1e-5, EpsMode::Plus,
                                Affine{use_w ? dw.get() : nullptr, nullptr, pd}, Act{}, dsums.as<double>(), ddx.get(),
                                exec());
          sync();
          const auto got = decode(ddx.download(), d);
          int64_t bad = 0;
          for (int64_t n = 0; n < g.n; ++n) {
            for (int64_t c = 0; c < g.c; ++c) {
              const double w = use_w ? nc.weight[c] : 1.0, is = nc.invstd[c];
              const double mdy = sums[c] / count, k = is * is * sums[g.c + c] / count;
              for (int64_t l = 0; l < g.l; ++l) {
                const int64_t i = at(g, n, c, l);
                const double t = (x[i] - nc.mean[c]) * k;
                const double ref = (dy[i] - mdy - t) * is * w;
                const double scale = (std::fabs(dy[i]) + std::fabs(mdy) + std::fabs(t)) * std::fabs(is * w);
                if (!(std::fabs(got[i] - ref) <= out_tol(d) * (1.0 + scale)) && bad++ < 5) {
                  ADD_FAILURE() << "dx at (" << n << ", " << c << ", " << l << "): " << got[i] << " vs " << ref;
                }
              }
            }
          }
          EXPECT_EQ(bad, 0);
        }
      }
    }
  }
}

TEST_F(CudaOps, BackwardElemtWithZeroCountWritesZero)
{
  for (DType d : kTypes) {
    Geometry g{3, 4, 5, Layout::ChannelMajor};
    const auto x = random_input(g, d, 1), dy = random_input(g, d, 2);
    Dev ddy(encode(dy, d)), dx(encode(x, d));
    Dev dstats(f64(make_stats(0.0, std::vector<double>(g.c, 0.5), std::vector<double>(g.c, 0.0),
                              std::vector<double>(g.c, 2.0))));
    Dev dsums(f64(std::vector<double>(2 * g.c, 1.0)));
    Dev ddx = Dev::filled(x.size() * esize(d), 0xff);
    pysbn::backward_elemt(TensorView{dx.get(), d, g}, ddy.get(), dstats.as<double>(), 1e-5, EpsMode::Plus,
                          Affine{nullptr, nullptr, d}, Act{}, dsums.as<double>(), ddx.get(), exec());
    sync();
    for (double v : decode(ddx.download(), d)) { EXPECT_EQ(v, 0.0) << name(d); }
  }
}

// ---- agreement with the CPU ops --------------------------------------------------------------

TEST_F(CudaOps, AgreesWithCpuOps)
{
  const int threads = 2;
  const Exec cpu = on_cpu(threads);
  for (DType d : kTypes) {
    for (Layout lay : kLayouts) {
      Geometry g{4, 6, 50, lay};
      SCOPED_TRACE(describe(d, g));
      const auto x = random_input(g, d, 31, 2.0);
      const auto dy = random_input(g, d, 32);
      const Bytes hx = encode(x, d), hdy = encode(dy, d);
      const TensorView hxv{hx.data(), d, g};
      const double tol = stat_tol(d);
      const double n_l = static_cast<double>(g.n * g.l);
      const Affine none{nullptr, nullptr, d};

      // moments
      std::vector<double> cs(2 * g.c + 1);
      pysbn::moments(hxv, cs.data(), cpu);
      const auto gs = run_moments(x, d, g);
      EXPECT_EQ(gs[0], cs[0]);
      for (int64_t c = 0; c < g.c; ++c) {
        const double spread = std::sqrt(cs[1 + g.c + c] / n_l);
        EXPECT_NEAR(gs[1 + c], cs[1 + c], tol * spread) << "mean " << c;
        EXPECT_NEAR(gs[1 + g.c + c], cs[1 + g.c + c], tol * cs[1 + g.c + c]) << "m2 " << c;
      }

      // sum_ft
      std::vector<double> csum(g.c);
      pysbn::sum_ft(hxv, csum.data(), cpu);
      Dev dx(hx), dsum = Dev::filled(g.c * sizeof(double), 0xff);
      const TensorView dxv{dx.get(), d, g};
      pysbn::sum_ft(dxv, dsum.as<double>(), exec());
      sync();
      const auto gsum = decode(dsum.download(), DType::Float64);
      for (int64_t c = 0; c < g.c; ++c) {
        EXPECT_NEAR(gsum[c], csum[c], tol * (std::fabs(csum[c]) + n_l)) << "sum " << c;
      }

      // merge_moments of the CPU record with itself and an empty record
      std::vector<double> three(cs);
      three.insert(three.end(), cs.begin(), cs.end());
      three.push_back(0.0);
      three.insert(three.end(), 2 * g.c, 0.0);
      std::vector<double> cmerged(cs.size());
      pysbn::merge_moments(3, g.c, three.data(), cmerged.data(), cpu);
      Dev dthree(f64(three)), dmerged = Dev::filled(cs.size() * sizeof(double), 0xff);
      pysbn::merge_moments(3, g.c, dthree.as<double>(), dmerged.as<double>(), exec());
      sync();
      const auto gmerged = decode(dmerged.download(), DType::Float64);
      for (size_t i = 0; i < cs.size(); ++i) {
        EXPECT_NEAR(gmerged[i], cmerged[i], 1e-14 * std::fabs(cmerged[i])) << "merge " << i;
      }

      // finalize, from the CPU record on both sides
      const size_t stats_n = static_cast<size_t>(pysbn::stats_size(g.c));
      std::vector<double> cst(stats_n);
      pysbn::finalize(g.c, cs.data(), 1e-5, EpsMode::Plus, cst.data(), RunningStats{}, on_cpu(1));
      Dev drec(f64(cs)), dst = Dev::filled(stats_n * sizeof(double), 0xff);
      pysbn::finalize(g.c, drec.as<double>(), 1e-5, EpsMode::Plus, dst.as<double>(), RunningStats{}, exec());
      sync();
      const auto gst = decode(dst.download(), DType::Float64);
      for (size_t i = 0; i < cs.size(); ++i) { EXPECT_EQ(gst[i], cs[i]) << "finalize record slot " << i; }
      for (int64_t c = 0; c < g.c; ++c) {
        EXPECT_EQ(gst[1 + c], cst[1 + c]) << "finalize mean " << c;
        EXPECT_NEAR(gst[1 + 2 * g.c + c], cst[1 + 2 * g.c + c], 1e-14 * cst[1 + 2 * g.c + c]) << "finalize invstd " << c;
      }

      // normalize with the CPU's statistics
      Bytes cy(hx.size());
      pysbn::normalize(hxv, cst.data(), none, Act{}, cy.data(), cpu);
      Dev dcst(f64(cst)), dyo = Dev::filled(hx.size(), 0xff);
      pysbn::normalize(dxv, dcst.as<double>(), none, Act{}, dyo.get(), exec());
      sync();
      const auto cyv = decode(cy, d), gyv = decode(dyo.download(), d);
      for (size_t i = 0; i < cyv.size(); ++i) {
        ASSERT_NEAR(gyv[i], cyv[i], 2 * out_tol(d) * (1.0 + std::fabs(cyv[i]))) << "normalize " << i;
      }

      // backward_reduce and backward_elemt (the count is the statistics' own, N*L)
      std::vector<double> csums(2 * g.c);
      pysbn::backward_reduce(hxv, hdy.data(), cst.data(), none, Act{}, csums.data(), AffineGrad{}, cpu);
      Dev ddy(hdy), dsums = Dev::filled(2 * g.c * sizeof(double), 0xff);
      pysbn::backward_reduce(dxv, ddy.get(), dcst.as<double>(), none, Act{}, dsums.as<double>(), AffineGrad{}, exec());
      sync();
      const auto gsv = decode(dsums.download(), DType::Float64);
      for (int64_t c = 0; c < 2 * g.c; ++c) { EXPECT_NEAR(gsv[c], csums[c], tol * 10.0 * n_l) << "sums " << c; }
      EXPECT_EQ(cst[0], n_l);
      Bytes cdx(hx.size());
      pysbn::backward_elemt(hxv, hdy.data(), cst.data(), 1e-5, EpsMode::Plus, none, Act{}, csums.data(), cdx.data(),
                            cpu);
      Dev dcsums(f64(csums)), ddx = Dev::filled(hx.size(), 0xff);
      pysbn::backward_elemt(dxv, ddy.get(), dcst.as<double>(), 1e-5, EpsMode::Plus, none, Act{}, dcsums.as<double>(),
                            ddx.get(), exec());
      sync();
      const auto cdxv = decode(cdx, d), gdxv = decode(ddx.download(), d);
      for (size_t i = 0; i < cdxv.size(); ++i) {
        ASSERT_NEAR(gdxv[i], cdxv[i], 4 * out_tol(d) * (1.0 + std::fabs(cdxv[i]))) << "backward_elemt " << i;
      }

      // backward_elemt in eps mode Clamp: even channels have a variance below eps (no variance
      // term), odd ones above it.
      const double eps = 1e-2;
      std::vector<double> clamp_st = cst;
      for (int64_t c = 0; c < g.c; ++c) { clamp_st[1 + g.c + c] = n_l * (c % 2 == 0 ? eps / 2 : 2 * eps); }
      Bytes cdx2(hx.size());
      pysbn::backward_elemt(hxv, hdy.data(), clamp_st.data(), eps, EpsMode::Clamp, none, Act{}, csums.data(),
                            cdx2.data(), cpu);
      Dev dclamp(f64(clamp_st)), ddx2 = Dev::filled(hx.size(), 0xff);
      pysbn::backward_elemt(dxv, ddy.get(), dclamp.as<double>(), eps, EpsMode::Clamp, none, Act{},
                            dcsums.as<double>(), ddx2.get(), exec());
      sync();
      const auto cdx2v = decode(cdx2, d), gdx2v = decode(ddx2.download(), d);
      for (size_t i = 0; i < cdx2v.size(); ++i) {
        ASSERT_NEAR(gdx2v[i], cdx2v[i], 4 * out_tol(d) * (1.0 + std::fabs(cdx2v[i]))) << "backward_elemt Clamp " << i;
      }
    }
  }
}

/// An int64 counter in device memory.
Dev device_counter(int64_t v)
{
  Bytes h(sizeof v);
  std::memcpy(h.data(), &v, sizeof v);
  return Dev(h);
}

int64_t read_counter(const Dev& c)
{
  int64_t v = 0;
  std::memcpy(&v, c.download().data(), sizeof v);
  return v;
}

/// The composites are the composed ops in one call: same kernels, so the same bits; the
/// running statistics and the counter are updated, the backward uses the local sums.
TEST_F(CudaOps, CompositesAreTheComposedOps)
{
  for (DType d : kTypes) {
    for (Layout lay : kLayouts) {
      Geometry g{4, 6, 50, lay};
      SCOPED_TRACE(describe(d, g));
      const DType pd = d;
      const auto x = random_input(g, d, 41, 3.0);
      const auto dy = random_input(g, d, 42);
      const auto w = random_vector(g.c, 43, 0.5, 1.5, pd), b = random_vector(g.c, 44, -1.0, 1.0, pd);
      const auto rm0 = random_vector(g.c, 45, -1.0, 1.0, pd), rv0 = random_vector(g.c, 46, 0.5, 2.0, pd);
      Dev dx(encode(x, d)), ddy(encode(dy, d)), dw(encode(w, pd)), db(encode(b, pd));
      const TensorView xv{dx.get(), d, g};
      const Affine affine{dw.get(), db.get(), pd};
      const size_t rec = (2 * g.c + 1) * sizeof(double), stn = (3 * g.c + 1) * sizeof(double);
      const size_t per = g.c * sizeof(double);
      const size_t bytes = encode(x, d).size();

      // composed
      Dev rec_c = Dev::filled(rec, 0xff), st_c = Dev::filled(stn, 0xff);
      Dev y_c = Dev::filled(bytes, 0xff), rm_c(encode(rm0, pd)), rv_c(encode(rv0, pd));
      Dev counter_c = device_counter(41);
      pysbn::moments(xv, rec_c.as<double>(), exec());
      pysbn::finalize(g.c, rec_c.as<double>(), 1e-3, EpsMode::Plus, st_c.as<double>(),
                      RunningStats{rm_c.get(), rv_c.get(), pd, 0.25, false, counter_c.as<int64_t>()}, exec());
      pysbn::normalize(xv, st_c.as<double>(), affine, Act{}, y_c.get(), exec());
      // batch_norm_forward, x's own moments
      Dev st_f = Dev::filled(stn, 0xff);
      Dev y_f = Dev::filled(bytes, 0xff), rm_f(encode(rm0, pd)), rv_f(encode(rv0, pd));
      Dev counter = device_counter(41);
      pysbn::batch_norm_forward(xv, nullptr, 1e-3, EpsMode::Plus, affine, Act{}, st_f.as<double>(), y_f.get(),
                                RunningStats{rm_f.get(), rv_f.get(), pd, 0.25, false, counter.as<int64_t>()}, exec());
      sync();
      EXPECT_EQ(st_f.download(), st_c.download()) << "stats";
      EXPECT_EQ(y_f.download(), y_c.download()) << "y";
      EXPECT_EQ(rm_f.download(), rm_c.download()) << "running_mean";
      EXPECT_EQ(rv_f.download(), rv_c.download()) << "running_var";
      EXPECT_EQ(read_counter(counter), 42) << "num_batches_tracked";
      EXPECT_EQ(read_counter(counter_c), 42) << "num_batches_tracked (composed)";

      // batch_norm_forward with a global record (not x's moments), the cumulative average, Clamp
      std::vector<double> grec{1000.0};
      for (double m : random_vector(g.c, 47, -1.0, 4.0, DType::Float64)) { grec.push_back(m); }
      for (double v : random_vector(g.c, 48, 0.0, 2e-3, DType::Float64)) { grec.push_back(1000.0 * v); }
      Dev drec(f64(grec));
      Dev st_gc = Dev::filled(stn, 0xff), y_gc = Dev::filled(bytes, 0xff), rm_gc(encode(rm0, pd)), rv_gc(encode(rv0, pd));
      Dev counter_gc = device_counter(6);
      pysbn::finalize(g.c, drec.as<double>(), 1e-3, EpsMode::Clamp, st_gc.as<double>(),
                      RunningStats{rm_gc.get(), rv_gc.get(), pd, 0.1, true, counter_gc.as<int64_t>()}, exec());
      pysbn::normalize(xv, st_gc.as<double>(), affine, Act{}, y_gc.get(), exec());
      Dev st_gf = Dev::filled(stn, 0xff), y_gf = Dev::filled(bytes, 0xff), rm_gf(encode(rm0, pd)), rv_gf(encode(rv0, pd));
      Dev counter_gf = device_counter(6);
      pysbn::batch_norm_forward(xv, drec.as<double>(), 1e-3, EpsMode::Clamp, affine, Act{}, st_gf.as<double>(),
                                y_gf.get(),
                                RunningStats{rm_gf.get(), rv_gf.get(), pd, 0.1, true, counter_gf.as<int64_t>()}, exec());
      sync();
      EXPECT_EQ(drec.download(), f64(grec)) << "record (an input)";
      const auto gst = decode(st_gf.download(), DType::Float64);
      for (size_t i = 0; i < grec.size(); ++i) { EXPECT_EQ(gst[i], grec[i]) << "stats: record slot " << i; }
      EXPECT_EQ(st_gf.download(), st_gc.download()) << "stats (record)";
      EXPECT_EQ(y_gf.download(), y_gc.download()) << "y (record)";
      EXPECT_EQ(rm_gf.download(), rm_gc.download()) << "running_mean (record)";
      EXPECT_EQ(rv_gf.download(), rv_gc.download()) << "running_var (record)";
      EXPECT_EQ(read_counter(counter_gf), 7) << "num_batches_tracked (record)";
      EXPECT_EQ(read_counter(counter_gc), 7) << "num_batches_tracked (record, composed)";

      // backward: composed with the statistics of x (their count is the local N*L) vs batch_norm_backward
      const Affine wonly{dw.get(), nullptr, pd};
      Dev s_c = Dev::filled(2 * per, 0xff), gw_c = Dev::filled(g.c * esize(pd), 0xff), gb_c = Dev::filled(g.c * esize(pd), 0xff);
      Dev dx_c = Dev::filled(bytes, 0xff);
      pysbn::backward_reduce(xv, ddy.get(), st_c.as<double>(), wonly, Act{}, s_c.as<double>(),
                             AffineGrad{gw_c.get(), gb_c.get(), pd}, exec());
      pysbn::backward_elemt(xv, ddy.get(), st_c.as<double>(), 1e-3, EpsMode::Plus, wonly, Act{}, s_c.as<double>(),
                            dx_c.get(), exec());
      Dev s_f = Dev::filled(2 * per, 0xff), gw_f = Dev::filled(g.c * esize(pd), 0xff), gb_f = Dev::filled(g.c * esize(pd), 0xff);
      Dev dx_f = Dev::filled(bytes, 0xff);
      pysbn::batch_norm_backward(xv, ddy.get(), st_c.as<double>(), 1e-3, EpsMode::Plus, wonly, Act{}, s_f.as<double>(),
                                 AffineGrad{gw_f.get(), gb_f.get(), pd}, dx_f.get(), exec());
      sync();
      EXPECT_EQ(s_f.download(), s_c.download()) << "sums";
      EXPECT_EQ(gw_f.download(), gw_c.download()) << "grad_weight";
      EXPECT_EQ(gb_f.download(), gb_c.download()) << "grad_bias";
      EXPECT_EQ(dx_f.download(), dx_c.download()) << "dx";
    }
  }
}

// ---- fused activations -----------------------------------------------------------------------
// Every activation through normalize, backward_reduce and backward_elemt against
// act_reference.hpp (long double, z = (x - mean) * invstd * w + b from the rounded inputs), and
// against the same ops on the CPU; the composites are the composed ops bit for bit. Tolerances
// as above, widened by what an error in z (s_z: the size of z's terms) does to act (act' s_z) and
// to act' (act'' s_z, or a whole jump of act' for z within that error of a kink).

/// The reference values of one element.
struct ActElem {
  long double z, xm, s_z;
};

ActElem act_elem(double x, double mean, double invstd, double w, double b)
{
  const long double xm = static_cast<long double>(x) - mean, t = xm * invstd * w;
  return {t + b, xm, std::fabs(t) + std::fabs(static_cast<long double>(b))};
}

/// Error bound of a kernel's g = act'(z) dy with output tolerance tol (relative).
double act_g_err(const Act& act, long double slope, const ActElem& e, long double dy, double tol)
{
  const act_ref::Value v = act_ref::eval(act.kind, slope, e.z);
  long double dist, jump;
  act_ref::kink(act.kind, slope, e.z, dist, jump);
  const long double kink = dist <= tol * e.s_z + 1e-300L ? jump * std::fabs(dy) : 0.0L;
  return static_cast<double>(tol * std::fabs(dy) * (v.dterms + std::fabs(v.d2) * e.s_z) + kink);
}

TEST_F(CudaOps, ActivationsMatchLongDoubleReference)
{
  const Geometry shapes[] = {{1, 1, 1}, {2, 3, 5}, {4, 1, 7}, {3, 5, 1}, {2, 4097, 3}, {8, 16, 64}, {2, 64, 256}, {3, 24, 40}};
  uint32_t seed = 900;
  for (const pysbn::Activation a : act_ref::kAll) {
    const Act act{a, 0.1};
    for (DType d : kTypes) {
      const long double slope = act_ref::slope_in(act, d);
      const double tol = out_tol(d), stol = stat_tol(d);
      for (DType pd : param_dtypes(d)) {
        for (Layout lay : kLayouts) {
          for (Geometry g : shapes) {
            g.layout = lay;
            SCOPED_TRACE(std::string(act_ref::name(a)) + " " + describe(d, g) + " param " + name(pd));
            const auto x = random_input(g, d, seed++, 1.0);
            const auto dy = random_input(g, d, seed++, -0.5);
            const NormCase nc = make_norm_case(g.c, pd, seed++);
            const auto st = norm_stats(nc, g);
            Dev dx(encode(x, d)), ddy(encode(dy, d)), dstats(f64(st)), dw(encode(nc.weight, pd)), db(encode(nc.bias, pd));
            const TensorView xv{dx.get(), d, g};
            const Affine affine{dw.get(), db.get(), pd};
            // normalize
            Dev dyo = Dev::filled(x.size() * esize(d), 0xff);
            pysbn::normalize(xv, dstats.as<double>(), affine, act, dyo.get(), exec());
            // backward_reduce
            Dev dsums = Dev::filled(2 * g.c * sizeof(double), 0xff);
            Dev dgw = Dev::filled(g.c * esize(pd), 0xff), dgb = Dev::filled(g.c * esize(pd), 0xff);
            pysbn::backward_reduce(xv, ddy.get(), dstats.as<double>(), affine, act, dsums.as<double>(),
                                   AffineGrad{dgw.get(), dgb.get(), pd}, exec());
            // backward_elemt with global sums and count
            const double count = static_cast<double>(3 * g.n * g.l + 1);
            std::vector<double> gs = random_vector(g.c, seed++, -0.5 * count, 0.5 * count, DType::Float64);
            const auto gs2 = random_vector(g.c, seed++, -0.5 * count, 0.5 * count, DType::Float64);
            gs.insert(gs.end(), gs2.begin(), gs2.end());
            Dev dgs(f64(gs)), dst2(f64(make_stats(count, nc.mean, nans(nc.mean.size()), nc.invstd)));
            Dev ddx = Dev::filled(x.size() * esize(d), 0xff);
            pysbn::backward_elemt(xv, ddy.get(), dst2.as<double>(), 1e-5, EpsMode::Plus, affine, act, dgs.as<double>(),
                                  ddx.get(), exec());
            sync();
            const auto y = decode(dyo.download(), d), sums = decode(dsums.download(), DType::Float64);
            const auto gw = decode(dgw.download(), pd), gb = decode(dgb.download(), pd);
            const auto got_dx = decode(ddx.download(), d);
            std::vector<long double> s1(g.c, 0.0L), s2(g.c, 0.0L);
            std::vector<double> t1(g.c, 0.0), t2(g.c, 0.0);
            int64_t bad = 0;
            for (int64_t n = 0; n < g.n; ++n) {
              for (int64_t c = 0; c < g.c; ++c) {
                for (int64_t l = 0; l < g.l; ++l) {
                  const int64_t i = at(g, n, c, l);
                  const ActElem e = act_elem(x[i], nc.mean[c], nc.invstd[c], nc.weight[c], nc.bias[c]);
                  const act_ref::Value v = act_ref::eval(a, slope, e.z);
                  const double ty = tol * (1.0 + static_cast<double>(std::fabs(v.y) + std::fabs(v.d) * e.s_z));
                  if (!(std::fabs(y[i] - static_cast<double>(v.y)) <= ty) && bad++ < 5) {
                    ADD_FAILURE() << "y at (" << n << ", " << c << ", " << l << "): " << y[i] << " vs "
                                  << static_cast<double>(v.y);
                  }
                  const long double gi = act_ref::grad(a, slope, e.z, dy[i]);
                  const double gerr = act_g_err(act, slope, e, dy[i], tol);
                  s1[c] += gi;
                  s2[c] += gi * e.xm;
                  t1[c] += stol * static_cast<double>(std::fabs(gi)) + gerr;
                  t2[c] += static_cast<double>(stol * std::fabs(gi * e.xm) + gerr * std::fabs(e.xm));
                  const long double is = nc.invstd[c], isw = is * nc.weight[c];
                  const long double mb = gs[c] / count, k = e.xm * is * is * gs[g.c + c] / count;
                  const long double ref = (gi - mb - k) * isw;
                  const double tdx =
                    tol * (1.0 + static_cast<double>((std::fabs(gi) + std::fabs(mb) + std::fabs(k)) * std::fabs(isw))) +
                    gerr * static_cast<double>(std::fabs(isw));
                  if (!(std::fabs(got_dx[i] - static_cast<double>(ref)) <= tdx) && bad++ < 5) {
                    ADD_FAILURE() << "dx at (" << n << ", " << c << ", " << l << "): " << got_dx[i] << " vs "
                                  << static_cast<double>(ref);
                  }
                }
              }
            }
            EXPECT_EQ(bad, 0);
            for (int64_t c = 0; c < g.c; ++c) {
              EXPECT_NEAR(sums[c], static_cast<double>(s1[c]), t1[c] + 1e-30) << "sum_dy " << c;
              EXPECT_NEAR(sums[g.c + c], static_cast<double>(s2[c]), t2[c] + 1e-30) << "sum_dy_xmu " << c;
              const double rw = static_cast<double>(s2[c]) * nc.invstd[c];
              EXPECT_NEAR(gw[c], rw, t2[c] * nc.invstd[c] + eps_of(pd) * std::fabs(rw) + 1e-30) << "grad_weight " << c;
              EXPECT_NEAR(gb[c], static_cast<double>(s1[c]), t1[c] + eps_of(pd) * std::fabs(static_cast<double>(s1[c])) + 1e-30)
                << "grad_bias " << c;
            }
          }
        }
      }
    }
  }
}

/// The GPU and the CPU agree with every activation (and on NaN and +-inf in x: same class).
TEST_F(CudaOps, ActivationsAgreeWithCpuOps)
{
  const Exec cpu = on_cpu(2);
  for (const pysbn::Activation a : act_ref::kAll) {
    const Act act{a, 0.2};
    for (DType d : kTypes) {
      for (Layout lay : kLayouts) {
        Geometry g{4, 6, 50, lay};
        SCOPED_TRACE(std::string(act_ref::name(a)) + " " + describe(d, g));
        auto x = random_input(g, d, 51, 0.5);
        x[at(g, 1, 2, 3)] = std::numeric_limits<double>::quiet_NaN();
        x[at(g, 2, 3, 7)] = std::numeric_limits<double>::infinity();
        x[at(g, 3, 4, 11)] = -std::numeric_limits<double>::infinity();
        const auto dy = random_input(g, d, 52);
        const NormCase nc = make_norm_case(g.c, d, 53);
        const auto st = norm_stats(nc, g);
        const Bytes hx = encode(x, d), hdy = encode(dy, d), hw = encode(nc.weight, d), hb = encode(nc.bias, d);
        const Affine haff{hw.data(), hb.data(), d};
        Dev dx(hx), ddy(hdy), dw(hw), db(hb), dst(f64(st));
        const Affine daff{dw.get(), db.get(), d};
        const double tol = out_tol(d);
        auto close = [&](const char* what, const std::vector<double>& gv, const std::vector<double>& cv, double rel) {
          int64_t bad = 0;
          for (size_t i = 0; i < cv.size(); ++i) {
            const bool ok = std::isnan(cv[i]) ? std::isnan(gv[i])
                            : std::isinf(cv[i]) ? gv[i] == cv[i]
                                                : std::fabs(gv[i] - cv[i]) <= rel * (1.0 + std::fabs(cv[i]));
            if (!ok && bad++ < 5) { ADD_FAILURE() << what << " " << i << ": " << gv[i] << " vs " << cv[i]; }
          }
          EXPECT_EQ(bad, 0) << what;
        };
        // normalize
        Bytes cy(hx.size());
        pysbn::normalize(TensorView{hx.data(), d, g}, st.data(), haff, act, cy.data(), cpu);
        Dev gy = Dev::filled(hx.size(), 0xff);
        pysbn::normalize(TensorView{dx.get(), d, g}, dst.as<double>(), daff, act, gy.get(), exec());
        // backward_reduce
        std::vector<double> csums(2 * g.c);
        pysbn::backward_reduce(TensorView{hx.data(), d, g}, hdy.data(), st.data(), haff, act, csums.data(), AffineGrad{},
                               cpu);
        Dev gsums = Dev::filled(2 * g.c * sizeof(double), 0xff);
        pysbn::backward_reduce(TensorView{dx.get(), d, g}, ddy.get(), dst.as<double>(), daff, act, gsums.as<double>(),
                               AffineGrad{}, exec());
        // backward_elemt with finite sums
        std::vector<double> fs(2 * g.c);
        for (int64_t c = 0; c < 2 * g.c; ++c) { fs[c] = std::isfinite(csums[c]) ? csums[c] : 1.0; }
        Bytes cdx(hx.size());
        pysbn::backward_elemt(TensorView{hx.data(), d, g}, hdy.data(), st.data(), 1e-5, EpsMode::Plus, haff, act,
                              fs.data(), cdx.data(), cpu);
        Dev dfs(f64(fs)), gdx = Dev::filled(hx.size(), 0xff);
        pysbn::backward_elemt(TensorView{dx.get(), d, g}, ddy.get(), dst.as<double>(), 1e-5, EpsMode::Plus, daff, act,
                              dfs.as<double>(), gdx.get(), exec());
        sync();
        close("normalize", decode(gy.download(), d), decode(cy, d), 2 * tol);
        const auto gsv = decode(gsums.download(), DType::Float64);
        const double n_l = static_cast<double>(g.n * g.l);
        close("sums", gsv, csums, stat_tol(d) * 10.0 * n_l);
        close("backward_elemt", decode(gdx.download(), d), decode(cdx, d), 4 * tol);
      }
    }
  }
}

/// With an activation too, batch_norm_forward and batch_norm_backward are the composed ops, bit
/// for bit.
TEST_F(CudaOps, CompositesWithActivationsAreTheComposedOps)
{
  for (const pysbn::Activation a : act_ref::kAll) {
    const Act act{a, 0.05};
    for (DType d : kTypes) {
      for (Layout lay : kLayouts) {
        Geometry g{4, 6, 50, lay};
        SCOPED_TRACE(std::string(act_ref::name(a)) + " " + describe(d, g));
        const auto x = random_input(g, d, 61, 1.0), dy = random_input(g, d, 62);
        const auto w = random_vector(g.c, 63, 0.5, 1.5, d), b = random_vector(g.c, 64, -1.0, 1.0, d);
        Dev dx(encode(x, d)), ddy(encode(dy, d)), dw(encode(w, d)), db(encode(b, d));
        const TensorView xv{dx.get(), d, g};
        const Affine affine{dw.get(), db.get(), d};
        const size_t rec = (2 * g.c + 1) * sizeof(double), stn = (3 * g.c + 1) * sizeof(double);
        const size_t bytes = x.size() * esize(d), per = g.c * sizeof(double);
        Dev rec_c = Dev::filled(rec, 0xff), st_c = Dev::filled(stn, 0xff), y_c = Dev::filled(bytes, 0xff);
        pysbn::moments(xv, rec_c.as<double>(), exec());
        pysbn::finalize(g.c, rec_c.as<double>(), 1e-3, EpsMode::Plus, st_c.as<double>(), RunningStats{}, exec());
        pysbn::normalize(xv, st_c.as<double>(), affine, act, y_c.get(), exec());
        Dev st_f = Dev::filled(stn, 0xff), y_f = Dev::filled(bytes, 0xff);
        pysbn::batch_norm_forward(xv, nullptr, 1e-3, EpsMode::Plus, affine, act, st_f.as<double>(), y_f.get(),
                                  RunningStats{}, exec());
        Dev s_c = Dev::filled(2 * per, 0xff), gw_c = Dev::filled(g.c * esize(d), 0xff),
            gb_c = Dev::filled(g.c * esize(d), 0xff), dx_c = Dev::filled(bytes, 0xff);
        pysbn::backward_reduce(xv, ddy.get(), st_c.as<double>(), affine, act, s_c.as<double>(),
                               AffineGrad{gw_c.get(), gb_c.get(), d}, exec());
        pysbn::backward_elemt(xv, ddy.get(), st_c.as<double>(), 1e-3, EpsMode::Plus, affine, act, s_c.as<double>(),
                              dx_c.get(), exec());
        Dev s_f = Dev::filled(2 * per, 0xff), gw_f = Dev::filled(g.c * esize(d), 0xff),
            gb_f = Dev::filled(g.c * esize(d), 0xff), dx_f = Dev::filled(bytes, 0xff);
        pysbn::batch_norm_backward(xv, ddy.get(), st_c.as<double>(), 1e-3, EpsMode::Plus, affine, act,
                                   s_f.as<double>(), AffineGrad{gw_f.get(), gb_f.get(), d}, dx_f.get(), exec());
        sync();
        EXPECT_EQ(st_f.download(), st_c.download()) << "stats";
        EXPECT_EQ(y_f.download(), y_c.download()) << "y";
        EXPECT_EQ(s_f.download(), s_c.download()) << "sums";
        EXPECT_EQ(gw_f.download(), gw_c.download()) << "grad_weight";
        EXPECT_EQ(gb_f.download(), gb_c.download()) << "grad_bias";
        EXPECT_EQ(dx_f.download(), dx_c.download()) << "dx";
      }
    }
  }
}

// ---- argument validation (fails before any device work) --------------------------------------

TEST(CudaOpsValidation, BadArgumentsThrowInvalidArgument)
{
  if (!pysbn::built_with_cuda()) { GTEST_SKIP() << "built without CUDA"; }
  const Exec gpu{Device::CUDA, 1, nullptr};
  Geometry g{2, 3, 4, Layout::ChannelMajor};
  float xf[64] = {};
  double st[64] = {};
  int64_t counter = 0;
  const TensorView xv{xf, DType::Float32, g};
  EXPECT_THROW(pysbn::moments(TensorView{nullptr, DType::Float32, g}, st, gpu), std::invalid_argument);
  EXPECT_THROW(pysbn::moments(xv, nullptr, gpu), std::invalid_argument);
  EXPECT_THROW(pysbn::moments(TensorView{xf, static_cast<DType>(9), g}, st, gpu), std::invalid_argument);
  Geometry neg{-1, 3, 4, Layout::ChannelMajor};
  EXPECT_THROW(pysbn::sum_ft(TensorView{xf, DType::Float32, neg}, st, gpu), std::invalid_argument);
  EXPECT_THROW(pysbn::normalize(xv, st, Affine{st, nullptr, DType::Float16}, pysbn::Act{}, xf, gpu),
               std::invalid_argument);
  EXPECT_THROW(pysbn::backward_reduce(TensorView{xf, DType::Float16, g}, xf, st, Affine{}, Act{}, st,
                                      AffineGrad{st, nullptr, DType::BFloat16}, gpu),
               std::invalid_argument);
  EXPECT_THROW(pysbn::backward_elemt(xv, xf, nullptr, 1e-5, EpsMode::Plus, Affine{}, Act{}, st, xf, gpu),
               std::invalid_argument);
  EXPECT_THROW(pysbn::merge_moments(-1, 3, st, st + 32, gpu), std::invalid_argument);
  EXPECT_THROW(pysbn::merge_moments(0, 3, st, st + 32, gpu), std::invalid_argument);
  EXPECT_THROW(pysbn::merge_moments(2, 3, nullptr, st, gpu), std::invalid_argument);
  EXPECT_THROW(pysbn::finalize(3, st, 1e-5, EpsMode::Plus, st, RunningStats{xf, nullptr, DType::Float32}, gpu),
               std::invalid_argument);
  EXPECT_THROW(pysbn::finalize(3, st, -1.0, EpsMode::Plus, st, RunningStats{}, gpu), std::invalid_argument);
  EXPECT_THROW(pysbn::finalize(3, st, 1e-5, static_cast<EpsMode>(5), st, RunningStats{}, gpu), std::invalid_argument);
  EXPECT_THROW(pysbn::finalize(3, st, 1e-5, EpsMode::Plus, st,
                               RunningStats{xf, xf + 8, DType::Float32, 0.1, true, nullptr}, gpu),
               std::invalid_argument);
  EXPECT_THROW(pysbn::batch_norm_forward(xv, st, 1e-5, EpsMode::Plus, Affine{}, Act{}, st, xf,
                                         RunningStats{nullptr, nullptr, DType::Float32, 0.1, false, &counter}, gpu),
               std::invalid_argument);
  EXPECT_THROW(pysbn::normalize(xv, st, Affine{}, Act{static_cast<pysbn::Activation>(99)}, xf, gpu),
               std::invalid_argument);
  EXPECT_EQ(counter, 0);
  try {
    pysbn::moments(TensorView{nullptr, DType::Float32, g}, st, gpu);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("moments: x"), std::string::npos) << e.what();
  }
}

}  // namespace
