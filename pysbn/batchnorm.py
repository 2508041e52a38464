# SPDX-License-Identifier: MIT
"""The synchronized batch-norm layers and the model conversion helpers.

The layers own the policy (argument checks, momentum and ``num_batches_tracked``, eval mode,
which synchronizer, conversion); :class:`pysbn._functions.BatchNormFunction` owns the mechanism
(statistics, sync, normalise; reduce, sync, elementwise) on the ops of :mod:`pysbn.ops`.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import warnings
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as TF
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import ops
from ._functions import BatchNormFunction, apply_function
from .sync import LOCAL, LayerIdentity, ReplicaGroup, ReplicaSync, synchronizer_for

__all__ = [
    "SynchronizedBatchNorm",
    "SynchronizedBatchNorm1d",
    "SynchronizedBatchNorm2d",
    "SynchronizedBatchNorm3d",
    "SynchronizedBatchNormAct2d",
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
    if mode not in ops.EPS_MODES:
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
_IDENTITY = (ops.ACTIVATIONS["identity"], 0.01)
_ORDINAL = itertools.count()  # unnamed layers are named by creation order (alike on every rank)


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
            _BatchNorm.__init__(self, num_features, eps, momentum, affine, track_running_stats,
                                device=device, dtype=dtype, bias=bias)
        except TypeError:  # a torch without the bias keyword
            if not bias:
                raise
            _BatchNorm.__init__(self, num_features, eps, momentum, affine, track_running_stats,
                                device=device, dtype=dtype)
        _sbn_init(self, process_group, None)

    # ---- names ----------------------------------------------------------------------------------

    def _layer_name(self) -> str:
        return self._sbn_identity.name

    def _sbn_set_name(self, name: Optional[str]) -> None:
        """Names the layer (its qualified name in the model) for headers and messages."""
        self._sbn_identity = LayerIdentity(name or f"{type(self).__name__}#{next(_ORDINAL)}")

    # ---- checks ---------------------------------------------------------------------------------

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in self._expected_dims:
            want = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(f"{type(self).__name__}: expected {want} input (got "
                             f"{input.dim()}D input)")

    def _check_tensors(self, x: torch.Tensor) -> None:
        # The common case costs a few attribute reads: this runs at every call, and small
        # layers are bound by per-call overhead. Anything unusual goes to _explain_tensors,
        # which raises the error that names the problem. (torch.jit.trace: sizes are traced
        # values there, so their comparisons would be baked into the trace with a warning;
        # torch's own op checks the shapes.)
        if torch.jit.is_tracing():
            return
        if type(x) is torch.Tensor and x.layout is torch.strided \
                and x.dim() in self._expected_dims and x.dtype in _FLOATS:
            c, dev, xdt = self.num_features, x.device, x.dtype
            params, bufs = self._parameters, self._buffers
            w, b = params.get("weight", _ABSENT), params.get("bias", _ABSENT)
            rm, rv = bufs.get("running_mean", _ABSENT), bufs.get("running_var", _ABSENT)
            if x.shape[1] == c and dev.type in ops._RUNNABLE \
                    and (w is None or (w is not _ABSENT and w.device == dev
                                       and w.shape == (c,) and ops._param_ok(xdt, w.dtype))) \
                    and (b is None or (b is not _ABSENT and b.device == dev and b.shape == (c,)
                                       and ops._param_ok(xdt, b.dtype)
                                       and (w is None or b.dtype == w.dtype))) \
                    and (rm is None or (rm is not _ABSENT and rm.device == dev
                                        and rm.shape == (c,) and rm.dtype in _FLOATS)) \
                    and (rv is None or (rv is not _ABSENT and rv.device == dev
                                        and rv.shape == (c,) and rv.dtype in _FLOATS
                                        and (rm is None or rv.dtype == rm.dtype))):
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
        ops._check_device(name, "input", x)
        ref = None
        for pname in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(self, pname)
            if t is None:
                continue
            if t.device != x.device:
                raise ValueError(f"{name}: {pname} is on {t.device} but input is on {x.device}; "
                                 "move the layer to the input's device (.to(device))")
            if t.shape != (self.num_features,):
                raise ValueError(f"{name}: {pname} has shape {tuple(t.shape)}; expected a tensor "
                                 f"of shape ({self.num_features},)")
            if pname in ("weight", "bias"):
                if not ops._param_ok(x.dtype, t.dtype):
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
        when there are none), through torch's own batch-norm op, and nothing is communicated.

        Parameters
        ----------
        input : torch.Tensor
            ``(N, C)`` or ``(N, C, L)`` for the 1d layer, ``(N, C, H, W)`` for 2d,
            ``(N, C, D, H, W)`` for 3d; float32, float64, float16 or bfloat16, on the device
            of the layer.

        Returns
        -------
        torch.Tensor
            Same shape, dtype and device as ``input``; channels_last in, channels_last out,
            contiguous otherwise (as ``nn.BatchNorm``).

        Raises
        ------
        ValueError
            Wrong number of dims, a non-strided input, parameters or buffers on another device
            or of the wrong shape, eps <= 0 in training, only one value per channel in the
            whole training batch, or this rank outside the layer's process group.
        ChannelMismatchError
            The input's channel count differs from ``num_features``.
        TypeError
            Not a tensor, an unsupported input dtype, or parameters of a dtype that does not
            go with it.
        SyncAbortedError
            A DataParallel replica of this layer failed or timed out (see
            :func:`pysbn.set_sync_timeout`).
        RuntimeError
            A CUDA input with a build without CUDA; ranks of the process group at different
            calls or layers, or a failed collective (see docs/usage.md for what is checked).

        Notes
        -----
        A failed step leaves the running statistics and ``num_batches_tracked`` as they were.
        A wired DataParallel replica that raises here releases the other replicas of the layer.
        """
        return self._sbn_forward(input, _IDENTITY)

    def _sbn_forward(self, x: torch.Tensor, act) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x)
        replica = self._sbn_replica if self.training else None
        if replica is None:
            return self._forward(x, act)
        try:
            return self._forward(x, act)
        except BaseException as exc:
            # An error every replica raises by itself (decided on the global count) must not
            # abort the group: the others would get a SyncAbortedError instead of it.
            if not getattr(exc, "_sbn_agreed", False):
                replica.abort(exc)
            raise

    def _forward(self, x: torch.Tensor, act) -> torch.Tensor:
        self._check_tensors(x)
        eps = float(self.eps)
        params, bufs = self._parameters, self._buffers
        weight, bias = params["weight"], params["bias"]
        rm, rv = bufs["running_mean"], bufs["running_var"]
        mode = _eps_mode
        if not self.training:
            if rm is not None and rv is not None:
                return self._eval(x, weight, bias, rm, rv, eps, mode, act)
            if mode == "plus":  # batch statistics, through torch's own op
                return _torch_act(TF.batch_norm(x, None, None, weight, bias, True, 0.0, eps), act)
        elif not eps > 0.0:
            raise ValueError(f"{type(self).__name__}: batch_norm eps must be positive during "
                             f"training, but got {eps}")
        sync = synchronizer_for(self, x) if self.training else LOCAL
        track = self.training and self.track_running_stats
        if track and sync.updates_running_stats:
            nbt = bufs.get("num_batches_tracked")
            momentum = self.momentum
            if momentum is None and nbt is None:  # as nn.BatchNorm: a factor of 0
                momentum = 0.0
        else:
            rm = rv = nbt = None
            momentum = 0.0
        if momentum is not None:
            momentum = float(momentum)
        args = (ops.dense(x), weight, bias, rm, rv, nbt, momentum, eps, ops.EPS_MODES[mode],
                act[0], act[1], sync)
        if not sync.traceable:
            return _apply_eagerly(*args)
        return apply_function(*args)[0]

    def _eval(self, x, weight, bias, rm, rv, eps, mode, act):
        """Eval mode with running statistics: torch's own batch-norm op, so torch.export, ONNX
        and conv-BN folding see a standard layer (the clamp eps mode as max(var, eps) + 0)."""
        pdt = ops.param_dtype(x.dtype, weight, bias)
        if rm.dtype != pdt and not (rm.dtype == torch.float32 and x.dtype in (
                torch.float16, torch.bfloat16)):
            rm, rv = rm.to(pdt), rv.to(pdt)
        if mode == "clamp":
            rv, eps = rv.clamp_min(eps), 0.0
        return _torch_act(TF.batch_norm(x, rm, rv, weight, bias, False, 0.0, eps), act)

    # ---- export, copies -------------------------------------------------------------------------

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} '{self._layer_name()}' cannot be compiled by torch.jit.script "
            "(deprecated upstream): turn the model back into nn.BatchNorm layers with "
            "pysbn.revert_model(model) first, or use torch.export / torch.jit.trace in eval mode")

    def __getstate__(self):
        # A copy (deepcopy, pickle, torch.save) is a fresh, unwired layer: replica wiring is
        # per replication, and process groups belong to one process and do not pickle.
        state = self.__dict__.copy()
        state["_sbn_replica"] = None
        state["process_group"] = None
        return state

    def __setstate__(self, state) -> None:
        state.setdefault("_sbn_replica", None)
        state.setdefault("process_group", None)
        state.setdefault("_sbn_origin", None)
        if "_sbn_identity" not in state:
            state["_sbn_identity"] = LayerIdentity(state.pop("_sbn_name", None)
                                                   or f"{type(self).__name__}#{next(_ORDINAL)}")
        state.pop("_sbn_calls", None)
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


