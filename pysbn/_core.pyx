# SPDX-License-Identifier: MIT
# cython: language_level=3, embedsignature=True
"""Thin bindings of the pysbn native core (``<pysbn/core.hpp>``).

Every op exists twice, ``cpu_<op>`` (host memory, ``num_threads`` OpenMP threads) and
``cuda_<op>`` (device memory, enqueued asynchronously on ``stream``, a ``cudaStream_t`` given as
an int; 0 is the legacy default stream). Arguments are plain ints: data pointers
(``tensor.data_ptr()``), element types (``DTYPE_*``), layouts (``LAYOUT_*``), eps modes
(``EPS_*``); a geometry is a 4-sequence ``(n, c, l, layout)``. Pointers to optional arrays
(weight, bias, running stats, grad_weight, grad_bias) are 0 when absent.

These wrappers check nothing beyond the conversion of their arguments (the tensor layer,
``pysbn.functional``, checks tensors first); the core validates its arguments and throws
``std::invalid_argument`` (raised here as ``ValueError``) or ``std::runtime_error`` (raised
as ``RuntimeError``, e.g. a ``cuda_*`` op in a build without CUDA). Each wrapper converts its
arguments, then releases the GIL for the whole native call. Memory is never allocated here:
all outputs are caller-owned and must stay alive for the call (CPU) or until the stream has
run the work (CUDA).
"""

from libc.stdint cimport int32_t, int64_t, uintptr_t

cimport _lib
from _lib cimport DType, EpsMode, Geometry, Layout

__all__ = [
    "DTYPE_FLOAT32", "DTYPE_FLOAT64", "DTYPE_FLOAT16", "DTYPE_BFLOAT16",
    "LAYOUT_CHANNEL_MAJOR", "LAYOUT_CHANNELS_LAST", "EPS_PLUS", "EPS_CLAMP",
    "version", "built_with_cuda", "built_with_openmp", "cuda_architectures",
    "acc_dtype", "dtype_size",
    "cpu_sum_ft", "cpu_moments", "cpu_merge_moments", "cpu_finalize", "cpu_normalize",
    "cpu_backward_reduce", "cpu_backward_elemt", "cpu_fused_forward", "cpu_fused_backward",
    "cuda_sum_ft", "cuda_moments", "cuda_merge_moments", "cuda_finalize", "cuda_normalize",
    "cuda_backward_reduce", "cuda_backward_elemt", "cuda_fused_forward", "cuda_fused_backward",
]

# ---- enum values (from the header, not retyped) -------------------------------------------------
DTYPE_FLOAT32 = <int32_t>DType.Float32
DTYPE_FLOAT64 = <int32_t>DType.Float64
DTYPE_FLOAT16 = <int32_t>DType.Float16
DTYPE_BFLOAT16 = <int32_t>DType.BFloat16
LAYOUT_CHANNEL_MAJOR = <int32_t>Layout.ChannelMajor
LAYOUT_CHANNELS_LAST = <int32_t>Layout.ChannelsLast
EPS_PLUS = <int32_t>EpsMode.Plus
EPS_CLAMP = <int32_t>EpsMode.Clamp


cdef Geometry _geometry(object geometry) except *:
    """(n, c, l, layout) -> Geometry; the core checks the values."""
    cdef Geometry g
    n, c, l, layout = geometry
    g.n = n
    g.c = c
    g.l = l
    g.layout = <Layout><int32_t>layout
    return g


# ---- build information --------------------------------------------------------------------------

cpdef str version():
    """Version string of the native core ("major.minor.patch")."""
    return _lib.version().decode("utf-8")


cpdef bint built_with_cuda():
    """True when the core was compiled with CUDA kernels (the ``cuda_*`` ops work)."""
    return _lib.built_with_cuda()


cpdef bint built_with_openmp():
    """True when the CPU kernels were compiled with OpenMP (``num_threads`` > 1 is used)."""
    return _lib.built_with_openmp()


cpdef str cuda_architectures():
    """Semicolon-separated CUDA architectures compiled in; "" in a build without CUDA."""
    return _lib.cuda_architectures().decode("utf-8")


