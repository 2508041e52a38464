# SPDX-License-Identifier: MIT
"""The native core as torch operators: the op set of pysbn, registered with torch's dispatcher.

Every op is declared once here, in namespace ``pysbn`` (``torch.ops.pysbn.<name>``), with

- its schema, mutated arguments declared (``Tensor(a!)``: running statistics, the counter);
- one implementation for CPU and CUDA that checks the tensors, allocates the outputs with torch
  (its caching allocator owns every byte) and calls the core (:mod:`pysbn._core`, imported by
  this module only) with raw pointers: CPU tensors with ``torch.get_num_threads()`` OpenMP
  threads, CUDA tensors asynchronously on the current stream of their device (no host
  synchronisation);
- a fake implementation (shapes, dtypes and strides only; the same checks), so that
  ``torch.compile``, ``torch.export`` and FakeTensor tracing see the op without running it;
- an autograd formula where the op on its own is differentiable (``sum_ft``, ``moments``,
  ``merge_moments``, ``normalize``). The training ops (``batch_norm_forward`` and the backward
  ops) are the two halves of the layer's autograd Function (:mod:`pysbn._functions`), which adds
  the synchronisation between them.

Tensors and records
-------------------
The input ``x`` has shape ``(N, C, *spatial)``, 0 to 3 spatial dims, viewed as ``(N, C, L)``.
Dense contiguous input and dense channels_last / channels_last_3d input are read in place;
anything else is copied to contiguous first (:func:`dense`), and outputs take the layout read
(as ``nn.BatchNorm``: channels_last in, channels_last out; a 3-D channel-innermost view gives a
contiguous output). Per-channel statistics are float64 for every input dtype:

- moments record ``(2C+1,)``: ``[count, mean[C], m2[C]]`` (the forward sync payload);
- batch statistics ``(3C+1,)``: ``[count, mean[C], m2[C], invstd[C]]`` (a record and its invstd;
  what the backward reads);
- grad-sums record ``(2C,)``: ``[sum_dy[C], sum_dy_xmu[C]]`` (the backward sync payload).

Parameters (weight, bias, their gradients) have the input dtype, or float32 for float16/bfloat16
input; running statistics may have any float dtype. ``eps_mode`` is 0 (``"plus"``,
``1/sqrt(var + eps)``, as nn.BatchNorm) or 1 (``"clamp"``, ``1/sqrt(max(var, eps))``, the
seed's); ``act`` is an :data:`ACTIVATIONS` code, applied after the affine map.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _core

__all__ = [
    "STATS_DTYPE",
    "ACTIVATIONS",
    "EPS_MODES",
    "dense",
    "param_dtype",
    "sum_ft",
    "moments",
    "merge_moments",
    "finalize",
    "normalize",
    "batch_norm_forward",
    "backward_reduce",
    "backward_elemt",
    "batch_norm_backward",
    "built_with_cuda",
    "built_with_openmp",
    "cuda_architectures",
    "core_version",
]

STATS_DTYPE = torch.float64
"""Dtype of every per-channel statistic: records, batch statistics, grad sums."""

EPS_MODES = {"plus": _core.EPS_PLUS, "clamp": _core.EPS_CLAMP}
"""eps mode names and their codes (the ``eps_mode`` argument of the ops)."""

ACTIVATIONS = {
    "identity": _core.ACT_IDENTITY,
    "relu": _core.ACT_RELU,
    "leaky_relu": _core.ACT_LEAKY_RELU,
    "silu": _core.ACT_SILU,
    "gelu": _core.ACT_GELU,
    "gelu_tanh": _core.ACT_GELU_TANH,
    "hardswish": _core.ACT_HARDSWISH,
}
"""Activation names and their codes (the ``act`` argument of the ops)."""

built_with_cuda = _core.built_with_cuda
built_with_openmp = _core.built_with_openmp
cuda_architectures = _core.cuda_architectures
core_version = _core.version

_DT = {
    torch.float32: _core.DTYPE_FLOAT32,
    torch.float64: _core.DTYPE_FLOAT64,
    torch.float16: _core.DTYPE_FLOAT16,
    torch.bfloat16: _core.DTYPE_BFLOAT16,
}
_HALF = (torch.float16, torch.bfloat16)
_SUPPORTED = "float32, float64, float16 or bfloat16"
_CM, _CL = _core.LAYOUT_CHANNEL_MAJOR, _core.LAYOUT_CHANNELS_LAST
_CL_FORMAT = {4: torch.channels_last, 5: torch.channels_last_3d}
_RUNNABLE = ("cpu", "cuda") if _core.built_with_cuda() else ("cpu",)

# ================================================================================================
# checks (on metadata only: they run on real and on fake tensors alike)
# ================================================================================================


def param_dtype(x_dtype: torch.dtype, weight: Optional[Tensor] = None,
                bias: Optional[Tensor] = None) -> torch.dtype:
    """The param dtype of a call: the weight's (or bias's) dtype, else the input dtype (float32
    for float16/bfloat16 input)."""
    if weight is not None:
        return weight.dtype
    if bias is not None:
        return bias.dtype
    return torch.float32 if x_dtype in _HALF else x_dtype


_param_dtype_of = param_dtype  # for functions with an argument of that name


def _param_ok(x_dtype: torch.dtype, p_dtype: torch.dtype) -> bool:
    return p_dtype == x_dtype or (p_dtype == torch.float32 and x_dtype in _HALF)


def _tensor(op: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    return t


def _check_input(op: str, x: object, name: str = "input x") -> Tensor:
    x = _tensor(op, name, x)
    if x.dtype not in _DT:
        raise TypeError(f"{op}: {name} has dtype {x.dtype}; expected {_SUPPORTED}")
    if not 2 <= x.dim() <= 5:
        raise ValueError(f"{op}: {name} must have shape (N, C, *spatial) with 2 to 5 dims, got "
                         f"shape {tuple(x.shape)}")
    _check_device(op, name, x)
    return x


def _check_device(op: str, name: str, t: Tensor) -> None:
    kind = t.device.type
    if kind == "cuda" and "cuda" not in _RUNNABLE:
        raise RuntimeError(f"{op}: {name} is a CUDA tensor but pysbn was built without CUDA; "
                           "rebuild it with a CUDA compiler (PYSBN_WITH_CUDA=ON)")
    if kind not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{op}: {name} is on device {t.device}; pysbn runs on cpu and cuda only")


def _same_device(op: str, name: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but input x is on {x.device}; all "
                         "tensors must be on the same device")


def _vector(op: str, name: str, t: object, size, dtype: Optional[torch.dtype],
            x: Tensor) -> Tensor:
    """A 1-D tensor of ``size`` values (of ``dtype`` when given) on x's device."""
    t = _tensor(op, name, t)
    if t.dim() != 1 or t.shape[0] != size:
        raise ValueError(f"{op}: {name} must have shape ({size},), got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected {dtype}")
    _same_device(op, name, t, x)
    return t


