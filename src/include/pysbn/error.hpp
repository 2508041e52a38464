// SPDX-License-Identifier: MIT
// Error helpers of the pysbn core: std-derived exceptions carrying file:line, so that
// Cython's `except +` maps them to ValueError (std::invalid_argument) or RuntimeError
// (std::runtime_error) with no custom handler.
#pragma once

#include <stdexcept>
#include <string>

namespace pysbn::detail {

[[noreturn]] inline void throw_at(const char* kind, const char* file, int line, const std::string& msg)
{
  std::string what = msg + " (" + file + ":" + std::to_string(line) + ")";
  if (std::string(kind) == "invalid") { throw std::invalid_argument(what); }
  throw std::runtime_error(what);
}

}  // namespace pysbn::detail

/// Throws std::invalid_argument with `msg` (a std::string expression) unless `cond` holds.
#define PYSBN_EXPECTS(cond, msg)                                                     \
  do {                                                                               \
    if (!(cond)) { ::pysbn::detail::throw_at("invalid", __FILE__, __LINE__, (msg)); } \
  } while (0)

/// Throws std::runtime_error with `msg` (a std::string expression).
#define PYSBN_FAIL(msg) ::pysbn::detail::throw_at("runtime", __FILE__, __LINE__, (msg))