cpdef int acc_dtype(int dtype):
    """Accumulation dtype of an element dtype: DTYPE_FLOAT64 for float64, else DTYPE_FLOAT32."""
    return <int32_t>_lib.acc_dtype(<DType><int32_t>dtype)


cpdef int64_t dtype_size(int dtype):
    """Size in bytes of one element of ``dtype``."""
    return _lib.dtype_size(<DType><int32_t>dtype)


# ---- cpu:: ops ----------------------------------------------------------------------------------

cpdef void cpu_sum_ft(uintptr_t x, int dtype, object geometry, uintptr_t out,
                      int num_threads) except *:
    """Per-channel sum of x: ``out[c]`` (C float64 values) = sum over (n, l) of x."""
    cdef Geometry g = _geometry(geometry)
    with nogil:
        _lib.cpu_sum_ft(<const void*>x, <DType>dtype, g, <double*>out, num_threads)


cpdef void cpu_moments(uintptr_t x, int dtype, object geometry, uintptr_t stats,
                       int num_threads) except *:
    """Moments record of x into ``stats`` (2C+1 float64 values): [count = N*L, mean[C], m2[C]]."""
    cdef Geometry g = _geometry(geometry)
    with nogil:
        _lib.cpu_moments(<const void*>x, <DType>dtype, g, <double*>stats, num_threads)


cpdef void cpu_merge_moments(int64_t k, int64_t c, uintptr_t records,
                             uintptr_t out) except *:
    """Chan merge of ``k`` moments records (k*(2C+1) float64 values back to back) into ``out``."""
    with nogil:
        _lib.cpu_merge_moments(k, c, <const double*>records, <double*>out)


cpdef void cpu_finalize(int64_t c, uintptr_t stats, double eps, int eps_mode,
                        uintptr_t mean, uintptr_t invstd, uintptr_t running_mean,
                        uintptr_t running_var, int param_dtype, double factor) except *:
    """From a moments record, write mean[C] and invstd[C] (float64) and, when the running-stat
    pointers are not 0, update them in place (param dtype) with ``factor`` and unbiased var."""
    with nogil:
        _lib.cpu_finalize(c, <const double*>stats, eps, <EpsMode>eps_mode,
                          <double*>mean, <double*>invstd, <void*>running_mean, <void*>running_var,
                          <DType>param_dtype, factor)


cpdef void cpu_normalize(uintptr_t x, int dtype, object geometry, uintptr_t mean,
                         uintptr_t invstd, uintptr_t weight, uintptr_t bias, int param_dtype,
                         uintptr_t y, int num_threads) except *:
    """``y = (x - mean[c]) * invstd[c] * weight[c] + bias[c]``; weight/bias 0 mean 1 and 0."""
    cdef Geometry g = _geometry(geometry)
    with nogil:
        _lib.cpu_normalize(<const void*>x, <DType>dtype, g, <const double*>mean,
                           <const double*>invstd, <const void*>weight, <const void*>bias,
                           <DType>param_dtype, <void*>y, num_threads)


cpdef void cpu_backward_reduce(uintptr_t dy, uintptr_t x, int dtype, object geometry,
                               uintptr_t mean, uintptr_t invstd, uintptr_t sums,
                               uintptr_t grad_weight, uintptr_t grad_bias, int param_dtype,
                               int num_threads) except *:
    """Grad-sums record [sum_dy[C], sum_dy_xmu[C]] into ``sums``; grad_weight/grad_bias when
    their pointers are not 0."""
    cdef Geometry g = _geometry(geometry)
    with nogil:
        _lib.cpu_backward_reduce(<const void*>dy, <const void*>x, <DType>dtype, g,
                                 <const double*>mean, <const double*>invstd, <double*>sums,
                                 <void*>grad_weight, <void*>grad_bias, <DType>param_dtype,
                                 num_threads)


cpdef void cpu_backward_elemt(uintptr_t dy, uintptr_t x, int dtype, object geometry,
                              uintptr_t mean, uintptr_t invstd, uintptr_t weight,
                              int param_dtype, uintptr_t sums, uintptr_t count, uintptr_t dx,
                              int num_threads) except *:
    """``dx`` from the global grad-sums record ``sums`` and global ``count`` (one float64 value)."""
    cdef Geometry g = _geometry(geometry)
    with nogil:
        _lib.cpu_backward_elemt(<const void*>dy, <const void*>x, <DType>dtype, g,
                                <const double*>mean, <const double*>invstd, <const void*>weight,
                                <DType>param_dtype, <const double*>sums, <const double*>count,
                                <void*>dx, num_threads)


