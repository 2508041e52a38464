# SPDX-License-Identifier: MIT
"""The torch.distributed synchronizer: one collective per direction over a process group."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Dict, List

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed import ProcessGroup

import torch

from .. import ops
from . import base
from .base import Synchronizer

__all__ = ["ProcessGroupSync", "LayerIdentity"]

_HEADER = 4  # [layer key, channels, dtype code, call number] in front of the forward record
_DTYPE_CODES = {torch.float32: 0.0, torch.float64: 1.0, torch.float16: 2.0, torch.bfloat16: 3.0}
_DTYPE_NAMES = {v: str(k).replace("torch.", "") for k, v in _DTYPE_CODES.items()}

# Layer names by key, for messages that name the layer another rank was at (every rank builds
# the same model, so a key seen on another rank is usually known here too).
_NAMES: Dict[int, str] = {}


class LayerIdentity:
    """What a synchronised call says about its layer: a name, a key derived from it (exact in
    float64: 32 bits for the forward header, 20 for the backward check) and the layer's call
    counter (eager mode; one element, shared by the synchronizers of its calls)."""

    __slots__ = ("name", "key", "small_key", "counter", "headers")

    def __init__(self, name: str) -> None:
        self.name = name
        self.key = zlib.crc32(name.encode("utf-8"))
        self.small_key = self.key & 0xFFFFF
        self.counter: List[int] = [0]
        self.headers: dict = {}  # CUDA: the header on each device (see ProcessGroupSync)
        _NAMES[self.key] = name

    def __getstate__(self):
        return {"name": self.name}

    def __setstate__(self, state) -> None:
        self.__init__(state["name"])


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """c10d all-gather of ``inp`` (1-D, same size on every rank) into ``out`` (rank order).

    torch >= 2.13 names it ``all_gather_single`` (``all_gather_into_tensor`` warns there). The
    flat form is the one every backend accepts. Looked up at each call, so that a benchmark or a
    test can wrap the functions to count collectives.
    """
    import torch.distributed as dist

    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _funcol():
    import torch.distributed._functional_collectives as funcol

    return funcol


def _funcol_all_gather(inp: torch.Tensor, group) -> torch.Tensor:
    funcol = _funcol()
    fn = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    return fn(inp, 0, group)


class ProcessGroupSync(Synchronizer):
    """Synchronisation over a torch.distributed process group.

    Forward: one all-gather of ``[key, C, dtype, call, count, mean[C], m2[C]]`` (float64,
    ``2C+5`` values) per rank, then the exact Chan merge of the gathered records on every rank
    (``pysbn::merge_moments``; exact under unequal counts and ranks with count 0; no sums of
    squares, so nothing is lost at large offsets). Backward: one ``all_reduce`` (sum) of the
    ``2C`` grad sums (plus, on CPU, two values of the layer key, which checks that every rank
    is at the same layer). Every rank gets the same merged record, so the running statistics,
    which every rank updates on its own buffers, stay equal across ranks.

    The header is checked where that costs no host synchronisation: in eager mode on CPU
    tensors (the message names the layer each rank was at), and in compiled graphs on CPU with
    an in-graph assertion (``torch._assert_async``). On CUDA nothing is read on the host unless
    the check mode is on (:func:`pysbn.set_sync_check`). Eager mode uses the c10d collectives
    (so ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` checks them, and a failed or timed-out collective is
    re-raised naming the layer); compiled graphs use the functional collectives, which the
    graph holds (no graph break, CUDA-graph capturable).
    """

    updates_running_stats = True

    def __init__(self, group: "ProcessGroup", world_size: int, layer: LayerIdentity,
                 dtype: torch.dtype) -> None:
        """
        Parameters
        ----------
        group : torch.distributed.ProcessGroup
            The group to synchronise over (the layer's ``process_group`` or the default group).
        world_size : int
            Its size (> 1).
        layer : LayerIdentity
            The layer's identity (name, key, call counter).
        dtype : torch.dtype
            The dtype of the layer's input in this call (sent in the header).
        """
        self.group = group
        self.world_size = world_size
        self.layer = layer
        self.dtype_code = _DTYPE_CODES[dtype]

    # ---- forward --------------------------------------------------------------------------------

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
            The ranks are not at the same call of the same layer (checked as described in the
            class notes), or the collective failed or timed out (eager mode).
        """
        c = (record.shape[0] - 1) // 2
        world = self.world_size
        width = _HEADER + record.shape[0]
        compiling = torch.compiler.is_compiling()
        cpu = record.device.type == "cpu"
        if compiling:
            head = (float(self.layer.key), float(c), self.dtype_code, -1.0)
            payload = torch.cat((torch.tensor(head, dtype=record.dtype, device=record.device),
                                 record))
            gathered = _funcol_all_gather(payload, self.group).view(world, width)
            if cpu:
                torch._assert_async((gathered[:, :3] == gathered[:1, :3]).all(), self._mismatch(
                    None, "forward"))
        else:
            seq = self.layer.counter[0]
            self.layer.counter[0] += 1
            check = cpu or base.get_sync_check()
            # On CUDA, outside the check mode, nothing reads the header on the host: its call
            # number is not sent, so the header is a constant of the layer, copied to the
            # device once (a fresh host-to-device copy at each call would block).
            head = (float(self.layer.key), float(c), self.dtype_code,
                    float(seq) if check else -1.0)
            header = (torch.tensor(head, dtype=record.dtype, device=record.device) if check
                      else self._device_header(head, record.device))
            if base.get_sync_check():
                heads = torch.empty(world * _HEADER, dtype=record.dtype, device=record.device)
                self._collective("forward", seq, lambda: _all_gather(heads, header, self.group))
                self._check_headers(heads.view(world, _HEADER).tolist(), "forward")
                check = False
            payload = torch.cat((header, record))
            gathered = torch.empty(world * width, dtype=record.dtype, device=record.device)
            self._collective("forward", seq, lambda: _all_gather(gathered, payload, self.group))
            gathered = gathered.view(world, width)
            if check:
                self._check_headers(gathered[:, :_HEADER].tolist(), "forward")
        return ops.trusted.merge_moments(gathered[:, _HEADER:])

    def _device_header(self, head, device) -> torch.Tensor:
        key = (device, head[1], head[2])
        t = self.layer.headers.get(key)
        if t is None:
            t = self.layer.headers[key] = torch.tensor(head, dtype=torch.float64, device=device)
        return t

    # ---- backward -------------------------------------------------------------------------------

    def backward(self, sums: torch.Tensor) -> torch.Tensor:
        """One ``all_reduce`` (sum) of ``sums`` over the group.

        Parameters
        ----------
        sums : torch.Tensor
            This rank's grad-sums record, float64, ``(2C,)``.

        Returns
        -------
        torch.Tensor
            The sums over the group (a new tensor).
        """
        compiling = torch.compiler.is_compiling()
        cpu = sums.device.type == "cpu"
        n = sums.shape[0]
        a = float(self.layer.small_key)
        world = self.world_size
        if cpu:  # two values that check the layer: sum(a) = world*a and sum(a^2) = world*a^2
            payload = torch.cat((sums, torch.tensor((a, a * a), dtype=sums.dtype)))
        else:
            payload = sums
        if compiling:
            out = _funcol().all_reduce(payload, "sum", self.group)
            if cpu:
                torch._assert_async(
                    (out[n] == world * a) & (out[n + 1] == world * a * a),
                    self._mismatch(None, "backward"))
        else:
            import torch.distributed as dist

            out = payload
            self._collective("backward", None, lambda: dist.all_reduce(out, group=self.group))
            if cpu and (float(out[n]) != world * a or float(out[n + 1]) != world * a * a):
                raise RuntimeError(self._mismatch(None, "backward"))
        return out[:n] if cpu else out

    # ---- errors ---------------------------------------------------------------------------------

    def _collective(self, direction: str, seq, fn) -> None:
        try:
            fn()
        except RuntimeError as exc:
            import torch.distributed as dist

            call = f" call {seq + 1}" if seq is not None else ""
            raise RuntimeError(
                f"SynchronizedBatchNorm layer '{self.layer.name}': the {direction} collective"
                f"{call} failed on rank {dist.get_rank()} ({type(exc).__name__}: {exc}). A rank "
                "that stops calling this layer, calls another layer, or fails elsewhere leaves "
                "the others waiting until the process group's timeout; every rank must call "
                "the same layers in the same order") from exc

    def _mismatch(self, rows, direction: str) -> str:
        what = (f"SynchronizedBatchNorm layer '{self.layer.name}': the ranks of the process group "
                f"are not at the same layer call in {direction}")
        if rows is not None:
            def describe(h):
                key, c, dt, seq = int(h[0]), int(h[1]), h[2], int(h[3])
                name = _NAMES.get(key, f"<unknown layer, key {key}>")
                call = f", call {seq + 1}" if seq >= 0 else ""
                return f"'{name}' ({c} channels, {_DTYPE_NAMES.get(dt, dt)}{call})"
            what += "; " + "; ".join(f"rank {r}: {describe(h)}" for r, h in enumerate(rows))
        return (what + ". Every rank must call the same layers in the same order, the same number "
                "of times, with the same number of channels and dtype (stochastic depth and "
                "conditional branches must agree across ranks)")

    def _check_headers(self, rows, direction: str) -> None:
        first = rows[0]
        if any(r != first for r in rows):
            raise RuntimeError(self._mismatch(rows, direction))