def _check_affine(op: str, x: Tensor, c, weight, bias) -> None:
    first = None
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _vector(op, name, t, c, None, x)
        if not _param_ok(x.dtype, t.dtype):
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but input x has dtype {x.dtype}; "
                            "parameters must have the input dtype, or float32 for "
                            "float16/bfloat16 input")
        if first is not None and t.dtype != first[1].dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {first[0]} has dtype "
                            f"{first[1].dtype}; parameters must share one dtype")
        first = (name, t)


def _check_running(op: str, x: Tensor, c, running_mean, running_var, num_batches_tracked,
                   momentum) -> None:
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must be given together (got "
                         f"running_mean={'None' if running_mean is None else 'a tensor'}, "
                         f"running_var={'None' if running_var is None else 'a tensor'})")
    if running_mean is not None:
        _vector(op, "running_mean", running_mean, c, None, x)
        _vector(op, "running_var", running_var, c, None, x)
        if running_mean.dtype not in _DT:
            raise TypeError(f"{op}: running_mean has dtype {running_mean.dtype}; expected "
                            f"{_SUPPORTED}")
        if running_var.dtype != running_mean.dtype:
            raise TypeError(f"{op}: running_var has dtype {running_var.dtype} but running_mean "
                            f"has dtype {running_mean.dtype}; they must match")
    if num_batches_tracked is not None:
        t = _tensor(op, "num_batches_tracked", num_batches_tracked)
        if t.dtype != torch.int64 or t.numel() != 1:
            raise TypeError(f"{op}: num_batches_tracked must be one int64 value, got dtype "
                            f"{t.dtype} and shape {tuple(t.shape)}")
        _same_device(op, "num_batches_tracked", t, x)
    if momentum is None:
        if running_mean is not None and num_batches_tracked is None:
            raise ValueError(f"{op}: momentum None (cumulative average) needs "
                             "num_batches_tracked")
    elif not math.isfinite(momentum):
        raise ValueError(f"{op}: momentum must be finite or None, got {momentum}")


def _check_eps(op: str, eps: float, eps_mode: int) -> None:
    if eps_mode not in (_core.EPS_PLUS, _core.EPS_CLAMP):
        raise ValueError(f"{op}: eps_mode must be {_core.EPS_PLUS} (plus) or {_core.EPS_CLAMP} "
                         f"(clamp), got {eps_mode}")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"{op}: eps must be finite and >= 0, got {eps}")


def _check_act(op: str, act: int, negative_slope: float) -> None:
    if act not in _ACT_CODES:
        raise ValueError(f"{op}: act must be one of {sorted(_ACT_CODES)} (see "
                         f"pysbn.ops.ACTIVATIONS), got {act}")
    if not math.isfinite(negative_slope):
        raise ValueError(f"{op}: negative_slope must be finite, got {negative_slope}")


_ACT_CODES = frozenset(ACTIVATIONS.values())