cpdef void cpu_fused_forward(uintptr_t x, int dtype, object geometry, uintptr_t weight,
                             uintptr_t bias, int param_dtype, double eps, int eps_mode,
                             uintptr_t stats, uintptr_t mean, uintptr_t invstd,
                             uintptr_t running_mean, uintptr_t running_var, int running_dtype,
                             double factor, uintptr_t num_batches_tracked, uintptr_t y,
                             int num_threads) except *:
    """moments + finalize + normalize in one call (a member with nothing to synchronise); the
    running stats (dtype ``running_dtype``) and ``num_batches_tracked`` (int64) are updated
    last, when their pointers are not 0."""
    cdef Geometry g = _geometry(geometry)
    with nogil:
        _lib.cpu_fused_forward(<const void*>x, <DType>dtype, g, <const void*>weight,
                               <const void*>bias, <DType>param_dtype, eps, <EpsMode>eps_mode,
                               <double*>stats, <double*>mean, <double*>invstd,
                               <void*>running_mean, <void*>running_var, <DType>running_dtype,
                               factor, <int64_t*>num_batches_tracked, <void*>y, num_threads)


cpdef void cpu_fused_backward(uintptr_t dy, uintptr_t x, int dtype, object geometry,
                              uintptr_t mean, uintptr_t invstd, uintptr_t weight,
                              int param_dtype, uintptr_t count, uintptr_t sums,
                              uintptr_t grad_weight, uintptr_t grad_bias, uintptr_t dx,
                              int num_threads) except *:
    """backward_reduce into ``sums`` then, when ``dx`` is not 0, backward_elemt with those
    local sums and ``count`` (one float64 value)."""
    cdef Geometry g = _geometry(geometry)
    with nogil:
        _lib.cpu_fused_backward(<const void*>dy, <const void*>x, <DType>dtype, g,
                                <const double*>mean, <const double*>invstd, <const void*>weight,
                                <DType>param_dtype, <const double*>count, <double*>sums,
                                <void*>grad_weight, <void*>grad_bias, <void*>dx, num_threads)


# ---- cuda:: ops (same contracts; asynchronous on ``stream``) ------------------------------------

cpdef void cuda_sum_ft(uintptr_t x, int dtype, object geometry, uintptr_t out,
                       uintptr_t stream) except *:
    """CUDA :func:`cpu_sum_ft`, enqueued on ``stream``."""
    cdef Geometry g = _geometry(geometry)
    with nogil:
        _lib.cuda_sum_ft(<const void*>x, <DType>dtype, g, <double*>out, <void*>stream)


cpdef void cuda_moments(uintptr_t x, int dtype, object geometry, uintptr_t stats,
                        uintptr_t stream) except *:
    """CUDA :func:`cpu_moments`, enqueued on ``stream``."""
    cdef Geometry g = _geometry(geometry)
    with nogil:
        _lib.cuda_moments(<const void*>x, <DType>dtype, g, <double*>stats, <void*>stream)


cpdef void cuda_merge_moments(int64_t k, int64_t c, uintptr_t records, uintptr_t out,
                              uintptr_t stream) except *:
    """CUDA :func:`cpu_merge_moments`, enqueued on ``stream``."""
    with nogil:
        _lib.cuda_merge_moments(k, c, <const double*>records, <double*>out,
                                <void*>stream)


cpdef void cuda_finalize(int64_t c, uintptr_t stats, double eps, int eps_mode,
                         uintptr_t mean, uintptr_t invstd, uintptr_t running_mean,
                         uintptr_t running_var, int param_dtype, double factor,
                         uintptr_t stream) except *:
    """CUDA :func:`cpu_finalize`, enqueued on ``stream``."""
    with nogil:
        _lib.cuda_finalize(c, <const double*>stats, eps, <EpsMode>eps_mode,
                           <double*>mean, <double*>invstd, <void*>running_mean, <void*>running_var,
                           <DType>param_dtype, factor, <void*>stream)


