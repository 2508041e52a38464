# SPDX-License-Identifier: MIT
"""The DataParallel synchronizer: the replicas of one layer meet in a :class:`ReplicaGroup`."""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import ops
from . import base
from .base import SyncAbortedError, Synchronizer

__all__ = ["ReplicaGroup", "ReplicaSync"]


# ---- DataParallel: master/slave through a shared group -----------------------------------------

class _Round:
    __slots__ = ("payloads", "arrived", "result", "taken")

    def __init__(self, size: int) -> None:
        self.payloads: List[Optional[torch.Tensor]] = [None] * size
        self.arrived = 0
        self.result: Optional[torch.Tensor] = None
        self.taken = 0


class ReplicaGroup:
    """The rendezvous of one layer's DataParallel replicas (one per layer per replication).

    Replicas register in replica order (the replication callback runs replica 0 first); replica
    0 is the master. Each exchange is a *round* keyed by direction and sequence number: every
    replica deposits its payload, the master waits for all of them, reduces them on its device,
    and publishes the result, which each replica copies to its own device.

    Failure handling: :meth:`abort` (a replica failed) and :meth:`finished` (a replica's forward
    returned, so it will deposit nothing more in this direction) release waiting replicas at
    once with :class:`SyncAbortedError`; every wait is bounded by :func:`get_sync_timeout`, and
    a timeout aborts the group with an error naming the replicas that never arrived.
    """

    def __init__(self, name: str) -> None:
        """
        Parameters
        ----------
        name : str
            The layer's name, for error messages. The group starts empty; replicas join with
            :meth:`register`.
        """
        self.name = name
        self.size = 0
        self._cv = threading.Condition()
        self._rounds: Dict[Tuple[str, int], _Round] = {}
        self._error: Optional[BaseException] = None
        self._finished: set = set()

    # pickling/deepcopy of a wired module never carries the group (see the layer's __getstate__)

    def register(self) -> int:
        """Adds a replica; returns its rank (0 = master)."""
        with self._cv:
            rank = self.size
            self.size += 1
            return rank

    def abort(self, rank: int, exc: BaseException) -> None:
        """Replica ``rank`` failed with ``exc``: every waiting and later exchange raises."""
        with self._cv:
            if self._error is None:
                if isinstance(exc, SyncAbortedError):
                    self._error = exc
                else:
                    self._error = SyncAbortedError(
                        f"SynchronizedBatchNorm layer '{self.name}': replica {rank} failed "
                        f"({type(exc).__name__}: {exc}); the other replicas were released")
                    self._error.__cause__ = exc
            self._cv.notify_all()

    def finished(self, rank: int, direction: str = "forward") -> None:
        """Replica ``rank`` will make no more ``direction`` calls: a round still missing it can
        never complete, so it fails now (a replica called this layer fewer times)."""
        with self._cv:
            self._finished.add((rank, direction))
            self._check_stranded()
            self._cv.notify_all()

    def _check_stranded(self) -> None:
        if self._error is not None:
            return
        for (direction, seq), rnd in self._rounds.items():
            missing = [r for r, p in enumerate(rnd.payloads) if p is None]
            gone = [r for r in missing if (r, direction) in self._finished]
            if gone:
                came = [r for r, p in enumerate(rnd.payloads) if p is not None]
                self._error = SyncAbortedError(
                    f"SynchronizedBatchNorm layer '{self.name}': replicas {came} called it "
                    f"{seq + 1} times in {direction} but replicas {gone} returned after fewer "
                    "calls; every replica must call each layer the same number of times")
                return

    def _timeout_error(self, rnd: _Round, rank: int, direction: str, seq: int,
                       timeout: float) -> SyncAbortedError:
        came = [r for r, p in enumerate(rnd.payloads) if p is not None]
        missing = [r for r, p in enumerate(rnd.payloads) if p is None]
        if missing:
            what = (f"replicas {came} arrived but replicas {missing} never did (they failed "
                    "outside this layer, are stuck, or called this layer fewer times)")
        else:  # every payload is in, but the master never published the reduced result
            what = ("every replica arrived but the master (replica 0) never published the "
                    "result")
        return SyncAbortedError(
            f"SynchronizedBatchNorm layer '{self.name}': timed out after {timeout:g} s in "
            f"{direction} call {seq + 1} (replica {rank} gave up first): {what}; "
            "see pysbn.set_sync_timeout")

    def _raise_error(self) -> None:
        err = self._error
        raise SyncAbortedError(str(err)) from (err.__cause__ or err)

    def exchange(self, rank: int, direction: str, seq: int, payload: torch.Tensor,
                 reduce: Callable[[List[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
        """Deposits ``payload`` for round (direction, seq) and returns the reduced result (on
        the payload's device). The master (rank 0) runs ``reduce`` on the list of payloads
        moved to its device."""
        timeout = base.get_sync_timeout()
        deadline = time.monotonic() + timeout
        key = (direction, seq)
        with self._cv:
            if self._error is not None:
                self._raise_error()
            size = self.size
            rnd = self._rounds.get(key)
            if rnd is None:
                rnd = self._rounds[key] = _Round(size)
            rnd.payloads[rank] = payload
            rnd.arrived += 1
            self._check_stranded()
            self._cv.notify_all()
            if rank == 0:
                ready = lambda: rnd.arrived == size or self._error is not None  # noqa: E731
            else:
                ready = lambda: rnd.result is not None or self._error is not None  # noqa: E731
            while not ready():
                left = deadline - time.monotonic()
                if left <= 0.0:
                    self._error = self._timeout_error(rnd, rank, direction, seq, timeout)
                    self._cv.notify_all()
                    raise self._error
                self._cv.wait(left)
            # A round that completed stands even if the group failed meanwhile (e.g. another
            # replica aborted just after this round's last payload or result came in).
            complete = rnd.arrived == size if rank == 0 else rnd.result is not None
            if not complete:
                self._raise_error()
            if rank == 0:
                try:
                    device = payload.device
                    items = [p if p.device == device else p.to(device) for p in rnd.payloads]
                    rnd.result = reduce(items)
                except BaseException as exc:
                    self.abort(0, exc)
                    raise
                self._cv.notify_all()
            result = rnd.result
            rnd.taken += 1
            if rnd.taken == size:
                del self._rounds[key]
        return result if result.device == payload.device else result.to(payload.device)


def _merge_records(name: str, items: List[torch.Tensor]) -> torch.Tensor:
    width = items[0].numel()
    for i, t in enumerate(items):
        if t.numel() != width:
            sizes = {r: (int(p.numel()) - 1) // 2 for r, p in enumerate(items)}
            raise ValueError(f"SynchronizedBatchNorm layer '{name}': replicas disagree on the "
                             f"number of channels (channels per replica: {sizes})")
    return ops.trusted.merge_moments(torch.stack(items))


def _sum_records(name: str, items: List[torch.Tensor]) -> torch.Tensor:
    width = items[0].numel()
    for t in items:
        if t.numel() != width:
            sizes = {r: int(p.numel()) // 2 for r, p in enumerate(items)}
            raise ValueError(f"SynchronizedBatchNorm layer '{name}': replicas disagree on the "
                             f"number of channels in backward (channels per replica: {sizes})")
    out = items[0].clone()
    for t in items[1:]:
        out += t
    return out


class ReplicaSync(Synchronizer):
    """One replica's end of a :class:`ReplicaGroup`: matches its calls by sequence number.

    Threads and a condition variable: not traceable (``torch.compile`` runs the layer eagerly
    when it has a replica synchronizer).
    """

    traceable = False

    def __init__(self, group: ReplicaGroup, rank: int) -> None:
        """
        Parameters
        ----------
        group : ReplicaGroup
            The layer's group.
        rank : int
            This replica's rank, from :meth:`ReplicaGroup.register`; rank 0 (the master) is
            the one that updates the running statistics.
        """
        self.group = group
        self.rank = rank
        self.updates_running_stats = rank == 0
        self._seq = {"forward": 0, "backward": 0}
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """The number of replicas registered in the group."""
        return self.group.size

    @property
    def exchanges(self) -> bool:  # type: ignore[override]
        """True when the group has other replicas to exchange with."""
        return self.group.size > 1

    def _next(self, direction: str) -> int:
        with self._lock:
            seq = self._seq[direction]
            self._seq[direction] = seq + 1
            return seq

    def forward(self, record: torch.Tensor) -> torch.Tensor:
        """Deposits this replica's moments record for its next forward call and returns the
        merged record (Chan merge on the master's device, copied to ``record``'s device).

        Raises
        ------
        SyncAbortedError
            Another replica failed, returned after fewer calls, or the wait exceeded the sync
            timeout.
        ValueError
            (On the master; the others get ``SyncAbortedError``) the replicas disagree on the
            number of channels.
        """
        name = self.group.name
        return self.group.exchange(self.rank, "forward", self._next("forward"), record,
                                   lambda items: _merge_records(name, items))

    def backward(self, sums: torch.Tensor) -> torch.Tensor:
        """Deposits this replica's grad sums for its next backward call and returns their sum
        over the replicas (on the master's device, copied to ``sums``'s device).

        Raises
        ------
        SyncAbortedError
            Another replica failed or the wait exceeded the sync timeout.
        ValueError
            (On the master; the others get ``SyncAbortedError``) the replicas disagree on the
            number of channels.
        """
        name = self.group.name
        return self.group.exchange(self.rank, "backward", self._next("backward"), sums,
                                   lambda items: _sum_records(name, items))

    def abort(self, exc: BaseException) -> None:
        """This replica failed with ``exc``: the group's waiting and later exchanges raise
        :class:`SyncAbortedError` (see :meth:`ReplicaGroup.abort`)."""
        self.group.abort(self.rank, exc)
