// SPDX-License-Identifier: MIT
// Internal helpers shared by the CPU and CUDA back ends: argument validation with messages
// that name the op and the argument. Not part of the public header.
#pragma once

#include <pysbn/core.hpp>
#include <pysbn/error.hpp>

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

/// Checks the input dtype, its geometry and (optionally) the parameter dtype.
inline void check_input(const char* op, DType dtype, const Geometry& g)
{
  PYSBN_EXPECTS(valid_dtype(dtype), std::string(op) + ": dtype " + dtype_name(dtype) + " is not supported");
  PYSBN_EXPECTS(g.n >= 0 && g.c >= 0 && g.l >= 0,
                std::string(op) + ": geometry must be non-negative, got (N=" + std::to_string(g.n) +
                  ", C=" + std::to_string(g.c) + ", L=" + std::to_string(g.l) + ")");
  PYSBN_EXPECTS(g.layout == Layout::ChannelMajor || g.layout == Layout::ChannelsLast,
                std::string(op) + ": layout must be ChannelMajor (0) or ChannelsLast (1)");
  // N*C*L values of up to 8 bytes must be addressable: no int64 overflow anywhere downstream.
  constexpr int64_t max_values = std::numeric_limits<int64_t>::max() / 8;
  bool fits = true;
  int64_t prod = 1;
  for (int64_t e : {g.n, g.c, g.l}) {
    if (e != 0 && prod > max_values / e) { fits = false; }
    prod = fits ? prod * e : prod;
  }
  PYSBN_EXPECTS(fits || g.n == 0 || g.c == 0 || g.l == 0,
                std::string(op) + ": geometry (N=" + std::to_string(g.n) + ", C=" +
                  std::to_string(g.c) + ", L=" + std::to_string(g.l) +
                  ") is too large: N*C*L overflows");
}

inline void check_param_dtype(const char* op, DType dtype, DType param_dtype)
{
  bool ok = param_dtype == dtype ||
            (param_dtype == DType::Float32 && (dtype == DType::Float16 || dtype == DType::BFloat16));
  PYSBN_EXPECTS(ok, std::string(op) + ": param_dtype " + dtype_name(param_dtype) +
                      " does not match input dtype " + dtype_name(dtype) +
                      " (must be equal, or float32 for float16/bfloat16 input)");
}

/// A pointer that must be non-null whenever `needed` (there is data behind it).
inline void check_ptr(const char* op, const char* name, const void* p, bool needed)
{
  PYSBN_EXPECTS(p != nullptr || !needed, std::string(op) + ": " + name + " is null");
}

inline int64_t numel(const Geometry& g) { return g.n * g.c * g.l; }

}  // namespace pysbn::detail