cpdef void cuda_normalize(uintptr_t x, int dtype, object geometry, uintptr_t mean,
                          uintptr_t invstd, uintptr_t weight, uintptr_t bias, int param_dtype,
                          uintptr_t y, uintptr_t stream) except *:
    """CUDA :func:`cpu_normalize`, enqueued on ``stream``."""
    cdef Geometry g = _geometry(geometry)
    with nogil:
        _lib.cuda_normalize(<const void*>x, <DType>dtype, g, <const double*>mean,
                            <const double*>invstd, <const void*>weight, <const void*>bias,
                            <DType>param_dtype, <void*>y, <void*>stream)


cpdef void cuda_backward_reduce(uintptr_t dy, uintptr_t x, int dtype, object geometry,
                                uintptr_t mean, uintptr_t invstd, uintptr_t sums,
                                uintptr_t grad_weight, uintptr_t grad_bias, int param_dtype,
                                uintptr_t stream) except *:
    """CUDA :func:`cpu_backward_reduce`, enqueued on ``stream``."""
    cdef Geometry g = _geometry(geometry)
    with nogil:
        _lib.cuda_backward_reduce(<const void*>dy, <const void*>x, <DType>dtype, g,
                                  <const double*>mean, <const double*>invstd, <double*>sums,
                                  <void*>grad_weight, <void*>grad_bias, <DType>param_dtype,
                                  <void*>stream)


cpdef void cuda_backward_elemt(uintptr_t dy, uintptr_t x, int dtype, object geometry,
                               uintptr_t mean, uintptr_t invstd, uintptr_t weight,
                               int param_dtype, uintptr_t sums, uintptr_t count, uintptr_t dx,
                               uintptr_t stream) except *:
    """CUDA :func:`cpu_backward_elemt`, enqueued on ``stream``."""
    cdef Geometry g = _geometry(geometry)
    with nogil:
        _lib.cuda_backward_elemt(<const void*>dy, <const void*>x, <DType>dtype, g,
                                 <const double*>mean, <const double*>invstd, <const void*>weight,
                                 <DType>param_dtype, <const double*>sums, <const double*>count,
                                 <void*>dx, <void*>stream)


cpdef void cuda_fused_forward(uintptr_t x, int dtype, object geometry, uintptr_t weight,
                              uintptr_t bias, int param_dtype, double eps, int eps_mode,
                              uintptr_t stats, uintptr_t mean, uintptr_t invstd,
                              uintptr_t running_mean, uintptr_t running_var, int running_dtype,
                              double factor, uintptr_t num_batches_tracked, uintptr_t y,
                              uintptr_t stream) except *:
    """CUDA :func:`cpu_fused_forward`, enqueued on ``stream``."""
    cdef Geometry g = _geometry(geometry)
    with nogil:
        _lib.cuda_fused_forward(<const void*>x, <DType>dtype, g, <const void*>weight,
                                <const void*>bias, <DType>param_dtype, eps, <EpsMode>eps_mode,
                                <double*>stats, <double*>mean, <double*>invstd,
                                <void*>running_mean, <void*>running_var, <DType>running_dtype,
                                factor, <int64_t*>num_batches_tracked, <void*>y, <void*>stream)


cpdef void cuda_fused_backward(uintptr_t dy, uintptr_t x, int dtype, object geometry,
                               uintptr_t mean, uintptr_t invstd, uintptr_t weight,
                               int param_dtype, uintptr_t count, uintptr_t sums,
                               uintptr_t grad_weight, uintptr_t grad_bias, uintptr_t dx,
                               uintptr_t stream) except *:
    """CUDA :func:`cpu_fused_backward`, enqueued on ``stream``."""
    cdef Geometry g = _geometry(geometry)
    with nogil:
        _lib.cuda_fused_backward(<const void*>dy, <const void*>x, <DType>dtype, g,
                                 <const double*>mean, <const double*>invstd,
                                 <const void*>weight, <DType>param_dtype, <const double*>count,
                                 <double*>sums, <void*>grad_weight, <void*>grad_bias,
                                 <void*>dx, <void*>stream)
