# SPDX-License-Identifier: MIT
# cython: language_level=3, embedsignature=True
"""Thin bindings of the pysbn native core (``<pysbn/core.hpp>``).

One wrapper per op. The header's small structs travel as tuples of plain ints and floats
(pointers are ``tensor.data_ptr()`` values, 0 for an absent optional array):

- view ``(data, dtype, n, c, l, layout)``: an input tensor (``TensorView``);
- exec ``(device, num_threads, stream)``: ``DEVICE_CPU`` with OpenMP threads, or
  ``DEVICE_CUDA`` with a ``cudaStream_t`` as an int (0: the legacy default stream);
- affine / grad ``(weight, bias, dtype)``: parameters or their gradients, with the param dtype;
- act ``(kind, negative_slope)``: the activation after the affine map (``ACT_*``);
- running ``(mean, var, dtype, momentum, cumulative, num_batches_tracked)``.

These wrappers check nothing beyond the conversion of their arguments (the torch ops of
:mod:`pysbn.ops` check tensors first); the core validates every argument and throws
``std::invalid_argument`` (raised here as ``ValueError``) or ``std::runtime_error`` (raised as
``RuntimeError``, e.g. a CUDA exec in a build without CUDA). Each wrapper converts its
arguments, then releases the GIL for the whole native call. Memory is never allocated here:
all outputs are caller-owned and must stay alive for the call (CPU) or until the stream has
run the work (CUDA). Only :mod:`pysbn.ops` imports this module.
"""

from libc.stdint cimport int32_t, int64_t, uintptr_t

cimport _lib
from _lib cimport (Act, Activation, Affine, AffineGrad, Device, DType, EpsMode, Exec, Layout,
                   RunningStats, TensorView)

# ---- enum values (from the header, not retyped) -------------------------------------------------
DTYPE_FLOAT32 = <int32_t>DType.Float32
DTYPE_FLOAT64 = <int32_t>DType.Float64
DTYPE_FLOAT16 = <int32_t>DType.Float16
DTYPE_BFLOAT16 = <int32_t>DType.BFloat16
LAYOUT_CHANNEL_MAJOR = <int32_t>Layout.ChannelMajor
LAYOUT_CHANNELS_LAST = <int32_t>Layout.ChannelsLast
EPS_PLUS = <int32_t>EpsMode.Plus
EPS_CLAMP = <int32_t>EpsMode.Clamp
DEVICE_CPU = <int32_t>Device.CPU
DEVICE_CUDA = <int32_t>Device.CUDA
ACT_IDENTITY = <int32_t>Activation.Identity
ACT_RELU = <int32_t>Activation.ReLU
ACT_LEAKY_RELU = <int32_t>Activation.LeakyReLU
ACT_SILU = <int32_t>Activation.SiLU
ACT_GELU = <int32_t>Activation.GELU
ACT_GELU_TANH = <int32_t>Activation.GELUTanh
ACT_HARDSWISH = <int32_t>Activation.Hardswish


# ---- tuple -> struct ----------------------------------------------------------------------------

cdef TensorView _view(tuple v) except *:
    cdef TensorView t
    data, dtype, n, c, l, layout = v
    t.data = <const void*><uintptr_t>data
    t.dtype = <DType><int32_t>dtype
    t.geometry.n = n
    t.geometry.c = c
    t.geometry.l = l
    t.geometry.layout = <Layout><int32_t>layout
    return t


cdef Exec _exec(tuple v) except *:
    cdef Exec e
    device, num_threads, stream = v
    e.device = <Device><int32_t>device
    e.num_threads = num_threads
    e.stream = <void*><uintptr_t>stream
    return e


cdef Affine _affine(tuple v) except *:
    cdef Affine a
    weight, bias, dtype = v
    a.weight = <const void*><uintptr_t>weight
    a.bias = <const void*><uintptr_t>bias
    a.dtype = <DType><int32_t>dtype
    return a


cdef AffineGrad _grad(tuple v) except *:
    cdef AffineGrad g
    weight, bias, dtype = v
    g.weight = <void*><uintptr_t>weight
    g.bias = <void*><uintptr_t>bias
    g.dtype = <DType><int32_t>dtype
    return g


cdef Act _act(tuple v) except *:
    cdef Act a
    kind, negative_slope = v
    a.kind = <Activation><int32_t>kind
    a.negative_slope = negative_slope
    return a


cdef RunningStats _running(tuple v) except *:
    cdef RunningStats r
    mean, var, dtype, momentum, cumulative, tracked = v
    r.mean = <void*><uintptr_t>mean
    r.var = <void*><uintptr_t>var
    r.dtype = <DType><int32_t>dtype
    r.momentum = momentum
    r.cumulative = cumulative
    r.num_batches_tracked = <int64_t*><uintptr_t>tracked
    return r


# ---- build information and sizes ----------------------------------------------------------------

cpdef str version():
    """Version string of the native core ("major.minor.patch")."""
    return _lib.version().decode("utf-8")


cpdef bint built_with_cuda():
    """True when the core was compiled with CUDA kernels (``DEVICE_CUDA`` works)."""
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


cpdef int64_t record_size(int64_t c):
    """Doubles in a moments record ``[count, mean[C], m2[C]]``."""
    return _lib.record_size(c)


