# SPDX-License-Identifier: MIT
"""The DataParallel side: replication callbacks and a failure-aware parallel apply.

Same names and semantics as the seed (vacancy's Synchronized-BatchNorm-PyTorch):
``CallbackContext``, ``execute_replication_callbacks``, ``DataParallelWithCallback``,
``patch_replication_callback``. After ``nn.DataParallel`` replicates a module, the callback
``__data_parallel_replicate__(ctx, copy_id)`` of every sub-module of every replica is called
with one context per sub-module position, so the replicas of one layer can find each other
(pysbn's layers create a :class:`pysbn.sync.ReplicaGroup` in the context; copy 0 is the master).

What pysbn adds: :class:`DataParallelWithCallback` runs the replicas through
:func:`parallel_apply`, which releases the replicas waiting in a synchronized layer as soon as
another replica raises (anywhere in its forward) or returns without making a call the others
made, and re-raises the original exception rather than the secondary ones.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, List, Optional, Sequence

import torch
from torch import nn
from torch._utils import ExceptionWrapper
from torch.nn.parallel.parallel_apply import get_a_var  # torch's own: first tensor in args

from .sync import ReplicaGroup, SyncAbortedError

__all__ = [
    "CallbackContext",
    "execute_replication_callbacks",
    "DataParallelWithCallback",
    "patch_replication_callback",
    "parallel_apply",
]


class CallbackContext:
    """Shared by the replicas of one sub-module during the replication callbacks.

    Attributes set by pysbn: ``name`` (the sub-module's qualified name in replica 0) and, for
    synchronized layers, ``sbn_group`` (their :class:`~pysbn.sync.ReplicaGroup`).
    """


def execute_replication_callbacks(modules: Sequence[nn.Module]) -> List[ReplicaGroup]:
    """Calls ``__data_parallel_replicate__(ctx, copy_id)`` on every sub-module of every replica.

    Parameters
    ----------
    modules : sequence of nn.Module
        The replicas, replica 0 (the master) first; they must have the same structure (as
        ``nn.DataParallel``'s replicas, or ``copy.deepcopy`` copies, have).

    Returns
    -------
    list of ReplicaGroup
        The synchronisation groups created (one per synchronized layer); the seed returned
        None, so callers may ignore it.
    """
    if len(modules) == 0:
        return []
    master = modules[0]
    named = list(master.named_modules())
    ctxs = []
    for name, _ in named:
        ctx = CallbackContext()
        ctx.name = name or type(master).__name__
        ctxs.append(ctx)
    for i, module in enumerate(modules):
        subs = list(module.modules())
        if len(subs) != len(ctxs):
            raise ValueError(f"execute_replication_callbacks: replica {i} has {len(subs)} "
                             f"sub-modules but replica 0 has {len(ctxs)}; replicas must have the "
                             "same structure")
        for ctx, m in zip(ctxs, subs):
            callback = getattr(m, "__data_parallel_replicate__", None)
            if callback is not None:
                callback(ctx, i)
    groups, seen = [], set()
    for ctx in ctxs:
        g = getattr(ctx, "sbn_group", None)
        if g is not None and id(g) not in seen:
            seen.add(id(g))
            groups.append(g)
    return groups


def parallel_apply(modules: Sequence[nn.Module], inputs: Sequence[Any],
                   kwargs_tup: Optional[Sequence[dict]] = None,
                   devices: Optional[Sequence[Any]] = None,
                   groups: Sequence[ReplicaGroup] = ()) -> List[Any]:
    """Runs ``modules[i](*inputs[i], **kwargs_tup[i])`` in one thread per replica.

    As ``torch.nn.parallel.parallel_apply`` (device, current stream, grad mode and autocast
    state carried into each thread; CPU replicas run in plain threads), plus: when replica
    ``i`` raises, every group in ``groups`` is aborted at once (the replicas waiting in a
    synchronized layer raise instead of waiting for it), and when replica ``i`` returns, a
    group round still waiting for it fails at once. The original exception is re-raised in
    preference to the :class:`~pysbn.sync.SyncAbortedError` it caused in other replicas.
    """
    n = len(modules)
    if len(inputs) != n:
        raise ValueError(f"parallel_apply: {n} modules but {len(inputs)} inputs")
    if kwargs_tup is None:
        kwargs_tup = ({},) * n
    elif len(kwargs_tup) != n:
        raise ValueError(f"parallel_apply: {n} modules but {len(kwargs_tup)} kwargs")
    if devices is None:
        devices = [None] * n
    elif len(devices) != n:
        raise ValueError(f"parallel_apply: {n} modules but {len(devices)} devices")
    devices = [torch.device("cuda", d) if isinstance(d, int) else d for d in devices]
    lock = threading.Lock()
    results: dict = {}
    grad_enabled = torch.is_grad_enabled()
    autocast_cuda = torch.is_autocast_enabled("cuda") if hasattr(torch, "is_autocast_enabled") \
        else False

    def worker(i: int, module: nn.Module, inp: Any, kwargs: dict, device) -> None:
        torch.set_grad_enabled(grad_enabled)
        if device is None:
            t = get_a_var(inp)
            if t is None:
                t = get_a_var(kwargs)
            device = t.device if t is not None else torch.device("cpu")
        try:
            with contextlib.ExitStack() as stack:
                if device.type == "cuda":
                    stack.enter_context(torch.cuda.device(device))
                    stack.enter_context(torch.cuda.stream(torch.cuda.current_stream(device)))
                    stack.enter_context(torch.autocast("cuda", enabled=autocast_cuda))
                args = inp if isinstance(inp, (list, tuple)) else (inp,)
                output = module(*args, **kwargs)
            with lock:
                results[i] = output
            for g in groups:
                g.finished(i, "forward")
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            # BaseException too: a replica thread that died on SystemExit/KeyboardInterrupt
            # must still release the others and leave a result to report
            with lock:
                results[i] = (exc, ExceptionWrapper(where=f"in replica {i} on device {device}"))
            for g in groups:
                g.abort(i, exc)

    if n > 1:
        threads = [threading.Thread(target=worker, args=(i, m, x, k, d), daemon=True)
                   for i, (m, x, k, d) in enumerate(zip(modules, inputs, kwargs_tup, devices))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elif n == 1:
        worker(0, modules[0], inputs[0], kwargs_tup[0], devices[0])

    failures = [results[i] for i in range(n) if isinstance(results[i], tuple)
                and len(results[i]) == 2 and isinstance(results[i][1], ExceptionWrapper)]
    if failures:
        original = [f for f in failures if not isinstance(f[0], SyncAbortedError)]
        (original or failures)[0][1].reraise()
    return [results[i] for i in range(n)]


class DataParallelWithCallback(nn.DataParallel):
    """``nn.DataParallel`` that runs the replication callbacks after each replication.

    Use it (or :func:`patch_replication_callback` on an existing ``nn.DataParallel``) for models
    with synchronized layers: the callbacks wire each layer's replicas so that they share
    statistics. Replicas run through :func:`parallel_apply`, so a replica that raises releases
    the others at once, and its exception is the one re-raised.

    Examples
    --------
    >>> net = pysbn.convert_model(model)                          # doctest: +SKIP
    >>> net = pysbn.DataParallelWithCallback(net, device_ids=[0, 1])  # doctest: +SKIP
    """

    def replicate(self, module: nn.Module, device_ids: Sequence[int]) -> List[nn.Module]:
        """Replicates ``module`` as ``nn.DataParallel`` does, then runs the replication
        callbacks (:func:`execute_replication_callbacks`) on the replicas.

        Parameters
        ----------
        module : nn.Module
            The wrapped module.
        device_ids : sequence of int
            One replica per device, replica 0 on ``device_ids[0]``.

        Returns
        -------
        list of nn.Module
            The replicas, their synchronized layers wired; the groups created are kept (per
            thread) for the next :meth:`parallel_apply`.
        """
        modules = super().replicate(module, device_ids)
        self._sbn_local.groups = execute_replication_callbacks(modules)
        return modules

    def parallel_apply(self, replicas: Sequence[nn.Module], inputs: Sequence[Any],
                       kwargs: Any) -> List[Any]:
        """Runs the replicas with pysbn's failure-aware :func:`parallel_apply`.

        Parameters
        ----------
        replicas : sequence of nn.Module
            From :meth:`replicate`.
        inputs : sequence
            The scattered positional arguments, one entry per replica.
        kwargs : sequence of dict or None
            The scattered keyword arguments, one dict per replica.

        Returns
        -------
        list
            The replicas' outputs, in replica order. The groups of the last
            :meth:`replicate` are aborted when a replica fails and told when a replica returns
            (a round still waiting for it then fails); a replica's exception is re-raised (the
            original one, not the ``SyncAbortedError`` it caused in the others).
        """
        groups = getattr(self._sbn_local, "groups", ())
        self._sbn_local.groups = ()
        return parallel_apply(replicas, inputs, kwargs, self.device_ids[:len(replicas)],
                              groups)

    @property
    def _sbn_local(self) -> threading.local:
        local = self.__dict__.get("_sbn_tls")
        if local is None:
            local = self.__dict__["_sbn_tls"] = threading.local()
        return local

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_sbn_tls", None)
        return state


class _Patched:
    """The replicate / parallel_apply installed on a patched ``nn.DataParallel`` instance.

    A plain object (not a closure), so a patched module still pickles, deep-copies (the copy's
    patch refers to the copy) and saves with ``torch.save``."""

    def __init__(self, data_parallel: nn.DataParallel, shared: "_PatchState", what: str) -> None:
        self.data_parallel = data_parallel
        self.shared = shared
        self.what = what

    def __call__(self, *args):
        dp = self.data_parallel
        if self.what == "replicate":
            module, device_ids = args
            modules = type(dp).replicate(dp, module, device_ids)
            self.shared.local.groups = execute_replication_callbacks(modules)
            return modules
        replicas, inputs, kwargs = args
        groups = getattr(self.shared.local, "groups", ())
        self.shared.local.groups = ()
        return parallel_apply(replicas, inputs, kwargs, dp.device_ids[:len(replicas)], groups)


class _PatchState:
    """Per-thread hand-over of the groups from replicate to parallel_apply (not pickled)."""

    def __init__(self) -> None:
        self.local = threading.local()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.local = threading.local()


def patch_replication_callback(data_parallel: nn.DataParallel) -> None:
    """Monkey-patches an existing ``nn.DataParallel`` so that it runs the replication callbacks
    (and pysbn's failure-aware :func:`parallel_apply`), as ``DataParallelWithCallback`` does.

    Parameters
    ----------
    data_parallel : nn.DataParallel
        Patched in place (its ``replicate`` and ``parallel_apply``); it keeps its class, and
        still pickles and deep-copies.

    Examples
    --------
    >>> dp = nn.DataParallel(model, device_ids=[0, 1])              # doctest: +SKIP
    >>> patch_replication_callback(dp)                              # doctest: +SKIP
    """
    if not isinstance(data_parallel, nn.DataParallel):
        raise TypeError(f"patch_replication_callback: data_parallel must be an nn.DataParallel, "
                        f"got {type(data_parallel).__name__}")
    if isinstance(data_parallel, DataParallelWithCallback) or isinstance(
            data_parallel.__dict__.get("replicate"), _Patched):
        return  # already runs the callbacks
    shared = _PatchState()
    data_parallel.replicate = _Patched(data_parallel, shared, "replicate")
    data_parallel.parallel_apply = _Patched(data_parallel, shared, "parallel_apply")
