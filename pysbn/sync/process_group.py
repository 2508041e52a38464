# SPDX-License-Identifier: MIT
"""The torch.distributed synchronizer: one collective per direction over a process group."""

from __future__ import annotations

from typing import TYPE_CHECKING, List

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed import ProcessGroup

import torch

from .. import _core
from .. import functional as F
from .base import Synchronizer

__all__ = ["ProcessGroupSync"]


# ---- torch.distributed --------------------------------------------------------------------------

def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """Gathers ``inp`` (1-D, same size on every rank) of every rank into ``out`` (1-D,
    ``world * inp.numel()``, rank order): one collective.

    torch >= 2.13 names it ``all_gather_single`` (``all_gather_into_tensor`` warns there);
    older releases only have ``all_gather_into_tensor``. The flat (concatenation) form is the
    one every backend accepts (Gloo rejects the stacked ``(world, n)`` form). The functions are
    looked up at each call, so a benchmark or a test can wrap them to count collectives.
    """
    import torch.distributed as dist

    fn = getattr(dist, "all_gather_single", None)
    if fn is None:
        fn = dist.all_gather_into_tensor
    fn(out, inp, group=group)


class ProcessGroupSync(Synchronizer):
    """Synchronisation over a torch.distributed process group.

    Forward: one all-gather (``all_gather_single`` / ``all_gather_into_tensor``) of
    ``[C, seq, count, mean[C], m2[C]]`` (float64, ``2C+3`` values) per rank, then the exact
    Chan merge of the gathered records on every rank (exact under unequal counts and ranks with
    count 0; no sums of squares, so nothing is lost at large offsets). The header lets every
    rank check, on CPU where the read is free, that all ranks are at the same call of a layer
    with the same channel count; on CUDA nothing is read on the host. Backward: one
    ``all_reduce`` (sum) of the ``2C`` grad sums, in place on the record passed in (a fresh
    buffer of the autograd Function). Every rank gets the same merged record, so the running
    statistics, which every rank updates on its own buffers, stay equal across ranks.
    """

    updates_running_stats = True

    def __init__(self, group: "ProcessGroup", world_size: int, name: str,
                 counter: List[int]) -> None:
        """
        Parameters
        ----------
        group : torch.distributed.ProcessGroup
            The group to synchronise over (the layer's ``process_group`` or the default group).
        world_size : int
            Its size (> 1).
        name : str
            The layer's name, for error messages.
        counter : list of int
            The layer's call counter (one element), shared by the synchronizers of its calls
            and incremented by each :meth:`forward`.
        """
        self.group = group
        self.world_size = world_size
        self.name = name
        self._counter = counter  # the layer's call counter, shared across its calls

    def forward(self, record: torch.Tensor) -> torch.Tensor:
        """One all-gather of the header and ``record``, then the Chan merge of every rank's
        record.

        Parameters
        ----------
        record : torch.Tensor
            This rank's moments record, float64, ``(2C+1,)``, on the input's device.

        Returns
        -------
        torch.Tensor
            The merged record, a new tensor on ``record``'s device (the same on every rank).

        Raises
        ------
        RuntimeError
            (CPU tensors only) the gathered headers differ: the ranks are not at the same call
            of the layer (call number or channel count).
        """
        width = record.numel()
        c = (width - 1) // 2
        seq = self._counter[0]
        self._counter[0] += 1
        world = self.world_size
        cpu = record.device.type == "cpu"
        payload = torch.empty(width + 2, dtype=record.dtype, device=record.device)
        if cpu:  # numpy views: a few us less per call than tensor indexing
            a = payload.numpy()
            a[0] = c
            a[1] = seq
            a[2:] = record.numpy()
        else:  # fills and a device copy: nothing is read on the host
            payload[0] = float(c)
            payload[1] = float(seq)
            payload[2:].copy_(record)
        gathered = torch.empty(world * (width + 2), dtype=record.dtype, device=record.device)
        _all_gather_flat(gathered, payload, self.group)
        gathered = gathered.view(world, width + 2)
        if cpu:  # free to read on the host; skipped on CUDA
            rows = gathered[:, :2].numpy().tolist()
            if any(r != rows[0] for r in rows):
                rows = [(int(h[0]), int(h[1]) + 1) for h in rows]
                raise RuntimeError(
                    f"SynchronizedBatchNorm layer '{self.name}': ranks of the process group are "
                    f"not at the same layer call; (channels, call number) per rank: {rows}. "
                    "Every rank must call each layer the same number of times, with the same "
                    "number of channels")
        # F.merge_moments without its argument checks (the records are ours): per-call cost
        records = gathered[:, 2:].contiguous()
        out = torch.empty(width, dtype=record.dtype, device=record.device)
        F._run(record.device, _core.cpu_merge_moments, _core.cuda_merge_moments, world, c,
               records.data_ptr(), out.data_ptr(), threaded=False)
        return out

    def backward(self, sums: torch.Tensor) -> torch.Tensor:
        """One ``all_reduce`` (sum) of ``sums`` over the group.

        Parameters
        ----------
        sums : torch.Tensor
            This rank's grad-sums record, float64, ``(2C,)``; reduced in place.

        Returns
        -------
        torch.Tensor
            ``sums`` itself, now holding the sums over the group.
        """
        import torch.distributed as dist

        dist.all_reduce(sums, group=self.group)
        return sums
