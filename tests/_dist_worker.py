# SPDX-License-Identifier: MIT
"""One rank of a torch.distributed (Gloo) test group; started by tests/test_distributed.py.

    python _dist_worker.py RANK WORLD STORE_FILE OUT_DIR PG_TIMEOUT_S CASE [CASE ...]

Environment (both optional; the CPU tests set neither): ``PYSBN_TEST_DEVICE`` ``cpu`` (default)
or ``cuda`` (rank r runs its layers on ``cuda:{r % device_count}``, so several ranks may share
one GPU; the float64 references stay on the CPU), and ``PYSBN_TEST_BACKEND`` (default ``gloo``;
``nccl`` for CUDA). Only the cases that honour ``DEVICE`` (``check_layer``, ``check_too_few``,
``check_ddp`` and the cases built on them, listed in tests/test_gpu_layers.py) make sense on
CUDA.

Joins the group through a FileStore (no ports to pick), runs the named cases in order and
writes ``OUT_DIR/rank{RANK}.json`` = ``{case: "ok" | failure text}`` after every case (so a
later hang still leaves the earlier results). Every rank builds the *global* batch from the same
seed, runs its share through the synchronized layer and checks the result against one
``nn.BatchNorm`` in float64 over the whole batch, locally; the only collectives are the layers'
own and a few explicit all_reduces that every rank of the case runs unconditionally. Checks are
collected, not raised at once, so a failed check never leaves the ranks out of step; any other
exception ends the worker (the others then fail fast on the closed connection or on the process
group's timeout).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import traceback
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

import pysbn

# ---- collective counters --------------------------------------------------------------------------

COUNTS: Dict[str, int] = {}


def _wrap(name: str) -> None:
    fn = getattr(dist, name, None)
    if fn is None:
        return

    def counted(*args, **kwargs):
        COUNTS[name] = COUNTS.get(name, 0) + 1
        return fn(*args, **kwargs)

    setattr(dist, name, counted)


for _name in ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce",
              "broadcast", "reduce_scatter_tensor"):
    _wrap(_name)


def gathers() -> int:
    return COUNTS.get("all_gather_single", 0) + COUNTS.get("all_gather_into_tensor", 0) \
        + COUNTS.get("all_gather", 0)


def reduces() -> int:
    return COUNTS.get("all_reduce", 0)


def snapshot():
    return gathers(), reduces()


# ---- soft checks ------------------------------------------------------------------------------------

class Checks:
    def __init__(self, label: str) -> None:
        self.label = label
        self.failures: List[str] = []

    def true(self, cond: bool, msg: str) -> None:
        if not cond:
            self.failures.append(f"{self.label}: {msg}")

    def close(self, what: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float,
              atol: Optional[float] = None) -> None:
        """|actual - expected| <= atol + rtol * |expected|; atol defaults to rtol * max|expected|."""
        if tuple(actual.shape) != tuple(expected.shape):
            self.failures.append(f"{self.label}: {what}: shape {tuple(actual.shape)} != "
                                 f"{tuple(expected.shape)}")
            return
        if actual.numel() == 0:
            return
        a = actual.detach().double().cpu()
        e = expected.detach().double().cpu()
        scale = float(e.abs().max())
        if atol is None:
            atol = rtol * max(scale, 1e-30)
        err = (a - e).abs()
        bad = err > atol + rtol * e.abs()
        if bool(bad.any()) or not bool(torch.isfinite(a).all()):
            self.failures.append(f"{self.label}: {what}: max abs error {float(err.max()):.3e} "
                                 f"(scale {scale:.3e}, atol {atol:.1e}, rtol {rtol:.1e})")

    def done(self) -> None:
        if self.failures:
            raise AssertionError("\n".join(self.failures))


# ---- helpers ------------------------------------------------------------------------------------------

RANK = WORLD = -1
DEVICE = torch.device("cpu")  # set by main() from PYSBN_TEST_DEVICE

BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SBN = {1: pysbn.SynchronizedBatchNorm1d, 2: pysbn.SynchronizedBatchNorm2d,
       3: pysbn.SynchronizedBatchNorm3d}


def _fmt(x: torch.Tensor, memory_format: str) -> torch.Tensor:
    if memory_format == "channels_last":
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                            else torch.channels_last_3d)
    return x.contiguous()


def _is_fmt(y: torch.Tensor, memory_format: str) -> bool:
    if y.numel() == 0:
        return True
    if memory_format == "channels_last":
        return y.is_contiguous(memory_format=torch.channels_last if y.dim() == 4
                               else torch.channels_last_3d)
    return y.is_contiguous()


def _offsets(shares: Sequence[int]) -> List[int]:
    out = [0]
    for s in shares:
        out.append(out[-1] + s)
    return out


def _sum_over(t: torch.Tensor, group) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t, group=group)
    return t


def check_layer(label: str, kind: int, rest: Sequence[int], channels: int, shares: Sequence[int],
                dtype: torch.dtype = torch.float64, memory_format: str = "contiguous",
                group=None, members: Optional[Sequence[int]] = None, steps: int = 2,
                momentum: Optional[float] = 0.1, affine: bool = True, offset: float = 0.0,
                seed: int = 0) -> None:
    """The layer of this rank on its share of a global batch vs nn.BatchNorm (float64) on the
    whole batch: outputs, input gradients under random upstream gradients, weight/bias
    gradients summed over the group, running stats, num_batches_tracked, one collective per
    direction, and eval mode (no collective)."""
    members = list(range(WORLD)) if members is None else list(members)
    me = members.index(RANK)
    offs = _offsets(shares)
    lo, hi = offs[me], offs[me + 1]
    n = offs[-1]
    ck = Checks(f"{label} (rank {RANK}, shares {list(shares)})")
    tol = 1e-9 if dtype == torch.float64 else 2e-4

    gen = torch.Generator().manual_seed(seed)
    ref = BN[kind](channels, momentum=momentum, affine=affine, dtype=torch.float64)
    layer = SBN[kind](channels, momentum=momentum, affine=affine, process_group=group,
                      dtype=dtype, device=DEVICE)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5)
            ref.bias.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
            layer.weight.copy_(ref.weight)
            layer.bias.copy_(ref.bias)

    for step in range(steps):
        shape = (n, channels, *rest)
        xg = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0 + offset).to(dtype)
        dyg = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        x = _fmt(xg[lo:hi].to(DEVICE, copy=True), memory_format).requires_grad_()
        dy = _fmt(dyg[lo:hi].to(DEVICE, copy=True), memory_format)
        layer.train()
        layer.zero_grad(set_to_none=True)
        g0, r0 = snapshot()
        y = layer(x)
        g1, r1 = snapshot()
        y.backward(dy)
        g2, r2 = snapshot()
        want = 1 if len(members) > 1 else 0  # a group of one never communicates
        ck.true((g1 - g0, r1 - r0) == (want, 0),
                f"step {step}: forward made {g1 - g0} gathers, {r1 - r0} all_reduces "
                f"(want {want}, 0)")
        ck.true((g2 - g1, r2 - r1) == (0, want),
                f"step {step}: backward made {g2 - g1} gathers, {r2 - r1} all_reduces "
                f"(want 0, {want})")
        gw = gb = None
        if affine:
            gw = _sum_over(layer.weight.grad, group)
            gb = _sum_over(layer.bias.grad, group)
            if hi == lo:
                ck.true(bool((layer.weight.grad == 0).all()) and bool((layer.bias.grad == 0).all()),
                        f"step {step}: an empty rank must get zero weight/bias gradients")

        xr = xg.double().requires_grad_()
        ref.train()
        ref.zero_grad(set_to_none=True)
        yr = ref(xr)
        yr.backward(dyg.double())

        ck.true(y.dtype == dtype and tuple(y.shape) == tuple(x.shape),
                f"step {step}: output {y.dtype} {tuple(y.shape)}")
        ck.true(_is_fmt(y, memory_format), f"step {step}: output is not {memory_format}")
        ck.true(_is_fmt(x.grad, memory_format), f"step {step}: grad input is not {memory_format}")
        ck.close(f"step {step} output", y, yr[lo:hi], tol)
        ck.close(f"step {step} grad input", x.grad, xr.grad[lo:hi], tol)
        if affine:
            ck.close(f"step {step} grad weight (summed)", gw, ref.weight.grad, tol)
            ck.close(f"step {step} grad bias (summed)", gb, ref.bias.grad, tol)
        ck.close(f"step {step} running_mean", layer.running_mean, ref.running_mean, tol)
        ck.close(f"step {step} running_var", layer.running_var, ref.running_var, tol)
        ck.true(int(layer.num_batches_tracked) == int(ref.num_batches_tracked),
                f"step {step}: num_batches_tracked {int(layer.num_batches_tracked)}")

    # eval: the running stats, no communication
    layer.eval()
    ref.eval()
    xg = torch.randn((n, channels, *rest), generator=gen, dtype=torch.float64).to(dtype)
    g0, r0 = snapshot()
    with torch.no_grad():
        y = layer(_fmt(xg[lo:hi].to(DEVICE, copy=True), memory_format))
        yr = ref(xg.double())
    ck.true(snapshot() == (g0, r0), "eval mode communicated")
    ck.close("eval output", y, yr[lo:hi], tol)
    ck.done()


# ---- cases --------------------------------------------------------------------------------------------

def case_layers_w2() -> None:
    check_layer("bn1d (N,C) f64", 1, (), 5, [3, 4])
    check_layer("bn1d (N,C,L) f64", 1, (6,), 4, [2, 3], seed=1)
    check_layer("bn1d (N,C,L) f32", 1, (6,), 4, [3, 2], dtype=torch.float32, seed=2)
    check_layer("bn2d NCHW f64", 2, (5, 4), 3, [1, 4], seed=3)
    check_layer("bn2d channels_last f64", 2, (5, 4), 3, [3, 2], memory_format="channels_last",
                seed=4)
    check_layer("bn2d NCHW f32", 2, (6, 6), 8, [2, 5], dtype=torch.float32, seed=5)
    check_layer("bn2d channels_last f32", 2, (6, 6), 8, [4, 1], dtype=torch.float32,
                memory_format="channels_last", seed=6)
    check_layer("bn3d NCDHW f64", 3, (3, 4, 2), 4, [2, 1], seed=7)
    check_layer("bn3d channels_last_3d f64", 3, (3, 4, 2), 4, [1, 2],
                memory_format="channels_last", seed=8)
    check_layer("bn3d channels_last_3d f32", 3, (3, 4, 2), 4, [2, 2], dtype=torch.float32,
                memory_format="channels_last", seed=9)
    check_layer("bn2d momentum=None affine=False", 2, (3, 3), 5, [2, 3], momentum=None,
                affine=False, steps=3, seed=10)
    check_layer("bn2d one local value per channel per rank (global 2)", 2, (1, 1), 3, [1, 1],
                seed=11)


def case_offset_w2() -> None:
    """float32 at offset 1e4 over 2 uneven ranks: the variance (momentum 1: running_var is the
    unbiased batch variance, stored in float32) within 1e-5 relative of float64."""
    ck = Checks(f"offset 1e4 (rank {RANK})")
    shares = [3, 9]
    lo, hi = _offsets(shares)[RANK], _offsets(shares)[RANK + 1]
    for fmt in ("contiguous", "channels_last"):
        gen = torch.Generator().manual_seed(42)
        xg = (1e4 + torch.randn((12, 16, 20, 20), generator=gen, dtype=torch.float64)).float()
        layer = pysbn.SynchronizedBatchNorm2d(16, momentum=1.0)
        with torch.no_grad():
            y = layer(_fmt(xg[lo:hi].clone(), fmt))
        var_ref = xg.double().var(dim=(0, 2, 3), unbiased=True)
        mean_ref = xg.double().mean(dim=(0, 2, 3))
        rel = float(((layer.running_var.double() - var_ref).abs() / var_ref).max())
        ck.true(rel <= 1e-5, f"{fmt}: variance relative error {rel:.2e} > 1e-5")
        ck.close(f"{fmt}: mean", layer.running_mean, mean_ref, 1e-9, atol=2e-3)
        yr = nn.functional.batch_norm(xg.double(), None, None, training=True, eps=1e-5)
        ck.close(f"{fmt}: output", y, yr[lo:hi], 0.0, atol=1e-4)
    ck.done()


def _expect(exc_type, needle: str, fn: Callable[[], object]) -> Optional[str]:
    try:
        fn()
    except exc_type as exc:
        if needle not in str(exc):
            return f"{exc_type.__name__} without {needle!r}: {exc}"
        return None
    except BaseException as exc:  # noqa: BLE001
        return f"expected {exc_type.__name__}, got {type(exc).__name__}: {exc}"
    return f"expected {exc_type.__name__}, nothing raised"


def check_too_few(shares: Sequence[int], group=None, members=None) -> List[str]:
    members = list(range(WORLD)) if members is None else list(members)
    me = members.index(RANK)
    layer = pysbn.SynchronizedBatchNorm1d(3, process_group=group, device=DEVICE)
    before = (layer.running_mean.clone(), layer.running_var.clone())
    x = torch.randn(shares[me], 3, device=DEVICE)
    err = _expect(ValueError, "more than 1 value per channel", lambda: layer(x))
    out = [f"shares {list(shares)}: {err}"] if err else []
    if not (torch.equal(before[0], layer.running_mean) and torch.equal(before[1], layer.running_var)
            and int(layer.num_batches_tracked) == 0):
        out.append(f"shares {list(shares)}: a failed step changed the running stats")
    return out


def case_too_few_w2() -> None:
    """The "more than 1 value per channel" check is global: ValueError on every rank when the
    group has one value per channel in all; no error with one value per rank (see layers)."""
    ck = Checks(f"too few values (rank {RANK})")
    ck.failures += check_too_few([1, 0])
    ck.failures += check_too_few([0, 1])
    # every rank empty: a zero-size batch (as for a lone layer), not an error; no stats change
    layer = pysbn.SynchronizedBatchNorm1d(3, device=DEVICE)
    y = layer(torch.randn(0, 3, device=DEVICE))
    ck.true(tuple(y.shape) == (0, 3), f"shares [0, 0]: output shape {tuple(y.shape)}")
    ck.true(bool((layer.running_mean == 0).all()) and bool((layer.running_var == 1).all()),
            "shares [0, 0]: the running stats changed")
    # BN2d with 1x1 planes: the count is N*H*W
    layer = pysbn.SynchronizedBatchNorm2d(2, device=DEVICE)
    err = _expect(ValueError, "more than 1 value per channel",
                  lambda: layer(torch.randn(1 - RANK, 2, 1, 1, device=DEVICE)))
    ck.true(err is None, f"bn2d (1,2,1,1)+(0,2,1,1): {err}")
    ck.done()


def case_mismatch_w2() -> None:
    """Rank 0 calls layer a twice; rank 1 calls a, then b: the second exchange pairs calls of
    different layer positions, and both ranks get the header check's RuntimeError (no hang)."""
    ck = Checks(f"call mismatch (rank {RANK})")
    a = pysbn.SynchronizedBatchNorm2d(3)
    b = pysbn.SynchronizedBatchNorm2d(3)
    x = torch.randn(2, 3, 4, 4)
    a(x)
    second = a if RANK == 0 else b
    err = _expect(RuntimeError, "not at the same layer call", lambda: second(x))
    ck.true(err is None, str(err))
    # the group is still usable afterwards
    c = pysbn.SynchronizedBatchNorm2d(3)
    c(x)
    ck.done()


