// SPDX-License-Identifier: MIT
// The activations of <pysbn/core.hpp> in long double, for the native tests (CPU and CUDA):
// torch's definitions, forward and backward (ReLU, LeakyReLU and Hardswish backward select as
// torch's kernels do, so z = NaN passes dy where torch passes it), written in forms that do not
// cancel (sigmoid from e^-|v|, Phi from erfc) so that the reference is good to long double
// precision everywhere. Also the second derivative and the kinks, which the tests' tolerances
// need: an error dz in z moves act'(z) by act''(z) dz, or by the jump of act' across a kink.
#pragma once

#include <pysbn/core.hpp>

#include <cmath>
#include <limits>

namespace act_ref {

using ld = long double;

/// Every activation, for loops over them.
constexpr pysbn::Activation kAll[] = {pysbn::Activation::Identity, pysbn::Activation::ReLU,
                                      pysbn::Activation::LeakyReLU, pysbn::Activation::SiLU,
                                      pysbn::Activation::GELU,      pysbn::Activation::GELUTanh,
                                      pysbn::Activation::Hardswish};

inline const char* name(pysbn::Activation a)
{
  switch (a) {
    case pysbn::Activation::Identity: return "Identity";
    case pysbn::Activation::ReLU: return "ReLU";
    case pysbn::Activation::LeakyReLU: return "LeakyReLU";
    case pysbn::Activation::SiLU: return "SiLU";
    case pysbn::Activation::GELU: return "GELU";
    case pysbn::Activation::GELUTanh: return "GELUTanh";
    case pysbn::Activation::Hardswish: return "Hardswish";
  }
  return "?";
}

/// act(z), act'(z), act''(z), and the size of the terms of act'(z) (a scale for its rounding
/// error: act' of SiLU or GELU crosses zero as a difference of two terms).
struct Value {
  ld y = 0, d = 0, d2 = 0, dterms = 0;
};

/// The negative slope as the kernels use it: rounded to the accumulation type (torch converts
/// the scalar to the op's math type).
inline ld slope_in(const pysbn::Act& act, pysbn::DType dtype)
{
  return pysbn::acc_dtype(dtype) == pysbn::DType::Float64 ? static_cast<ld>(act.negative_slope)
                                                          : static_cast<ld>(static_cast<float>(act.negative_slope));
}

/// sigmoid(v) and 1 - sigmoid(v), neither cancelling.
inline void sigmoid(ld v, ld& s, ld& q)
{
  const ld e = std::exp(-std::fabs(v)), r = 1.0L / (1.0L + e);
  s = v < 0 ? e * r : r;
  q = v < 0 ? r : e * r;
}

inline Value eval(pysbn::Activation a, ld slope, ld z)
{
  Value v;
  switch (a) {
    case pysbn::Activation::Identity: v = {z, 1.0L, 0.0L, 1.0L}; break;
    case pysbn::Activation::ReLU: v = {z < 0 ? 0.0L : z, z > 0 ? 1.0L : 0.0L, 0.0L, z > 0 ? 1.0L : 0.0L}; break;
    case pysbn::Activation::LeakyReLU: {
      const ld d = z > 0 ? 1.0L : slope;
      v = {z > 0 ? z : z * slope, d, 0.0L, std::fabs(d)};
      break;
    }
    case pysbn::Activation::SiLU: {
      ld s, q;
      sigmoid(z, s, q);
      v.y = z * s;
      v.d = s + z * s * q;
      v.d2 = s * q * (2.0L + z * (q - s));
      v.dterms = s + std::fabs(z * s * q);
      break;
    }
    case pysbn::Activation::GELU: {
      const ld cdf = 0.5L * std::erfc(-z / std::sqrt(2.0L));
      const ld pdf = std::exp(-0.5L * z * z) / std::sqrt(2.0L * 3.141592653589793238462643383279502884L);
      v.y = z * cdf;
      v.d = cdf + z * pdf;
      v.d2 = pdf * (2.0L - z * z);
      v.dterms = cdf + std::fabs(z * pdf);
      break;
    }
    case pysbn::Activation::GELUTanh: {
      const ld k = std::sqrt(2.0L / 3.141592653589793238462643383279502884L), kappa = 0.044715L;
      const ld u = k * (z + kappa * z * z * z), du = k * (1.0L + 3.0L * kappa * z * z), ddu = 6.0L * k * kappa * z;
      ld s, q;
      sigmoid(2.0L * u, s, q);  // (1 + tanh u) / 2 and (1 - tanh u) / 2
      const ld t = s - q, sech2 = 4.0L * s * q;
      v.y = z * s;
      v.d = s + 0.5L * z * sech2 * du;
      v.d2 = sech2 * (du - z * t * du * du + 0.5L * z * ddu);
      v.dterms = s + std::fabs(0.5L * z * sech2 * du);
      break;
    }
    case pysbn::Activation::Hardswish: {
      ld t = z + 3.0L;
      t = t < 0 ? 0.0L : t;
      t = 6.0L < t ? 6.0L : t;
      v.y = z * t / 6.0L;
      const bool mid = z >= -3.0L && z <= 3.0L;
      v.d = z < -3.0L ? 0.0L : (z <= 3.0L ? z / 3.0L + 0.5L : 1.0L);
      v.d2 = mid ? 1.0L / 3.0L : 0.0L;
      v.dterms = z < -3.0L ? 0.0L : (z <= 3.0L ? std::fabs(z / 3.0L) + 0.5L : 1.0L);
      break;
    }
  }
  if (std::isnan(z)) { v.y = v.d = z; }  // all but the selects' backward (grad below) propagate NaN
  return v;
}

/// g = act'(z) * dy as torch's backward forms it: ReLU's threshold_backward, LeakyReLU's and
/// Hardswish's selects (z = NaN falls to their last branch), the product elsewhere.
inline ld grad(pysbn::Activation a, ld slope, ld z, ld dy)
{
  switch (a) {
    case pysbn::Activation::Identity: return dy;
    case pysbn::Activation::ReLU: return z <= 0 ? 0.0L : dy;
    case pysbn::Activation::LeakyReLU: return z > 0 ? dy : dy * slope;
    case pysbn::Activation::Hardswish: return z < -3.0L ? 0.0L : (z <= 3.0L ? dy * (z / 3.0L + 0.5L) : dy);
    default: return eval(a, slope, z).d * dy;
  }
}

/// Distance from z to the nearest kink of act' and the jump of act' there (0, inf when smooth).
inline void kink(pysbn::Activation a, ld slope, ld z, ld& distance, ld& jump)
{
  distance = std::numeric_limits<ld>::infinity();
  jump = 0;
  if (a == pysbn::Activation::ReLU || a == pysbn::Activation::LeakyReLU) {
    distance = std::fabs(z);
    jump = std::fabs(1.0L - (a == pysbn::Activation::ReLU ? 0.0L : slope));
  } else if (a == pysbn::Activation::Hardswish) {
    distance = std::fmin(std::fabs(z + 3.0L), std::fabs(z - 3.0L));
    jump = 0.5L;  // 0 -> -1/2 at -3, 3/2 -> 1 at 3
  }
}

}  // namespace act_ref
