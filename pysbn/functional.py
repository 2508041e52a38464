# SPDX-License-Identifier: MIT
"""Tensor-level batch-norm ops of pysbn: name-free functions on torch tensors.

Each function checks its tensors (types, dtypes, shapes, devices), allocates its outputs with
torch (so torch's caching allocator owns the memory), and calls the CPU or CUDA op of the native
core (:mod:`pysbn._core`) with raw pointers:

- CPU tensors run with ``torch.get_num_threads()`` OpenMP threads;
- CUDA tensors run asynchronously on ``torch.cuda.current_stream(device)``, with that device
  current. No CUDA path synchronises the host (no ``.item()``, no device-to-host copy).

The input ``x`` has shape ``(N, C, *spatial)`` with 0 to 3 spatial dims and is viewed as
``(N, C, L)``, ``L`` the product of the spatial sizes. Dense channel-major (contiguous) and
channels-last inputs are used in place; other strides are copied first (see :func:`_view`).

Dtypes: ``x`` (and ``dy``, ``y``, ``dx``) is float32, float64, float16 or bfloat16; the kernels
accumulate in float64 for float64 input and float32 otherwise (:func:`acc_dtype`). Per-channel
statistics (moments records, mean, invstd, grad sums, counts) are float64 for every input dtype
(:data:`STATS_DTYPE`): they are O(C), and float64 keeps the merge across replicas exact at
large offsets. Parameters (weight, bias, running stats, grad_weight,
grad_bias) have the *param dtype*: the input dtype, or float32 for float16/bfloat16 input.

Record formats (the payloads exchanged when synchronising replicas):

- moments record, ``(2C+1,)``: ``[count, mean[0..C), m2[0..C)]``, ``count`` the number of values
  per channel and ``m2`` the sum of squared deviations from the mean;
- grad-sums record, ``(2C,)``: ``[sum_dy[0..C), sum_dy_xmu[0..C)]``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from . import _core

__all__ = [
    "STATS_DTYPE",
    "acc_dtype",
    "sum_ft",
    "moments",
    "merge_moments",
    "finalize",
    "normalize",
    "backward_reduce",
    "backward_elemt",
]

STATS_DTYPE = torch.float64
"""Dtype of every per-channel statistic: moments records, mean, invstd, grad sums, counts."""

Geometry = Tuple[int, int, int, int]
"""``(n, c, l, layout)``: the (N, C, L) view of a dense tensor and its ``_core.LAYOUT_*``."""

_DTYPES = {
    torch.float32: _core.DTYPE_FLOAT32,
    torch.float64: _core.DTYPE_FLOAT64,
    torch.float16: _core.DTYPE_FLOAT16,
    torch.bfloat16: _core.DTYPE_BFLOAT16,
}
_EPS_MODES = {"plus": _core.EPS_PLUS, "clamp": _core.EPS_CLAMP}
_SUPPORTED = "float32, float64, float16 or bfloat16"


# ---- checks -------------------------------------------------------------------------------------

def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of an input dtype: float64 for float64, float32 otherwise.

    Parameters
    ----------
    dtype : torch.dtype
        One of float32, float64, float16, bfloat16.

    Returns
    -------
    torch.dtype
        The dtype in which the kernels accumulate values of that input (per-channel results
        are then float64, :data:`STATS_DTYPE`).
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _param_dtype_ok(dtype: torch.dtype, param_dtype: torch.dtype) -> bool:
    return param_dtype == dtype or (
        param_dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16))


def _check_tensor(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    return t


def _check_input(op: str, name: str, x: object) -> torch.Tensor:
    """The input tensor: a float tensor of 2 to 5 dims on a device pysbn can run on."""
    x = _check_tensor(op, name, x)
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: {name} has dtype {x.dtype}; expected {_SUPPORTED}")
    if not 2 <= x.dim() <= 5:
        raise ValueError(f"{op}: {name} must have shape (N, C, *spatial) with 2 to 5 dims, "
                         f"got shape {tuple(x.shape)}")
    _check_device(op, name, x)
    return x


# Device types this build runs on (the fast checks of the layers compare against it).
_RUNNABLE = ("cpu", "cuda") if _core.built_with_cuda() else ("cpu",)


def _check_device(op: str, name: str, t: torch.Tensor) -> None:
    kind = t.device.type
    if kind == "cuda":
        if not _core.built_with_cuda():
            raise RuntimeError(f"{op}: {name} is a CUDA tensor but pysbn was built without CUDA; "
                               "rebuild it with a CUDA compiler (PYSBN_WITH_CUDA=ON)")
    elif kind != "cpu":
        raise ValueError(f"{op}: {name} is on device {t.device}; pysbn runs on cpu and cuda only")


def _same_device(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                         "all tensors must be on the same device")


def _per_channel(op: str, name: str, t: object, c: int, dtype: Optional[torch.dtype],
                 ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    """A per-channel array: a tensor of shape (C,) (of ``dtype`` when given) on ref's device,
    returned contiguous."""
    t = _check_tensor(op, name, t)
    if t.dim() != 1 or t.shape[0] != c:
        raise ValueError(f"{op}: {name} must have shape ({c},), got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected {dtype}")
    _same_device(op, name, t, ref, ref_name)
    return t.contiguous()


def _params(op: str, x: torch.Tensor, c: int, named: Sequence[Tuple[str, object]]
            ) -> Tuple[torch.dtype, list]:
    """Optional parameters (weight, bias): checked, made contiguous; their common param dtype
    (the input dtype when all are None)."""
    out, param_dtype, first = [], None, None
    for name, t in named:
        if t is None:
            out.append(None)
            continue
        t = _per_channel(op, name, t, c, None, x, "input x")
        if t.dtype not in _DTYPES or not _param_dtype_ok(x.dtype, t.dtype):
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but input x has dtype {x.dtype}; "
                            "parameters must have the input dtype, or float32 for "
                            "float16/bfloat16 input")
        if param_dtype is not None and t.dtype != param_dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {first} has dtype "
                            f"{param_dtype}; parameters must share one dtype")
        param_dtype, first = t.dtype, name
        out.append(t)
    return (x.dtype if param_dtype is None else param_dtype), out


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


# ---- layout -------------------------------------------------------------------------------------

def _is_channels_last(t: torch.Tensor) -> bool:
    # Dense with the channel dim innermost and the others in order: torch.channels_last (4-D),
    # torch.channels_last_3d (5-D), and the same order for 3-D (N, C, L).
    return t.dim() >= 3 and t.movedim(1, -1).is_contiguous()


def _view(x: torch.Tensor) -> Tuple[torch.Tensor, Geometry]:
    """The (N, C, L) view of an input, and the tensor to hand to the core.

    Parameters
    ----------
    x : torch.Tensor
        Shape ``(N, C, *spatial)``, 2 to 5 dims (checked by the callers).

    Returns
    -------
    tensor : torch.Tensor
        ``x`` itself when it is dense channel-major (contiguous) or dense channels-last
        (``torch.channels_last`` / ``channels_last_3d``, or channel-innermost 3-D); otherwise a
        contiguous **copy** of ``x`` (transposed, sliced, expanded inputs...), which costs one
        extra pass over the data.
    geometry : tuple of int
        ``(n, c, l, layout)`` with ``l`` the product of the spatial sizes and ``layout``
        ``_core.LAYOUT_CHANNEL_MAJOR`` or ``_core.LAYOUT_CHANNELS_LAST``. When both layouts
        describe the memory (e.g. C == 1 or L == 1) channel-major is chosen.
    """
    n, c = int(x.shape[0]), int(x.shape[1])
    l = 1
    for s in x.shape[2:]:
        l *= int(s)
    if x.is_contiguous():
        return x, (n, c, l, _core.LAYOUT_CHANNEL_MAJOR)
    if _is_channels_last(x):
        return x, (n, c, l, _core.LAYOUT_CHANNELS_LAST)
    return x.contiguous(), (n, c, l, _core.LAYOUT_CHANNEL_MAJOR)


def _in_layout(t: torch.Tensor, layout: int) -> torch.Tensor:
    """``t`` (same shape as the input) dense in ``layout``, copied only when it is not."""
    if layout == _core.LAYOUT_CHANNEL_MAJOR:
        return t.contiguous()
    if _is_channels_last(t):
        return t
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def _empty_in_layout(x: torch.Tensor, layout: int) -> torch.Tensor:
    """A new uninitialised tensor like ``x`` (shape, dtype, device), dense in ``layout``."""
    if layout == _core.LAYOUT_CHANNEL_MAJOR:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    shape = (x.shape[0], *x.shape[2:], x.shape[1])
    return torch.empty(shape, dtype=x.dtype, device=x.device).movedim(-1, 1)


# ---- dispatch -----------------------------------------------------------------------------------

def _run(device: torch.device, cpu_op, cuda_op, *args, threaded: bool = True) -> None:
    """Calls the CPU op (plus the thread count when ``threaded``) or the CUDA op (plus the current
    stream of ``device``, with ``device`` current)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            cuda_op(*args, torch.cuda.current_stream(device).cuda_stream)
    elif threaded:
        cpu_op(*args, torch.get_num_threads())
    else:
        cpu_op(*args)