def _sbn_init(module: nn.Module, process_group, name: Optional[str]) -> None:
    """The attributes a synchronized layer has beyond those of nn.BatchNorm."""
    module.process_group = process_group
    module._sbn_replica = None
    module._sbn_origin = None  # the class convert_model replaced (revert_model restores it)
    module._sbn_identity = LayerIdentity(name or f"{type(module).__name__}#{next(_ORDINAL)}")


def _fx_leaf(layer: nn.Module, x: "torch.fx.Proxy") -> "torch.fx.Proxy":
    """torch.fx symbolic tracing (torchvision's feature extraction, timm's FX features...): the
    layer is one call_module node, as torch's own batch norms are, so the traced module still
    runs the synchronized layer (not a plain batch norm in its place)."""
    tracer = x.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(layer), (x,), {})


@torch.compiler.disable
def _apply_eagerly(*args):
    # A synchronizer that torch.compile cannot trace (DataParallel's threads): this call runs
    # eagerly (a graph break), with the same Function.
    return apply_function(*args)[0]


def _torch_act(y: torch.Tensor, act) -> torch.Tensor:
    if act[0] == _IDENTITY[0]:
        return y
    from ._functions import _torch_act as fn

    return fn(y, *act)


class SynchronizedBatchNorm1d(_SynchronizedBatchNorm, nn.BatchNorm1d):
    r"""Batch norm over a 2-D or 3-D input, ``(N, C)`` or ``(N, C, L)``, with statistics
    synchronised across DataParallel replicas or a torch.distributed process group.

    Same constructor, state dict and behaviour as ``nn.BatchNorm1d`` (plus ``process_group``,
    as ``nn.SyncBatchNorm``), and a subclass of it; see :class:`SynchronizedBatchNorm2d`.
    """

    _expected_dims = (2, 3)


