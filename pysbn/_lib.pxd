# SPDX-License-Identifier: MIT
# cython: language_level=3
# Declarations of the native core's public header <pysbn/core.hpp>; nothing else.
#
# Every op may throw std::invalid_argument (-> ValueError) or std::runtime_error
# (-> RuntimeError): `except +`.

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

    enum class Device(int32_t):
        CPU
        CUDA

    enum class Activation(int32_t):
        Identity
        ReLU
        LeakyReLU
        SiLU
        GELU
        GELUTanh
        Hardswish

    struct Geometry:
        int64_t n
        int64_t c
        int64_t l
        Layout layout

    struct TensorView:
        const void* data
        DType dtype
        Geometry geometry

    struct Exec:
        Device device
        int num_threads
        void* stream

    struct Affine:
        const void* weight
        const void* bias
        DType dtype

    struct AffineGrad:
        void* weight
        void* bias
        DType dtype

    struct Act:
        Activation kind
        double negative_slope

    struct RunningStats:
        void* mean
        void* var
        DType dtype
        double momentum
        bool cumulative
        int64_t* num_batches_tracked

    int64_t record_size(int64_t c)
    int64_t stats_size(int64_t c)
    int64_t sums_size(int64_t c)
    DType acc_dtype(DType d)
    int64_t dtype_size(DType d)

    const char* version()
    bool built_with_cuda()
    bool built_with_openmp()
    const char* cuda_architectures()

    void sum_ft(const TensorView& x, double* out, const Exec& exec) except +
    void moments(const TensorView& x, double* record, const Exec& exec) except +
    void merge_moments(int64_t k, int64_t c, const double* records, double* record,
                       const Exec& exec) except +
    void finalize(int64_t c, const double* record, double eps, EpsMode mode, double* stats,
                  const RunningStats& running, const Exec& exec) except +
    void normalize(const TensorView& x, const double* stats, const Affine& affine, const Act& act,
                   void* y, const Exec& exec) except +
    void batch_norm_forward(const TensorView& x, const double* record, double eps, EpsMode mode,
                            const Affine& affine, const Act& act, double* stats, void* y,
                            const RunningStats& running, const Exec& exec) except +
    void backward_reduce(const TensorView& x, const void* dy, const double* stats,
                         const Affine& affine, const Act& act, double* sums,
                         const AffineGrad& grad, const Exec& exec) except +
    void backward_elemt(const TensorView& x, const void* dy, const double* stats, double eps,
                        EpsMode mode, const Affine& affine, const Act& act, const double* sums,
                        void* dx, const Exec& exec) except +
    void batch_norm_backward(const TensorView& x, const void* dy, const double* stats,
                             double eps, EpsMode mode, const Affine& affine, const Act& act,
                             double* sums, const AffineGrad& grad, void* dx,
                             const Exec& exec) except +