def _resnet_like(width: int = 6, classes: int = 4) -> nn.Module:
    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU())
            self.block1 = Block(width)
            self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1,
                                                bias=False),
                                      nn.BatchNorm2d(2 * width, momentum=None), nn.ReLU())
            self.block2 = Block(2 * width)
            self.head = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(2 * width),
                                      nn.Linear(2 * width, classes))

        def forward(self, x):
            x = self.block2(self.down(self.block1(self.stem(x))))
            return self.head(x.mean(dim=(2, 3), keepdim=True))

    return Net()


def check_ddp(shares: Sequence[int], steps: int = 3, memory_format: str = "contiguous") -> None:
    """DDP (gradients averaged over ranks) with loss_r = sum of this rank's sample losses
    * W / N: the averaged gradient is that of the mean loss over the global batch, so the run
    must end where one plain-BN process trained on the whole batch (mean loss) ends."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ck = Checks(f"DDP resnet-like (rank {RANK}, shares {list(shares)}, {memory_format})")
    offs = _offsets(shares)
    lo, hi = offs[RANK], offs[RANK + 1]
    n = offs[-1]
    torch.manual_seed(1234)
    ref = _resnet_like().double()
    model = pysbn.convert_model(copy.deepcopy(ref)).to(DEVICE)
    n_sync = sum(isinstance(m, (pysbn.SynchronizedBatchNorm1d, pysbn.SynchronizedBatchNorm2d))
                 for m in model.modules())
    ck.true(n_sync == 7, f"convert_model made {n_sync} synchronized layers (want 7)")
    ddp = DDP(model, device_ids=[DEVICE] if DEVICE.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(99)
    ce = nn.functional.cross_entropy
    for _ in range(steps):
        xg = torch.randn((n, 3, 8, 8), generator=gen, dtype=torch.float64) + 3.0
        tg = torch.randint(0, 4, (n,), generator=gen)
        opt.zero_grad(set_to_none=True)
        x = _fmt(xg[lo:hi].to(DEVICE, copy=True), memory_format)
        loss = ce(ddp(x), tg[lo:hi].to(DEVICE), reduction="sum") * (WORLD / n)
        loss.backward()
        opt.step()
        opt_ref.zero_grad(set_to_none=True)
        ce(ref(xg), tg).backward()
        opt_ref.step()
    # An absolute floor of 1e-12: some values are rounding noise around an exact 0 (the bias of
    # a BN whose output goes through a conv into another BN has a zero gradient; the running
    # mean after a 1x1 conv of batch-normalized channels is 0), ~1e-16 in either run.
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        ck.close(f"parameter {name}", got[name], p, 1e-8, 1e-8 * max(float(p.abs().max()), 1e-4))
    got_b = dict(model.named_buffers())
    for name, b in ref.named_buffers():
        if b.dtype.is_floating_point:
            ck.close(f"buffer {name}", got_b[name], b, 1e-8, 1e-8 * max(float(b.abs().max()), 1e-4))
        else:
            ck.true(torch.equal(got_b[name].cpu(), b), f"buffer {name}: {got_b[name]} != {b}")
    # eval mode on both: same predictions, no communication
    model.eval()
    ref.eval()
    xe = torch.randn((4, 3, 8, 8), generator=gen, dtype=torch.float64)
    before = snapshot()
    with torch.no_grad():
        ck.close("eval output", model(xe.to(DEVICE)), ref(xe), 1e-8)
    ck.true(snapshot() == before, "eval mode communicated")
    ck.done()


def case_ddp_w2() -> None:
    check_ddp([3, 5])
    check_ddp([4, 4], steps=2, memory_format="channels_last")


def case_empty_rank_w3() -> None:
    check_layer("bn2d NCHW, empty rank 1", 2, (4, 3), 3, [4, 0, 3])
    check_layer("bn2d channels_last, empty rank 1", 2, (4, 3), 3, [2, 0, 3],
                memory_format="channels_last", seed=1)
    check_layer("bn1d (N,C), empty rank 0", 1, (), 6, [0, 2, 3], seed=2)
    check_layer("bn1d (N,C,L) f32, empty rank 2", 1, (5,), 6, [3, 2, 0], dtype=torch.float32,
                seed=3)
    check_layer("bn3d channels_last_3d, empty rank 2", 3, (2, 3, 2), 2, [1, 2, 0],
                memory_format="channels_last", seed=4)


def case_too_few_w3() -> None:
    ck = Checks(f"too few values, 3 ranks (rank {RANK})")
    ck.failures += check_too_few([0, 1, 0])
    ck.failures += check_too_few([0, 0, 1])
    ck.done()


def case_subgroup_w3() -> None:
    """Ranks 0 and 2 sync in a sub-group; rank 1, alone in its group, never communicates."""
    g02 = dist.new_group([0, 2])
    g1 = dist.new_group([1])
    if RANK == 1:
        before = snapshot()
        check_layer("lone rank 1 (group of 1)", 2, (3, 3), 4, [3], group=g1, members=[1],
                    seed=21, steps=1)
        # check_layer's own explicit all_reduces run on g1 (a group of one); no layer exchange
        ck = Checks("lone rank 1")
        ck.true(gathers() == before[0], "the layer of a group of one gathered")
        ck.done()
    else:
        check_layer("sub-group [0, 2] bn2d", 2, (3, 3), 4, [2, 3], group=g02, members=[0, 2],
                    seed=20)
        check_layer("sub-group [0, 2] bn1d (N,C,L), empty rank 2", 1, (4,), 3, [1, 0],
                    group=g02, members=[0, 2], seed=22)
    # a rank outside the layer's group gets a ValueError
    if RANK == 1:
        layer = pysbn.SynchronizedBatchNorm2d(2, process_group=g02)
        err = _expect(ValueError, "not a member", lambda: layer(torch.randn(2, 2, 2, 2)))
        ck = Checks("rank outside the group")
        ck.true(err is None, str(err))
        ck.done()


def case_layers_w4() -> None:
    check_layer("bn2d NCHW 4 ranks", 2, (3, 5), 3, [1, 2, 0, 3])
    check_layer("bn2d channels_last f32 4 ranks", 2, (5, 5), 6, [2, 1, 3, 2],
                dtype=torch.float32, memory_format="channels_last", seed=1)
    check_layer("bn1d 4 ranks", 1, (), 5, [2, 0, 1, 1], seed=2)


def case_subgroups_w4() -> None:
    """Two sub-groups [0, 1] and [2, 3], different data: each pair matches its own batch."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pair = RANK // 2
    members = [2 * pair, 2 * pair + 1]
    shares = [[3, 1], [2, 2]][pair]
    check_layer(f"sub-group {members} bn2d", 2, (4, 4), 3, shares, group=groups[pair],
                members=members, seed=30 + pair)
    check_layer(f"sub-group {members} bn3d channels_last_3d", 3, (2, 2, 3), 2, shares,
                group=groups[pair], members=members, memory_format="channels_last",
                seed=40 + pair)