class SynchronizedBatchNorm2d(_SynchronizedBatchNorm, nn.BatchNorm2d):
    r"""Batch norm over a 4-D input ``(N, C, H, W)`` whose training statistics are those of the
    whole batch spread across DataParallel replicas or the ranks of a process group.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    A subclass of ``nn.BatchNorm2d`` (``isinstance(layer, nn.BatchNorm2d)`` holds, so code
    that treats batch norms by class, e.g. to exclude them from weight decay, keeps working).

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float
        Added to the variance (see :func:`set_sbn_eps_mode` for the seed's clamp mode); must
        be positive in training, as for ``nn.BatchNorm2d``.
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
    member. Otherwise, and always in eval mode, it never communicates; eval mode computes
    through torch's own batch-norm op. Statistics are merged exactly (Chan) in float64; one
    exchange per direction per call. Supports float32, float64, float16 and bfloat16 inputs
    (parameters float32 or the input dtype), contiguous and channels_last memory formats
    (other strides are copied). Works under ``torch.compile(fullgraph=True)``, and an eval-mode
    model exports with ``torch.export`` to standard ops (see docs/usage.md).
    """

    _expected_dims = (4,)


class SynchronizedBatchNorm3d(_SynchronizedBatchNorm, nn.BatchNorm3d):
    r"""Batch norm over a 5-D input ``(N, C, D, H, W)`` with synchronised statistics; see
    :class:`SynchronizedBatchNorm2d`. A subclass of ``nn.BatchNorm3d``."""

    _expected_dims = (5,)