# ---- ops ----------------------------------------------------------------------------------------

def sum_ft(x: torch.Tensor) -> torch.Tensor:
    """Per-channel sum of ``x`` over every dim but the channel dim (the seed's ``_sum_ft``).

    Parameters
    ----------
    x : torch.Tensor
        Input, shape ``(N, C, *spatial)``.

    Returns
    -------
    torch.Tensor
        Shape ``(C,)``, float64: ``out[c] = x[:, c].sum()``.
    """
    x = _check_input("sum_ft", "input x", x)
    xv, g = _view(x)
    out = torch.empty(g[1], dtype=STATS_DTYPE, device=x.device)
    _run(x.device, _core.cpu_sum_ft, _core.cuda_sum_ft,
         xv.data_ptr(), _DTYPES[x.dtype], g, out.data_ptr())
    return out


def moments(x: torch.Tensor) -> torch.Tensor:
    """Moments record of ``x``: count, per-channel mean and sum of squared deviations.

    Computed with a stable scheme (deviations from a shift near each block's mean, Chan merge
    in double), so inputs with a mean far from zero keep their variance.

    Parameters
    ----------
    x : torch.Tensor
        Input, shape ``(N, C, *spatial)``.

    Returns
    -------
    torch.Tensor
        Shape ``(2C+1,)``, float64: ``[count, mean[0..C), m2[0..C)]`` with
        ``count = N * L``. The biased variance is ``m2 / count``. An empty batch (count 0)
        gives zeros.
    """
    x = _check_input("moments", "input x", x)
    xv, g = _view(x)
    stats = torch.empty(2 * g[1] + 1, dtype=STATS_DTYPE, device=x.device)
    _run(x.device, _core.cpu_moments, _core.cuda_moments,
         xv.data_ptr(), _DTYPES[x.dtype], g, stats.data_ptr())
    return stats


