# SPDX-License-Identifier: MIT
"""The synchronized batch-norm layers and the model conversion helpers."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional as F
from ._functions import (FixedStatsBatchNormFunction, LocalBatchNormFunction,
                         SyncBatchNormFunction)
from .sync import ProcessGroupSync, ReplicaGroup, ReplicaSync, Synchronizer

__all__ = [
    "SynchronizedBatchNorm1d",
    "SynchronizedBatchNorm2d",
    "SynchronizedBatchNorm3d",
    "ChannelMismatchError",
    "convert_model",
    "revert_model",
    "patch_sync_batchnorm",
    "set_sbn_eps_mode",
    "get_sbn_eps_mode",
]

_eps_mode = "plus"


def set_sbn_eps_mode(mode: str) -> None:
    """Sets how every synchronized layer applies ``eps`` (read at each call).

    Parameters
    ----------
    mode : {"plus", "clamp"}
        ``"plus"`` (default): ``invstd = 1 / sqrt(var + eps)``, as ``nn.BatchNorm``;
        ``"clamp"``: ``invstd = 1 / sqrt(max(var, eps))``, as the seed's SyncBN.
    """
    global _eps_mode
    if mode not in ("plus", "clamp"):
        raise ValueError(f"set_sbn_eps_mode: mode must be 'plus' or 'clamp', got {mode!r}")
    _eps_mode = mode


def get_sbn_eps_mode() -> str:
    """The eps mode in force (see :func:`set_sbn_eps_mode`)."""
    return _eps_mode


class ChannelMismatchError(ValueError, RuntimeError):
    """The input's channel count differs from ``num_features``.

    Both a ``ValueError`` (bad argument) and a ``RuntimeError`` (what ``nn.BatchNorm`` raises in
    that case), so code written for either keeps working.
    """


_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ABSENT = object()  # a parameter or buffer name missing from the module's dicts


class _SynchronizedBatchNorm(_BatchNorm):
    """Base of the synchronized layers (see :class:`SynchronizedBatchNorm2d`)."""

    _expected_dims: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Optional[object] = None,
                 device: Optional[Union[torch.device, str, int]] = None,
                 dtype: Optional[torch.dtype] = None, *, bias: bool = True) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int) \
                or num_features <= 0:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int, got "
                             f"{num_features!r}")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
            raise ValueError(f"{type(self).__name__}: eps must be a number >= 0, got {eps!r}")
        if momentum is not None and (isinstance(momentum, bool)
                                     or not isinstance(momentum, (int, float))):
            raise ValueError(f"{type(self).__name__}: momentum must be a number or None, got "
                             f"{momentum!r}")
        try:
            super().__init__(num_features, eps, momentum, affine, track_running_stats,
                             device=device, dtype=dtype, bias=bias)
        except TypeError:  # a torch without the bias keyword
            if not bias:
                raise
            super().__init__(num_features, eps, momentum, affine, track_running_stats,
                             device=device, dtype=dtype)
        self.process_group = process_group
        self._sbn_replica: Optional[ReplicaSync] = None
        self._sbn_name: Optional[str] = None
        self._sbn_calls = [0]

    # ---- checks ---------------------------------------------------------------------------------

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in self._expected_dims:
            want = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(f"{type(self).__name__}: expected {want} input (got "
                             f"{input.dim()}D input)")

    def _layer_name(self) -> str:
        return self._sbn_name or f"{type(self).__name__}({self.num_features})"

    def _check_tensors(self, x: torch.Tensor) -> None:
        # The common case costs a few attribute reads: this runs at every call, and small
        # layers are bound by per-call overhead. Anything unusual goes to _explain_tensors,
        # which raises the error that names the problem.
        if type(x) is torch.Tensor and x.layout is torch.strided \
                and x.dim() in self._expected_dims and x.dtype in _FLOATS \
                and x.shape[1] == self.num_features and x.device.type in F._RUNNABLE:
            params, bufs = self._parameters, self._buffers
            w, b = params.get("weight", _ABSENT), params.get("bias", _ABSENT)
            rm, rv = bufs.get("running_mean", _ABSENT), bufs.get("running_var", _ABSENT)
            shape = (self.num_features,)
            ok = True
            for t in (w, b, rm, rv):
                if t is not None and (t is _ABSENT or t.device != x.device or t.shape != shape
                                      or not t.is_contiguous()):
                    ok = False
                    break
            if ok:
                wd = w.dtype if w is not None else None
                bd = b.dtype if b is not None else None
                ok = ((wd is None or F._param_dtype_ok(x.dtype, wd))
                      and (bd is None or F._param_dtype_ok(x.dtype, bd))
                      and (wd is None or bd is None or wd == bd)
                      and (rm is None or rm.dtype in _FLOATS)
                      and (rv is None or (rv.dtype in _FLOATS
                                          and (rm is None or rv.dtype == rm.dtype))))
            if ok:
                return
        self._explain_tensors(x)

    def _explain_tensors(self, x: torch.Tensor) -> None:
        """Checks the input and the layer's tensors one by one; raises the first problem."""
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.layout != torch.strided:
            raise ValueError(f"{name}: input must be a dense (strided) tensor, got layout "
                             f"{x.layout}")
        self._check_input_dim(x)
        if x.dtype not in _FLOATS:
            raise TypeError(f"{name}: input has dtype {x.dtype}; expected float32, float64, "
                            "float16 or bfloat16")
        if x.shape[1] != self.num_features:
            raise ChannelMismatchError(
                f"{name}: input has {x.shape[1]} channels (dim 1 of shape {tuple(x.shape)}) but "
                f"the layer has num_features={self.num_features}")
        F._check_device(name, "input", x)
        ref = None
        for pname in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(self, pname)
            if t is None:
                continue
            if t.device != x.device:
                raise ValueError(f"{name}: {pname} is on {t.device} but input is on {x.device}; "
                                 "move the layer to the input's device (.to(device))")
            # The core reads (and, for the running stats, writes) C contiguous values.
            if t.shape != (self.num_features,) or not t.is_contiguous():
                what = (f"has shape {tuple(t.shape)}" if t.shape != (self.num_features,)
                        else f"is not contiguous (strides {t.stride()})")
                raise ValueError(f"{name}: {pname} {what}; expected a contiguous tensor of "
                                 f"shape ({self.num_features},)")
            if pname in ("weight", "bias"):
                if not F._param_dtype_ok(x.dtype, t.dtype):
                    raise TypeError(f"{name}: {pname} has dtype {t.dtype} but input has dtype "
                                    f"{x.dtype}; convert the layer (.to(dtype)) or the input "
                                    "(float32 parameters are accepted with float16/bfloat16 "
                                    "input)")
                if ref is not None and t.dtype != ref.dtype:
                    raise TypeError(f"{name}: bias has dtype {t.dtype} but weight has dtype "
                                    f"{ref.dtype}")
                ref = t
            elif t.dtype not in _FLOATS:
                raise TypeError(f"{name}: {pname} has dtype {t.dtype}; expected a float dtype")
            elif pname == "running_var" and self.running_mean is not None \
                    and t.dtype != self.running_mean.dtype:
                raise TypeError(f"{name}: running_var has dtype {t.dtype} but running_mean has "
                                f"dtype {self.running_mean.dtype}; they must match")

    # ---- synchronisation ------------------------------------------------------------------------

    def _synchronizer(self) -> Optional[Synchronizer]:
        rep = self._sbn_replica
        if rep is not None and rep.size > 1:
            return rep
        if rep is None and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            import torch.distributed as dist
            group = self.process_group if self.process_group is not None else dist.group.WORLD
            world = dist.get_world_size(group)
            if world < 0:
                raise ValueError(f"{self._layer_name()}: this rank (global rank "
                                 f"{dist.get_rank()}) is not a member of the layer's "
                                 "process_group")
            if world > 1:
                return ProcessGroupSync(group, world, self._layer_name(), self._sbn_calls)
        return None

    def __data_parallel_replicate__(self, ctx, copy_id: int) -> None:
        """Replication callback: wires the replicas of this layer (copy 0 is the master)."""
        if copy_id == 0 or getattr(ctx, "sbn_group", None) is None:
            ctx.sbn_group = ReplicaGroup(getattr(ctx, "name", None) or self._layer_name())
        group = ctx.sbn_group
        self._sbn_replica = ReplicaSync(group, group.register())

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Batch-normalises ``input``.

        In training mode the statistics are those of the whole synchronised batch (the
        DataParallel replicas of this layer, or the ranks of its process group; see the class
        notes), and the running statistics and ``num_batches_tracked`` are updated when
        ``track_running_stats``; in eval mode the running statistics are used (batch statistics
        when there are none) and nothing is communicated.

        Parameters
        ----------
        input : torch.Tensor
            ``(N, C)`` or ``(N, C, L)`` for the 1d layer, ``(N, C, H, W)`` for 2d,
            ``(N, C, D, H, W)`` for 3d; float32, float64, float16 or bfloat16, on the device
            of the layer.

        Returns
        -------
        torch.Tensor
            Same shape, dtype, device and memory format (contiguous or channels_last) as
            ``input``.

        Raises
        ------
        ValueError
            Wrong number of dims, a non-strided input, parameters or buffers on another device
            or of the wrong shape, only one value per channel in the whole training batch, or
            this rank outside the layer's process group.
        ChannelMismatchError
            The input's channel count differs from ``num_features``.
        TypeError
            Not a tensor, an unsupported input dtype, or parameters of a dtype that does not
            go with it.
        SyncAbortedError
            A DataParallel replica of this layer failed or timed out (see
            :func:`pysbn.set_sync_timeout`).
        RuntimeError
            A CUDA input with a build without CUDA, or (CPU tensors) ranks of the process
            group at different calls of the layer.

        Notes
        -----
        A failed step leaves the running statistics and ``num_batches_tracked`` as they were.
        A wired DataParallel replica that raises here releases the other replicas of the layer.
        """
        sync = self._sbn_replica if self.training else None
        try:
            return self._forward(input)
        except BaseException as exc:
            # An error every replica raises by itself (decided on the global count) must not
            # abort the group: the others would get a SyncAbortedError instead of it.
            if sync is not None and not getattr(exc, "_sbn_agreed", False):
                sync.abort(exc)
            raise

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_tensors(x)
        eps = float(self.eps)
        params, bufs = self._parameters, self._buffers
        weight, bias = params["weight"], params["bias"]
        rm, rv = bufs["running_mean"], bufs["running_var"]
        if not self.training and rm is not None and rv is not None:
            mean = rm.to(torch.float64)
            var = rv.to(torch.float64)
            var = var + eps if _eps_mode == "plus" else var.clamp_min(eps)
            return FixedStatsBatchNormFunction.apply(x, weight, bias, mean, var.rsqrt_())
        track = self.training and self.track_running_stats
        factor = 0.0
        nbt = bufs.get("num_batches_tracked") if track else None
        if track:
            if self.momentum is None:
                done = 0 if nbt is None else int(nbt)
                factor = 1.0 / (done + 1)
            else:
                factor = float(self.momentum)
        else:
            rm = rv = None
        sync = self._synchronizer() if self.training else None
        if sync is None and _eps_mode == "plus" and (
                nbt is None or (nbt.dtype == torch.int64 and nbt.device == x.device)):
            # Nothing to synchronise: one native call per direction, which also updates the
            # running stats and num_batches_tracked last (nothing changes if it fails).
            return LocalBatchNormFunction.apply(x, weight, bias, rm, rv, nbt, eps, factor)
        # Atomicity: the running stats are updated in place inside the Function (finalize,
        # after the sync); keep their old values (2C elements) so that a failure after that
        # point (in normalize, or anything later) leaves them exactly as they were.
        saved = None
        if rm is not None and rv is not None and (sync is None or sync.updates_running_stats):
            saved = torch.cat((rm, rv))
        try:
            y = SyncBatchNormFunction.apply(x, weight, bias, rm, rv, eps, _eps_mode, factor, sync)
        except BaseException:
            if saved is not None:
                with torch.no_grad():
                    rm.copy_(saved[:rm.numel()])
                    rv.copy_(saved[rm.numel():])
            raise
        if nbt is not None:
            nbt.add_(1)
        return y

    # ---- copies ---------------------------------------------------------------------------------

    def __getstate__(self):
        # A copy (deepcopy, pickle, torch.save) is a fresh, unwired layer: replica wiring is
        # per replication, and process groups belong to one process and do not pickle.
        state = self.__dict__.copy()
        state["_sbn_replica"] = None
        state["process_group"] = None
        return state

    def __setstate__(self, state) -> None:
        state.setdefault("_sbn_replica", None)
        state.setdefault("_sbn_name", None)
        state.setdefault("_sbn_calls", [0])
        state.setdefault("process_group", None)
        super().__setstate__(state)

    def __deepcopy__(self, memo):
        # Like the default deepcopy, but unwired, and sharing the process group (a handle to
        # this process's communicator, not data).
        import copy

        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        state = self.__dict__.copy()
        state["_sbn_replica"] = None
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        new.__setstate__(copy.deepcopy(state, memo))
        return new


class SynchronizedBatchNorm1d(_SynchronizedBatchNorm):
    r"""Batch norm over a 2-D or 3-D input, ``(N, C)`` or ``(N, C, L)``, with statistics
    synchronised across DataParallel replicas or a torch.distributed process group.

    Same constructor, state dict and behaviour as ``nn.BatchNorm1d`` (plus ``process_group``,
    as ``nn.SyncBatchNorm``); see :class:`SynchronizedBatchNorm2d`.
    """

    _expected_dims = (2, 3)


class SynchronizedBatchNorm2d(_SynchronizedBatchNorm):
    r"""Batch norm over a 4-D input ``(N, C, H, W)`` whose training statistics are those of the
    whole batch spread across DataParallel replicas or the ranks of a process group.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float
        Added to the variance (see :func:`set_sbn_eps_mode` for the seed's clamp mode).
    momentum : float or None
        Running-stat update factor; None for a cumulative average.
    affine : bool
        Learnable weight (and bias, see ``bias``).
    track_running_stats : bool
        Keep running mean/variance (used in eval mode); when False, batch statistics are used
        in eval mode too.
    process_group : torch.distributed.ProcessGroup, optional
        The group to synchronise over when torch.distributed is initialised; default the whole
        world. Not used under DataParallel, where the replicas of one process synchronise.
    device, dtype : optional
        Factory arguments of the parameters and buffers.
    bias : bool, keyword-only
        With ``affine``, whether to learn a bias.

    Notes
    -----
    In training mode the layer synchronises when (1) it is a wired DataParallel replica
    (:class:`pysbn.DataParallelWithCallback` or :func:`pysbn.patch_replication_callback`) with
    other replicas, or (2) torch.distributed is initialised and its group has more than one
    member. Otherwise, and always in eval mode, it never communicates. Statistics are merged
    exactly (Chan) in float64; one exchange per direction per call. Supports float32, float64,
    float16 and bfloat16 inputs (parameters float32 or the input dtype), contiguous and
    channels_last memory formats (other strides are copied).
    """

    _expected_dims = (4,)


class SynchronizedBatchNorm3d(_SynchronizedBatchNorm):
    r"""Batch norm over a 5-D input ``(N, C, D, H, W)`` with synchronised statistics; see
    :class:`SynchronizedBatchNorm2d`."""

    _expected_dims = (5,)


_PAIRS = (
    (nn.BatchNorm1d, SynchronizedBatchNorm1d),
    (nn.BatchNorm2d, SynchronizedBatchNorm2d),
    (nn.BatchNorm3d, SynchronizedBatchNorm3d),
)


def _transplant(src: _BatchNorm, dst: _BatchNorm) -> _BatchNorm:
    """Moves parameters, buffers (the same tensor objects) and the training flag."""
    with torch.no_grad():
        dst.weight = src.weight
        dst.bias = src.bias
        dst.running_mean = src.running_mean
        dst.running_var = src.running_var
        dst.num_batches_tracked = src.num_batches_tracked
    dst.training = src.training
    return dst


def _data_parallel_args(dp: nn.DataParallel) -> dict:
    """The constructor arguments of an ``nn.DataParallel``. Without a GPU, torch's constructor
    returns early: ``device_ids`` is ``[]`` and ``output_device``/``dim`` are never set (a new
    one made on such a machine is again a plain wrapper, whatever the arguments)."""
    if not dp.device_ids:
        return {}
    return {"device_ids": list(dp.device_ids),
            "output_device": getattr(dp, "output_device", None), "dim": getattr(dp, "dim", 0)}


def convert_model(module: nn.Module, process_group: Optional[object] = None) -> nn.Module:
    """Replaces ``nn.BatchNorm1d/2d/3d`` layers by the synchronized ones.

    Parameters
    ----------
    module : nn.Module
        A model (or one layer). An ``nn.DataParallel`` becomes a
        :class:`pysbn.DataParallelWithCallback` with the same ``device_ids``,
        ``output_device`` and ``dim``.
    process_group : torch.distributed.ProcessGroup, optional
        Given to every new layer.

    Returns
    -------
    nn.Module
        The converted model: the module itself with its BatchNorm children replaced, or a new
        layer when ``module`` is itself a BatchNorm. Parameters and buffers are the same
        tensor objects (an optimizer built before keeps working); ``requires_grad``, training
        flag, device and dtype are kept.
    """
    from .replicate import DataParallelWithCallback

    if isinstance(module, nn.DataParallel) and not isinstance(module, DataParallelWithCallback):
        inner = convert_model(module.module, process_group)
        return DataParallelWithCallback(inner, **_data_parallel_args(module))
    return _convert(module, process_group, "")


def _convert(module: nn.Module, process_group, prefix: str) -> nn.Module:
    out = module
    if not isinstance(module, _SynchronizedBatchNorm):
        for plain, sync in _PAIRS:
            if isinstance(module, plain):
                out = sync(module.num_features, module.eps, module.momentum, module.affine,
                           module.track_running_stats, process_group, device="meta")
                out = _transplant(module, out)
                out._sbn_name = prefix or None
                break
    for name, child in list(module.named_children()):
        new = _convert(child, process_group, f"{prefix}.{name}" if prefix else name)
        if new is not child:
            setattr(out, name, new)
    return out


def revert_model(module: nn.Module) -> nn.Module:
    """Turns synchronized layers back into ``nn.BatchNorm1d/2d/3d`` (e.g. before export).

    Parameters and buffers are the same tensor objects; a
    :class:`pysbn.DataParallelWithCallback` becomes an ``nn.DataParallel``.
    """
    from .replicate import DataParallelWithCallback

    if isinstance(module, DataParallelWithCallback):
        return nn.DataParallel(revert_model(module.module), **_data_parallel_args(module))
    out = module
    for plain, sync in _PAIRS:
        if isinstance(module, sync):
            out = plain(module.num_features, module.eps, module.momentum, module.affine,
                        module.track_running_stats, device="meta")
            out = _transplant(module, out)
            break
    for name, child in list(module.named_children()):
        new = revert_model(child)
        if new is not child:
            setattr(out, name, new)
    return out


@contextlib.contextmanager
def patch_sync_batchnorm() -> Iterator[None]:
    """Within the block, ``torch.nn.BatchNorm1d/2d/3d`` are the synchronized classes (as the
    seed's context manager): models built inside get synchronized layers."""
    saved = nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d = (
        SynchronizedBatchNorm1d, SynchronizedBatchNorm2d, SynchronizedBatchNorm3d)
    try:
        yield
    finally:
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d = saved