class SynchronizedBatchNorm(_SynchronizedBatchNorm):
    r"""Batch norm over an input of 2 to 5 dims ``(N, C, *spatial)`` with synchronised
    statistics, as ``nn.SyncBatchNorm`` (which it replaces in :func:`convert_model`, where the
    input's rank is unknown); see :class:`SynchronizedBatchNorm2d`."""

    _expected_dims = (2, 3, 4, 5)


# ---- batch norm + activation ---------------------------------------------------------------------

def _act_from_name(name: str) -> type:
    """An activation class from its timm name (timm's own table when timm is installed)."""
    key = name.lower()
    table = {"relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU,
             "swish": nn.SiLU, "gelu": nn.GELU, "hard_swish": nn.Hardswish,
             "hardswish": nn.Hardswish, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "elu": nn.ELU,
             "mish": nn.Mish, "hard_sigmoid": nn.Hardsigmoid, "identity": nn.Identity}
    try:
        from timm.layers import get_act_layer
    except Exception:  # timm absent (or not importable): the table above
        get_act_layer = None
    if get_act_layer is not None:
        try:
            return get_act_layer(name)
        except (KeyError, ValueError) as exc:  # timm's lookup raises KeyError
            raise ValueError(f"SynchronizedBatchNormAct2d: unknown act_layer {name!r} (not a "
                             "timm activation name); give a class (e.g. nn.SiLU) or a name "
                             "timm knows") from exc
    if key == "gelu_tanh":
        return lambda inplace=False: nn.GELU(approximate="tanh")  # type: ignore[return-value]
    if key not in table:
        raise ValueError(f"SynchronizedBatchNormAct2d: unknown act_layer {name!r}; give a "
                         f"class (e.g. nn.SiLU) or one of {sorted(table) + ['gelu_tanh']}")
    return table[key]


def _create_act(act_layer, act_kwargs, inplace, apply_act) -> nn.Module:
    """timm's ``_create_act``: the activation module of a norm-act layer."""
    if not apply_act or act_layer is None:
        return nn.Identity()
    if isinstance(act_layer, str):
        if not act_layer:
            return nn.Identity()
        act_layer = _act_from_name(act_layer)
        if act_layer is None:
            return nn.Identity()
    kwargs = dict(act_kwargs or {})
    kwargs.setdefault("inplace", inplace)
    try:
        return act_layer(**kwargs)
    except TypeError:
        kwargs.pop("inplace", None)  # activations without an inplace argument (nn.GELU...)
        return act_layer(**kwargs)


def _fused_act(act: nn.Module):
    """(code, negative_slope) when the native kernels compute ``act``, else None."""
    codes = ops.ACTIVATIONS
    t = type(act)
    if t is nn.Identity:
        return (codes["identity"], 0.01)
    if t is nn.ReLU:
        return (codes["relu"], 0.01)
    if t is nn.LeakyReLU:
        return (codes["leaky_relu"], float(act.negative_slope))
    if t is nn.SiLU:
        return (codes["silu"], 0.01)
    if t is nn.Hardswish:
        return (codes["hardswish"], 0.01)
    if t is nn.GELU:
        return (codes["gelu" if act.approximate == "none" else "gelu_tanh"], 0.01)
    name = (t.__module__, t.__name__)
    if name[0].startswith("timm."):  # timm's own modules of the same functions
        if name[1] in ("GELU",):
            return (codes["gelu"], 0.01)
        if name[1] in ("GELUTanh",):
            return (codes["gelu_tanh"], 0.01)
        if name[1] in ("Swish", "SiLU"):
            return (codes["silu"], 0.01)
        if name[1] in ("HardSwish",):
            return (codes["hardswish"], 0.01)
    return None