def _check_grad(op: str, dy: object, x: Tensor) -> Tensor:
    dy = _tensor(op, "grad_output dy", dy)
    if dy.shape != x.shape:
        raise ValueError(f"{op}: grad_output dy has shape {tuple(dy.shape)} but input x has "
                         f"shape {tuple(x.shape)}; they must match")
    if dy.dtype != x.dtype:
        raise TypeError(f"{op}: grad_output dy has dtype {dy.dtype} but input x has dtype "
                        f"{x.dtype}; they must match")
    _same_device(op, "grad_output dy", dy, x)
    return dy


# ================================================================================================
# layout, views, dispatch
# ================================================================================================


def _layout(x: Tensor) -> Optional[int]:
    """The core layout x is dense in (read in place), or None (x must be copied)."""
    if x.is_contiguous():
        return _CM
    fmt = _CL_FORMAT.get(x.dim())
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return _CL
    return None


def dense(x: Tensor) -> Tensor:
    """``x`` itself when the core reads it in place (dense contiguous, or dense channels_last /
    channels_last_3d), else a contiguous copy (one extra pass over the data).

    A 3-D channel-innermost view (e.g. ``(N, L, C).transpose(1, 2)``) is copied too, so that
    its output is contiguous, as ``nn.BatchNorm1d``'s is.
    """
    return x if _layout(x) is not None else x.contiguous()


def _view(x: Tensor) -> Tuple[Tensor, Tuple[int, int, int, int, int, int]]:
    """The dense tensor the core reads (:func:`dense`) and its view (data, dtype, n, c, l,
    layout)."""
    layout = _layout(x)
    if layout is None:
        x, layout = x.contiguous(), _CM
    shape = x.shape
    return x, (x.data_ptr(), _DT[x.dtype], shape[0], shape[1], math.prod(shape[2:]), layout)


def _in_layout(t: Tensor, view) -> Tensor:
    """``t`` (the input's shape) dense in the layout of ``view``, copied only if it is not."""
    if view[5] == _CL:
        return t.contiguous(memory_format=_CL_FORMAT[t.dim()])
    return t.contiguous()


def _call(x: Tensor, fn, *args) -> None:
    """Calls the core op ``fn(*args, exec)`` for x's device: CPU with torch's thread count;
    CUDA on the current stream, with x's device current (the core enqueues on the current
    device)."""
    if x.device.type != "cuda":
        fn(*args, (_core.DEVICE_CPU, torch.get_num_threads(), 0))
        return
    exec_ = (_core.DEVICE_CUDA, 1, torch.cuda.current_stream(x.device).cuda_stream)
    if x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            fn(*args, exec_)
    else:
        fn(*args, exec_)


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _affine(weight: Optional[Tensor], bias: Optional[Tensor], dtype: torch.dtype):
    return (_ptr(weight), _ptr(bias), _DT[dtype])


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


# ================================================================================================
# the op set
# ================================================================================================

_LIB = torch.library.Library("pysbn", "DEF")

_SCHEMAS = {
    "sum_ft": "sum_ft(Tensor x) -> Tensor",
    "moments": "moments(Tensor x) -> Tensor",
    "merge_moments": "merge_moments(Tensor records) -> Tensor",
    "finalize": "finalize(Tensor record, float eps, int eps_mode, Tensor(a!)? running_mean, "
                "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum) "
                "-> Tensor",
    "normalize": "normalize(Tensor x, Tensor stats, Tensor? weight, Tensor? bias, int act=0, "
                 "float negative_slope=0.01) -> Tensor",
    "batch_norm_forward": "batch_norm_forward(Tensor x, Tensor? weight, Tensor? bias, "
                          "Tensor? record, float eps, int eps_mode, int act, float negative_slope, "
                          "Tensor(a!)? running_mean, Tensor(b!)? running_var, "
                          "Tensor(c!)? num_batches_tracked, float? momentum) -> (Tensor, Tensor)",
    "backward_reduce": "backward_reduce(Tensor grad_out, Tensor x, Tensor stats, Tensor? weight, "
                       "Tensor? bias, int act=0, float negative_slope=0.01, "
                       "ScalarType? param_dtype=None) -> (Tensor, Tensor, Tensor)",
    "backward_elemt": "backward_elemt(Tensor grad_out, Tensor x, Tensor stats, Tensor? weight, "
                      "Tensor? bias, Tensor sums, float eps, int eps_mode, int act=0, "
                      "float negative_slope=0.01) -> Tensor",
    "batch_norm_backward": "batch_norm_backward(Tensor grad_out, Tensor x, Tensor stats, "
                           "Tensor? weight, Tensor? bias, float eps, int eps_mode, int act, "
                           "float negative_slope, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
}
for _schema in _SCHEMAS.values():
    _LIB.define(_schema)


class _Op:
    """One op's implementation: ``check(*args)`` raises on bad arguments (it reads metadata
    only), ``alloc(*args)`` makes the outputs (the fake kernel is check + alloc), ``impl(*args)``
    computes them with the core. The registered CPU/CUDA kernel is check + impl; the layers'
    route (:data:`trusted`) calls impl alone."""

    __slots__ = ("check", "alloc", "impl")

    def __init__(self, check, alloc, impl) -> None:
        self.check, self.alloc, self.impl = check, alloc, impl

    def kernel(self, *args):
        self.check(*args)
        return self.impl(*args)

    def fake(self, *args):
        self.check(*args)
        return self.alloc(*args)


