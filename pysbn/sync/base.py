# SPDX-License-Identifier: MIT
"""Synchronizers (:mod:`pysbn.sync`): how a layer turns its local statistics into the global ones.

One small interface, three kinds (:func:`pysbn.sync.synchronizer_for` picks one for a layer):

- :data:`LOCAL` (:class:`LocalSync`): a lone member (one process, a lone DataParallel replica);
  nothing to exchange, so the layer runs its fused local ops;
- :class:`~pysbn.sync.replica.ReplicaSync` (:mod:`pysbn.sync.replica`): the ``nn.DataParallel``
  path. The replicas of one layer share a :class:`ReplicaGroup` wired by the replication
  callback; replica 0 is the master: it gathers every replica's payload, reduces it (Chan merge
  of the moments forward, sum of the gradient sums backward) and hands the result back to each
  replica. Threads and locks: it runs eagerly only (``traceable = False``);
- :class:`~pysbn.sync.process_group.ProcessGroupSync` (:mod:`pysbn.sync.process_group`): the
  ``torch.distributed`` path, one collective per direction, traceable by ``torch.compile``.

The interface (:class:`Synchronizer`):

``exchanges``
    False when there is nothing to exchange (the layer then uses its x's own statistics).
``forward(record) -> record``
    A local moments record ``[count, mean[C], m2[C]]`` (float64, ``(2C+1,)``) in, the global
    record out (the exact Chan merge of every member's record).
``backward(sums) -> sums``
    A local grad-sums record ``[sum_dy[C], sum_dy_xmu[C]]`` in, the global sums out.
``abort(exc)``
    This member failed: release the members waiting for it (DataParallel path; a process group
    member that raises is seen by the others through torch.distributed's own timeout).
``updates_running_stats``
    Whether this member writes the running statistics (DataParallel: the master only; process
    groups: every rank, each on its own buffers).
``traceable``
    Whether ``torch.compile`` may trace it (the layer runs an untraceable one eagerly).

Every wait of the DataParallel path is bounded by :func:`set_sync_timeout`; calls are matched by
sequence number, so a replica that calls a layer more or fewer times than the others gets an
error, never mixed statistics.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

__all__ = [
    "DEFAULT_SYNC_TIMEOUT",
    "SyncAbortedError",
    "Synchronizer",
    "LocalSync",
    "LOCAL",
    "set_sync_timeout",
    "get_sync_timeout",
    "set_sync_check",
    "get_sync_check",
]

DEFAULT_SYNC_TIMEOUT = 300.0
"""Seconds a DataParallel replica waits for the others before raising (the default bound)."""

_timeout = DEFAULT_SYNC_TIMEOUT


def set_sync_timeout(seconds: Optional[float]) -> None:
    """Bounds every wait of the DataParallel synchronisation.

    Parameters
    ----------
    seconds : float or None
        Positive, finite number of seconds a replica waits at a layer for the other replicas
        before it raises a ``RuntimeError`` that names the layer and the replicas that never
        arrived. ``None`` restores the default (:data:`DEFAULT_SYNC_TIMEOUT`, 300 s).

    Notes
    -----
    The process-group path waits inside torch.distributed, whose bound is the ``timeout`` given
    to ``torch.distributed.init_process_group`` (or ``new_group``).
    """
    global _timeout
    if seconds is None:
        _timeout = DEFAULT_SYNC_TIMEOUT
        return
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"set_sync_timeout: seconds must be a number or None, got "
                        f"{type(seconds).__name__}")
    seconds = float(seconds)
    if not (math.isfinite(seconds) and seconds > 0.0):
        raise ValueError(f"set_sync_timeout: seconds must be positive and finite, got {seconds}")
    _timeout = seconds


def get_sync_timeout() -> float:
    """The current bound of a DataParallel wait, in seconds (see :func:`set_sync_timeout`)."""
    return _timeout


class SyncAbortedError(RuntimeError):
    """Raised in a replica whose synchronisation partner failed or never arrived.

    It is a secondary error: ``DataParallelWithCallback`` re-raises the original exception of the
    failing replica in preference to it.
    """


class Synchronizer:
    """Interface of the synchronizers (see the module docstring)."""

    exchanges: bool = True
    updates_running_stats: bool = True
    traceable: bool = True

    def forward(self, record: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """Exchanges the forward statistics.

        Parameters
        ----------
        record : torch.Tensor
            This member's moments record ``[count, mean[C], m2[C]]``, float64, ``(2C+1,)``.

        Returns
        -------
        torch.Tensor
            The global record (the exact Chan merge of every member's record), on
            ``record``'s device.
        """
        raise NotImplementedError

    def backward(self, sums: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """Exchanges the backward sums.

        Parameters
        ----------
        sums : torch.Tensor
            This member's grad-sums record ``[sum_dy[C], sum_dy_xmu[C]]``, float64, ``(2C,)``.

        Returns
        -------
        torch.Tensor
            The sums over every member, on ``sums``'s device (may be ``sums`` itself, updated
            in place).
        """
        raise NotImplementedError

    def abort(self, exc: BaseException) -> None:
        """Releases the members waiting on this one (default: nothing to release)."""


class LocalSync(Synchronizer):
    """A member with nothing to synchronise: a lone process or a lone replica."""

    exchanges = False

    def forward(self, record: torch.Tensor) -> torch.Tensor:
        """The record itself: this member's statistics are the global ones."""
        return record

    def backward(self, sums: torch.Tensor) -> torch.Tensor:
        """The sums themselves."""
        return sums


LOCAL = LocalSync()
"""The one :class:`LocalSync` (it has no state)."""


def _env_flag(name: str) -> bool:
    v = os.environ.get(name, "")
    return v not in ("", "0")


_check = _env_flag("PYSBN_SYNC_CHECK")


def set_sync_check(enabled: bool) -> None:
    """Turns the process-group check mode on or off (default: ``PYSBN_SYNC_CHECK=1`` or off).

    With one collective per direction, a layer can only compare the ranks' headers (layer,
    channels, dtype, call number) after the payload collective itself, and a payload whose size
    differs across ranks (layers of different channel counts) never gets that far: Gloo aborts
    the process, NCCL may hang. In check mode every synchronised forward first all-gathers the
    fixed-size header alone (one extra small collective per layer call, and a host read on
    CUDA), so every rank raises a ``RuntimeError`` naming the layers instead. Eager mode only:
    compiled graphs keep one collective per direction.

    Parameters
    ----------
    enabled : bool
        True to check every call.
    """
    global _check
    if not isinstance(enabled, bool):
        raise TypeError(f"set_sync_check: enabled must be a bool, got {type(enabled).__name__}")
    _check = enabled


def get_sync_check() -> bool:
    """Whether the process-group check mode is on (see :func:`set_sync_check`)."""
    return _check