class SynchronizedBatchNormAct2d(SynchronizedBatchNorm2d):
    r"""Synchronized batch norm followed by an activation: timm's ``BatchNormAct2d``
    (efficientnet, mobilenetv3, regnet, ...), with the activation fused where the native core
    computes it.

    Same constructor, sub-modules (``drop``, ``act``), state dict and results as
    ``timm.layers.BatchNormAct2d``, plus ``process_group``. With a fused activation (ReLU,
    LeakyReLU, SiLU, GELU, Hardswish, identity) and no drop layer, training computes
    ``act(bn(x))`` in the normalize pass and the backward recomputes the pre-activation from
    the saved input and statistics, so the layer keeps one tensor alive for the backward where
    batch norm then activation keep two. Any other activation or drop layer is applied after
    the synchronized batch norm, as timm does. Eval mode is torch's batch norm then the act
    module, so export sees standard ops.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, device, dtype
        As :class:`SynchronizedBatchNorm2d`.
    apply_act : bool
        Whether to apply the activation (else identity).
    act_layer : type or str
        The activation class (e.g. ``nn.SiLU``) or its timm name (``"relu"``, ``"silu"``,
        ``"gelu"``, ``"hard_swish"``, ...).
    act_kwargs : dict, optional
        Keyword arguments of the activation.
    inplace : bool
        Passed to the activation (where it takes it).
    drop_layer : type, optional
        A drop module class (e.g. timm's DropBlock2d), applied between norm and activation.
    process_group : torch.distributed.ProcessGroup, optional, keyword-only
        As :class:`SynchronizedBatchNorm2d`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, apply_act: bool = True,
                 act_layer=nn.ReLU, act_kwargs: Optional[dict] = None, inplace: bool = True,
                 drop_layer: Optional[type] = None,
                 device: Optional[Union[torch.device, str, int]] = None,
                 dtype: Optional[torch.dtype] = None, *,
                 process_group: Optional[object] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group,
                         device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _create_act(act_layer, act_kwargs, inplace, apply_act)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``act(drop(batch_norm(input)))`` (see the class notes); arguments, results and errors
        as :meth:`SynchronizedBatchNorm2d.forward`."""
        if isinstance(input, torch.fx.Proxy):
            return _fx_leaf(self, input)
        fused = _fused_act(self.act) if type(self.drop) is nn.Identity else None
        if fused is not None:
            if self.training:
                return self._sbn_forward(input, fused)
            return self.act(self._sbn_forward(input, _IDENTITY))
        return self.act(self.drop(self._sbn_forward(input, _IDENTITY)))


# ---- conversion ----------------------------------------------------------------------------------

_PAIRS = (
    (nn.BatchNorm1d, SynchronizedBatchNorm1d),
    (nn.BatchNorm2d, SynchronizedBatchNorm2d),
    (nn.BatchNorm3d, SynchronizedBatchNorm3d),
)


def _timm_batchnorm_act():
    """timm's BatchNormAct2d class when timm is loaded (its layers can only exist then)."""
    mod = sys.modules.get("timm.layers.norm_act")
    return getattr(mod, "BatchNormAct2d", None) if mod is not None else None


def _transplant(src: _BatchNorm, dst: _BatchNorm) -> _BatchNorm:
    """Moves parameters, buffers (the same tensor objects), sub-modules and the training
    flag."""
    with torch.no_grad():
        dst.weight = src.weight
        dst.bias = src.bias
        dst.running_mean = src.running_mean
        dst.running_var = src.running_var
        dst.num_batches_tracked = src.num_batches_tracked
    for name, child in src.named_children():
        setattr(dst, name, child)
    dst.training = src.training
    return dst


def _rebuild(cls: type, src: _BatchNorm, **kwargs) -> _BatchNorm:
    """A ``cls`` layer with src's settings, parameters, buffers and sub-modules (made on the
    meta device, so nothing is allocated for the tensors it then takes over)."""
    dst = cls(src.num_features, src.eps, src.momentum, src.affine, src.track_running_stats,
              device="meta", **kwargs)
    return _transplant(src, dst)


def _own_forward(cls: type) -> bool:
    """Whether a _BatchNorm subclass computes something of its own (overrides forward)."""
    return cls.forward is not _BatchNorm.forward


def _data_parallel_args(dp: nn.DataParallel) -> dict:
    """The constructor arguments of an ``nn.DataParallel``. Without a GPU, torch's constructor
    returns early: ``device_ids`` is ``[]`` and ``output_device``/``dim`` are never set (a new
    one made on such a machine is again a plain wrapper, whatever the arguments)."""
    if not dp.device_ids:
        return {}
    return {"device_ids": list(dp.device_ids),
            "output_device": getattr(dp, "output_device", None), "dim": getattr(dp, "dim", 0)}


