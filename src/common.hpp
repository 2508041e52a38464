// SPDX-License-Identifier: MIT
// Internal helpers shared by the op entry points (src/ops.cpp) and the back ends: names, and
// argument checks whose messages name the op and the argument. Not part of the public header.
#pragma once

#include <pysbn/core.hpp>
#include <pysbn/error.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

namespace pysbn::detail {

inline std::string dtype_name(DType d)
{
  switch (d) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
  }
  return "unknown(" + std::to_string(static_cast<int>(d)) + ")";
}

inline bool valid_dtype(DType d)
{
  return d == DType::Float32 || d == DType::Float64 || d == DType::Float16 || d == DType::BFloat16;
}

inline int64_t numel(const Geometry& g) { return g.n * g.c * g.l; }

/// Checks an input view: dtype, geometry, layout, and (when it holds values) its pointer.
inline void check_view(const char* op, const char* name, const TensorView& x)
{
  const std::string o(op);
  const Geometry& g = x.geometry;
  PYSBN_EXPECTS(valid_dtype(x.dtype), o + ": " + name + " dtype " + dtype_name(x.dtype) + " is not supported");
  PYSBN_EXPECTS(g.n >= 0 && g.c >= 0 && g.l >= 0,
                o + ": " + name + " geometry must be non-negative, got (N=" + std::to_string(g.n) +
                  ", C=" + std::to_string(g.c) + ", L=" + std::to_string(g.l) + ")");
  PYSBN_EXPECTS(g.layout == Layout::ChannelMajor || g.layout == Layout::ChannelsLast,
                o + ": " + name + " layout must be ChannelMajor (0) or ChannelsLast (1)");
  // N*C*L values of up to 8 bytes must be addressable: no int64 overflow anywhere downstream.
  constexpr int64_t max_values = std::numeric_limits<int64_t>::max() / 8;
  bool fits = true;
  int64_t prod = 1;
  for (int64_t e : {g.n, g.c, g.l}) {
    if (e != 0 && prod > max_values / e) { fits = false; }
    prod = fits ? prod * e : prod;
  }
  PYSBN_EXPECTS(fits || g.n == 0 || g.c == 0 || g.l == 0,
                o + ": " + name + " geometry (N=" + std::to_string(g.n) + ", C=" + std::to_string(g.c) +
                  ", L=" + std::to_string(g.l) + ") is too large: N*C*L overflows");
  PYSBN_EXPECTS(x.data != nullptr || !(g.n > 0 && g.c > 0 && g.l > 0), o + ": " + name + " data is null");
}

/// A pointer that must be non-null whenever `needed` (there is data behind it).
inline void check_ptr(const char* op, const char* name, const void* p, bool needed)
{
  PYSBN_EXPECTS(p != nullptr || !needed, std::string(op) + ": " + name + " is null");
}

/// The param dtype rule: equal to the input dtype, or Float32 for Float16/BFloat16 input.
inline void check_param_dtype(const char* op, const char* name, DType dtype, DType param_dtype)
{
  bool ok = param_dtype == dtype ||
            (param_dtype == DType::Float32 && (dtype == DType::Float16 || dtype == DType::BFloat16));
  PYSBN_EXPECTS(ok, std::string(op) + ": " + name + " dtype " + dtype_name(param_dtype) +
                      " does not match input dtype " + dtype_name(dtype) +
                      " (must be equal, or float32 for float16/bfloat16 input)");
}

inline void check_exec(const char* op, const Exec& e)
{
  PYSBN_EXPECTS(e.device == Device::CPU || e.device == Device::CUDA,
                std::string(op) + ": exec.device must be CPU (0) or CUDA (1)");
  PYSBN_EXPECTS(e.device != Device::CPU || e.num_threads >= 1,
                std::string(op) + ": exec.num_threads must be >= 1, got " + std::to_string(e.num_threads));
}

inline void check_eps(const char* op, double eps, EpsMode mode)
{
  PYSBN_EXPECTS(mode == EpsMode::Plus || mode == EpsMode::Clamp, std::string(op) + ": mode must be Plus (0) or Clamp (1)");
  PYSBN_EXPECTS(eps >= 0 && std::isfinite(eps), std::string(op) + ": eps must be finite and >= 0, got " + std::to_string(eps));
}

inline bool valid_activation(Activation a)
{
  return static_cast<int32_t>(a) >= static_cast<int32_t>(Activation::Identity) &&
         static_cast<int32_t>(a) <= static_cast<int32_t>(Activation::Hardswish);
}

inline void check_act(const char* op, const Act& act)
{
  PYSBN_EXPECTS(valid_activation(act.kind),
                std::string(op) + ": act.kind " + std::to_string(static_cast<int32_t>(act.kind)) + " is not supported");
  PYSBN_EXPECTS(std::isfinite(act.negative_slope),
                std::string(op) + ": act.negative_slope must be finite, got " + std::to_string(act.negative_slope));
}

inline void check_affine(const char* op, const TensorView& x, const Affine& a)
{
  if (a.weight != nullptr || a.bias != nullptr) { check_param_dtype(op, "affine", x.dtype, a.dtype); }
}

inline void check_grad(const char* op, const TensorView& x, const AffineGrad& g)
{
  if (g.weight != nullptr || g.bias != nullptr) { check_param_dtype(op, "grad", x.dtype, g.dtype); }
}

inline void check_running(const char* op, const RunningStats& r)
{
  const std::string o(op);
  PYSBN_EXPECTS((r.mean == nullptr) == (r.var == nullptr),
                o + ": running.mean and running.var must both be given or both be null");
  PYSBN_EXPECTS(r.mean == nullptr || valid_dtype(r.dtype),
                o + ": running.dtype " + dtype_name(r.dtype) + " is not supported");
  PYSBN_EXPECTS(r.cumulative || std::isfinite(r.momentum),
                o + ": running.momentum must be finite, got " + std::to_string(r.momentum));
  PYSBN_EXPECTS(!r.cumulative || r.num_batches_tracked != nullptr,
                o + ": running.cumulative needs running.num_batches_tracked");
}

}  // namespace pysbn::detail