def merge_moments(records: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    """Merges moments records (Chan's parallel formula) into the record of their union.

    Exact for unequal counts; records with count 0 contribute nothing.

    Parameters
    ----------
    records : torch.Tensor or sequence of torch.Tensor
        Shape ``(k, 2C+1)``, one moments record (see :func:`moments`) per row, float64; or a
        sequence of ``k`` records of shape ``(2C+1,)`` (stacked first).

    Returns
    -------
    torch.Tensor
        Shape ``(2C+1,)``, float64: the moments record of all the values.
    """
    op = "merge_moments"
    if not isinstance(records, torch.Tensor):
        if not isinstance(records, (list, tuple)) or len(records) == 0:
            raise TypeError(f"{op}: records must be a tensor of shape (k, 2C+1) or a non-empty "
                            f"sequence of (2C+1,) tensors, got {type(records).__name__}")
        items = [_check_tensor(op, f"records[{i}]", r) for i, r in enumerate(records)]
        for i, r in enumerate(items):
            if r.dim() != 1 or r.shape != items[0].shape:
                raise ValueError(f"{op}: records[{i}] must have shape {tuple(items[0].shape)} "
                                 f"(one 1-D record), got {tuple(r.shape)}")
            if r.dtype != items[0].dtype:
                raise TypeError(f"{op}: records[{i}] has dtype {r.dtype} but records[0] has "
                                f"dtype {items[0].dtype}")
            _same_device(op, f"records[{i}]", r, items[0], "records[0]")
        records = torch.stack(items)
    records = _check_tensor(op, "records", records)
    if records.dtype != STATS_DTYPE:
        raise TypeError(f"{op}: records has dtype {records.dtype}; expected {STATS_DTYPE} "
                        "(moments records are float64)")
    if records.dim() != 2 or records.shape[1] % 2 != 1:
        raise ValueError(f"{op}: records must have shape (k, 2C+1), got {tuple(records.shape)}")
    _check_device(op, "records", records)
    records = records.contiguous()
    k, c = int(records.shape[0]), (int(records.shape[1]) - 1) // 2
    out = torch.empty(2 * c + 1, dtype=records.dtype, device=records.device)
    _run(records.device, _core.cpu_merge_moments, _core.cuda_merge_moments,
         k, c, records.data_ptr(), out.data_ptr(), threaded=False)
    return out


def finalize(stats: torch.Tensor, eps: float, eps_mode: str = "plus",
             running_mean: Optional[torch.Tensor] = None,
             running_var: Optional[torch.Tensor] = None,
             factor: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and inverse std from a moments record; optionally updates running statistics.

    Parameters
    ----------
    stats : torch.Tensor
        A moments record, shape ``(2C+1,)``, float64 (see :func:`moments`).
    eps : float
        Added to (``"plus"``) or clamping (``"clamp"``) the biased variance.
    eps_mode : {"plus", "clamp"}
        ``"plus"``: ``invstd = 1 / sqrt(var + eps)`` as ``nn.BatchNorm``; ``"clamp"``:
        ``invstd = 1 / sqrt(max(var, eps))`` as the seed's SyncBN.
    running_mean, running_var : torch.Tensor, optional
        Both or neither; shape ``(C,)``, one dtype (float32, float64, float16 or bfloat16: the
        module's buffers). Updated in place:
        ``running_mean = (1 - factor) * running_mean + factor * mean`` and
        ``running_var = (1 - factor) * running_var + factor * m2 / (count - 1)`` (unbiased).
        Left untouched when count is 0.
    factor : float
        The momentum, or ``1 / num_batches_tracked`` for a cumulative average.

    Returns
    -------
    mean, invstd : torch.Tensor
        Shape ``(C,)``, float64. Count 0 gives mean 0 and variance 0.
    """
    op = "finalize"
    stats = _check_tensor(op, "stats", stats)
    if stats.dtype != STATS_DTYPE:
        raise TypeError(f"{op}: stats has dtype {stats.dtype}; expected {STATS_DTYPE} "
                        "(moments records are float64)")
    if stats.dim() != 1 or stats.shape[0] % 2 != 1:
        raise ValueError(f"{op}: stats must be one moments record of shape (2C+1,), "
                         f"got {tuple(stats.shape)}")
    _check_device(op, "stats", stats)
    if eps_mode not in _EPS_MODES:
        raise ValueError(f"{op}: eps_mode must be 'plus' or 'clamp', got {eps_mode!r}")
    eps, factor = float(eps), float(factor)
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"{op}: eps must be finite and >= 0, got {eps}")
    if not math.isfinite(factor):
        raise ValueError(f"{op}: factor must be finite, got {factor}")
    c = (int(stats.shape[0]) - 1) // 2
    stats = stats.contiguous()
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must be given together "
                         f"(got running_mean={'None' if running_mean is None else 'a tensor'}, "
                         f"running_var={'None' if running_var is None else 'a tensor'})")
    param_dtype = STATS_DTYPE
    rm = rv = None
    if running_mean is not None:
        rm = _per_channel(op, "running_mean", running_mean, c, None, stats, "stats")
        rv = _per_channel(op, "running_var", running_var, c, None, stats, "stats")
        if rm.dtype not in _DTYPES:
            raise TypeError(f"{op}: running_mean has dtype {rm.dtype}; expected {_SUPPORTED}")
        if rv.dtype != rm.dtype:
            raise TypeError(f"{op}: running_var has dtype {rv.dtype} but running_mean has dtype "
                            f"{rm.dtype}; they must match")
        param_dtype = rm.dtype
    mean = torch.empty(c, dtype=STATS_DTYPE, device=stats.device)
    invstd = torch.empty(c, dtype=STATS_DTYPE, device=stats.device)
    _run(stats.device, _core.cpu_finalize, _core.cuda_finalize,
         c, stats.data_ptr(), eps, _EPS_MODES[eps_mode],
         mean.data_ptr(), invstd.data_ptr(), _ptr(rm), _ptr(rv), _DTYPES[param_dtype], factor,
         threaded=False)
    # The update ran on contiguous copies when the buffers were strided: write them back.
    if rm is not None and rm.data_ptr() != running_mean.data_ptr():
        running_mean.copy_(rm)
    if rv is not None and rv.data_ptr() != running_var.data_ptr():
        running_var.copy_(rv)
    return mean, invstd


def normalize(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
              weight: Optional[torch.Tensor] = None,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalizes and applies the affine map per channel.

    ``y = (x - mean[c]) * invstd[c] * weight[c] + bias[c]``

    Parameters
    ----------
    x : torch.Tensor
        Input, shape ``(N, C, *spatial)``.
    mean, invstd : torch.Tensor
        Shape ``(C,)``, float64 (see :func:`finalize`).
    weight, bias : torch.Tensor, optional
        Shape ``(C,)``, param dtype (the two share it). None means 1 and 0.

    Returns
    -------
    torch.Tensor
        ``y``, shape and dtype of ``x``, in the memory format of ``x`` (channel-major or
        channels-last; channel-major when ``x`` had other strides and was copied).
    """
    op = "normalize"
    x = _check_input(op, "input x", x)
    xv, g = _view(x)
    c, acc = g[1], STATS_DTYPE
    mean = _per_channel(op, "mean", mean, c, acc, x, "input x")
    invstd = _per_channel(op, "invstd", invstd, c, acc, x, "input x")
    param_dtype, (weight, bias) = _params(op, x, c, (("weight", weight), ("bias", bias)))
    y = _empty_in_layout(x, g[3])
    _run(x.device, _core.cpu_normalize, _core.cuda_normalize,
         xv.data_ptr(), _DTYPES[x.dtype], g, mean.data_ptr(), invstd.data_ptr(), _ptr(weight),
         _ptr(bias), _DTYPES[param_dtype], y.data_ptr())
    return y


def _grad_output(op: str, dy: object, x: torch.Tensor, layout: int) -> torch.Tensor:
    dy = _check_tensor(op, "grad_output dy", dy)
    if dy.shape != x.shape:
        raise ValueError(f"{op}: grad_output dy has shape {tuple(dy.shape)} but input x has "
                         f"shape {tuple(x.shape)}; they must match")
    if dy.dtype != x.dtype:
        raise TypeError(f"{op}: grad_output dy has dtype {dy.dtype} but input x has dtype "
                        f"{x.dtype}; they must match")
    _same_device(op, "grad_output dy", dy, x, "input x")
    return _in_layout(dy, layout)


def backward_reduce(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                    invstd: torch.Tensor, need_weight_grad: bool = True,
                    need_bias_grad: bool = True, *,
                    param_dtype: Optional[torch.dtype] = None
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Local gradient sums of the backward pass, and the weight and bias gradients.

    Parameters
    ----------
    dy : torch.Tensor
        Gradient of the loss with respect to ``y``, shape and dtype of ``x`` (copied into the
        memory format of ``x`` when its strides differ).
    x : torch.Tensor
        The forward input, shape ``(N, C, *spatial)``.
    mean, invstd : torch.Tensor
        Shape ``(C,)``, float64: the (global) statistics of the forward pass.
    need_weight_grad, need_bias_grad : bool
        Whether to return ``grad_weight`` and ``grad_bias``.
    param_dtype : torch.dtype, optional
        Dtype of ``grad_weight`` / ``grad_bias`` (the weight's dtype): the input dtype (default)
        or float32 for float16/bfloat16 input.

    Returns
    -------
    sums : torch.Tensor
        The grad-sums record, shape ``(2C,)``, float64:
        ``[sum_dy[0..C), sum_dy_xmu[0..C)]`` with ``sum_dy_xmu = sum(dy * (x - mean))``.
        These are local sums: synchronise (sum) them across replicas before
        :func:`backward_elemt`.
    grad_weight : torch.Tensor or None
        ``sum_dy_xmu * invstd``, shape ``(C,)``, param dtype; None unless requested.
    grad_bias : torch.Tensor or None
        ``sum_dy``, shape ``(C,)``, param dtype; None unless requested.
    """
    op = "backward_reduce"
    x = _check_input(op, "input x", x)
    xv, g = _view(x)
    dy = _grad_output(op, dy, x, g[3])
    c, acc = g[1], STATS_DTYPE
    mean = _per_channel(op, "mean", mean, c, acc, x, "input x")
    invstd = _per_channel(op, "invstd", invstd, c, acc, x, "input x")
    if param_dtype is None:
        param_dtype = x.dtype
    elif not isinstance(param_dtype, torch.dtype) or not _param_dtype_ok(x.dtype, param_dtype):
        raise TypeError(f"{op}: param_dtype {param_dtype} does not suit input x of dtype "
                        f"{x.dtype}; expected the input dtype, or float32 for float16/bfloat16 "
                        "input")
    sums = torch.empty(2 * c, dtype=acc, device=x.device)
    grad_weight = (torch.empty(c, dtype=param_dtype, device=x.device)
                   if need_weight_grad else None)
    grad_bias = torch.empty(c, dtype=param_dtype, device=x.device) if need_bias_grad else None
    _run(x.device, _core.cpu_backward_reduce, _core.cuda_backward_reduce,
         dy.data_ptr(), xv.data_ptr(), _DTYPES[x.dtype], g, mean.data_ptr(), invstd.data_ptr(),
         sums.data_ptr(), _ptr(grad_weight), _ptr(grad_bias), _DTYPES[param_dtype])
    return sums, grad_weight, grad_bias


def backward_elemt(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                   weight: Optional[torch.Tensor], sums: torch.Tensor,
                   count: torch.Tensor) -> torch.Tensor:
    """Gradient with respect to the input, from the global gradient sums.

    ``dx = (dy - sum_dy / count - (x - mean) * invstd**2 * sum_dy_xmu / count) * invstd * weight``

    Parameters
    ----------
    dy : torch.Tensor
        Gradient with respect to ``y``, shape and dtype of ``x`` (copied into the memory format
        of ``x`` when its strides differ).
    x : torch.Tensor
        The forward input, shape ``(N, C, *spatial)``.
    mean, invstd : torch.Tensor
        Shape ``(C,)``, float64: the global statistics of the forward pass.
    weight : torch.Tensor or None
        Shape ``(C,)``, param dtype; None means 1.
    sums : torch.Tensor
        The global grad-sums record, shape ``(2C,)``, float64 (see
        :func:`backward_reduce`).
    count : torch.Tensor
        The global number of values per channel: one float64 element, e.g. the
        count slot ``stats[:1]`` of the global moments record (kept on the device: no host
        synchronisation). A global count of 0 means there are no elements anywhere.

    Returns
    -------
    torch.Tensor
        ``dx``, shape and dtype of ``x``, in the memory format used for ``x`` (see
        :func:`normalize`).
    """
    op = "backward_elemt"
    x = _check_input(op, "input x", x)
    xv, g = _view(x)
    dy = _grad_output(op, dy, x, g[3])
    c, acc = g[1], STATS_DTYPE
    mean = _per_channel(op, "mean", mean, c, acc, x, "input x")
    invstd = _per_channel(op, "invstd", invstd, c, acc, x, "input x")
    param_dtype, (weight,) = _params(op, x, c, (("weight", weight),))
    sums = _per_channel(op, "sums", sums, 2 * c, acc, x, "input x")
    count = _check_tensor(op, "count", count)
    if count.numel() != 1:
        raise ValueError(f"{op}: count must hold exactly one element, got shape "
                         f"{tuple(count.shape)}")
    if count.dtype != acc:
        raise TypeError(f"{op}: count has dtype {count.dtype}; expected {acc} (statistics "
                        "are float64)")
    _same_device(op, "count", count, x, "input x")
    dx = _empty_in_layout(x, g[3])
    _run(x.device, _core.cpu_backward_elemt, _core.cuda_backward_elemt,
         dy.data_ptr(), xv.data_ptr(), _DTYPES[x.dtype], g, mean.data_ptr(), invstd.data_ptr(),
         _ptr(weight), _DTYPES[param_dtype], sums.data_ptr(), count.data_ptr(), dx.data_ptr())
    return dx
