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
#include "backend.hpp"
#include "common.hpp"

#include <pysbn/core.hpp>
#include <pysbn/error.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
template <class T, class P>
void normalize_impl(const T* x, const Geometry& g, const double* mean, const double* invstd,
                    const void* weight, const void* bias, T* y, int num_threads)
{
  using A = acc_t<T>;
  const int64_t C = g.c;
  // y = (x - hi) * a + (bias - lo * a): x - hi is exact near the mean, and the low part of the
  // mean folds into the constant term (three coefficients per channel).
  const SplitMean<A> sm(mean, C);
  std::vector<A> a(C), b(C);
  for (int64_t c = 0; c < C; ++c) {
    const double ac = invstd[c] * (weight ? ldp<P>(weight, c) : 1.0);
    a[c] = static_cast<A>(ac);
    b[c] = static_cast<A>((bias ? ldp<P>(bias, c) : 0.0) - static_cast<double>(sm.lo[c]) * ac);
  }
  if (!use_rows(g)) {
    parallel(cm_threads(g, num_threads), [&](int tid, int nt) {
      cm_for_planes_tail_first(g, sizeof(T), tid, nt, [&](int64_t, int64_t c, int64_t off) {
        const A mh = sm.hi[c], ac = a[c], bc = b[c];
        const T* __restrict xp = x + off;
        T* __restrict yp = y + off;
#pragma omp simd
        for (int64_t l = 0; l < g.l; ++l) { yp[l] = st<T>((ld(xp[l]) - mh) * ac + bc); }
      });
    });
    return;
  }
  const ClPlan p = cl_plan(g, num_threads);
  const std::vector<A> hw = replicate(sm.hi, p.w), aw = replicate(a, p.w), bw = replicate(b, p.w);
  parallel(p.nt, [&](int tid, int nt) {
    const A* __restrict ph = hw.data();
    const A* __restrict pa = aw.data();
    const A* __restrict pb = bw.data();
    cl_for_blocks_tail_first(p, C, sizeof(T), tid, nt, [&](int64_t r0, int64_t nrows, int64_t w) {
      for (int64_t i = 0; i < nrows; ++i) {
        const int64_t off = r0 * C + i * w;
        const T* __restrict xr = x + off;
        T* __restrict yr = y + off;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) { yr[j] = st<T>((ld(xr[j]) - ph[j]) * pa[j] + pb[j]); }
      }
    });
  });
}

