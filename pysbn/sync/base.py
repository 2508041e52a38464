# SPDX-License-Identifier: MIT
"""Synchronizers (:mod:`pysbn.sync`): how a layer turns its local statistics into the global ones.

One small interface, three kinds:

- no synchronizer (``None``): a lone replica or eval mode; the layer never communicates;
- :class:`~pysbn.sync.replica.ReplicaSync` (:mod:`pysbn.sync.replica`): the ``nn.DataParallel`` path. The replicas of one layer share a
  :class:`ReplicaGroup` wired by the replication callback; replica 0 is the master: it gathers
  every replica's payload, reduces it (Chan merge of the moments forward, sum of the gradient
  sums backward) and hands the result back to each replica;
- :class:`~pysbn.sync.process_group.ProcessGroupSync` (:mod:`pysbn.sync.process_group`): the ``torch.distributed`` path, one collective per direction.

The interface (:class:`Synchronizer`):

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

Every wait of the DataParallel path is bounded by :func:`set_sync_timeout`; calls are matched by
sequence number, so a replica that calls a layer more or fewer times than the others gets an
error, never mixed statistics.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "DEFAULT_SYNC_TIMEOUT",
    "SyncAbortedError",
    "Synchronizer",
    "set_sync_timeout",
    "get_sync_timeout",
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

    updates_running_stats: bool = True

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