cpdef int64_t stats_size(int64_t c):
    """Doubles in the batch statistics ``[count, mean[C], m2[C], invstd[C]]``."""
    return _lib.stats_size(c)


cpdef int64_t sums_size(int64_t c):
    """Doubles in a grad-sums record ``[sum_dy[C], sum_dy_xmu[C]]``."""
    return _lib.sums_size(c)


# ---- the ops ------------------------------------------------------------------------------------

cpdef void sum_ft(tuple x, uintptr_t out, tuple exec) except *:
    """Per-channel sum of x into ``out`` (C float64 values)."""
    cdef TensorView xv = _view(x)
    cdef Exec e = _exec(exec)
    with nogil:
        _lib.sum_ft(xv, <double*>out, e)


cpdef void moments(tuple x, uintptr_t record, tuple exec) except *:
    """Moments record of x into ``record`` (2C+1 float64 values)."""
    cdef TensorView xv = _view(x)
    cdef Exec e = _exec(exec)
    with nogil:
        _lib.moments(xv, <double*>record, e)


cpdef void merge_moments(int64_t k, int64_t c, uintptr_t records, uintptr_t record,
                         tuple exec) except *:
    """Chan merge of ``k`` records (k*(2C+1) float64 values back to back) into ``record``."""
    cdef Exec e = _exec(exec)
    with nogil:
        _lib.merge_moments(k, c, <const double*>records, <double*>record, e)


cpdef void finalize(int64_t c, uintptr_t record, double eps, int mode, uintptr_t stats,
                    tuple running, tuple exec) except *:
    """Batch statistics (3C+1 float64 values) of a record into ``stats``; running update."""
    cdef RunningStats r = _running(running)
    cdef Exec e = _exec(exec)
    with nogil:
        _lib.finalize(c, <const double*>record, eps, <EpsMode><int32_t>mode, <double*>stats, r, e)


cpdef void normalize(tuple x, uintptr_t stats, tuple affine, tuple act, uintptr_t y,
                     tuple exec) except *:
    """``y = act((x - mean) * invstd * weight + bias)`` with the batch statistics ``stats``."""
    cdef TensorView xv = _view(x)
    cdef Affine a = _affine(affine)
    cdef Act f = _act(act)
    cdef Exec e = _exec(exec)
    with nogil:
        _lib.normalize(xv, <const double*>stats, a, f, <void*>y, e)


cpdef void batch_norm_forward(tuple x, uintptr_t record, double eps, int mode, tuple affine,
                              tuple act, uintptr_t stats, uintptr_t y, tuple running,
                              tuple exec) except *:
    """Training forward: stats (from ``record``, or x's own moments when 0), y, running update."""
    cdef TensorView xv = _view(x)
    cdef Affine a = _affine(affine)
    cdef Act f = _act(act)
    cdef RunningStats r = _running(running)
    cdef Exec e = _exec(exec)
    with nogil:
        _lib.batch_norm_forward(xv, <const double*>record, eps, <EpsMode><int32_t>mode, a, f,
                                <double*>stats, <void*>y, r, e)


cpdef void backward_reduce(tuple x, uintptr_t dy, uintptr_t stats, tuple affine, tuple act,
                           uintptr_t sums, tuple grad, tuple exec) except *:
    """Local grad-sums record (2C float64 values) into ``sums``; parameter gradients."""
    cdef TensorView xv = _view(x)
    cdef Affine a = _affine(affine)
    cdef Act f = _act(act)
    cdef AffineGrad g = _grad(grad)
    cdef Exec e = _exec(exec)
    with nogil:
        _lib.backward_reduce(xv, <const void*>dy, <const double*>stats, a, f, <double*>sums, g, e)


cpdef void backward_elemt(tuple x, uintptr_t dy, uintptr_t stats, double eps, int mode,
                          tuple affine, tuple act, uintptr_t sums, uintptr_t dx,
                          tuple exec) except *:
    """``dx`` from the global grad-sums record ``sums`` and the count of ``stats``."""
    cdef TensorView xv = _view(x)
    cdef Affine a = _affine(affine)
    cdef Act f = _act(act)
    cdef Exec e = _exec(exec)
    with nogil:
        _lib.backward_elemt(xv, <const void*>dy, <const double*>stats, eps,
                            <EpsMode><int32_t>mode, a, f, <const double*>sums, <void*>dx, e)


cpdef void batch_norm_backward(tuple x, uintptr_t dy, uintptr_t stats, double eps, int mode,
                               tuple affine, tuple act, uintptr_t sums, tuple grad,
                               uintptr_t dx, tuple exec) except *:
    """backward_reduce into ``sums`` then, when ``dx`` is not 0, backward_elemt with them."""
    cdef TensorView xv = _view(x)
    cdef Affine a = _affine(affine)
    cdef Act f = _act(act)
    cdef AffineGrad g = _grad(grad)
    cdef Exec e = _exec(exec)
    with nogil:
        _lib.batch_norm_backward(xv, <const void*>dy, <const double*>stats, eps,
                                 <EpsMode><int32_t>mode, a, f, <double*>sums, g, <void*>dx, e)