_OPS = {}


def _register(name: str, check, alloc, run=None, impl=None) -> None:
    """Registers op ``name``: ``impl``, or ``alloc`` then ``run(out, *args)``."""
    if impl is None:
        def impl(*args):
            out = alloc(*args)
            run(out, *args)
            return out
    op = _OPS[name] = _Op(check, alloc, impl)
    _LIB.impl(name, op.kernel, "CPU")
    _LIB.impl(name, op.kernel, "CUDA")
    torch.library.register_fake(f"pysbn::{name}", op.fake, lib=_LIB)


# ---- sum_ft and moments -------------------------------------------------------------------------

def _run_reduction(name: str):
    def run(out, x):
        xv, view = _view(x)  # xv (a copy, for other strides) must outlive the call
        _call(xv, getattr(_core, name), view, out.data_ptr())
    return run


_register("sum_ft", lambda x: _check_input("sum_ft", x),
          lambda x: x.new_empty(x.shape[1], dtype=STATS_DTYPE), _run_reduction("sum_ft"))
_register("moments", lambda x: _check_input("moments", x),
          lambda x: x.new_empty(2 * x.shape[1] + 1, dtype=STATS_DTYPE),
          _run_reduction("moments"))


# ---- merge_moments ------------------------------------------------------------------------------

def _merge_check(records: Tensor) -> None:
    op = "merge_moments"
    records = _tensor(op, "records", records)
    if records.dtype != STATS_DTYPE:
        raise TypeError(f"{op}: records has dtype {records.dtype}; expected {STATS_DTYPE} "
                        "(moments records are float64)")
    if records.dim() != 2 or records.shape[1] % 2 != 1 or records.shape[0] < 1:
        raise ValueError(f"{op}: records must have shape (k, 2C+1) with k >= 1, got "
                         f"{tuple(records.shape)}")
    _check_device(op, "records", records)


