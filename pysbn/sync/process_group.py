# SPDX-License-Identifier: MIT
"""The torch.distributed synchronizer: one collective per direction over a process group."""

from __future__ import annotations

from typing import List

import torch

from .. import functional as F
from .base import Synchronizer

__all__ = ["ProcessGroupSync"]


# ---- torch.distributed --------------------------------------------------------------------------

class ProcessGroupSync(Synchronizer):
    """Synchronisation over a torch.distributed process group.

    Forward: one ``all_gather_into_tensor`` of ``[C, seq, count, mean[C], m2[C]]`` per rank (the
    header lets every rank check that all ranks are at the same call of a layer with the same
    channel count), then the exact Chan merge of the gathered records on every rank. Backward:
    one ``all_reduce`` (sum) of the grad-sums record. Both are O(C) per rank, float64, and never
    read a CUDA tensor on the host.
    """

    updates_running_stats = True

    def __init__(self, group, world_size: int, name: str, counter: List[int]) -> None:
        self.group = group
        self.world_size = world_size
        self.name = name
        self._counter = counter  # the layer's call counter, shared across its calls

    def forward(self, record: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        c = (record.numel() - 1) // 2
        seq = self._counter[0]
        self._counter[0] += 1
        payload = torch.empty(2 * c + 3, dtype=record.dtype, device=record.device)
        payload[0] = float(c)
        payload[1] = float(seq)
        payload[2:] = record
        gathered = torch.empty((self.world_size, 2 * c + 3), dtype=record.dtype,
                               device=record.device)
        dist.all_gather_into_tensor(gathered, payload, group=self.group)
        if gathered.device.type == "cpu":  # free to read on the host; skipped on CUDA
            header = gathered[:, :2]
            if not bool((header == header[:1]).all()):
                rows = [(int(h[0]), int(h[1]) + 1) for h in header.tolist()]
                raise RuntimeError(
                    f"SynchronizedBatchNorm layer '{self.name}': ranks of the process group are "
                    f"not at the same layer call; (channels, call number) per rank: {rows}. "
                    "Every rank must call each layer the same number of times, with the same "
                    "number of channels")
        return F.merge_moments(gathered[:, 2:])

    def backward(self, sums: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = sums.clone()
        dist.all_reduce(out, group=self.group)
        return out
