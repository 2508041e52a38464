# SPDX-License-Identifier: MIT
"""Autograd Functions of the synchronized layers, on the native core.

:class:`SyncBatchNormFunction` (training statistics):

- forward: local ``moments`` -> synchronizer (global record) -> ``finalize`` (mean, invstd, and
  the running-stat update on the member that owns it) -> ``normalize``;
- backward: ``backward_reduce`` (local sums, grad_weight, grad_bias) -> synchronizer (global
  sums) -> ``backward_elemt`` (dx).

:class:`LocalBatchNormFunction` (training statistics of a member with nothing to synchronise, eps
mode "plus"): the same work in one native call per direction, ``fused_forward`` and
``fused_backward``. Small layers are bound by per-call overhead (BN1d (256, 512) spends more time
in Python and torch than in its kernels), so this path keeps the Python to a minimum; it also
updates ``num_batches_tracked`` natively, after everything else, so a failed step changes nothing.

:class:`FixedStatsBatchNormFunction` (eval mode with running statistics): ``normalize`` with the
running statistics; backward ``backward_reduce`` (for the parameter gradients) and
``backward_elemt`` with zero sums, i.e. ``dx = dy * invstd * weight``.

The tensors were checked by the module (:mod:`pysbn.batchnorm`); these Functions call the core
through a lean path (one view, direct ``_core`` calls) because small layers are bound by
per-call overhead. Saved for backward: the input, the weight, mean, invstd (float64, C each) and
the global count (one float64): nothing else.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import _core
from . import functional as F
from .sync import Synchronizer

__all__ = ["SyncBatchNormFunction", "LocalBatchNormFunction", "FixedStatsBatchNormFunction",
           "too_few_values"]

_STATS = F.STATS_DTYPE
_run = F._run  # the tensor layer's CPU/CUDA dispatch
_ptr = F._ptr
_DT = F._DTYPES
_EPS_MODES = F._EPS_MODES


def too_few_values(shape: Sequence[int], agreed: bool = False) -> ValueError:
    """The error ``nn.BatchNorm`` raises for one value per channel in training.

    Parameters
    ----------
    shape : sequence of int
        The input's shape, quoted in the message.
    agreed : bool
        True when the error was decided on the global count after the synchronisation, so
        every member of the group raises it by itself; the layer then does not abort the group
        (that would turn the other members' ValueError into a ``SyncAbortedError``).

    Returns
    -------
    ValueError
        The error (not raised), with the attribute ``_sbn_agreed`` set to ``agreed``.
    """
    exc = ValueError(f"Expected more than 1 value per channel when training, got input size "
                     f"{torch.Size(shape)}")
    exc._sbn_agreed = agreed
    return exc


def _param_default(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _backward(ctx, dy, x, weight, mean, invstd, count, sync, fixed):
    """backward_reduce (+ sync of the sums) + backward_elemt; returns dx, dw, db."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dev = x.device
    xv, g = F._view(x)
    dy = F._in_layout(dy, g[3])
    c = g[1]
    pdt = ctx.param_dtype
    dxt = _DT[x.dtype]
    gw = torch.empty(c, dtype=pdt, device=dev) if need_w else None
    gb = torch.empty(c, dtype=pdt, device=dev) if need_b else None
    sums = None
    if need_w or need_b or (need_x and not fixed):
        sums = torch.empty(2 * c, dtype=_STATS, device=dev)
        _run(dev, _core.cpu_backward_reduce, _core.cuda_backward_reduce,
             dy.data_ptr(), xv.data_ptr(), dxt, g, mean.data_ptr(), invstd.data_ptr(),
             sums.data_ptr(), _ptr(gw), _ptr(gb), _DT[pdt])
    dx = None
    if need_x:
        if fixed:
            gsums = torch.zeros(2 * c, dtype=_STATS, device=dev)
        elif sync is not None:
            gsums = sync.backward(sums)
        else:
            gsums = sums
        clamped = getattr(ctx, "clamped", None)
        if clamped is not None:
            # eps mode "clamp": invstd = 1/sqrt(max(var, eps)) does not depend on the variance
            # of a channel with var < eps, so its dx has no variance term (sum_dy_xmu = 0).
            # Out of place: gsums may be shared with the other replicas.
            gsums = torch.cat((gsums[:c], gsums[c:].masked_fill(clamped, 0.0)))
        dx = F._empty_in_layout(x, g[3])
        _run(dev, _core.cpu_backward_elemt, _core.cuda_backward_elemt,
             dy.data_ptr(), xv.data_ptr(), dxt, g, mean.data_ptr(), invstd.data_ptr(),
             _ptr(weight), _DT[pdt], gsums.data_ptr(), count.data_ptr(), dx.data_ptr())
    return dx, gw, gb


def _first_order_only(ctx, grads, dy):
    """The core's backward is not differentiable. Under ``create_graph=True`` (grad mode on in
    the backward) with a second-order path through dy, x or weight (the Function's first two
    inputs), the gradients come back wrapped so that differentiating them raises, instead of
    silently missing that term (as ``torch.autograd.function.once_differentiable`` does, which
    only looks at dy)."""
    if not torch.is_grad_enabled() or not (
            dy.requires_grad or ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return grads
    delayed = getattr(torch._C._functions, "DelayedError", None)
    if delayed is None:  # pragma: no cover - private torch API moved
        return grads
    err = delayed(b"pysbn: the synchronized batch norm's backward is not differentiable "
                  b"(double backward / create_graph through the layer is not supported)",
                  len(grads))
    alias = [None if g is None else g.detach().requires_grad_() for g in grads]
    return tuple(err(*alias))


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with statistics synchronised by ``sync`` (None: local only).

    ``forward(x, weight, bias, running_mean, running_var, eps, eps_mode, factor, sync)``:
    ``running_mean``/``running_var`` (both or neither) are updated in place by the member whose
    synchronizer owns them (``sync.updates_running_stats``), and only once the statistics are
    known, so a failed synchronisation leaves them untouched.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], eps: float, eps_mode: str, factor: float,
                sync: Optional[Synchronizer]) -> torch.Tensor:
        """Normalises ``x`` with the statistics of the synchronised batch.

        Parameters
        ----------
        ctx
            The autograd context (saves x, weight, mean, invstd and the global count).
        x : torch.Tensor
            Input ``(N, C, *spatial)``, already checked by the module.
        weight, bias : torch.Tensor or None
            Affine parameters, shape ``(C,)``; their dtype is the param dtype (the input
            dtype, or float32 for float16/bfloat16 input).
        running_mean, running_var : torch.Tensor or None
            Updated in place (``finalize``) with ``factor`` and the unbiased variance, after
            the synchronisation, and only when ``sync`` is None or
            ``sync.updates_running_stats``.
        eps : float
            Added to the variance (``"plus"``) or its floor (``"clamp"``).
        eps_mode : {"plus", "clamp"}
            See :func:`pysbn.set_sbn_eps_mode`.
        factor : float
            Running-stat update factor (momentum, or the cumulative-average factor).
        sync : Synchronizer or None
            Turns the local moments record into the global one; None: local statistics.

        Returns
        -------
        torch.Tensor
            ``y``, same shape, dtype and memory layout as ``x``.

        Raises
        ------
        ValueError
            One value per channel over the whole synchronised batch (as ``nn.BatchNorm``).
        """
        dev = x.device
        xv, g = F._view(x)
        n, c, l, _ = g
        pdt = weight.dtype if weight is not None else (
            bias.dtype if bias is not None else _param_default(x.dtype))
        stats = torch.empty(2 * c + 1, dtype=_STATS, device=dev)
        _run(dev, _core.cpu_moments, _core.cuda_moments, xv.data_ptr(), _DT[x.dtype], g,
             stats.data_ptr())
        if sync is not None:
            try:
                stats = sync.forward(stats)
            except BaseException as exc:
                sync.abort(exc)
                raise
            # Global count 1 implies a local count <= 1: only then read the global count
            # (no host synchronisation in the common case). A global count of 0 (every
            # member empty) is a zero-size batch, as for a lone layer.
            if n * l <= 1 and float(stats[0]) == 1.0:
                raise too_few_values(x.shape, agreed=True)
            update = sync.updates_running_stats
        else:
            if n * l == 1:
                raise too_few_values(x.shape)
            update = True
        rm = running_mean if update else None
        rv = running_var if update else None
        y = F._empty_in_layout(x, g[3])
        mean = torch.empty(c, dtype=_STATS, device=dev)
        invstd = torch.empty(c, dtype=_STATS, device=dev)
        _run(dev, _core.cpu_finalize, _core.cuda_finalize, c, stats.data_ptr(), eps,
             _EPS_MODES[eps_mode], mean.data_ptr(), invstd.data_ptr(), _ptr(rm), _ptr(rv),
             _DT[rm.dtype] if rm is not None else _DT[_STATS], factor, threaded=False)
        _run(dev, _core.cpu_normalize, _core.cuda_normalize, xv.data_ptr(), _DT[x.dtype], g,
             mean.data_ptr(), invstd.data_ptr(), _ptr(weight), _ptr(bias), _DT[pdt],
             y.data_ptr())
        ctx.param_dtype = pdt
        ctx.sync = sync
        ctx.clamped = None
        if eps_mode == "clamp":  # channels whose invstd is clamped (no host synchronisation)
            ctx.clamped = stats[1 + c:] < eps * stats[0]
        ctx.save_for_backward(x, weight, mean, invstd, stats[:1])
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        """Gradients of the batch norm with statistics of the synchronised batch.

        Local ``backward_reduce`` (sum_dy, sum_dy_xmu, grad_weight, grad_bias), one
        synchronisation of the sums, then ``backward_elemt`` for dx. If anything fails, the
        synchronizer is aborted (the other replicas waiting at this layer are released) and the
        error is re-raised.

        Parameters
        ----------
        ctx
            The autograd context of :meth:`forward`.
        dy : torch.Tensor
            Gradient of the output (any strides; copied to the input's layout if needed).

        Returns
        -------
        tuple
            ``(dx, grad_weight, grad_bias)`` (each None where not needed; grad_weight and
            grad_bias are this member's local sums) followed by None for the six other
            arguments of :meth:`forward`.
        """
        x, weight, mean, invstd, count = ctx.saved_tensors
        try:
            dx, gw, gb = _backward(ctx, dy, x, weight, mean, invstd, count, ctx.sync, False)
        except BaseException as exc:
            # Whatever failed (the reduction, an allocation, the sync), the other replicas
            # waiting at this layer's backward are released now rather than at the timeout.
            if ctx.sync is not None:
                ctx.sync.abort(exc)
            raise
        dx, gw, gb = _first_order_only(ctx, (dx, gw, gb), dy)
        return dx, gw, gb, None, None, None, None, None, None


class LocalBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm of a member with nothing to synchronise (eps mode "plus").

    ``forward(x, weight, bias, running_mean, running_var, num_batches_tracked, eps, factor)``:
    one ``fused_forward`` call computes the statistics, normalises ``x`` and, when given,
    updates the running statistics and adds 1 to ``num_batches_tracked``, those last, after
    every argument was checked: a failure leaves them as they were. One float64 buffer of
    4C+1 values holds the moments record (count, mean, M2), then mean and invstd; the backward
    reuses the record's mean and M2 slots for the grad sums (its count slot is the count).
    The Python here is kept to the minimum on purpose: small layers are bound by it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], num_batches_tracked: Optional[torch.Tensor],
                eps: float, factor: float) -> torch.Tensor:
        """Normalises ``x`` with its own batch statistics (see :class:`SyncBatchNormFunction`
        for the arguments; ``num_batches_tracked``, an int64 tensor of one value or None, is
        incremented in place)."""
        xv, g = F._view(x)
        c = g[1]
        if g[0] * g[2] == 1:
            raise too_few_values(x.shape)
        pdt = weight.dtype if weight is not None else (
            bias.dtype if bias is not None else _param_default(x.dtype))
        buf = torch.empty(4 * c + 1, dtype=_STATS, device=x.device)
        y = torch.empty_like(xv)  # xv is dense: same strides, so the same layout
        p = buf.data_ptr()
        args = (xv.data_ptr(), _DT[x.dtype], g, _ptr(weight), _ptr(bias), _DT[pdt], eps,
                _core.EPS_PLUS, p, p + 8 * (2 * c + 1), p + 8 * (3 * c + 1), _ptr(running_mean),
                _ptr(running_var),
                _DT[running_mean.dtype] if running_mean is not None else _DT[_STATS], factor,
                _ptr(num_batches_tracked), y.data_ptr())
        _run(x.device, _core.cpu_fused_forward, _core.cuda_fused_forward, *args)
        ctx.param_dtype = pdt
        ctx.geometry = g
        # The tensor the kernels read (x itself, or its dense copy, which the backward reuses),
        # and the statistics buffer (saved, not a ctx attribute, so saved-tensor hooks and
        # memory accounting see it).
        ctx.save_for_backward(xv, weight, buf)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        """``dx``, grad_weight, grad_bias in one ``fused_backward`` call.

        Returns
        -------
        tuple
            ``(dx, grad_weight, grad_bias)`` (each None where not needed) and five None.
        """
        xv, weight, buf = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g = ctx.geometry
        c = g[1]
        pdt = ctx.param_dtype
        dy = F._in_layout(dy, g[3])
        gw = torch.empty(c, dtype=pdt, device=xv.device) if need_w else None
        gb = torch.empty(c, dtype=pdt, device=xv.device) if need_b else None
        dx = torch.empty_like(xv) if need_x else None
        if need_x or need_w or need_b:
            p = buf.data_ptr()
            args = (dy.data_ptr(), xv.data_ptr(), _DT[xv.dtype], g, p + 8 * (2 * c + 1),
                    p + 8 * (3 * c + 1), _ptr(weight), _DT[pdt], p, p + 8, _ptr(gw), _ptr(gb),
                    _ptr(dx))
            _run(xv.device, _core.cpu_fused_backward, _core.cuda_fused_backward, *args)
        dx, gw, gb = _first_order_only(ctx, (dx, gw, gb), dy)
        return dx, gw, gb, None, None, None, None, None


