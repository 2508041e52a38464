# SPDX-License-Identifier: MIT
"""The autograd Function of the synchronized layers' training mode, on the registered ops.

:class:`BatchNormFunction` is the one training path, whatever the synchronizer:

- forward: when the synchronizer has members to exchange with, ``pysbn::moments`` (local
  record) -> ``sync.forward`` (the global record) -> ``pysbn::batch_norm_forward`` with that
  record; otherwise (:data:`pysbn.sync.LOCAL`) ``pysbn::batch_norm_forward`` alone, which
  computes the statistics of its input in the same call. The op normalises (and applies the
  activation), then updates the running statistics and ``num_batches_tracked`` last, so a failed
  step changes nothing, and an update made before ``save_for_backward`` stays (as
  ``nn.BatchNorm``'s does when non-reentrant activation checkpointing stops a recomputation
  there);
- backward: ``pysbn::backward_reduce`` (local grad sums, grad_weight, grad_bias) ->
  ``sync.backward`` (global sums) -> ``pysbn::backward_elemt`` (dx); with nothing to exchange,
  ``pysbn::batch_norm_backward`` does both in one call.

Every step is a registered op or a traceable synchronizer (functional collectives under
``torch.compile``), so ``torch.compile(fullgraph=True)`` holds the whole synchronised step.
Saved for backward: the (dense) input, the parameters and the batch statistics
``[count, mean, m2, invstd]`` (3C+1 float64): the pre-activation is recomputed, never kept.

Double backward (``create_graph=True``) recomputes the layer with differentiable torch ops
(and differentiable collectives for a process group), so gradient penalties work as with
``nn.BatchNorm``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import ops
from .sync import Synchronizer

__all__ = ["BatchNormFunction", "apply_function", "too_few_values"]


def too_few_values(shape: Sequence[int], agreed: bool = False,
                   global_count: Optional[int] = None) -> ValueError:
    """The error ``nn.BatchNorm`` raises for one value per channel in training.

    Parameters
    ----------
    shape : sequence of int
        The input's shape, quoted in the message.
    agreed : bool
        True when the error was decided on the global count after the synchronisation, so
        every member of the group raises it by itself; the layer then does not abort the group
        (that would turn the other members' ValueError into a ``SyncAbortedError``).
    global_count : int, optional
        The number of values per channel over the synchronised batch, when it differs from
        this member's own.

    Returns
    -------
    ValueError
        The error (not raised), with the attribute ``_sbn_agreed`` set to ``agreed``.
    """
    msg = f"Expected more than 1 value per channel when training, got input size {torch.Size(shape)}"
    if global_count is not None:
        msg = (f"Expected more than 1 value per channel when training, got {global_count} value "
               f"per channel over the whole synchronised batch (this member's input size "
               f"{torch.Size(shape)})")
    exc = ValueError(msg)
    exc._sbn_agreed = agreed
    return exc


class BatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm (+ activation) with statistics synchronised by ``sync``.

    ``apply(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
    eps_mode, act, negative_slope, sync)`` returns ``(y, stats)``; ``stats`` (the batch
    statistics, float64 ``(3C+1,)``) is not differentiable. ``x`` must be dense
    (:func:`pysbn.ops.dense`); ``running_mean``/``running_var``/``num_batches_tracked`` are
    updated in place (pass None on a member that does not own them).
    """

    @staticmethod
    def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float,
                eps_mode: int, act: int, negative_slope: float,
                sync: Synchronizer) -> Tuple[Tensor, Tensor]:
        """Normalises ``x`` with the statistics of the synchronised batch.

        Raises
        ------
        ValueError
            One value per channel over the whole synchronised batch (as ``nn.BatchNorm``).
        """
        shape = x.shape
        local = shape[0] * (x.numel() // max(1, shape[0] * shape[1])) if shape[1] else 0
        record = None
        if sync.exchanges:
            try:
                record = sync.forward(ops.trusted.moments(x))
            except BaseException as exc:
                sync.abort(exc)
                raise
            # A global count of 1 needs a local count <= 1: only then read the count (no host
            # synchronisation in the common case). A global count of 0 (every member empty) is
            # a zero-size batch, as for a lone layer.
            if local <= 1 and float(record[0]) == 1.0:
                raise too_few_values(shape, agreed=True, global_count=None if local else 1)
        elif local == 1:
            raise too_few_values(shape)
        return ops.trusted.batch_norm_forward(x, weight, bias, record, eps, eps_mode, act,
                                      negative_slope, running_mean, running_var,
                                      num_batches_tracked, momentum)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, _rm, _rv, _nbt, _momentum, eps, eps_mode, act, slope, sync = inputs
        _y, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zeros for the statistics' (unused) gradient
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.eps, ctx.eps_mode, ctx.act, ctx.sync = eps, eps_mode, (act, slope), sync

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, running_mean, running_var, num_batches_tracked,
             momentum, eps, eps_mode, act, negative_slope, sync):
        """torch.func.vmap: each batch entry is its own batch norm, so the vmapped dim folds into
        the channels ((B, N, C, ...) -> (N, B*C, ...)), one call of the layer for all.
        As ``nn.BatchNorm`` under vmap, running statistics (updated in place) cannot be used;
        nor can a synchronizer (its exchange is one per call)."""
        if running_mean is not None or running_var is not None or num_batches_tracked is not None:
            raise RuntimeError(
                "Batch norm got a batched tensor as input while the running_mean or running_var, "
                "which will be updated in place, were not batched. If you are using a module and "
                "do not need eval mode, please set `track_running_stats` to be False (as "
                "torch.func requires for nn.BatchNorm)")
        if sync.exchanges:
            raise RuntimeError("pysbn: torch.func.vmap over a synchronised batch norm is not "
                               "supported (one exchange per call); vmap the layer where it has "
                               "nothing to synchronise")
        batch = info.batch_size
        x = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(batch, *x.shape)
        n, c, rest = x.shape[1], x.shape[2], x.shape[3:]
        xf = x.movedim(0, 1).reshape(n, batch * c, *rest)

        def per_channel(t, dim):
            if t is None:
                return None
            t = t.movedim(dim, 0) if dim is not None else t.expand(batch, c)
            return t.reshape(batch * c)

        y, stats = BatchNormFunction.apply(
            ops.dense(xf), per_channel(weight, in_dims[1]), per_channel(bias, in_dims[2]), None,
            None, None, momentum, eps, eps_mode, act, negative_slope, sync)
        y = y.reshape(n, batch, c, *rest).movedim(1, 0)
        parts = stats[1:].view(3, batch, c).movedim(1, 0).reshape(batch, 3 * c)
        stats = torch.cat((stats[:1].expand(batch, 1), parts), dim=1)
        return (y, stats), (0, 0)

    @staticmethod
    def backward(ctx, dy: Tensor, _dstats: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        """Gradients of the batch norm with statistics of the synchronised batch.

        Local ``backward_reduce`` (sum_dy, sum_dy_xmu, grad_weight, grad_bias), one
        synchronisation of the sums, then ``backward_elemt`` for dx. If anything fails, the
        synchronizer is aborted (the other replicas waiting at this layer are released) and the
        error is re-raised.

        Returns
        -------
        tuple
            ``(dx, grad_weight, grad_bias)`` (each None where not needed; grad_weight and
            grad_bias are this member's local sums), then None for the other nine arguments.
        """
        x, weight, bias, stats = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        sync = ctx.sync
        if dy is None:  # y did not reach the loss
            dy = torch.zeros_like(x)
        if torch.is_grad_enabled():  # create_graph=True: a differentiable recomputation
            dx, gw, gb = _differentiable_backward(ctx, dy, x, weight, bias)
        elif not sync.exchanges:
            dx, gw, gb = ops.trusted.batch_norm_backward(dy, x, stats, weight, bias, ctx.eps, ctx.eps_mode,
                                                 *ctx.act, [need_x, need_w, need_b])
        else:
            try:
                sums, gw, gb = ops.trusted.backward_reduce(dy, x, stats, weight, bias, *ctx.act)
                dx = None
                if need_x:
                    sums = sync.backward(sums)
                    dx = ops.trusted.backward_elemt(dy, x, stats, weight, bias, sums, ctx.eps,
                                            ctx.eps_mode, *ctx.act)
            except BaseException as exc:
                # Whatever failed (the reduction, an allocation, the sync), the other replicas
                # waiting at this layer's backward are released now rather than at the timeout.
                sync.abort(exc)
                raise
        return ((dx if need_x else None), (gw if need_w else None), (gb if need_b else None),
                None, None, None, None, None, None, None, None, None)


def apply_function(*args):
    """``BatchNormFunction.apply(*args)``, with all arguments positional.

    ``autograd.Function.apply`` binds the arguments to ``forward``'s signature with
    ``inspect.signature`` at every call when ``setup_context`` is defined (about 25 us: more than
    the kernels of a BN1d layer). With every argument given positionally there are no defaults
    to fill in, so outside torch.compile and torch.func transforms this goes straight to the
    base class's ``apply``, which runs the same forward, setup_context and backward.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return BatchNormFunction.apply(*args)
    return _BASE_APPLY(*args)


_BASE_APPLY = super(torch.autograd.Function, BatchNormFunction).apply


def _differentiable_backward(ctx, dy: Tensor, x: Tensor, weight: Optional[Tensor],
                             bias: Optional[Tensor]):
    """(dx, grad_weight, grad_bias) of the layer recomputed from x with differentiable torch
    ops (global statistics through differentiable collectives), for ``create_graph=True``."""
    from .sync import ProcessGroupSync

    sync = ctx.sync
    if sync.exchanges and not isinstance(sync, ProcessGroupSync):
        raise RuntimeError(
            "pysbn: double backward (create_graph=True) through a synchronized batch norm is "
            f"supported with a lone member or a process group, not with {type(sync).__name__} "
            "(DataParallel replicas); use DistributedDataParallel")
    act, slope = ctx.act
    inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(compute)
    dims = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    count = xc.new_tensor(float(xc.numel() // max(1, xc.shape[1])))
    s1 = xc.sum(dims)
    if sync.exchanges:
        from torch.distributed.nn.functional import all_reduce

        count = all_reduce(count, group=sync.group)
        s1 = all_reduce(s1, group=sync.group)
    mean = (s1 / count).view(shape)
    m2 = ((xc - mean) ** 2).sum(dims)
    if sync.exchanges:
        m2 = all_reduce(m2, group=sync.group)
    var = (m2 / count).view(shape)
    invstd = torch.rsqrt(var + ctx.eps if ctx.eps_mode == ops.EPS_MODES["plus"]
                         else var.clamp_min(ctx.eps))
    z = (xc - mean) * invstd
    if weight is not None:
        z = z * weight.to(compute).view(shape)
    if bias is not None:
        z = z + bias.to(compute).view(shape)
    y = _torch_act(z, act, slope)
    grads = torch.autograd.grad(y, inputs, dy.to(compute), create_graph=True, allow_unused=True)
    by_id = {id(t): g for t, g in zip(inputs, grads)}
    out = []
    for t in (x, weight, bias):
        g = by_id.get(id(t)) if t is not None else None
        out.append(None if g is None else g.to(t.dtype))
    return tuple(out)


def _torch_act(z: Tensor, act: int, slope: float) -> Tensor:
    """The activation ``act`` (an :data:`pysbn.ops.ACTIVATIONS` code) as torch ops."""
    F = torch.nn.functional
    codes = ops.ACTIVATIONS
    if act == codes["identity"]:
        return z
    if act == codes["relu"]:
        return F.relu(z)
    if act == codes["leaky_relu"]:
        return F.leaky_relu(z, slope)
    if act == codes["silu"]:
        return F.silu(z)
    if act == codes["gelu"]:
        return F.gelu(z)
    if act == codes["gelu_tanh"]:
        return F.gelu(z, approximate="tanh")
    return F.hardswish(z)
