// SPDX-License-Identifier: MIT
// The public ops of <pysbn/core.hpp>: every argument is checked here, once for both back ends,
// before anything is written; then the op runs on the back end `exec` names (src/backend.hpp).
// The composites (finalize with its running-stat update, batch_norm_forward, batch_norm_backward)
// are sequences of back-end primitives, with the module state (running statistics, counter)
// written last.
#include "backend.hpp"
#include "common.hpp"

#include <pysbn/core.hpp>
#include <pysbn/error.hpp>

#include <string>
#include <vector>

namespace pysbn {

namespace {

/// Checks `exec`, and that its device was built: before any op writes anything.
void check_backend(const char* op, const Exec& exec)
{
  detail::check_exec(op, exec);
#ifndef PYSBN_WITH_CUDA
  if (exec.device == Device::CUDA) {
    PYSBN_FAIL(std::string(op) + ": exec.device is CUDA but pysbn was built without CUDA; rebuild with a CUDA "
                                 "compiler (PYSBN_WITH_CUDA=ON)");
  }
#endif
}

}  // namespace

// Runs the back-end primitive `call` (e.g. `moments(x, record, exec)`) of exec's device.
#ifdef PYSBN_WITH_CUDA
#define PYSBN_RUN(exec, call)                 \
  do {                                        \
    if ((exec).device == Device::CUDA) {      \
      cuda::call;                             \
    } else {                                  \
      cpu::call;                              \
    }                                         \
  } while (0)
#else
#define PYSBN_RUN(exec, call) cpu::call
#endif

namespace {

bool has_values(const TensorView& x) { return detail::numel(x.geometry) > 0; }

/// Checks shared by the elementwise and backward ops: x, the stats, the parameters, the act.
void check_elementwise(const char* op, const TensorView& x, const double* stats, const Affine& affine, const Act& act)
{
  detail::check_view(op, "x", x);
  detail::check_affine(op, x, affine);
  detail::check_act(op, act);
  detail::check_ptr(op, "stats", stats, has_values(x));
}

}  // namespace

void sum_ft(const TensorView& x, double* out, const Exec& exec)
{
  constexpr const char* op = "sum_ft";
  detail::check_view(op, "x", x);
  detail::check_ptr(op, "out", out, x.geometry.c > 0);
  check_backend(op, exec);
  PYSBN_RUN(exec, sum_ft(x, out, exec));
}

void moments(const TensorView& x, double* record, const Exec& exec)
{
  constexpr const char* op = "moments";
  detail::check_view(op, "x", x);
  detail::check_ptr(op, "record", record, true);
  check_backend(op, exec);
  PYSBN_RUN(exec, moments(x, record, exec));
}

void merge_moments(int64_t k, int64_t c, const double* records, double* record, const Exec& exec)
{
  constexpr const char* op = "merge_moments";
  PYSBN_EXPECTS(k >= 1, std::string(op) + ": k (number of records) must be >= 1, got " + std::to_string(k));
  PYSBN_EXPECTS(c >= 0, std::string(op) + ": c must be >= 0, got " + std::to_string(c));
  detail::check_ptr(op, "records", records, true);
  detail::check_ptr(op, "record", record, true);
  check_backend(op, exec);
  PYSBN_RUN(exec, merge_moments(k, c, records, record, exec));
}

void finalize(int64_t c, const double* record, double eps, EpsMode mode, double* stats, const RunningStats& running,
              const Exec& exec)
{
  constexpr const char* op = "finalize";
  PYSBN_EXPECTS(c >= 0, std::string(op) + ": c must be >= 0, got " + std::to_string(c));
  detail::check_eps(op, eps, mode);
  detail::check_running(op, running);
  detail::check_ptr(op, "record", record, true);
  detail::check_ptr(op, "stats", stats, true);
  check_backend(op, exec);
  PYSBN_RUN(exec, finalize(c, record, eps, mode, stats, exec));
  PYSBN_RUN(exec, update_running(c, stats, running, exec));
}

void normalize(const TensorView& x, const double* stats, const Affine& affine, const Act& act, void* y,
               const Exec& exec)
{
  constexpr const char* op = "normalize";
  check_elementwise(op, x, stats, affine, act);
  detail::check_ptr(op, "y", y, has_values(x));
  check_backend(op, exec);
  if (has_values(x)) { PYSBN_RUN(exec, normalize(x, stats, affine, act, y, exec)); }
}

void batch_norm_forward(const TensorView& x, const double* record, double eps, EpsMode mode, const Affine& affine,
                        const Act& act, double* stats, void* y, const RunningStats& running, const Exec& exec)
{
  constexpr const char* op = "batch_norm_forward";
  check_elementwise(op, x, stats, affine, act);
  detail::check_eps(op, eps, mode);
  detail::check_running(op, running);
  detail::check_ptr(op, "stats", stats, true);
  detail::check_ptr(op, "y", y, has_values(x));
  PYSBN_EXPECTS(record != stats || record == nullptr, std::string(op) + ": record and stats must not be the same buffer");
  const int64_t c = x.geometry.c;
  check_backend(op, exec);
  if (record == nullptr) {
    PYSBN_RUN(exec, moments(x, stats, exec));
    PYSBN_RUN(exec, finalize(c, stats, eps, mode, stats, exec));
  } else {
    PYSBN_RUN(exec, finalize(c, record, eps, mode, stats, exec));
  }
  if (has_values(x)) { PYSBN_RUN(exec, normalize(x, stats, affine, act, y, exec)); }
  PYSBN_RUN(exec, update_running(c, stats, running, exec));  // module state last: a throw above changes nothing
}

void backward_reduce(const TensorView& x, const void* dy, const double* stats, const Affine& affine, const Act& act,
                     double* sums, const AffineGrad& grad, const Exec& exec)
{
  constexpr const char* op = "backward_reduce";
  check_elementwise(op, x, stats, affine, act);
  detail::check_grad(op, x, grad);
  detail::check_ptr(op, "dy", dy, has_values(x));
  detail::check_ptr(op, "stats", stats, grad.weight != nullptr && x.geometry.c > 0);
  detail::check_ptr(op, "sums", sums, x.geometry.c > 0);
  check_backend(op, exec);
  PYSBN_RUN(exec, backward_reduce(x, dy, stats, affine, act, sums, grad, exec));
}

void backward_elemt(const TensorView& x, const void* dy, const double* stats, double eps, EpsMode mode,
                    const Affine& affine, const Act& act, const double* sums, void* dx, const Exec& exec)
{
  constexpr const char* op = "backward_elemt";
  check_elementwise(op, x, stats, affine, act);
  detail::check_eps(op, eps, mode);
  detail::check_ptr(op, "dy", dy, has_values(x));
  detail::check_ptr(op, "sums", sums, has_values(x));
  detail::check_ptr(op, "dx", dx, has_values(x));
  check_backend(op, exec);
  if (has_values(x)) { PYSBN_RUN(exec, backward_elemt(x, dy, stats, eps, mode, affine, act, sums, dx, exec)); }
}

void batch_norm_backward(const TensorView& x, const void* dy, const double* stats, double eps, EpsMode mode,
                         const Affine& affine, const Act& act, double* sums, const AffineGrad& grad, void* dx,
                         const Exec& exec)
{
  constexpr const char* op = "batch_norm_backward";
  check_elementwise(op, x, stats, affine, act);
  detail::check_eps(op, eps, mode);
  detail::check_grad(op, x, grad);
  detail::check_ptr(op, "dy", dy, has_values(x));
  detail::check_ptr(op, "stats", stats, grad.weight != nullptr && x.geometry.c > 0);
  detail::check_ptr(op, "sums", sums, x.geometry.c > 0 && exec.device != Device::CPU);
  check_backend(op, exec);
  std::vector<double> scratch;
  if (sums == nullptr) {  // CPU: the local sums are only scratch here
    scratch.resize(static_cast<size_t>(sums_size(x.geometry.c)));
    sums = scratch.data();
  }
  PYSBN_RUN(exec, backward_reduce(x, dy, stats, affine, act, sums, grad, exec));
  if (dx != nullptr && has_values(x)) {
    PYSBN_RUN(exec, backward_elemt(x, dy, stats, eps, mode, affine, act, sums, dx, exec));
  }
}

}  // namespace pysbn