def convert_model(module: nn.Module, process_group: Optional[object] = None) -> nn.Module:
    """Replaces the batch norms of a model by synchronized ones, never changing what it computes.

    - ``nn.BatchNorm1d/2d/3d`` (and subclasses that keep nn.BatchNorm's forward) become
      :class:`SynchronizedBatchNorm1d/2d/3d`;
    - ``nn.SyncBatchNorm`` (e.g. from ``nn.SyncBatchNorm.convert_sync_batchnorm``) becomes
      :class:`SynchronizedBatchNorm` (any input rank, as it);
    - timm's ``BatchNormAct2d`` becomes :class:`SynchronizedBatchNormAct2d` (same activation and
      drop layer);
    - an uninitialised ``nn.LazyBatchNorm*d`` becomes the synchronized layer when its first
      forward materialises it;
    - any other ``_BatchNorm`` subclass with a forward of its own stays as it is, with a
      warning that names it (converting it would drop what its forward does);
    - an ``nn.DataParallel`` becomes a :class:`pysbn.DataParallelWithCallback` with the same
      ``device_ids``, ``output_device`` and ``dim``.

    Parameters
    ----------
    module : nn.Module
        A model (or one layer).
    process_group : torch.distributed.ProcessGroup, optional
        Given to every new layer.

    Returns
    -------
    nn.Module
        The converted model: the module itself with its batch norms replaced, or a new layer
        when ``module`` is itself a batch norm. Parameters and buffers are the same tensor
        objects (an optimizer built before keeps working); ``requires_grad``, training flag,
        device and dtype are kept; :func:`revert_model` gives the original classes back.
    """
    from .replicate import DataParallelWithCallback

    if isinstance(module, nn.DataParallel) and not isinstance(module, DataParallelWithCallback):
        inner = convert_model(module.module, process_group)
        return DataParallelWithCallback(inner, **_data_parallel_args(module))
    return _convert(module, process_group, "")


def _sync_class(module: nn.Module):
    """The synchronized class that replaces ``module``, None to keep it, or "warn"."""
    if isinstance(module, _SynchronizedBatchNorm) or not isinstance(module, _BatchNorm):
        return None
    cls = type(module)
    timm_bn_act = _timm_batchnorm_act()
    if timm_bn_act is not None and cls is timm_bn_act:
        return SynchronizedBatchNormAct2d
    if cls is nn.SyncBatchNorm:
        return SynchronizedBatchNorm
    for plain, sync in _PAIRS:
        if isinstance(module, plain) and not _own_forward(cls):
            return sync
    return "warn"


def _convert(module: nn.Module, process_group, prefix: str) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and isinstance(module, _BatchNorm):
        if module.has_uninitialized_params():
            _convert_lazy(module, process_group, prefix)
            return module
    target = _sync_class(module)
    if target == "warn":
        warnings.warn(f"pysbn.convert_model: '{prefix or type(module).__name__}' "
                      f"({type(module).__module__}.{type(module).__qualname__}) is a _BatchNorm "
                      "subclass with a forward of its own; it is left as it is (not "
                      "synchronised), since replacing it would change what it computes",
                      UserWarning, stacklevel=3)
    elif target is not None:
        extra = {"apply_act": False} if target is SynchronizedBatchNormAct2d else {}
        out = _rebuild(target, module, process_group=process_group, **extra)
        out._sbn_set_name(prefix or None)
        out._sbn_origin = type(module)
        if target is SynchronizedBatchNormAct2d:
            return out  # its act and drop are timm's modules, moved as they are
    for name, child in list(module.named_children()):
        new = _convert(child, process_group, f"{prefix}.{name}" if prefix else name)
        if new is not child:
            setattr(out, name, new)
    return out


def _convert_lazy(module: nn.Module, process_group, prefix: str) -> None:
    """An uninitialised lazy batch norm: its first forward turns it into the synchronized
    class (LazyModuleMixin switches to ``cls_to_become`` once the shapes are known)."""
    for plain, sync in _PAIRS:
        if module.cls_to_become is plain:
            _sbn_init(module, process_group, prefix or None)
            module._sbn_origin = plain
            module.cls_to_become = sync
            return