class FixedStatsBatchNormFunction(torch.autograd.Function):
    """Batch norm with given statistics (eval mode): ``forward(x, weight, bias, mean, invstd)``
    with ``mean``/``invstd`` float64 of shape (C,)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], mean: torch.Tensor,
                invstd: torch.Tensor) -> torch.Tensor:
        """``y = (x - mean) * invstd * weight + bias`` with given statistics.

        Parameters
        ----------
        ctx
            The autograd context (saves x, weight, mean, invstd).
        x : torch.Tensor
            Input ``(N, C, *spatial)``, already checked by the module.
        weight, bias : torch.Tensor or None
            Affine parameters, shape ``(C,)``.
        mean, invstd : torch.Tensor
            float64, shape ``(C,)``.

        Returns
        -------
        torch.Tensor
            ``y``, same shape, dtype and memory layout as ``x``.
        """
        dev = x.device
        xv, g = F._view(x)
        pdt = weight.dtype if weight is not None else (
            bias.dtype if bias is not None else _param_default(x.dtype))
        y = F._empty_in_layout(x, g[3])
        _run(dev, _core.cpu_normalize, _core.cuda_normalize, xv.data_ptr(), _DT[x.dtype], g,
             mean.data_ptr(), invstd.data_ptr(), _ptr(weight), _ptr(bias), _DT[pdt],
             y.data_ptr())
        ctx.param_dtype = pdt
        ctx.save_for_backward(x, weight, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        """Gradients with the statistics held fixed: ``dx = dy * invstd * weight`` (weight 1
        when None), grad_weight and grad_bias from ``backward_reduce``; no synchronisation.

        Returns
        -------
        tuple
            ``(dx, grad_weight, grad_bias, None, None)`` (each None where not needed).
        """
        x, weight, mean, invstd = ctx.saved_tensors
        one = torch.ones(1, dtype=_STATS, device=x.device)
        dx, gw, gb = _backward(ctx, dy, x, weight, mean, invstd, one, None, True)
        dx, gw, gb = _first_order_only(ctx, (dx, gw, gb), dy)
        return dx, gw, gb, None, None
