# SPDX-License-Identifier: MIT
"""Synchronizers: the interface and the local one (:mod:`.base`), the DataParallel path
(:mod:`.replica`), the torch.distributed path (:mod:`.process_group`), and
:func:`synchronizer_for`, which picks one for a layer call (so a new kind of synchronizer is
added here, not in the layers)."""

from __future__ import annotations

import torch

from .base import (DEFAULT_SYNC_TIMEOUT, LOCAL, LocalSync, SyncAbortedError, Synchronizer,
                   get_sync_check, get_sync_timeout, set_sync_check, set_sync_timeout)
from .process_group import LayerIdentity, ProcessGroupSync
from .replica import ReplicaGroup, ReplicaSync

__all__ = [
    "DEFAULT_SYNC_TIMEOUT",
    "LOCAL",
    "LayerIdentity",
    "LocalSync",
    "SyncAbortedError",
    "Synchronizer",
    "get_sync_check",
    "get_sync_timeout",
    "set_sync_check",
    "set_sync_timeout",
    "ProcessGroupSync",
    "ReplicaGroup",
    "ReplicaSync",
    "synchronizer_for",
]


def synchronizer_for(layer, x: torch.Tensor) -> Synchronizer:
    """The synchronizer of one training-mode call of ``layer`` on input ``x``.

    - a DataParallel replica wired by the replication callback: its :class:`ReplicaSync`
      (:data:`LOCAL` when it is the only replica);
    - otherwise, when torch.distributed is initialised: a :class:`ProcessGroupSync` over the
      layer's ``process_group`` (default: the whole world) when it has more than one member;
    - otherwise :data:`LOCAL`.

    Parameters
    ----------
    layer : pysbn's synchronized layer
        Reads its ``_sbn_replica``, ``process_group`` and ``_sbn_identity``.
    x : torch.Tensor
        The call's input (its dtype goes into the process-group header).

    Raises
    ------
    ValueError
        This rank is not a member of the layer's process group.
    """
    rep = layer._sbn_replica
    if rep is not None:
        return rep if rep.exchanges else LOCAL
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        group = layer.process_group if layer.process_group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        if world < 0:
            raise ValueError(f"{layer._sbn_identity.name}: this rank (global rank "
                             f"{dist.get_rank()}) is not a member of the layer's process_group")
        if world > 1:
            return ProcessGroupSync(group, world, layer._sbn_identity, x.dtype)
    return LOCAL