def _origin_of(module: "_SynchronizedBatchNorm"):
    """The class :func:`revert_model` gives a synchronized layer: the one it replaced, or the
    plain class of a layer built directly (None when there is none: timm absent)."""
    if module._sbn_origin is not None:
        return module._sbn_origin
    if isinstance(module, SynchronizedBatchNormAct2d):
        with contextlib.suppress(Exception):
            from timm.layers import BatchNormAct2d

            return BatchNormAct2d
        return None
    if isinstance(module, SynchronizedBatchNorm):
        return nn.SyncBatchNorm
    return next(plain for plain, sync in _PAIRS if isinstance(module, sync))


def revert_model(module: nn.Module) -> nn.Module:
    """Turns synchronized layers back into the classes :func:`convert_model` replaced
    (``nn.BatchNorm1d/2d/3d`` for layers built directly; timm's ``BatchNormAct2d`` for
    :class:`SynchronizedBatchNormAct2d`), e.g. before ``torch.jit.script``.

    Like :func:`convert_model`, it returns the module itself with its layers replaced in place
    (a new layer when ``module`` is itself a synchronized layer). Parameters and buffers are the
    same tensor objects, sub-modules (activation, drop) the same modules; a
    :class:`pysbn.DataParallelWithCallback` becomes an ``nn.DataParallel``.
    """
    from .replicate import DataParallelWithCallback

    if isinstance(module, DataParallelWithCallback):
        return nn.DataParallel(revert_model(module.module), **_data_parallel_args(module))
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and \
            getattr(module, "_sbn_origin", None) is not None:
        module.cls_to_become = module._sbn_origin  # not materialised yet
        return module
    if isinstance(module, _SynchronizedBatchNorm):
        origin = _origin_of(module)
        if origin is None:
            warnings.warn(f"pysbn.revert_model: '{module._layer_name()}' "
                          f"({type(module).__name__}) has no plain class to return to (timm is "
                          "not installed); it is left as it is", UserWarning, stacklevel=2)
            return module
        extra = {}
        if origin is nn.SyncBatchNorm:
            extra["process_group"] = module.process_group
        elif isinstance(module, SynchronizedBatchNormAct2d):
            extra["apply_act"] = False  # its act and drop are moved as they are
        return _rebuild(origin, module, **extra)
    for name, child in list(module.named_children()):
        new = revert_model(child)
        if new is not child:
            setattr(module, name, new)
    return module


@contextlib.contextmanager
def patch_sync_batchnorm() -> Iterator[None]:
    """Within the block, ``torch.nn.BatchNorm1d/2d/3d`` are the synchronized classes (as the
    seed's context manager): models built inside get synchronized layers. When timm is loaded,
    its norm-act factory also maps the synchronized 2d class to
    :class:`SynchronizedBatchNormAct2d` (so timm models built inside keep their activations)."""
    saved = nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d = (
        SynchronizedBatchNorm1d, SynchronizedBatchNorm2d, SynchronizedBatchNorm3d)
    timm_maps = _register_with_timm()
    try:
        yield
    finally:
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d = saved
        _unregister_from_timm(timm_maps)


def _register_with_timm():
    mod = sys.modules.get("timm.layers.create_norm_act")
    if mod is None:
        return None
    name = SynchronizedBatchNorm2d.__name__.lower()
    added = []
    if name not in mod._NORM_TO_NORM_ACT_MAP:
        mod._NORM_TO_NORM_ACT_MAP[name] = SynchronizedBatchNormAct2d
        added.append(("_NORM_TO_NORM_ACT_MAP", name))
    for attr in ("_NORM_ACT_TYPES", "_NORM_ACT_REQUIRES_ARG"):
        s = getattr(mod, attr, None)
        if isinstance(s, set) and SynchronizedBatchNormAct2d not in s:
            s.add(SynchronizedBatchNormAct2d)
            added.append((attr, None))
    return (mod, added)


def _unregister_from_timm(state) -> None:
    if state is None:
        return
    mod, added = state
    for attr, key in added:
        if key is not None:
            getattr(mod, attr).pop(key, None)
        else:
            getattr(mod, attr).discard(SynchronizedBatchNormAct2d)
