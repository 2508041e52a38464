# SPDX-License-Identifier: MIT
"""Synchronizers: the interface (:mod:`.base`), the DataParallel path (:mod:`.replica`) and the
torch.distributed path (:mod:`.process_group`)."""

from .base import (DEFAULT_SYNC_TIMEOUT, SyncAbortedError, Synchronizer, get_sync_timeout,
                   set_sync_timeout)
from .process_group import ProcessGroupSync
from .replica import ReplicaGroup, ReplicaSync

__all__ = [
    "DEFAULT_SYNC_TIMEOUT",
    "SyncAbortedError",
    "Synchronizer",
    "get_sync_timeout",
    "set_sync_timeout",
    "ProcessGroupSync",
    "ReplicaGroup",
    "ReplicaSync",
]
