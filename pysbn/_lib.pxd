# SPDX-License-Identifier: MIT
# cython: language_level=3
# Declarations of the native core's public header <pysbn/core.hpp>; nothing else.
#
# The cpu:: and cuda:: ops share their names in C++, so each is declared here with a
# prefixed Cython name and its fully qualified C++ name. Every op may throw
# std::invalid_argument (-> ValueError) or std::runtime_error (-> RuntimeError): `except +`.

from libc.stdint cimport int32_t, int64_t
from libcpp cimport bool


cdef extern from "pysbn/core.hpp" namespace "pysbn" nogil:

    enum class DType(int32_t):
        Float32
        Float64
        Float16
        BFloat16

    enum class Layout(int32_t):
        ChannelMajor
        ChannelsLast

    enum class EpsMode(int32_t):
        Plus
        Clamp

    struct Geometry:
        int64_t n
        int64_t c
        int64_t l
        Layout layout

    DType acc_dtype(DType d)
    int64_t dtype_size(DType d)

    const char* version()
    bool built_with_cuda()
    bool built_with_openmp()
    const char* cuda_architectures()

    # ---- cpu:: (host memory, OpenMP with num_threads threads) --------------------------------
    void cpu_sum_ft "pysbn::cpu::sum_ft"(
        const void* x, DType dtype, Geometry g, double* out, int num_threads) except +
    void cpu_moments "pysbn::cpu::moments"(
        const void* x, DType dtype, Geometry g, double* stats, int num_threads) except +
    void cpu_merge_moments "pysbn::cpu::merge_moments"(
        int64_t k, int64_t c, const double* records, double* out) except +
    void cpu_finalize "pysbn::cpu::finalize"(
        int64_t c, const double* stats, double eps, EpsMode mode, double* mean,
        double* invstd, void* running_mean, void* running_var, DType param_dtype,
        double factor) except +
    void cpu_normalize "pysbn::cpu::normalize"(
        const void* x, DType dtype, Geometry g, const double* mean, const double* invstd,
        const void* weight, const void* bias, DType param_dtype, void* y,
        int num_threads) except +
    void cpu_backward_reduce "pysbn::cpu::backward_reduce"(
        const void* dy, const void* x, DType dtype, Geometry g, const double* mean,
        const double* invstd, double* sums, void* grad_weight, void* grad_bias,
        DType param_dtype, int num_threads) except +
    void cpu_backward_elemt "pysbn::cpu::backward_elemt"(
        const void* dy, const void* x, DType dtype, Geometry g, const double* mean,
        const double* invstd, const void* weight, DType param_dtype, const double* sums,
        const double* count, void* dx, int num_threads) except +
    void cpu_fused_forward "pysbn::cpu::fused_forward"(
        const void* x, DType dtype, Geometry g, const void* weight, const void* bias,
        DType param_dtype, double eps, EpsMode mode, double* stats, double* mean,
        double* invstd, void* running_mean, void* running_var, DType running_dtype,
        double factor, int64_t* num_batches_tracked, void* y, int num_threads) except +
    void cpu_fused_backward "pysbn::cpu::fused_backward"(
        const void* dy, const void* x, DType dtype, Geometry g, const double* mean,
        const double* invstd, const void* weight, DType param_dtype, const double* count,
        double* sums, void* grad_weight, void* grad_bias, void* dx, int num_threads) except +

    # ---- cuda:: (device memory, enqueued on a cudaStream_t passed as void*) ------------------
    void cuda_sum_ft "pysbn::cuda::sum_ft"(
        const void* x, DType dtype, Geometry g, double* out, void* stream) except +
    void cuda_moments "pysbn::cuda::moments"(
        const void* x, DType dtype, Geometry g, double* stats, void* stream) except +
    void cuda_merge_moments "pysbn::cuda::merge_moments"(
        int64_t k, int64_t c, const double* records, double* out, void* stream) except +
    void cuda_finalize "pysbn::cuda::finalize"(
        int64_t c, const double* stats, double eps, EpsMode mode, double* mean,
        double* invstd, void* running_mean, void* running_var, DType param_dtype,
        double factor, void* stream) except +
    void cuda_normalize "pysbn::cuda::normalize"(
        const void* x, DType dtype, Geometry g, const double* mean, const double* invstd,
        const void* weight, const void* bias, DType param_dtype, void* y,
        void* stream) except +
    void cuda_backward_reduce "pysbn::cuda::backward_reduce"(
        const void* dy, const void* x, DType dtype, Geometry g, const double* mean,
        const double* invstd, double* sums, void* grad_weight, void* grad_bias,
        DType param_dtype, void* stream) except +
    void cuda_backward_elemt "pysbn::cuda::backward_elemt"(
        const void* dy, const void* x, DType dtype, Geometry g, const double* mean,
        const double* invstd, const void* weight, DType param_dtype, const double* sums,
        const double* count, void* dx, void* stream) except +
    void cuda_fused_forward "pysbn::cuda::fused_forward"(
        const void* x, DType dtype, Geometry g, const void* weight, const void* bias,
        DType param_dtype, double eps, EpsMode mode, double* stats, double* mean,
        double* invstd, void* running_mean, void* running_var, DType running_dtype,
        double factor, int64_t* num_batches_tracked, void* y, void* stream) except +
    void cuda_fused_backward "pysbn::cuda::fused_backward"(
        const void* dy, const void* x, DType dtype, Geometry g, const double* mean,
        const double* invstd, const void* weight, DType param_dtype, const double* count,
        double* sums, void* grad_weight, void* grad_bias, void* dx, void* stream) except +