def case_ddp_w4() -> None:
    check_ddp([2, 3, 1, 2], steps=3)


# ---- torch.compile ------------------------------------------------------------------------------------

def _counting_backend(counts: Dict[str, int]):
    """An AOT backend (eager kernels) that counts the collectives of the forward and backward
    graphs it is given: what a compiled step communicates."""
    from torch._dynamo.backends.common import aot_autograd

    def compiler(kind):
        def fn(gm, example_inputs):
            for node in gm.graph.nodes:
                name = str(node.target)
                if "_c10d_functional" in name and "wait" not in name:
                    key = f"{kind}:{name.split('.')[1] if '.' in name else name}"
                    counts[key] = counts.get(key, 0) + 1
            return gm
        return fn

    return aot_autograd(fw_compiler=compiler("fwd"), bw_compiler=compiler("bwd"))


def _small_net(channels: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels, momentum=None), nn.ReLU(), nn.Flatten(),
                         nn.BatchNorm1d(channels * 16))


def check_compiled(label: str, wrap: str, backend, shares: Sequence[int], steps: int = 2,
                   memory_format: str = "contiguous", counts: Optional[Dict[str, int]] = None
                   ) -> None:
    """A compiled synchronised training step (fullgraph for the plain model) against the same
    net with nn.BatchNorm in float64 on the whole batch, step by step: outputs, input and
    parameter gradients (summed over the ranks), running statistics, num_batches_tracked.
    wrap: "compile" = compile(model, fullgraph=True), "compile(ddp)", "ddp(compile)"."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ck = Checks(f"{label} (rank {RANK}, shares {list(shares)})")
    offs = _offsets(shares)
    lo, hi = offs[RANK], offs[RANK + 1]
    n = offs[-1]
    torch.manual_seed(77)
    ref = _small_net().double()
    model = pysbn.convert_model(copy.deepcopy(ref)).float()
    if wrap == "compile":
        run = torch.compile(model, backend=backend, fullgraph=True)
    elif wrap == "compile(ddp)":
        run = torch.compile(DDP(model), backend=backend)
    else:
        run = DDP(torch.compile(model, backend=backend))
    gen = torch.Generator().manual_seed(5)
    for step in range(steps):
        xg = torch.randn((n, 3, 4, 4), generator=gen, dtype=torch.float64) * 2 + 1
        dyg = torch.randn((n, 4 * 16), generator=gen, dtype=torch.float64)
        x = _fmt(xg[lo:hi].float(), memory_format).requires_grad_()
        model.zero_grad(set_to_none=True)
        y = run(x)
        y.backward(dyg[lo:hi].float())
        ref.zero_grad(set_to_none=True)
        xr = xg.clone().requires_grad_()
        yr = ref(xr)
        yr.backward(dyg)
        ck.close(f"step {step} output", y, yr[lo:hi], 2e-4)
        ck.close(f"step {step} grad input", x.grad, xr.grad[lo:hi], 2e-4)
        got = dict(model.named_parameters())
        for name, p in ref.named_parameters():
            g = got[name].grad.detach().clone()
            if wrap == "compile":  # DDP averages the gradients itself
                dist.all_reduce(g)
            else:
                g = g * WORLD
            ck.close(f"step {step} grad {name} (summed)", g, p.grad, 2e-4)
        got_b = dict(model.named_buffers())
        for name, b in ref.named_buffers():
            if b.dtype.is_floating_point:
                ck.close(f"step {step} buffer {name}", got_b[name], b, 2e-4)
            else:
                ck.true(int(got_b[name]) == int(b), f"step {step} {name}: {int(got_b[name])} "
                        f"!= {int(b)}")
    if counts is not None:
        layers = 3
        ck.true(counts.get("fwd:all_gather_into_tensor", 0) == layers
                and counts.get("bwd:all_reduce", 0) == layers
                and sum(counts.values()) == 2 * layers,
                f"collectives in the compiled graphs: {counts} (want one all_gather per layer "
                f"forward, one all_reduce per layer backward)")
    ck.done()


def case_compile_w2() -> None:
    counts: Dict[str, int] = {}
    check_compiled("compile fullgraph, counted collectives", "compile", _counting_backend(counts),
                   [3, 5], counts=counts)
    torch._dynamo.reset()
    check_compiled("compile fullgraph, inductor", "compile", "inductor", [2, 6])
    torch._dynamo.reset()
    check_compiled("compile fullgraph, inductor, channels_last", "compile", "inductor", [4, 4],
                   memory_format="channels_last", steps=1)


def case_compile_ddp_w2() -> None:
    check_compiled("compile(DDP(model))", "compile(ddp)", "inductor", [3, 5])
    torch._dynamo.reset()
    check_compiled("DDP(compile(model))", "ddp(compile)", "inductor", [5, 3])


def case_compile_mismatch_w2() -> None:
    """Compiled: rank 0 calls layer a, rank 1 layer b (same channels): both ranks raise a
    RuntimeError naming the layer (the header checked in the graph), nobody aborts."""
    ck = Checks(f"compiled layer mismatch (rank {RANK})")
    a = pysbn.SynchronizedBatchNorm2d(3)
    b = pysbn.SynchronizedBatchNorm2d(3)
    a._sbn_set_name("block.a")
    b._sbn_set_name("block.b")
    layer = a if RANK == 0 else b
    fn = torch.compile(layer, backend="inductor", fullgraph=True)
    err = _expect(RuntimeError, "not at the same layer call", lambda: fn(torch.randn(2, 3, 4, 4)))
    ck.true(err is None, str(err))
    name = "block.a" if RANK == 0 else "block.b"
    err = _expect(RuntimeError, f"'{name}'", lambda: fn(torch.randn(2, 3, 4, 4)))
    ck.true(err is None, f"the error does not name the layer: {err}")
    ck.done()


# ---- ranks at different layers --------------------------------------------------------------------

def _named(name: str, channels: int = 3) -> nn.Module:
    layer = pysbn.SynchronizedBatchNorm2d(channels)
    layer._sbn_set_name(name)
    return layer


def case_identity_w2() -> None:
    """Stochastic depth gone wrong: rank 0 calls layer 'stage.a', rank 1 'stage.b' (same
    channels). Every rank raises a RuntimeError naming both layers; the running stats stay;
    the group stays usable. Also in backward (the forward calls matched, the backward calls
    of different layers meet): RuntimeError naming the layer, on every rank."""
    ck = Checks(f"layer identity (rank {RANK})")
    a, b = _named("stage.a"), _named("stage.b")
    mine = a if RANK == 0 else b
    x = torch.randn(2, 3, 4, 4)
    err = _expect(RuntimeError, "'stage.a' (3 channels, float32, call 1); rank 1: 'stage.b'",
                  lambda: mine(x))
    ck.true(err is None, f"forward: {err}")
    ck.true(int(mine.num_batches_tracked) == 0 and bool((mine.running_mean == 0).all()),
            "a failed step changed the layer's state")
    _named("stage.c")(x)  # the group still works
    # backward: both ranks ran forward of c then d; rank 1 runs backward of d first
    c, d = _named("stage.c2"), _named("stage.d2")
    xc = x.clone().requires_grad_()
    yc = c(xc)
    yd = d(xc)
    first = yc if RANK == 0 else yd
    err = _expect(RuntimeError, "not at the same layer call in backward",
                  lambda: first.backward(torch.randn_like(first)))
    ck.true(err is None, f"backward: {err}")
    ck.done()


def case_check_mode_w2() -> None:
    """Layers of different channel counts on the two ranks, with pysbn.set_sync_check(True):
    the header is gathered first, so every rank raises a RuntimeError naming the layers
    instead of a collective of mismatched sizes (which Gloo answers by aborting)."""
    ck = Checks(f"check mode (rank {RANK})")
    pysbn.set_sync_check(True)
    try:
        a, b = _named("head.bn", 3), _named("head.bn_wide", 5)  # one model on every rank
        mine = a if RANK == 0 else b
        err = _expect(RuntimeError, "rank 0: 'head.bn' (3 channels, float32, call 1); rank 1: "
                      "'head.bn_wide' (5 channels, float32, call 1)",
                      lambda: mine(torch.randn(2, mine.num_features, 2, 2)))
        ck.true(err is None, str(err))
        ck.true(int(mine.num_batches_tracked) == 0, "a failed step changed the layer's state")
        _named("head.same", 4)(torch.randn(2, 4, 2, 2))  # matching calls work in check mode
    finally:
        pysbn.set_sync_check(False)
    ck.done()


def case_sizes_detail_w2() -> None:
    """Run with TORCH_DISTRIBUTED_DEBUG=DETAIL: layers of different channel counts meet;
    torch's collective checker rejects the all-gather and every rank raises a RuntimeError that
    names its layer (no abort)."""
    ck = Checks(f"DETAIL (rank {RANK})")
    mine = _named("neck.bn", 3) if RANK == 0 else _named("neck.bn_wide", 6)
    name = "neck.bn" if RANK == 0 else "neck.bn_wide"
    err = _expect(RuntimeError, f"layer '{name}'", lambda: mine(torch.randn(2, mine.num_features,
                                                                           2, 2)))
    ck.true(err is None, str(err))
    ck.done()


def case_stops_calling_w2() -> None:
    """Rank 1 stops calling a layer (run with a short process-group timeout): rank 0's call
    fails after the timeout with a RuntimeError that names the layer. Last case of its group
    (the group is not usable after a timed-out collective)."""
    import time

    ck = Checks(f"stops calling (rank {RANK})")
    layer = _named("tail.bn")
    layer(torch.randn(2, 3, 2, 2))
    if RANK == 0:
        err = _expect(RuntimeError, "SynchronizedBatchNorm layer 'tail.bn': the forward "
                      "collective call 2 failed", lambda: layer(torch.randn(2, 3, 2, 2)))
        ck.true(err is None, str(err))
    else:
        time.sleep(float(os.environ.get("PYSBN_TEST_PG_TIMEOUT", "5")) + 3)
    ck.done()


# ---- model zoos, checkpointing ---------------------------------------------------------------------

def _ddp_vs_one_process(label: str, make, shares: Sequence[int], steps: int, size: int,
                        classes: int) -> None:
    """DDP over the ranks (loss scaled so the averaged gradient is that of the global mean
    loss) ends where one process training the plain model on the whole batch ends."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ck = Checks(f"{label} (rank {RANK}, shares {list(shares)})")
    offs = _offsets(shares)
    lo, hi = offs[RANK], offs[RANK + 1]
    n = offs[-1]
    torch.manual_seed(4321)
    ref = make().double()
    model = pysbn.convert_model(copy.deepcopy(ref))
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(7)
    ce = nn.functional.cross_entropy
    for _ in range(steps):
        xg = torch.randn((n, 3, size, size), generator=gen, dtype=torch.float64)
        tg = torch.randint(0, classes, (n,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = ce(ddp(xg[lo:hi]), tg[lo:hi], reduction="sum") * (WORLD / n)
        loss.backward()
        opt.step()
        opt_ref.zero_grad(set_to_none=True)
        ce(ref(xg), tg).backward()
        opt_ref.step()
    # An absolute floor of 1e-12: some values are rounding noise around an exact 0 (the bias of
    # a BN whose output goes through a conv into another BN has a zero gradient; the running
    # mean after a 1x1 conv of batch-normalized channels is 0), ~1e-16 in either run.
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        ck.close(f"parameter {name}", got[name], p, 1e-8, 1e-8 * max(float(p.abs().max()), 1e-4))
    got_b = dict(model.named_buffers())
    for name, b in ref.named_buffers():
        if b.dtype.is_floating_point:
            ck.close(f"buffer {name}", got_b[name], b, 1e-8, 1e-8 * max(float(b.abs().max()), 1e-4))
        else:
            ck.true(torch.equal(got_b[name], b), f"buffer {name}: {got_b[name]} != {b}")
    ck.done()


def case_zoo_ddp_w2() -> None:
    """timm's mobilenetv3 (BatchNormAct2d: hardswish and ReLU fused) and torchvision's resnet18
    under DDP on 2 ranks, uneven shares, against one process on the whole batch."""
    from _support import model_zoos

    timm, torchvision = model_zoos()
    _ddp_vs_one_process(
        "timm mobilenetv3_small_050", lambda: timm.create_model(
            "mobilenetv3_small_050", pretrained=False, num_classes=4, drop_rate=0.0,
            drop_path_rate=0.0), [3, 5], steps=2, size=32, classes=4)
    _ddp_vs_one_process("torchvision resnet18", lambda: torchvision.models.resnet18(num_classes=3),
                        [5, 2], steps=2, size=32, classes=3)


_ACTS = {"relu": lambda: nn.ReLU(), "leaky_relu": lambda: nn.LeakyReLU(0.2),
         "silu": lambda: nn.SiLU(), "gelu": lambda: nn.GELU(),
         "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "hardswish": lambda: nn.Hardswish(),
         "identity": lambda: nn.Identity(), "tanh": lambda: nn.Tanh()}


def case_act_w2() -> None:
    """SynchronizedBatchNormAct2d on uneven shares [5, 2], every activation (tanh: not fused),
    both memory formats, float64, two steps: outputs, input gradients, weight/bias gradients
    summed over the ranks, running statistics and one collective per direction, against
    nn.BatchNorm2d + the activation on the whole batch."""
    shares = [5, 2]
    offs = _offsets(shares)
    lo, hi, n = offs[RANK], offs[RANK + 1], offs[-1]
    for name, make_act in _ACTS.items():
        for fmt in ("contiguous", "channels_last"):
            ck = Checks(f"act {name} {fmt} (rank {RANK}, shares {shares})")
            gen = torch.Generator().manual_seed(len(name))
            ref = nn.Sequential(nn.BatchNorm2d(4, dtype=torch.float64), make_act())
            with torch.no_grad():
                ref[0].weight.copy_(torch.rand(4, generator=gen, dtype=torch.float64) + 0.5)
                ref[0].bias.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
            layer = pysbn.SynchronizedBatchNormAct2d(4, act_layer=nn.ReLU, dtype=torch.float64,
                                                     device=DEVICE)
            layer.act = make_act()
            layer.load_state_dict(ref[0].state_dict())
            for step in range(2):
                xg = torch.randn((n, 4, 5, 3), generator=gen, dtype=torch.float64) * 1.5 + 0.2
                dyg = torch.randn((n, 4, 5, 3), generator=gen, dtype=torch.float64)
                x = _fmt(xg[lo:hi].to(DEVICE, copy=True), fmt).requires_grad_()
                layer.zero_grad(set_to_none=True)
                g0, r0 = snapshot()
                y = layer(x)
                g1, r1 = snapshot()
                y.backward(_fmt(dyg[lo:hi].to(DEVICE, copy=True), fmt))
                g2, r2 = snapshot()
                ck.true((g1 - g0, r1 - r0, g2 - g1, r2 - r1) == (1, 0, 0, 1),
                        f"step {step}: collectives {(g1 - g0, r1 - r0, g2 - g1, r2 - r1)}")
                gw, gb = _sum_over(layer.weight.grad, None), _sum_over(layer.bias.grad, None)
                xr = xg.clone().requires_grad_()
                ref.zero_grad(set_to_none=True)
                yr = ref(xr)
                yr.backward(dyg)
                ck.true(_is_fmt(y, fmt), f"step {step}: output is not {fmt}")
                ck.close(f"step {step} output", y, yr[lo:hi], 1e-11)
                ck.close(f"step {step} grad input", x.grad, xr.grad[lo:hi], 1e-10)
                ck.close(f"step {step} grad weight (summed)", gw, ref[0].weight.grad, 1e-10)
                ck.close(f"step {step} grad bias (summed)", gb, ref[0].bias.grad, 1e-10)
                ck.close(f"step {step} running_mean", layer.running_mean, ref[0].running_mean,
                         1e-12)
                ck.close(f"step {step} running_var", layer.running_var, ref[0].running_var,
                         1e-12)
            ck.done()


class _Checkpointed(nn.Module):
    """The resnet-like net with its first two stages under non-reentrant checkpointing."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        n = self.net
        y = checkpoint(n.stem, x, use_reentrant=False)
        y = checkpoint(n.block1, y, use_reentrant=False)
        return n.head(n.block2(n.down(y)).mean(dim=(2, 3), keepdim=True))


def case_checkpoint_w2() -> None:
    """Non-reentrant activation checkpointing under DDP: the recomputation synchronises again
    and updates the running statistics a second time, as nn.BatchNorm's does in one process."""
    _ddp_vs_one_process("checkpointed resnet-like", lambda: _Checkpointed(_resnet_like()),
                        [3, 4], steps=2, size=8, classes=4)


def case_layers_cuda_w2() -> None:
    """The layers of case_layers_w2 that matter on a GPU (run with PYSBN_TEST_DEVICE=cuda):
    both memory formats, float32/float64, an empty rank."""
    check_layer("bn1d (N,C) f64", 1, (), 5, [3, 4])
    check_layer("bn1d (N,C,L) f32", 1, (6,), 4, [3, 2], dtype=torch.float32, seed=2)
    check_layer("bn2d NCHW f32", 2, (6, 6), 8, [2, 5], dtype=torch.float32, seed=5)
    check_layer("bn2d channels_last f32", 2, (6, 6), 8, [4, 1], dtype=torch.float32,
                memory_format="channels_last", seed=6)
    check_layer("bn2d NCHW f64, empty rank 1", 2, (4, 3), 3, [4, 0], seed=12)
    check_layer("bn3d channels_last_3d f64", 3, (3, 4, 2), 4, [1, 2],
                memory_format="channels_last", seed=8)
    check_layer("bn2d momentum=None affine=False", 2, (3, 3), 5, [2, 3], momentum=None,
                affine=False, steps=3, seed=10)


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def main(argv: Sequence[str]) -> int:
    global RANK, WORLD, DEVICE
    rank, world, store, out_dir, timeout = argv[:5]
    os.environ["PYSBN_TEST_PG_TIMEOUT"] = timeout
    cases = list(argv[5:])
    RANK, WORLD = int(rank), int(world)
    torch.set_num_threads(1)
    if os.environ.get("PYSBN_TEST_DEVICE", "cpu") == "cuda":
        DEVICE = torch.device("cuda", RANK % torch.cuda.device_count())
        torch.cuda.set_device(DEVICE)
    backend = os.environ.get("PYSBN_TEST_BACKEND", "gloo")
    dist.init_process_group(backend, init_method=f"file://{store}", rank=RANK, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=float(timeout)))
    results: Dict[str, str] = {}
    path = os.path.join(out_dir, f"rank{RANK}.json")
    status = 0
    try:
        for name in cases:
            try:
                CASES[name]()
                results[name] = "ok"
            except AssertionError as exc:  # checks ran after the collectives: keep going
                results[name] = f"FAIL\n{exc}"
                status = 1
            except BaseException:  # noqa: BLE001 - unexpected: the ranks may be out of step
                results[name] = f"ERROR\n{traceback.format_exc()}"
                status = 2
                with open(path + ".tmp", "w") as f:
                    json.dump(results, f)
                os.replace(path + ".tmp", path)
                return 2
            with open(path + ".tmp", "w") as f:
                json.dump(results, f)
            os.replace(path + ".tmp", path)
    finally:
        if status != 2:
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