def _merge_run(out: Tensor, records: Tensor) -> None:
    records = records.contiguous()
    k, width = records.shape
    _call(records, _core.merge_moments, k, (width - 1) // 2, records.data_ptr(), out.data_ptr())


_register("merge_moments", _merge_check, lambda records: records.new_empty(records.shape[1]),
          _merge_run)


# ---- finalize -----------------------------------------------------------------------------------

def _check_record(op: str, record: object, name: str = "record") -> Tensor:
    record = _tensor(op, name, record)
    if record.dtype != STATS_DTYPE:
        raise TypeError(f"{op}: {name} has dtype {record.dtype}; expected {STATS_DTYPE} "
                        "(moments records are float64)")
    if record.dim() != 1 or record.shape[0] % 2 != 1:
        raise ValueError(f"{op}: {name} must be one moments record of shape (2C+1,), got "
                         f"{tuple(record.shape)}")
    _check_device(op, name, record)
    return record


def _finalize_check(record, eps, eps_mode, running_mean, running_var, num_batches_tracked,
                    momentum) -> None:
    op = "finalize"
    record = _check_record(op, record)
    _check_eps(op, eps, eps_mode)
    _check_running(op, record, (record.shape[0] - 1) // 2, running_mean, running_var,
                   num_batches_tracked, momentum)


def _running_spec(running_mean, running_var, num_batches_tracked, momentum):
    rdt = _DT[running_mean.dtype] if running_mean is not None else _core.DTYPE_FLOAT64
    return (_ptr(running_mean), _ptr(running_var), rdt,
            0.0 if momentum is None else float(momentum), momentum is None,
            _ptr(num_batches_tracked))


def _with_running(fn, running_mean, running_var, num_batches_tracked, momentum) -> None:
    """Runs ``fn(running_spec)`` on contiguous running stats, writing strided ones back."""
    if running_mean is None or (running_mean.is_contiguous() and running_var.is_contiguous()):
        fn(_running_spec(running_mean, running_var, num_batches_tracked, momentum))
        return
    rm, rv = running_mean.contiguous(), running_var.contiguous()
    fn(_running_spec(rm, rv, num_batches_tracked, momentum))
    running_mean.copy_(rm)
    running_var.copy_(rv)


def _finalize_run(stats, record, eps, eps_mode, running_mean, running_var, num_batches_tracked,
                  momentum) -> None:
    record = record.contiguous()
    c = (record.shape[0] - 1) // 2
    _with_running(lambda running: _call(record, _core.finalize, c, record.data_ptr(), eps,
                                        eps_mode, stats.data_ptr(), running),
                  running_mean, running_var, num_batches_tracked, momentum)


_register("finalize", _finalize_check,
          lambda record, *args: record.new_empty(3 * ((record.shape[0] - 1) // 2) + 1),
          _finalize_run)


# ---- normalize ----------------------------------------------------------------------------------

def _check_stats(op: str, stats: object, c, x: Tensor) -> Tensor:
    return _vector(op, "stats", stats, 3 * c + 1, STATS_DTYPE, x)


def _normalize_check(x, stats, weight, bias, act=0, negative_slope=0.01) -> None:
    op = "normalize"
    x = _check_input(op, x)
    c = x.shape[1]
    _check_stats(op, stats, c, x)
    _check_affine(op, x, c, weight, bias)
    _check_act(op, act, negative_slope)


def _normalize_run(y, x, stats, weight, bias, act=0, negative_slope=0.01) -> None:
    weight, bias, stats = _contig(weight), _contig(bias), stats.contiguous()
    xv, view = _view(x)
    _call(xv, _core.normalize, view, stats.data_ptr(),
          _affine(weight, bias, param_dtype(x.dtype, weight, bias)), (act, negative_slope),
          y.data_ptr())


_register("normalize", _normalize_check, lambda x, *args: torch.empty_like(dense(x)),
          _normalize_run)


# ---- batch_norm_forward -------------------------------------------------------------------------

def _vec_ok(t, c, dev) -> bool:
    """A dense per-channel tensor of c values on dev (the common case of the checks)."""
    return (type(t) in _TENSOR_TYPES and t.layout is torch.strided and t.dim() == 1
            and t.shape[0] == c and t.device == dev)


_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _common_ok(x, weight, bias, act) -> bool:
    """The common case of an op's checks, in a few attribute reads. The detailed checks run only
    when this is False (they raise the error that names the problem): the ops run at every
    layer call, also from compiled graphs, where the fake kernel checked the same metadata at
    trace time."""
    if type(x) is not Tensor or x.layout is not torch.strided or x.dtype not in _DT \
            or not 2 <= x.dim() <= 5 or x.device.type not in _RUNNABLE or act not in _ACT_CODES:
        return False
    c, dev, pdt = x.shape[1], x.device, None
    for t in (weight, bias):
        if t is not None:
            if not _vec_ok(t, c, dev) or not _param_ok(x.dtype, t.dtype) or (
                    pdt is not None and t.dtype != pdt):
                return False
            pdt = t.dtype
    return True


def _running_ok(x, running_mean, running_var, num_batches_tracked, momentum) -> bool:
    c, dev = x.shape[1], x.device
    if running_mean is None or running_var is None:
        if running_mean is not running_var:
            return False
    elif not (_vec_ok(running_mean, c, dev) and _vec_ok(running_var, c, dev)
              and running_mean.dtype in _DT and running_var.dtype == running_mean.dtype):
        return False
    t = num_batches_tracked
    if t is not None and not (type(t) in _TENSOR_TYPES and t.dtype == torch.int64
                              and t.numel() == 1 and t.device == dev):
        return False
    if momentum is None:
        return running_mean is None or t is not None
    return math.isfinite(momentum)


def _forward_check(x, weight, bias, record, eps, eps_mode, act, negative_slope, running_mean,
                   running_var, num_batches_tracked, momentum) -> None:
    if not (_common_ok(x, weight, bias, act) and eps_mode in (0, 1) and 0.0 <= eps < math.inf
            and math.isfinite(negative_slope)
            and _running_ok(x, running_mean, running_var, num_batches_tracked, momentum)
            and (record is None or (_vec_ok(record, 2 * x.shape[1] + 1, x.device)
                                    and record.dtype == STATS_DTYPE))):
        _forward_explain(x, weight, bias, record, eps, eps_mode, act, negative_slope,
                         running_mean, running_var, num_batches_tracked, momentum)


def _forward_explain(x, weight, bias, record, eps, eps_mode, act, negative_slope, running_mean,
                     running_var, num_batches_tracked, momentum) -> None:
    op = "batch_norm_forward"
    x = _check_input(op, x)
    c = x.shape[1]
    _check_affine(op, x, c, weight, bias)
    if record is not None:
        _vector(op, "record", record, 2 * c + 1, STATS_DTYPE, x)
    _check_eps(op, eps, eps_mode)
    _check_act(op, act, negative_slope)
    _check_running(op, x, c, running_mean, running_var, num_batches_tracked, momentum)


def _forward_alloc(x, *args):
    return torch.empty_like(dense(x)), x.new_empty(3 * x.shape[1] + 1, dtype=STATS_DTYPE)


def _forward_impl(x, weight, bias, record, eps, eps_mode, act, negative_slope, running_mean,
                  running_var, num_batches_tracked, momentum):
    # Kept lean (the layers' hot path): small layers are bound by the Python between the
    # native calls, and a few microseconds there cost more than their own time on a busy CPU.
    xv, view = _view(x)
    dev = x.device
    y = torch.empty_like(xv)
    stats = torch.empty(3 * view[3] + 1, dtype=STATS_DTYPE, device=dev)
    if weight is not None:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if record is not None:
        record = record.contiguous()  # (ours, so contiguous: no copy)
    args = (view, _ptr(record), eps, eps_mode,
            (_ptr(weight), _ptr(bias), _DT[param_dtype(x.dtype, weight, bias)]),
            (act, negative_slope), stats.data_ptr(), y.data_ptr())
    if dev.type == "cpu" and (running_mean is None or (running_mean.is_contiguous()
                                                       and running_var.is_contiguous())):
        _core.batch_norm_forward(*args, _running_spec(running_mean, running_var,
                                                      num_batches_tracked, momentum),
                                 (_core.DEVICE_CPU, torch.get_num_threads(), 0))
    else:
        _with_running(lambda running: _call(x, _core.batch_norm_forward, *args, running),
                      running_mean, running_var, num_batches_tracked, momentum)
    return y, stats


_register("batch_norm_forward", _forward_check, _forward_alloc, impl=_forward_impl)


# ---- backward -----------------------------------------------------------------------------------

def _backward_common(op, grad_out, x, stats, weight, bias, act, negative_slope):
    x = _check_input(op, x)
    _check_grad(op, grad_out, x)
    c = x.shape[1]
    _check_stats(op, stats, c, x)
    _check_affine(op, x, c, weight, bias)
    _check_act(op, act, negative_slope)
    return c


def _grad_dtype(op, x, weight, bias, requested):
    pdt = param_dtype(x.dtype, weight, bias)
    if requested is not None:
        if not _param_ok(x.dtype, requested) or (
                (weight is not None or bias is not None) and requested != pdt):
            raise TypeError(f"{op}: param_dtype {requested} does not suit input x of dtype "
                            f"{x.dtype} and the parameters; expected the parameters' dtype, "
                            "the input dtype, or float32 for float16/bfloat16 input")
        pdt = requested
    return pdt


def _reduce_check(grad_out, x, stats, weight, bias, act=0, negative_slope=0.01,
                  param_dtype=None) -> None:
    op = "backward_reduce"
    _backward_common(op, grad_out, x, stats, weight, bias, act, negative_slope)
    _grad_dtype(op, x, weight, bias, param_dtype)


def _reduce_alloc(grad_out, x, stats, weight, bias, act=0, negative_slope=0.01,
                  param_dtype=None):
    c = x.shape[1]
    pdt = param_dtype if param_dtype is not None else _param_dtype_of(x.dtype, weight, bias)
    return (x.new_empty(2 * c, dtype=STATS_DTYPE), x.new_empty(c, dtype=pdt),
            x.new_empty(c, dtype=pdt))


def _reduce_run(out, grad_out, x, stats, weight, bias, act=0, negative_slope=0.01,
                param_dtype=None) -> None:
    sums, gw, gb = out
    xv, view = _view(x)
    dy = _in_layout(grad_out, view)
    weight, bias, stats = _contig(weight), _contig(bias), stats.contiguous()
    _call(xv, _core.backward_reduce, view, dy.data_ptr(), stats.data_ptr(),
          _affine(weight, bias, _param_dtype_of(x.dtype, weight, bias)), (act, negative_slope),
          sums.data_ptr(), (gw.data_ptr(), gb.data_ptr(), _DT[gw.dtype]))


_register("backward_reduce", _reduce_check, _reduce_alloc, _reduce_run)


def _elemt_check(grad_out, x, stats, weight, bias, sums, eps, eps_mode, act=0,
                 negative_slope=0.01) -> None:
    op = "backward_elemt"
    c = _backward_common(op, grad_out, x, stats, weight, bias, act, negative_slope)
    _vector(op, "sums", sums, 2 * c, STATS_DTYPE, x)
    _check_eps(op, eps, eps_mode)


def _elemt_run(dx, grad_out, x, stats, weight, bias, sums, eps, eps_mode, act=0,
               negative_slope=0.01) -> None:
    xv, view = _view(x)
    dy = _in_layout(grad_out, view)
    weight, bias, stats, sums = _contig(weight), _contig(bias), stats.contiguous(), sums.contiguous()
    _call(xv, _core.backward_elemt, view, dy.data_ptr(), stats.data_ptr(), eps, eps_mode,
          _affine(weight, bias, param_dtype(x.dtype, weight, bias)), (act, negative_slope),
          sums.data_ptr(), dx.data_ptr())


_register("backward_elemt", _elemt_check, lambda grad_out, x, *args: torch.empty_like(dense(x)),
          _elemt_run)


def _backward_ok(grad_out, x, stats, weight, bias, act, negative_slope) -> bool:
    """The common case of the backward ops' checks (see _common_ok)."""
    return (_common_ok(x, weight, bias, act) and math.isfinite(negative_slope)
            and type(grad_out) is Tensor and grad_out.layout is torch.strided
            and grad_out.shape == x.shape and grad_out.dtype == x.dtype
            and grad_out.device == x.device and _vec_ok(stats, 3 * x.shape[1] + 1, x.device)
            and stats.dtype == STATS_DTYPE)


def _backward_check(grad_out, x, stats, weight, bias, eps, eps_mode, act, negative_slope,
                    output_mask) -> None:
    if _backward_ok(grad_out, x, stats, weight, bias, act, negative_slope) and eps_mode in (0, 1) \
            and 0.0 <= eps < math.inf:
        return
    op = "batch_norm_backward"
    _backward_common(op, grad_out, x, stats, weight, bias, act, negative_slope)
    _check_eps(op, eps, eps_mode)


def _backward_alloc(grad_out, x, stats, weight, bias, eps, eps_mode, act, negative_slope,
                    output_mask):
    # Outputs not asked for are empty (a frozen affine layer allocates no parameter grads).
    c = x.shape[1]
    pdt = param_dtype(x.dtype, weight, bias)
    return (torch.empty_like(dense(x)) if output_mask[0] else x.new_empty(0),
            x.new_empty(c if output_mask[1] else 0, dtype=pdt),
            x.new_empty(c if output_mask[2] else 0, dtype=pdt))


def _backward_impl(grad_out, x, stats, weight, bias, eps, eps_mode, act, negative_slope,
                   output_mask):
    # Kept lean (the layers' hot path), like _forward_impl.
    xv, view = _view(x)
    c, dev = view[3], x.device
    pdt = param_dtype(x.dtype, weight, bias)
    need_x, need_w, need_b = output_mask
    dx = torch.empty_like(xv) if need_x else xv.new_empty(0)
    gw = torch.empty(c if need_w else 0, dtype=pdt, device=dev)
    gb = torch.empty(c if need_b else 0, dtype=pdt, device=dev)
    dy = _in_layout(grad_out, view)
    if weight is not None:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    stats = stats.contiguous()
    args = (view, dy.data_ptr(), stats.data_ptr(), eps, eps_mode,
            (_ptr(weight), _ptr(bias), _DT[pdt]), (act, negative_slope))
    grads = ((gw.data_ptr() if need_w else 0, gb.data_ptr() if need_b else 0, _DT[pdt]),
             dx.data_ptr() if need_x else 0)
    if dev.type == "cpu":  # the local sums are scratch: the CPU core keeps them itself
        _core.batch_norm_backward(*args, 0, *grads, (_core.DEVICE_CPU, torch.get_num_threads(), 0))
    else:
        sums = torch.empty(2 * c, dtype=STATS_DTYPE, device=dev)
        _call(x, _core.batch_norm_backward, *args, sums.data_ptr(), *grads)
    return dx, gw, gb


_register("batch_norm_backward", _backward_check, _backward_alloc, impl=_backward_impl)


# ================================================================================================
# autograd of the ops that are differentiable on their own (traceable torch code)
# ================================================================================================

def _channel_view(v: Tensor, ndim: int) -> Tensor:
    """A per-channel vector shaped to broadcast against an (N, C, *spatial) tensor of ndim dims."""
    return v.view((1, -1) + (1,) * (ndim - 2))


def _reduce_dims(x: Tensor):
    return [0] + list(range(2, x.dim()))


def _sum_ft_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.x_meta = (x.shape, x.dtype)


def _sum_ft_backward(ctx, grad):
    shape, dtype = ctx.x_meta
    return _channel_view(grad, len(shape)).to(dtype).expand(shape)


def _moments_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x, output)


def _moments_backward(ctx, grad):
    # mean = sum(x) / count, m2 = sum((x - mean)^2): d mean/dx = 1/count,
    # d m2/dx = 2 (x - mean) (the mean's own derivative cancels: sum(x - mean) = 0).
    x, record = ctx.saved_tensors
    c = x.shape[1]
    count = record[0].clamp_min(1.0)
    g_mean, g_m2 = grad[1:c + 1], grad[c + 1:]
    xd = x.to(STATS_DTYPE)
    nd = x.dim()
    dx = (_channel_view(g_mean / count, nd)
          + 2.0 * _channel_view(g_m2, nd) * (xd - _channel_view(record[1:c + 1], nd)))
    return dx.to(x.dtype)


def _merge_setup(ctx, inputs, output):
    (records,) = inputs
    ctx.save_for_backward(records, output)


def _merge_backward(ctx, grad):
    # mean = sum n_i mean_i / n, m2 = sum m2_i + sum n_i (mean_i - mean)^2, n = sum n_i:
    # d/dmean_i = n_i/n (mean) and 2 n_i (mean_i - mean) (m2); d/dm2_i = 1;
    # d/dn_i = 1 (n), (mean_i - mean)/n (mean), (mean_i - mean)^2 (m2). Empty records (n_i <= 0)
    # contributed nothing and get zero gradient.
    records, merged = ctx.saved_tensors
    c = (records.shape[1] - 1) // 2
    n_i = records[:, :1]
    live = (n_i > 0).to(records.dtype)
    n_i = n_i * live
    n = merged[:1].clamp_min(1.0)
    d = (records[:, 1:c + 1] - merged[1:c + 1]) * live
    g_n, g_mean, g_m2 = grad[:1], grad[1:c + 1], grad[c + 1:]
    d_n = (g_n + (d * g_mean / n).sum(1, keepdim=True) + (d * d * g_m2).sum(1, keepdim=True))
    d_mean = n_i / n * g_mean + 2.0 * n_i * d * g_m2
    d_m2 = g_m2.expand(records.shape[0], c) * live
    return torch.cat((d_n * live, d_mean, d_m2), dim=1)


def _normalize_setup(ctx, inputs, output):
    x, stats, weight, bias, act, negative_slope = inputs
    ctx.save_for_backward(x, stats, weight, bias)
    ctx.act = (act, negative_slope)


def _act_backward(grad: Tensor, z: Tensor, act: int, negative_slope: float) -> Tensor:
    """grad * act'(z), with torch's own derivative ops."""
    aten = torch.ops.aten
    if act == _core.ACT_IDENTITY:
        return grad
    if act == _core.ACT_RELU:
        return aten.threshold_backward(grad, z, 0)
    if act == _core.ACT_LEAKY_RELU:
        return aten.leaky_relu_backward(grad, z, negative_slope, False)
    if act == _core.ACT_SILU:
        return aten.silu_backward(grad, z)
    if act == _core.ACT_GELU:
        return aten.gelu_backward(grad, z, approximate="none")
    if act == _core.ACT_GELU_TANH:
        return aten.gelu_backward(grad, z, approximate="tanh")
    return aten.hardswish_backward(grad, z)


def _normalize_backward(ctx, grad):
    # y = act(z), z = (x - mean) * invstd * w + b, with mean and invstd read from stats.
    x, stats, weight, bias = ctx.saved_tensors
    c = x.shape[1]
    dims = _reduce_dims(x)
    xd, nd = x.to(STATS_DTYPE), x.dim()
    mean = _channel_view(stats[1:c + 1], nd)
    invstd = _channel_view(stats[2 * c + 1:], nd)
    w = _channel_view(weight.to(STATS_DTYPE), nd) if weight is not None else 1.0
    b = _channel_view(bias.to(STATS_DTYPE), nd) if bias is not None else 0.0
    xmu = xd - mean
    z = xmu * invstd * w + b
    g = _act_backward(grad.to(STATS_DTYPE), z, *ctx.act)
    dx = (g * invstd * w).to(x.dtype)
    sum_g, sum_g_xmu = g.sum(dims), (g * xmu).sum(dims)
    wv = weight.to(STATS_DTYPE) if weight is not None else torch.ones_like(sum_g)
    g_stats = torch.cat((torch.zeros_like(sum_g[:1]), -sum_g * stats[2 * c + 1:] * wv,
                         torch.zeros_like(sum_g), sum_g_xmu * wv))
    gw = (sum_g_xmu * stats[2 * c + 1:]).to(weight.dtype) if weight is not None else None
    gb = sum_g.to(bias.dtype) if bias is not None else None
    return dx, g_stats, gw, gb, None, None


torch.library.register_autograd("pysbn::sum_ft", _sum_ft_backward, setup_context=_sum_ft_setup,
                                lib=_LIB)
torch.library.register_autograd("pysbn::moments", _moments_backward,
                                setup_context=_moments_setup, lib=_LIB)
torch.library.register_autograd("pysbn::merge_moments", _merge_backward,
                                setup_context=_merge_setup, lib=_LIB)
torch.library.register_autograd("pysbn::normalize", _normalize_backward,
                                setup_context=_normalize_setup, lib=_LIB)

# ================================================================================================
# the ops, as Python callables (torch.ops.pysbn.<name>.default)
# ================================================================================================

sum_ft = torch.ops.pysbn.sum_ft.default
moments = torch.ops.pysbn.moments.default
merge_moments = torch.ops.pysbn.merge_moments.default
finalize = torch.ops.pysbn.finalize.default
normalize = torch.ops.pysbn.normalize.default
batch_norm_forward = torch.ops.pysbn.batch_norm_forward.default
backward_reduce = torch.ops.pysbn.backward_reduce.default
backward_elemt = torch.ops.pysbn.backward_elemt.default
batch_norm_backward = torch.ops.pysbn.batch_norm_backward.default


# ================================================================================================
# the layers' route
# ================================================================================================

def _direct(x: Tensor) -> bool:
    """Whether a call may skip the dispatcher: eager mode on a plain tensor, with nothing
    (compiler, tracer, torch.func transform, dispatch mode) that must see the op."""
    return (not torch.compiler.is_compiling() and type(x) is Tensor
            and not torch._C._are_functorch_transforms_active()
            and torch._C._len_torch_dispatch_stack() == 0
            and torch._C._get_tracing_state() is None)


def _trusted(name: str):
    op, registered = _OPS[name], getattr(torch.ops.pysbn, name).default
    grad_first = name in ("backward_reduce", "backward_elemt", "batch_norm_backward")

    def call(*args):
        if _direct(args[1] if grad_first else args[0]):
            return op.impl(*args)
        return registered(*args)

    call.__name__ = call.__qualname__ = name
    return call


class _Trusted:
    """The ops for callers that made their arguments themselves and checked the user's tensors
    (the layers and synchronizers): in eager mode they run the op's kernel without its checks
    and without the dispatcher (small layers are bound by per-call overhead: about 15 us per op
    on a 2-core VM); otherwise they call the registered op, so that torch.compile,
    torch.export, torch.func and dispatch modes see it. Same arguments as the ops."""

    def __init__(self) -> None:
        for name in _OPS:
            setattr(self, name, _trusted(name))


trusted = _Trusted()
"""``trusted.<op>(...)``: an op for the layers (see :class:`_Trusted`)."""