// ================================================================================================
// backward_reduce (and sum_ft: the same walk with dy only)
// ================================================================================================
/// Per-channel sums of dy and of dy * (x - mean) in double; x may be null (sum of dy only).
template <class T>
void grad_sums(const T* dy, const T* x, const Geometry& g, const SplitMean<acc_t<T>>& sm,
               std::vector<double>& sum_dy, std::vector<double>& sum_dy_xmu, int num_threads)
{
  using A = acc_t<T>;
  const int64_t C = g.c;
  if (!use_rows(g)) {
    using Lanes = Stream2<A, kChanLanes>;
    const int nt0 = cm_threads(g, num_threads);
    std::vector<double> part(static_cast<size_t>(nt0) * 2 * C, 0.0);
    parallel(nt0, [&](int tid, int nt) {
      std::vector<Lanes> acc(C);
      cm_for_planes(g, tid, nt, [&](int64_t, int64_t c, int64_t off) {
        const A mh = sm.hi[c], ml = sm.lo[c];
        Lanes& a = acc[c];
        for (int64_t i = 0; i < g.l; i += kBlock) {
          const int64_t len = std::min(kBlock, g.l - i);
          const T* d = dy + off + i;
          if (x) {
            const T* xp = x + off + i;
            a.add(len, [&](int64_t l, A& u, A& v) {
              u = ld(d[l]);
              v = u * ((ld(xp[l]) - mh) - ml);
            });
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
  std::vector<double> lanes(static_cast<size_t>(p.nt) * 2 * p.w, 0.0);
  parallel(p.nt, [&](int tid, int nt) {
    std::vector<A> b1(p.w), b2(p.w);
    double* l1 = lanes.data() + static_cast<size_t>(tid) * 2 * p.w;
    double* l2 = l1 + p.w;
    const A* ph = hw.data();
    const A* pl = lw.data();
    cl_for_blocks(p, C, tid, nt, [&](int64_t r0, int64_t nrows, int64_t w) {
      A* q1 = b1.data();
      A* q2 = b2.data();
      std::fill(q1, q1 + w, A(0));
      std::fill(q2, q2 + w, A(0));
      const T* d = dy + r0 * C;
      if (x) {
        const T* xb = x + r0 * C;
        rows_accumulate2(nrows, w, q1, q2, [&](int64_t r, int64_t j, A& u, A& v) {
          u = ld(d[r * w + j]);
          v = u * ((ld(xb[r * w + j]) - ph[j]) - pl[j]);
        }, mem && w == p.w);
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
template <class T, class P>
void elemt_impl(const T* dy, const T* x, const Geometry& g, const double* mean, const double* invstd,
                const void* weight, const double* sums, double cnt, const double* clamp_m2, double eps, T* dx,
                int num_threads)
{
  using A = acc_t<T>;
  const int64_t C = g.c;
  const SplitMean<A> sm(mean, C);
  // dx = dy * k1 - (x - mean) * k2 - k3 = dy * k1 - (x - hi) * k2 - (k3 - lo * k2)
  std::vector<A> k1(C), k2(C), k3(C);
  const double inv_cnt = cnt > 0 ? 1.0 / cnt : 0.0;
  for (int64_t c = 0; c < C; ++c) {
    double is = invstd[c], w = weight ? ldp<P>(weight, c) : 1.0;
    double mdy = sums[c] * inv_cnt, mdyxmu = sums[C + c] * inv_cnt;
    // Eps mode Clamp (clamp_m2 = the record's m2): a channel with var < eps has
    // invstd = 1/sqrt(eps), which does not depend on x: no variance term.
    if (clamp_m2 != nullptr && clamp_m2[c] * inv_cnt < eps) { mdyxmu = 0.0; }
    double c2 = is * is * is * w * mdyxmu;
    k1[c] = static_cast<A>(is * w);
    k2[c] = static_cast<A>(c2);
    k3[c] = static_cast<A>(is * w * mdy - static_cast<double>(sm.lo[c]) * c2);
  }
  if (!use_rows(g)) {
    parallel(cm_threads(g, num_threads), [&](int tid, int nt) {
      cm_for_planes_tail_first(g, 2 * sizeof(T), tid, nt, [&](int64_t, int64_t c, int64_t off) {
        const A mh = sm.hi[c], a1 = k1[c], a2 = k2[c], a3 = k3[c];
        const T* __restrict d = dy + off;
        const T* __restrict xp = x + off;
        T* __restrict o = dx + off;
#pragma omp simd
        for (int64_t l = 0; l < g.l; ++l) { o[l] = st<T>(ld(d[l]) * a1 - (ld(xp[l]) - mh) * a2 - a3); }
      });
    });
    return;
  }
  const ClPlan p = cl_plan(g, num_threads);
  const std::vector<A> hw = replicate(sm.hi, p.w), w1 = replicate(k1, p.w), w2 = replicate(k2, p.w),
                       w3 = replicate(k3, p.w);
  parallel(p.nt, [&](int tid, int nt) {
    const A* __restrict qh = hw.data();
    const A* __restrict q1 = w1.data();
    const A* __restrict q2 = w2.data();
    const A* __restrict q3 = w3.data();
    cl_for_blocks_tail_first(p, C, 2 * sizeof(T), tid, nt, [&](int64_t r0, int64_t nrows, int64_t w) {
      // One row per pass. (Two rows per pass, sharing the coefficient loads, was faster on a
      // Zen 5 and 1.7x slower on a Zen 4 VM: 3.4 vs 2.0 ms for (64,256,14,14), one thread.)
      for (int64_t i = 0; i < nrows; ++i) {
        const int64_t off = r0 * C + i * w;
        const T* __restrict d = dy + off;
        const T* __restrict xr = x + off;
        T* __restrict o = dx + off;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) { o[j] = st<T>(ld(d[j]) * q1[j] - (ld(xr[j]) - qh[j]) * q2[j] - q3[j]); }
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

// Temporary: the activations other than Identity come with their kernels.
void identity_only(const char* op, const Act& act)
{
  PYSBN_EXPECTS(act.kind == Activation::Identity, std::string(op) + ": activation not available yet");
}

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
  identity_only("normalize", act);
  const Geometry& g = x.geometry;
  const StatsParts s(stats, g.c);
  advise_huge_pages(y, detail::numel(g) * dtype_size(x.dtype));
  dispatch_io(x.dtype, affine.dtype, [&](auto tag, auto ptag) {
    using T = decltype(tag);
    normalize_impl<T, decltype(ptag)>(static_cast<const T*>(x.data), g, s.mean, s.invstd, affine.weight, affine.bias,
                                      static_cast<T*>(y), exec.num_threads);
  });
}

void backward_reduce(const TensorView& x, const void* dy, const double* stats, const Affine& affine, const Act& act,
                     double* sums, const AffineGrad& grad, const Exec& exec)
{
  identity_only("backward_reduce", act);
  (void)affine;
  const Geometry& g = x.geometry;
  const int64_t c = g.c;
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    std::vector<double> s1(c, 0.0), s2(c, 0.0);
    if (detail::numel(g) > 0) {
      grad_sums<T>(static_cast<const T*>(dy), static_cast<const T*>(x.data), g, SplitMean<acc_t<T>>(stats + 1, c), s1,
                   s2, exec.num_threads);
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
  identity_only("backward_elemt", act);
  const Geometry& g = x.geometry;
  const StatsParts s(stats, g.c);
  advise_huge_pages(dx, detail::numel(g) * dtype_size(x.dtype));
  dispatch_io(x.dtype, affine.dtype, [&](auto tag, auto ptag) {
    using T = decltype(tag);
    elemt_impl<T, decltype(ptag)>(static_cast<const T*>(dy), static_cast<const T*>(x.data), g, s.mean, s.invstd,
                                  affine.weight, sums, s.count, mode == EpsMode::Clamp ? s.m2 : nullptr, eps,
                                  static_cast<T*>(dx), exec.num_threads);
  });
}

}  // namespace pysbn::cpu
