# SPDX-License-Identifier: MIT
"""Tensor-level batch-norm functions of pysbn, on the registered ops (:mod:`pysbn.ops`).

Each function is one op of ``torch.ops.pysbn`` (or a few), so it works eagerly, under
``torch.compile`` and under ``torch.export`` alike. The op checks its tensors (types, dtypes,
shapes, devices), allocates its outputs with torch and runs the native core: CPU tensors with
``torch.get_num_threads()`` OpenMP threads, CUDA tensors asynchronously on the current stream of
their device, with no host synchronisation.

The input ``x`` has shape ``(N, C, *spatial)`` with 0 to 3 spatial dims and is viewed as
``(N, C, L)``. Dense contiguous and channels_last inputs are used in place; other strides are
copied first (:func:`pysbn.ops.dense`).

Dtypes: ``x`` (and ``dy``, ``y``, ``dx``) is float32, float64, float16 or bfloat16; the kernels
accumulate in float64 for float64 input and float32 otherwise (:func:`acc_dtype`). Per-channel
statistics (moments records, mean, invstd, grad sums, counts) are float64 for every input dtype
(:data:`STATS_DTYPE`). Parameters (weight, bias, running stats, grad_weight, grad_bias) have the
*param dtype*: the input dtype, or float32 for float16/bfloat16 input.

Record formats (the payloads exchanged when synchronising replicas):

- moments record, ``(2C+1,)``: ``[count, mean[0..C), m2[0..C)]``, ``count`` the number of values
  per channel and ``m2`` the sum of squared deviations from the mean;
- grad-sums record, ``(2C,)``: ``[sum_dy[0..C), sum_dy_xmu[0..C)]``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from . import ops

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

STATS_DTYPE = ops.STATS_DTYPE
"""Dtype of every per-channel statistic: moments records, mean, invstd, grad sums, counts."""


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
    return ops.sum_ft(ops._check_input("sum_ft", x))


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
    return ops.moments(ops._check_input("moments", x))


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
        items = [ops._tensor(op, f"records[{i}]", r) for i, r in enumerate(records)]
        for i, r in enumerate(items):
            if r.dim() != 1 or r.shape != items[0].shape:
                raise ValueError(f"{op}: records[{i}] must have shape {tuple(items[0].shape)} "
                                 f"(one 1-D record), got {tuple(r.shape)}")
            if r.dtype != items[0].dtype:
                raise TypeError(f"{op}: records[{i}] has dtype {r.dtype} but records[0] has "
                                f"dtype {items[0].dtype}")
            if r.device != items[0].device:
                raise ValueError(f"{op}: records[{i}] is on {r.device} but records[0] is on "
                                 f"{items[0].device}; all tensors must be on the same device")
        records = torch.stack(items)
    return ops.merge_moments(records)


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
    ops._check_record(op, stats, "stats")
    if eps_mode not in ops.EPS_MODES:
        raise ValueError(f"{op}: eps_mode must be 'plus' or 'clamp', got {eps_mode!r}")
    factor = float(factor)
    if not math.isfinite(factor):
        raise ValueError(f"{op}: factor must be finite, got {factor}")
    out = ops.finalize(stats, float(eps), ops.EPS_MODES[eps_mode], running_mean, running_var,
                       None, factor)
    c = (out.shape[0] - 1) // 3
    return out[1:c + 1], out[2 * c + 1:]


def _stats_of(op: str, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
              count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Batch statistics ``[count, mean, m2 (0), invstd]`` from separate tensors."""
    x = ops._check_input(op, x)
    c = x.shape[1]
    mean = ops._vector(op, "mean", mean, c, STATS_DTYPE, x)
    invstd = ops._vector(op, "invstd", invstd, c, STATS_DTYPE, x)
    if count is None:
        count = mean.new_ones(1)
    return torch.cat((count.reshape(1), mean, torch.zeros_like(mean), invstd))


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
    return ops.normalize(x, _stats_of("normalize", x, mean, invstd), weight, bias)


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
    ops._check_grad(op, dy, ops._check_input(op, x))
    if param_dtype is None:
        param_dtype = ops._check_input(op, x).dtype
    elif not isinstance(param_dtype, torch.dtype):
        raise TypeError(f"{op}: param_dtype must be a torch.dtype, got {param_dtype!r}")
    sums, gw, gb = ops.backward_reduce(dy, x, _stats_of(op, x, mean, invstd), None, None, 0, 0.01,
                                       param_dtype)
    return sums, (gw if need_weight_grad else None), (gb if need_bias_grad else None)


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
    ops._check_grad(op, dy, ops._check_input(op, x))
    count = ops._tensor(op, "count", count)
    if count.numel() != 1:
        raise ValueError(f"{op}: count must hold exactly one element, got shape "
                         f"{tuple(count.shape)}")
    if count.dtype != STATS_DTYPE:
        raise TypeError(f"{op}: count has dtype {count.dtype}; expected {STATS_DTYPE} "
                        "(statistics are float64)")
    ops._same_device(op, "count", count, x)
    stats = _stats_of(op, x, mean, invstd, count)
    return ops.backward_elemt(dy, x, stats, weight, None, sums, 0.0, ops.EPS_MODES["plus"])
