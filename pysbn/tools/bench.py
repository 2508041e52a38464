# SPDX-License-Identifier: MIT
"""``pysbn bench``: the benchmark protocol (the one BENCHMARKS.md describes) on this machine.

Every claim is a ratio measured in one process, implementations interleaved round-robin:

- ``torch``: the ``nn.BatchNorm1d/2d/3d`` layer in training mode, autograd backward with a random
  upstream gradient (on GPU with cuDNN; ``torch_native`` is the same with cuDNN disabled);
- ``pysbn``: the :class:`pysbn.SynchronizedBatchNorm2d` (1d/3d) layer in one process, autograd
  included: what a user's model runs;
- ``core``: the core chain through :mod:`pysbn.functional` (forward ``moments``, ``finalize``,
  ``normalize``; backward ``backward_reduce``, ``backward_elemt``): the layer minus its Python;
- ``seed``: the seed's composition: per-channel sum and sum of squares with torch ops,
  ``(x - mean) * (invstd * w) + b``, autograd backward;
- ``torch_compiled``: the ``nn.BatchNorm`` layer under ``torch.compile`` (default backend);
  ``pysbn_compiled``: the pysbn layer under ``torch.compile(fullgraph=True)``. Each row
  compiles afresh (``torch.compiler.reset()``, at the row's thread count); the first calls,
  forward then forward+backward, compile and are recorded as ``compile_s`` (inductor's on-disk
  caches as found: a warm cache shortens it), not timed;
- probes at the same size and thread count: a read-only sum and a copy.

Times are medians (p10, p90 in the JSON) of forward and forward+backward; backward is the
difference. "x of limit" is time / (passes at the probe bandwidth): 2 tensor passes forward and
5 forward+backward, the minimal traffic. Numerics: max relative error of the per-channel
variance against float64 at offsets 0, 1e2, 1e3, 1e4. Memory: peak bytes allocated during one
forward+backward (see :func:`peak_memory`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

import pysbn
from pysbn import functional as PF
from pysbn import ops

from . import bench_sync
from ._env import SHORT_DTYPES as _SHORT
from ._env import environment
from .chart import CHART_HINT, write_chart

__all__ = ["SHAPES", "QUICK_SHAPES", "COMPILE_MODES", "Timing", "measure", "peak_memory",
           "variance_errors", "environment", "run", "markdown", "geomean", "main"]

Fn = Callable[[], object]

# id -> (shape, where): "all" (CPU and GPU) or "gpu" (GPU only), as in the protocol.
SHAPES: Dict[str, Tuple[Tuple[int, ...], str]] = {
    "bn2d_56": ((32, 64, 56, 56), "all"),
    "bn2d_14": ((64, 256, 14, 14), "all"),
    "bn2d_128": ((8, 32, 128, 128), "all"),
    "bn1d": ((256, 512), "all"),
    "bn3d": ((4, 16, 16, 64, 64), "all"),
    "bn2d_112": ((32, 64, 112, 112), "all"),
    "gpu_big": ((128, 64, 112, 112), "gpu"),
    "small_c": ((128, 4, 224, 224), "gpu"),
}
QUICK_SHAPES = ("bn2d_14", "bn1d")
FORMATS = ("nchw", "cl")
NUMERICS_SHAPE = (32, 64, 28, 28)
OFFSETS = (0.0, 1e2, 1e3, 1e4)
EPS = 1e-5
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}
COMPILE_MODES = ("all", "first", "none")
"""Rows with compiled implementations: every row, the first memory format of each shape (the
``--quick`` default: compiling costs seconds per row), or none."""
COMPILED = ("torch_compiled", "pysbn_compiled")


# ---- implementations ---------------------------------------------------------------------------
def _layers(ndim: int) -> Tuple[type, type]:
    if ndim in (2, 3):
        return nn.BatchNorm1d, pysbn.SynchronizedBatchNorm1d
    if ndim == 4:
        return nn.BatchNorm2d, pysbn.SynchronizedBatchNorm2d
    if ndim == 5:
        return nn.BatchNorm3d, pysbn.SynchronizedBatchNorm3d
    raise ValueError(f"no batch-norm layer for {ndim}-D inputs")


def _layer_impl(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor,
                call: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Tuple[Fn, Fn]:
    """Forward and forward+backward of a batch-norm layer in training mode; ``call`` runs the
    layer (default: the layer itself; e.g. ``torch.compile(layer)``)."""
    layer.train()
    run = layer if call is None else call

    def fwd():
        return run(x)

    def fwd_bwd():
        layer.weight.grad = None  # as an optimizer's zero_grad(set_to_none=True)
        layer.bias.grad = None
        y = run(x.detach().requires_grad_())
        y.backward(dy)

    return fwd, fwd_bwd


def _with_cudnn(enabled: bool, fns: Tuple[Fn, Fn]) -> Tuple[Fn, Fn]:
    def wrap(fn):
        def call():
            with torch.backends.cudnn.flags(enabled=enabled):
                return fn()
        return call

    return wrap(fns[0]), wrap(fns[1])


def _core_impl(x, w, b, dy) -> Tuple[Fn, Fn]:
    """The core chain through pysbn.functional: the layer's work without autograd or Python."""
    def fwd():
        stats = PF.moments(x)
        mean, invstd = PF.finalize(stats, EPS)
        return PF.normalize(x, mean, invstd, w, b), stats, mean, invstd

    def fwd_bwd():
        _, stats, mean, invstd = fwd()
        sums, _gw, _gb = PF.backward_reduce(dy, x, mean, invstd, True, True)
        PF.backward_elemt(dy, x, mean, invstd, w, sums, stats[:1])

    return (lambda: fwd()[0]), fwd_bwd


def _seed_forward(x, w, b, eps=EPS):
    """The seed's composition (vacancy's _sum_ft / _compute_mean_std, eps clamp); returns y and
    the unbiased variance."""
    n, c = x.shape[0], x.shape[1]
    v = x.reshape(n, c, -1)
    size = v.shape[0] * v.shape[2]
    s = v.sum(dim=0).sum(dim=-1)
    ss = (v * v).sum(dim=0).sum(dim=-1)
    mean = s / size
    sumvar = ss - s * mean
    bias_var = sumvar / size
    invstd = bias_var.clamp(eps) ** -0.5
    shape = (1, c) + (1,) * (x.dim() - 2)
    return (x - mean.view(shape)) * (invstd * w).view(shape) + b.view(shape), sumvar / (size - 1)


def _seed_impl(x, w, b, dy) -> Tuple[Fn, Fn]:
    # The seed's layer holds its parameters in the model's dtype.
    ws = w.detach().to(x.dtype).clone().requires_grad_()
    bs = b.detach().to(x.dtype).clone().requires_grad_()

    def fwd():
        return _seed_forward(x, ws, bs)[0]

    def fwd_bwd():
        ws.grad = bs.grad = None
        xg = x.detach().requires_grad_()
        y, _ = _seed_forward(xg, ws, bs)
        y.backward(dy)

    return fwd, fwd_bwd


def _probes(x) -> Tuple[Fn, Fn]:
    out = torch.empty_like(x)

    def read():
        return x.sum()

    def copy():
        return out.copy_(x)

    return read, copy


def _make_impls(x, dy, w, b, compiled: bool = False) -> Dict[str, Tuple[Fn, Fn]]:
    """Every implementation of one row, keyed by name (torch first: the reference); with
    ``compiled``, also the two layers under ``torch.compile`` (compiled at their first call)."""
    c = x.shape[1]
    torch_cls, sbn_cls = _layers(x.dim())
    pdt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype

    def make(cls):
        layer = cls(c, eps=EPS, device=x.device, dtype=pdt)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        return layer

    impls = {}
    if x.is_cuda:
        impls["torch"] = _with_cudnn(True, _layer_impl(make(torch_cls), x, dy))
        impls["torch_native"] = _with_cudnn(False, _layer_impl(make(torch_cls), x, dy))
    else:
        impls["torch"] = _layer_impl(make(torch_cls), x, dy)
    impls["pysbn"] = _layer_impl(make(sbn_cls), x, dy)
    impls["core"] = _core_impl(x, w.to(pdt), b.to(pdt), dy)
    impls["seed"] = _seed_impl(x, w, b, dy)
    if x.dim() == 4:
        # batch norm + SiLU: the fused layer against nn.BatchNorm2d then nn.SiLU (what timm's
        # BatchNormAct2d computes; timm itself is not needed here)
        unfused, fused = make(torch_cls), pysbn.SynchronizedBatchNormAct2d(
            c, eps=EPS, act_layer=nn.SiLU, device=x.device, dtype=pdt)
        fused.load_state_dict(unfused.state_dict())
        impls["bn_silu"] = _layer_impl(unfused, x, dy, lambda t: nn.functional.silu(unfused(t)))
        impls["pysbn_silu"] = _layer_impl(fused, x, dy)
    if compiled:
        # A fresh start per row: compiled code is specialised to the shape, layout and thread
        # count, and the previous rows' entries would count against dynamo's recompile limit.
        torch.compiler.reset()
        tl, pl = make(torch_cls), make(sbn_cls)
        impls["torch_compiled"] = _layer_impl(tl, x, dy, torch.compile(tl))
        impls["pysbn_compiled"] = _layer_impl(pl, x, dy, torch.compile(pl, fullgraph=True))
    return impls


# ---- timing ------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Samples of one function, in seconds."""

    samples: List[float]

    @property
    def median(self) -> float:
        """The median sample."""
        return statistics.median(self.samples)

    def pct(self, q: float) -> float:
        """The q-quantile (nearest rank)."""
        s = sorted(self.samples)
        return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def _timer(device: torch.device) -> Callable[[Fn, int], List[float]]:
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)

        def run_cuda(fn, reps):
            out = []
            for _ in range(reps):
                start.record()
                fn()
                end.record()
                end.synchronize()  # no overlap between repetitions
                out.append(start.elapsed_time(end) * 1e-3)
            return out

        return run_cuda

    def run_cpu(fn, reps):
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    return run_cpu


def measure(fns: Dict[str, Fn], warmup: int, reps: int, rounds: int, min_time: float,
            device: torch.device = torch.device("cpu"),
            max_time: Optional[float] = None) -> Dict[str, Timing]:
    """Times every function, interleaved round-robin.

    Each function gets ``warmup`` calls, then ``rounds`` rounds; in each round every function
    runs ``max(reps / rounds, min_time / rounds / t)`` times in turn (t: one call's time), so
    each gets at least ``reps`` samples and about ``min_time`` seconds in all. With
    ``max_time``, a function slower than ``max_time / reps`` per call gets only about
    ``max_time`` seconds (at least 2 samples per round): this bounds the seed's composition on
    the largest shapes, whose time would otherwise dominate a run.
    """
    timer = _timer(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per = {}
    for name, fn in fns.items():
        dt = max(timer(fn, 1)[0], 1e-7)
        n = max(math.ceil(reps / rounds), math.ceil(min_time / rounds / dt), 1)
        if max_time is not None:
            n = min(n, max(2, math.ceil(max_time / rounds / dt)))
        per[name] = n
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(max(rounds, 1)):
        for name, fn in fns.items():
            samples[name] += timer(fn, per[name])
    return {name: Timing(s) for name, s in samples.items()}


# ---- memory ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silences file descriptor 2 (the profiler's native start/stop lines)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak(fn: Fn) -> Optional[int]:
    """Peak of (bytes allocated - bytes freed) on the CPU while ``fn`` runs, from the memory
    events of torch.profiler (every allocation and free through torch's CPU allocator)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    try:
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except AttributeError:  # a torch without these (private) accessors
        return None
    cur = peak = 0
    for _, nbytes in sorted(events):
        cur += nbytes
        peak = max(peak, cur)
    return peak


def _saved_bytes(fn: Callable[[], torch.Tensor], exclude: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs, not
    counting those of ``exclude`` (the input and the parameters, which exist anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: Dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    del y
    return sum(seen.values())


def peak_memory(module_or_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                dy: torch.Tensor,
                params: Sequence[torch.Tensor] = ()) -> Dict[str, Optional[float]]:
    """Memory of one training forward+backward, in bytes.

    ``peak``: the highest ``allocated - freed`` while ``y = f(x); y.backward(dy)`` runs, with
    ``y`` alive until the backward ends (as a loss keeps it), so it counts y, dx, the parameter
    gradients, what autograd saves and every temporary; the input, dy and the parameters exist
    before and are not counted. On CUDA: ``torch.cuda.max_memory_allocated`` minus
    ``memory_allocated`` before the call; on CPU: the running sum of torch.profiler's memory
    events (allocations and frees through torch's CPU allocator; the native core's own
    per-thread scratch, O(threads x C) with std::vector, is not seen). ``saved``: the part
    autograd holds between forward and backward (distinct storages saved for backward, other
    than the input and the parameters).
    """
    f = module_or_fn

    def once():
        for p in params:
            p.grad = None
        y = f(x.detach().requires_grad_())
        y.backward(dy)
        del y

    once()  # warm: lazy initialisation is not part of the peak
    if x.is_cuda:
        dev = x.device
        torch.cuda.synchronize(dev)
        for p in params:
            p.grad = None
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        once()
        torch.cuda.synchronize(dev)
        peak: Optional[int] = torch.cuda.max_memory_allocated(dev) - base
    else:
        for p in params:
            p.grad = None
        peak = _cpu_peak(once)
    saved = _saved_bytes(lambda: f(x.detach().requires_grad_()), [x, *params])
    return {"peak_bytes": peak, "saved_bytes": saved}


def _memory_row(x, dy, w, b) -> dict:
    c = x.shape[1]
    torch_cls, sbn_cls = _layers(x.dim())
    pdt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    out = {}
    for name, cls in (("torch", torch_cls), ("pysbn", sbn_cls)):
        layer = cls(c, eps=EPS, device=x.device, dtype=pdt).train()
        out[name] = peak_memory(layer, x, dy, [layer.weight, layer.bias])
    ws = w.detach().to(x.dtype).clone().requires_grad_()
    bs = b.detach().to(x.dtype).clone().requires_grad_()
    out["seed"] = peak_memory(lambda t: _seed_forward(t, ws, bs)[0], x, dy, [ws, bs])
    return out


# ---- numerics ----------------------------------------------------------------------------------
def variance_errors(shape: Sequence[int], memory_format: torch.memory_format,
                    device: str = "cpu", offsets: Sequence[float] = OFFSETS) -> dict:
    """Max relative error of the per-channel (unbiased) variance vs float64, per implementation.

    torch and pysbn: the layer's ``running_var`` after one training step with momentum 1 (the
    batch variance as a user's model stores it, float32); core: the float64 statistics of
    ``pysbn.functional.moments``; seed: its sum / sum-of-squares variance.
    """
    g = torch.Generator().manual_seed(0)
    out = {}
    c = shape[1]
    torch_cls, sbn_cls = _layers(len(shape))
    for off in offsets:
        x = (torch.randn(tuple(shape), generator=g) + off).to(device)
        x = x.contiguous(memory_format=memory_format)
        dims = [0] + list(range(2, x.dim()))
        ref = x.double().var(dim=dims, unbiased=True)
        errs = {}

        def err(v):
            return float(((v.double() - ref).abs() / ref).max())

        for name, cls in (("torch", torch_cls), ("pysbn", sbn_cls)):
            layer = cls(c, momentum=1.0, device=device).train()
            with torch.no_grad():
                layer(x)
            errs[name] = err(layer.running_var)
        stats = PF.moments(x)
        errs["core"] = err(stats[1 + c:] / (stats[0] - 1))
        _, seed_var = _seed_forward(x, torch.ones(c, device=device), torch.zeros(c, device=device))
        errs["seed"] = err(seed_var)
        out[f"{off:g}"] = errs
    return out


# ---- driver ------------------------------------------------------------------------------------
class _NoProgress:
    """Stands in for a tqdm bar when none is shown."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def update(self, n: float = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: float, enabled: bool) -> Any:
    """A tqdm bar on stderr with the time left, or a silent stand-in: when ``enabled`` is
    false, stderr is not a terminal, or tqdm (the ``bench`` extra) is not installed."""
    if not enabled or not getattr(sys.stderr, "isatty", lambda: False)():
        return _NoProgress()
    try:
        from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return _NoProgress()
    # updates come seconds apart: draw each one (mininterval 0)
    return tqdm(total=total, file=sys.stderr, desc="pysbn bench", leave=False,
                dynamic_ncols=True, mininterval=0, miniters=1,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}, ~{remaining} left"
                           "{postfix}")

def _memory_format(shape: Sequence[int], fmt: str) -> torch.memory_format:
    if fmt == "cl":
        if len(shape) == 4:
            return torch.channels_last
        if len(shape) == 5:
            return torch.channels_last_3d
        raise ValueError(f"channels_last needs a 4-D or 5-D shape, got {tuple(shape)}")
    return torch.contiguous_format


def _formats(shape: Sequence[int], formats: Sequence[str]) -> List[str]:
    return [f for f in formats if f == "nchw" or len(shape) in (4, 5)]


def _inputs(shape, fmt, dtype, device):
    mf = _memory_format(shape, fmt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=mf)
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=mf)
    c = shape[1]
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = (torch.rand(c, generator=g) + 0.5).to(device=device, dtype=pdt)
    b = torch.randn(c, generator=g).to(device=device, dtype=pdt)
    return x, dy, w, b


def _timing_dict(tf: Timing, tfb: Timing, limit_fwd: float, limit: float, nbytes: int) -> dict:
    return {"fwd_ms": tf.median * 1e3, "fwd_p10_ms": tf.pct(0.1) * 1e3,
            "fwd_p90_ms": tf.pct(0.9) * 1e3, "fwdbwd_ms": tfb.median * 1e3,
            "fwdbwd_p10_ms": tfb.pct(0.1) * 1e3, "fwdbwd_p90_ms": tfb.pct(0.9) * 1e3,
            "bwd_ms": (tfb.median - tf.median) * 1e3, "x_of_limit": tfb.median / limit,
            "x_of_limit_fwd": tf.median / limit_fwd,
            # the GPU target's model: 3 passes forward (stats read, normalize read + write) and
            # 5 backward (reduce reads dy, x; elemt reads dy, x, writes dx)
            "eff_GBps_8pass": 8 * nbytes / tfb.median / 1e9, "n": len(tfb.samples)}


def _first_call(fn: Fn, device: torch.device) -> float:
    """Seconds of one call, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _bench_row(sid, shape, fmt, dtype_name, device, nt, settings, compiled=False) -> dict:
    dtype = _DTYPES[dtype_name]
    x, dy, w, b = _inputs(shape, fmt, dtype, device)
    impls = _make_impls(x, dy, w, b, compiled)
    errors = {}
    first: Dict[str, Tuple[float, float]] = {}
    fns: Dict[str, Fn] = {}
    for name, (f, fb) in impls.items():
        try:  # an implementation that cannot run this case is reported, not fatal
            # the first calls: forward, then forward+backward (a compiled layer compiles both)
            first[name] = (_first_call(f, device), _first_call(fb, device))
        except Exception as exc:  # noqa: BLE001
            msg = str(exc).strip().splitlines()
            errors[name] = f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]
            continue
        fns[name + ".fwd"], fns[name + ".fwdbwd"] = f, fb
    read, copy = _probes(x)
    fns["probe.read"], fns["probe.copy"] = read, copy
    t = measure(fns, settings["warmup"], settings["reps"], settings["rounds"],
                settings["min_time_s"], device, settings.get("max_time_s"))
    nbytes = x.numel() * x.element_size()
    bw = max(nbytes / t["probe.read"].median, 2 * nbytes / t["probe.copy"].median)
    limit_fwd, limit = 2 * nbytes / bw, 5 * nbytes / bw
    row = {"id": sid, "shape": list(shape), "format": fmt, "dtype": dtype_name,
           "device": device.type, "threads": nt, "bytes": nbytes,
           "probe_GBps": bw / 1e9, "probe_read_ms": t["probe.read"].median * 1e3,
           "probe_copy_ms": t["probe.copy"].median * 1e3,
           "limit_fwd_ms": limit_fwd * 1e3, "limit_fwdbwd_ms": limit * 1e3}
    for name in impls:
        if name in errors:
            row[name] = {"error": errors[name]}
            continue
        row[name] = _timing_dict(t[name + ".fwd"], t[name + ".fwdbwd"], limit_fwd, limit,
                                 nbytes)
        if name in COMPILED:
            # first calls until warm: compile (and run once) forward, then forward+backward
            row[name]["compile_fwd_s"], row[name]["compile_fwdbwd_s"] = first[name]
            row[name]["compile_s"] = sum(first[name])

    def ratio(a, key="fwdbwd_ms", of="pysbn"):
        if "error" in row.get(a, {"error": 1}) or "error" in row.get(of, {"error": 1}):
            return None
        return row[a][key] / row[of][key]

    row["speedup_vs_torch"] = ratio("torch")
    row["speedup_vs_torch_fwd"] = ratio("torch", "fwd_ms")
    row["speedup_vs_seed"] = ratio("seed")
    if "torch_native" in row:
        row["speedup_vs_torch_native"] = ratio("torch_native")
    row["core_vs_layer"] = ratio("core")  # < 1: the layer's Python and autograd cost
    if "pysbn_silu" in row:
        row["speedup_act_vs_unfused"] = ratio("bn_silu", of="pysbn_silu")
        row["speedup_act_vs_unfused_fwd"] = ratio("bn_silu", "fwd_ms", of="pysbn_silu")
    if compiled:
        # pysbn_compiled vs torch_compiled (> 1: pysbn faster), and compiled vs eager pysbn
        row["speedup_compiled"] = ratio("torch_compiled", of="pysbn_compiled")
        row["speedup_compiled_fwd"] = ratio("torch_compiled", "fwd_ms", of="pysbn_compiled")
        row["pysbn_compiled_vs_eager"] = ratio("pysbn", of="pysbn_compiled")
    return row


# ---- batch norm + activation: memory kept for the backward ----------------------------------------
_ACT_MEMORY_CHILD = r"""
import gc, json, os, sys
import torch
from torch import nn
import pysbn

variant, blocks, shape = sys.argv[1], int(sys.argv[2]), tuple(json.loads(sys.argv[3]))
torch.manual_seed(0)
torch.set_num_threads(1)
c = shape[1]
layers = []
for _ in range(blocks):
    layers.append(nn.Conv2d(c, c, 3, padding=1, bias=False))
    layers.append(pysbn.SynchronizedBatchNormAct2d(c, act_layer=nn.SiLU) if variant == "fused"
                  else nn.Sequential(nn.BatchNorm2d(c), nn.SiLU()))
model = nn.Sequential(*layers)
x = torch.randn(shape)
model(x).sum().backward()  # warm-up: allocator, kernels, parameter gradients

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

storages = {}
def pack(t):
    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t

gc.collect()
before = rss()
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    y = model(x)
after = rss()
params = {p.untyped_storage().data_ptr() for p in model.parameters()}
saved = sum(n for ptr, n in storages.items() if ptr not in params)
print(json.dumps({"saved_bytes": saved, "rss_growth_bytes": after - before}))
"""


def act_memory(blocks: int = 6, shape: Sequence[int] = (16, 32, 56, 56)) -> Dict[str, Any]:
    """Memory a stack of ``blocks`` (conv3x3 -> batch norm + SiLU) blocks keeps alive for the
    backward, float32 on the CPU, each variant in a fresh process: the bytes of the tensors
    saved for the backward (saved-tensor hooks; parameters excluded) and the growth of the
    resident set over the forward (the output included). The processes run glibc's malloc with
    a fixed mmap threshold (128 KiB), so every activation is a mapping of its own and freed
    memory returns to the system: the growth is then what the forward leaves alive (with the
    default, dynamic threshold, activations freed by the warm-up are reused from the heap and
    the growth understates it)."""
    import subprocess
    import tempfile

    out: Dict[str, Any] = {"blocks": blocks, "shape": list(shape), "dtype": "float32",
                           "malloc": "glibc, MALLOC_MMAP_THRESHOLD_=131072"}
    labels = {"unfused": "nn.BatchNorm2d + nn.SiLU (timm's BatchNormAct2d)",
              "fused": "pysbn.SynchronizedBatchNormAct2d (SiLU fused)"}
    for variant, label in labels.items():
        proc = subprocess.run([sys.executable, "-c", _ACT_MEMORY_CHILD, variant, str(blocks),
                               json.dumps(list(shape))], capture_output=True, text=True,
                              timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                    MALLOC_MMAP_THRESHOLD_="131072"),
                              # not the working directory: from a source checkout's root,
                              # `import pysbn` would find the unbuilt source folder
                              cwd=tempfile.gettempdir())
        if proc.returncode != 0:
            raise RuntimeError(f"act_memory {variant}: {proc.stderr.strip()[-500:]}")
        out[variant] = dict(json.loads(proc.stdout.strip().splitlines()[-1]), label=label)
    out["ratio_saved"] = out["fused"]["saved_bytes"] / out["unfused"]["saved_bytes"]
    out["ratio_rss"] = out["fused"]["rss_growth_bytes"] / max(1, out["unfused"]["rss_growth_bytes"])
    return out


def run(shapes: Sequence[str], threads: Sequence[int], settings: dict,
        devices: Sequence[str] = ("cpu",), dtypes: Optional[Dict[str, Sequence[str]]] = None,
        formats: Sequence[str] = FORMATS, numerics: bool = True, memory: bool = True,
        custom: Optional[Dict[str, Tuple[int, ...]]] = None, progress: bool = True,
        compiled: str = "all") -> Dict[str, Any]:
    """Runs the protocol; returns every figure (see :func:`main` for the files written).

    Parameters
    ----------
    shapes : sequence of str
        Shape ids of :data:`SHAPES` (GPU-only ids are skipped on CPU) or keys of ``custom``.
    threads : sequence of int
        CPU thread counts (``torch.set_num_threads``); GPU rows run once.
    settings : dict
        ``warmup``, ``reps``, ``rounds``, ``min_time_s`` (see :func:`measure`).
    devices : sequence of str
        ``"cpu"`` and/or ``"cuda"``.
    dtypes : dict, optional
        Per device type, dtype names; default float32 on CPU, float32/float16/bfloat16 on CUDA.
    progress : bool
        Show a progress bar with the time left on stderr (tqdm; only when stderr is a terminal
        and tqdm is installed).
    compiled : str
        One of :data:`COMPILE_MODES`: which timing rows also measure the layers under
        ``torch.compile``.
    """
    if compiled not in COMPILE_MODES:
        raise ValueError(f"compiled: expected one of {COMPILE_MODES}, got {compiled!r}")
    table = {k: v for k, v in SHAPES.items()}
    for k, shp in (custom or {}).items():
        table[k] = (tuple(shp), "all")
    dtypes = dtypes or {"cpu": ["float32"], "cuda": ["float32", "float16", "bfloat16"]}
    # (kind, device, dtype, threads, id, shape, fmt, with compiled rows)
    jobs: List[Tuple[str, str, str, Optional[int], str, Tuple[int, ...], str, bool]] = []

    def cases(dev):  # (id, shape, fmt) of the rows a device runs
        for sid in shapes:
            shape, where = table[sid]
            if where == "gpu" and dev != "cuda":
                continue
            for fmt in _formats(shape, formats):
                yield sid, shape, fmt

    def with_compiled(shape, fmt):
        return compiled == "all" or (compiled == "first" and fmt == _formats(shape, formats)[0])

    for dev in devices:
        for dt in dtypes.get(dev, ["float32"]):
            for n_threads in (threads if dev == "cpu" else [torch.get_num_threads()]):
                jobs.extend(("time", dev, dt, n_threads, sid, shape, fmt,
                             with_compiled(shape, fmt)) for sid, shape, fmt in cases(dev))
        if memory:
            for dt in dtypes.get(dev, ["float32"]):
                jobs.extend(("memory", dev, dt, None, sid, shape, fmt, False)
                            for sid, shape, fmt in cases(dev))
        if numerics:
            for fmt in _formats(NUMERICS_SHAPE, formats):
                jobs.append(("numerics", dev, "float32", None, "numerics", NUMERICS_SHAPE, fmt,
                             False))
    # rough relative costs, for the estimate of the time left
    weights = [(5 + 5 * comp) if kind == "time" else 1 for kind, *_, comp in jobs]
    bar = _progress_bar(sum(weights), progress)
    rows: List[Dict[str, Any]] = []
    mem_rows: List[Dict[str, Any]] = []
    num: Dict[str, Dict[str, Dict[str, Any]]] = {}
    old_threads = torch.get_num_threads()
    try:
        for (kind, dev, dt, nt, sid, shape, fmt, comp), weight in zip(jobs, weights):
            label = f"{kind} {sid} {fmt} {_SHORT.get(dt, dt)}" + (f" {nt}t" if nt else "") \
                + (" gpu" if dev == "cuda" else "") + (" +compile" if comp else "")
            bar.set_postfix_str(label, refresh=True)
            device = torch.device(dev)
            if kind == "time":
                assert nt is not None
                torch.set_num_threads(nt)
                rows.append(_bench_row(sid, shape, fmt, dt, device, nt, settings, comp))
            elif kind == "memory":
                torch.set_num_threads(old_threads)
                x, dy, w, b = _inputs(shape, fmt, _DTYPES[dt], device)
                m = {"id": sid, "shape": list(shape), "format": fmt, "dtype": dt, "device": dev,
                     "input_bytes": x.numel() * x.element_size()}
                try:
                    m.update(_memory_row(x, dy, w, b))
                except Exception as exc:  # noqa: BLE001 - reported, not fatal
                    m["error"] = f"{type(exc).__name__}: {exc}"
                mem_rows.append(m)
            else:
                torch.set_num_threads(old_threads)
                num.setdefault(dev, {})[fmt] = variance_errors(
                    shape, _memory_format(shape, fmt), dev)
            if dev == "cuda":
                torch.cuda.empty_cache()
            bar.update(weight)
    finally:
        bar.close()
        torch.set_num_threads(old_threads)
    if compiled != "none":
        torch.compiler.reset()  # drop the last row's compiled code
    result: Dict[str, Any] = {"environment": environment(threads), "rows": rows,
                              "settings": dict(settings, compiled=compiled)}
    if memory:
        result["memory"] = mem_rows
        result["memory_method"] = (
            "peak of (allocated - freed) bytes during y = layer(x); y.backward(dy), y alive "
            "until backward ends; input, dy and parameters not counted. CPU: running sum of "
            "torch.profiler memory events; CUDA: max_memory_allocated - memory_allocated before. "
            "saved = distinct storages saved for backward other than input and parameters.")
    if numerics:
        result["numerics"] = num.get("cpu", {})
        if "cuda" in num:
            result["numerics_cuda"] = num["cuda"]
    return result


def geomean(values: Sequence[Optional[float]]) -> float:
    """Geometric mean of the values that are not None (nan when there are none)."""
    vs = [v for v in values if v is not None]
    return math.exp(sum(math.log(v) for v in vs) / len(vs)) if vs else float("nan")


def _ms(r: dict, impl: str, key: str) -> str:
    d = r.get(impl)
    if d is None:
        return "-"
    return "err" if "error" in d else f"{d[key]:.3f}"


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _mb(v: Optional[float]) -> str:
    if v is None:
        return "n/a"
    return f"{v / 1e6:.1f}" if v >= 1e7 else f"{v / 1e6:.3g}"


def _s(r: dict, impl: str) -> str:
    d = r.get(impl)
    return "-" if d is None or "error" in d else f"{d['compile_s']:.1f}"


def markdown(result: Dict[str, Any]) -> str:
    """The Markdown tables: times and ratios, the compiled layers, summaries, memory,
    numerics."""
    lines: List[str] = []
    cpu = [r for r in result["rows"] if r["device"] == "cpu"]
    gpu = [r for r in result["rows"] if r["device"] == "cuda"]
    if cpu:
        lines += ["| shape | fmt | dtype | thr | torch fwd ms | pysbn fwd ms | torch f+b ms "
                  "| pysbn f+b ms | core f+b ms | seed f+b ms | vs torch f+b | vs torch fwd "
                  "| vs seed | pysbn x of limit |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in cpu:
            xl = r["pysbn"].get("x_of_limit")
            lines.append(
                f"| {r['id']} {tuple(r['shape'])} | {r['format']} | {r['dtype']} | {r['threads']} "
                f"| {_ms(r, 'torch', 'fwd_ms')} | {_ms(r, 'pysbn', 'fwd_ms')} "
                f"| {_ms(r, 'torch', 'fwdbwd_ms')} | {_ms(r, 'pysbn', 'fwdbwd_ms')} "
                f"| {_ms(r, 'core', 'fwdbwd_ms')} | {_ms(r, 'seed', 'fwdbwd_ms')} "
                f"| {_x(r['speedup_vs_torch'])} | {_x(r['speedup_vs_torch_fwd'])} "
                f"| {_x(r['speedup_vs_seed'])} | {'-' if xl is None else f'{xl:.2f}'} |")
        lines.append("")
    if gpu:
        lines += ["| shape | fmt | dtype | cuDNN f+b ms | native f+b ms | pysbn fwd ms "
                  "| pysbn f+b ms | seed f+b ms | vs cuDNN | vs native | vs seed | pysbn GB/s (8-pass) "
                  "| pysbn x of limit |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in gpu:
            p = r["pysbn"]
            lines.append(
                f"| {r['id']} {tuple(r['shape'])} | {r['format']} | {r['dtype']} "
                f"| {_ms(r, 'torch', 'fwdbwd_ms')} | {_ms(r, 'torch_native', 'fwdbwd_ms')} "
                f"| {_ms(r, 'pysbn', 'fwd_ms')} | {_ms(r, 'pysbn', 'fwdbwd_ms')} "
                f"| {_ms(r, 'seed', 'fwdbwd_ms')} | {_x(r['speedup_vs_torch'])} "
                f"| {_x(r.get('speedup_vs_torch_native'))} | {_x(r['speedup_vs_seed'])} "
                f"| {'-' if 'error' in p else format(p['eff_GBps_8pass'], '.0f')} "
                f"| {'-' if 'error' in p else format(p['x_of_limit'], '.2f')} |")
        lines.append("")
    comp = [r for r in result["rows"] if "speedup_compiled" in r]
    if comp:
        lines += ["Under torch.compile: nn.BatchNorm (torch_compiled) and the pysbn layer "
                  "(pysbn_compiled, fullgraph=True), compiled afresh per row; compile s = the "
                  "first forward and forward+backward calls, compile included (with torch's "
                  "compile caches as found: a warm cache shortens them):", "",
                  "| shape | fmt | dtype | device | thr | torch_compiled fwd ms "
                  "| pysbn_compiled fwd ms | torch_compiled f+b ms | pysbn_compiled f+b ms "
                  "| vs torch_compiled f+b | vs torch_compiled fwd | pysbn compiled vs eager "
                  "| torch compile s | pysbn compile s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in comp:
            lines.append(
                f"| {r['id']} {tuple(r['shape'])} | {r['format']} | {r['dtype']} "
                f"| {r['device']} | {r['threads'] if r['device'] == 'cpu' else '-'} "
                f"| {_ms(r, 'torch_compiled', 'fwd_ms')} | {_ms(r, 'pysbn_compiled', 'fwd_ms')} "
                f"| {_ms(r, 'torch_compiled', 'fwdbwd_ms')} "
                f"| {_ms(r, 'pysbn_compiled', 'fwdbwd_ms')} | {_x(r['speedup_compiled'])} "
                f"| {_x(r['speedup_compiled_fwd'])} | {_x(r['pysbn_compiled_vs_eager'])} "
                f"| {_s(r, 'torch_compiled')} | {_s(r, 'pysbn_compiled')} |")
        lines.append("")
    acts = [r for r in result["rows"] if r.get("speedup_act_vs_unfused") is not None]
    if acts:
        lines += ["Batch norm + SiLU: SynchronizedBatchNormAct2d (pysbn_silu, fused) against "
                  "nn.BatchNorm2d then nn.SiLU (bn_silu, what timm's BatchNormAct2d computes):",
                  "", "| shape | fmt | dtype | device | thr | bn_silu fwd ms | pysbn_silu fwd ms "
                  "| bn_silu f+b ms | pysbn_silu f+b ms | vs bn_silu f+b | vs bn_silu fwd |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in acts:
            lines.append(
                f"| {r['id']} {tuple(r['shape'])} | {r['format']} | {r['dtype']} "
                f"| {r['device']} | {r['threads'] if r['device'] == 'cpu' else '-'} "
                f"| {_ms(r, 'bn_silu', 'fwd_ms')} | {_ms(r, 'pysbn_silu', 'fwd_ms')} "
                f"| {_ms(r, 'bn_silu', 'fwdbwd_ms')} | {_ms(r, 'pysbn_silu', 'fwdbwd_ms')} "
                f"| {_x(r['speedup_act_vs_unfused'])} | {_x(r['speedup_act_vs_unfused_fwd'])} |")
        lines.append("")
    if result.get("act_memory"):
        am = result["act_memory"]
        lines += ["Memory kept alive for the backward by a stack of "
                  f"{am['blocks']} (conv3x3 -> BN+SiLU) blocks, input {tuple(am['shape'])} "
                  f"{am['dtype']}, each measured in a fresh process (glibc malloc with a "
                  "fixed mmap threshold, so freed memory is not reused from the heap):", "",
                  "| layers | saved tensors MB | resident growth over the forward MB |",
                  "|---|---|---|"]
        for k in ("unfused", "fused"):
            lines.append(f"| {am[k]['label']} | {_mb(am[k]['saved_bytes'])} "
                         f"| {_mb(am[k]['rss_growth_bytes'])} |")
        lines += ["", f"- fused / unfused: saved {am['ratio_saved']:.2f}x, resident "
                  f"{am['ratio_rss']:.2f}x", ""]
    groups: Dict[tuple, List[float]] = {}
    cgroups: Dict[tuple, List[float]] = {}
    agroups: Dict[tuple, List[float]] = {}
    for r in result["rows"]:
        key = (r["device"], r["dtype"], r["threads"] if r["device"] == "cpu" else None,
               r["format"])
        if r["speedup_vs_torch"] is not None:
            groups.setdefault(key, []).append(r["speedup_vs_torch"])
        if r.get("speedup_compiled") is not None:
            cgroups.setdefault(key, []).append(r["speedup_compiled"])
        if r.get("speedup_act_vs_unfused") is not None:
            agroups.setdefault(key, []).append(r["speedup_act_vs_unfused"])
    for (dev, dt, nt, fmt), sel in groups.items():
        where = f"{nt} thread(s)" if dev == "cpu" else "GPU"
        lines.append(f"- {dev} {dt} {where}, {fmt}: geometric-mean speedup vs torch f+b "
                     f"{geomean(sel):.2f}x (min {min(sel):.2f}x over {len(sel)} shapes)")
    for (dev, dt, nt, fmt), sel in cgroups.items():
        where = f"{nt} thread(s)" if dev == "cpu" else "GPU"
        lines.append(f"- {dev} {dt} {where}, {fmt}, under torch.compile: geometric-mean "
                     f"speedup pysbn_compiled vs torch_compiled f+b {geomean(sel):.2f}x "
                     f"(min {min(sel):.2f}x over {len(sel)} shapes)")
    for (dev, dt, nt, fmt), sel in agroups.items():
        where = f"{nt} thread(s)" if dev == "cpu" else "GPU"
        lines.append(f"- {dev} {dt} {where}, {fmt}: batch norm + SiLU, geometric-mean speedup "
                     f"of the fused layer vs nn.BatchNorm2d + nn.SiLU f+b {geomean(sel):.2f}x "
                     f"(min {min(sel):.2f}x over {len(sel)} shapes)")
    seeds = [r["speedup_vs_seed"] for r in result["rows"] if r["speedup_vs_seed"] is not None]
    if seeds:
        lines.append(f"- vs the seed: {min(seeds):.2f}x to {max(seeds):.2f}x over "
                     f"{len(seeds)} rows")
    errs = sorted({f"{r['id']} {r['format']} {r['dtype']} {r['device']}: {k}: {v['error']}"
                   for r in result["rows"] for k, v in r.items()
                   if isinstance(v, dict) and "error" in v})
    lines += [f"- error: {e}" for e in errs]
    if result.get("memory"):
        lines += ["", "Peak memory of one forward+backward (MB; see memory_method in the JSON):",
                  "", "| shape | fmt | dtype | device | input MB | torch peak | pysbn peak "
                  "| seed peak | pysbn / torch | torch saved | pysbn saved | seed saved |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in result["memory"]:
            if "error" in m:
                lines.append(f"| {m['id']} | {m['format']} | {m['dtype']} | {m['device']} "
                             f"| {_mb(m['input_bytes'])} | error: {m['error']} |||||||")
                continue
            tp, pp = m["torch"]["peak_bytes"], m["pysbn"]["peak_bytes"]
            rel = "n/a" if not tp or pp is None else f"{pp / tp:.2f}"
            lines.append(
                f"| {m['id']} {tuple(m['shape'])} | {m['format']} | {m['dtype']} | {m['device']} "
                f"| {_mb(m['input_bytes'])} | {_mb(tp)} | {_mb(pp)} "
                f"| {_mb(m['seed']['peak_bytes'])} | {rel} | {_mb(m['torch']['saved_bytes'])} "
                f"| {_mb(m['pysbn']['saved_bytes'])} | {_mb(m['seed']['saved_bytes'])} |")
    for nkey, dev in (("numerics", "cpu"), ("numerics_cuda", "cuda")):
        if result.get(nkey):
            lines += ["", f"Variance relative error vs float64, {dev}, float32 "
                      f"{tuple(NUMERICS_SHAPE)}:", "",
                      "| fmt | offset | torch | pysbn (layer) | core (float64 stats) | seed |",
                      "|---|---|---|---|---|---|"]
            for fmt, d in result[nkey].items():
                for off, e in d.items():
                    lines.append(f"| {fmt} | {off} | {e['torch']:.2e} | {e['pysbn']:.2e} "
                                 f"| {e['core']:.2e} | {e['seed']:.2e} |")
    return "\n".join(lines)


def _parse_shapes(spec: str, ap: argparse.ArgumentParser):
    ids, custom = [], {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if item in SHAPES:
            ids.append(item)
        elif all(p.isdigit() for p in item.split("x")) and 2 <= len(item.split("x")) <= 5:
            custom[item] = tuple(int(p) for p in item.split("x"))
            ids.append(item)
        else:
            ap.error(f"--shapes: unknown id {item!r}; known: {', '.join(SHAPES)}, or a shape "
                     "such as 16x8x10x10")
    return ids, custom


def main(argv: Optional[Sequence[str]] = None, prog: str = "pysbn bench") -> int:
    """``pysbn bench [options]``; writes bench.json, bench.md and (with matplotlib) bench.png
    to --out. Returns the exit status (0)."""
    ap = argparse.ArgumentParser(
        prog=prog, description=(__doc__ or "").split("\n")[0],
        epilog=f"Full protocol run: {prog} --out <folder> (CPU: float32, 1 and all "
               "threads; CUDA rows when a GPU is present). Warm heap: prefix "
               "GLIBC_TUNABLES=glibc.malloc.mmap_max=0. The chart needs matplotlib and the "
               "progress bar tqdm: pip install \"pysbn[bench]\".")
    ap.add_argument("--quick", action="store_true",
                    help=f"shapes {','.join(QUICK_SHAPES)}, few repetitions, compiled rows on "
                         "the first format only (under a minute on a 2-core CPU machine)")
    ap.add_argument("--shapes", default=None,
                    help="comma-separated shape ids or NxCx... shapes (default: every protocol "
                         "shape; GPU-only ones on CUDA only)")
    ap.add_argument("--dtypes", default=None,
                    help="comma-separated dtypes for every device (default: float32 on CPU; "
                         "float32,float16,bfloat16 on CUDA)")
    ap.add_argument("--threads", default=None, help="comma-separated CPU thread counts "
                    "(default: 1 and all)")
    ap.add_argument("--formats", default="nchw,cl", help="nchw and/or cl (channels_last)")
    ap.add_argument("--devices", default=None,
                    help="cpu and/or cuda (default: cpu, and cuda when available)")
    ap.add_argument("--reps", type=int, default=30, help="repetitions per implementation and row")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.5,
                    help="at least this many seconds per implementation and row")
    ap.add_argument("--max-time", type=float, default=3.0,
                    help="at most about this many seconds per implementation and row (fewer "
                         "than --reps samples for calls slower than max-time/reps)")
    ap.add_argument("--out", default="bench-out",
                    help="output folder for bench.json, bench.md and bench.png")
    ap.add_argument("--no-numerics", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-chart", action="store_true")
    ap.add_argument("--no-act-memory", action="store_true",
                    help="skip the batch norm + activation memory measurement (two fresh "
                         "processes; not run with --quick)")
    ap.add_argument("--compile", choices=COMPILE_MODES, default=None,
                    help="rows that also time the layers under torch.compile: all (default), "
                         "first (the first memory format of each shape; the --quick default) "
                         "or none")
    ap.add_argument("--no-compile", action="store_true",
                    help="no torch.compile rows (same as --compile none)")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bar (there is none anyway when stderr is not a terminal)")
    ap.add_argument("--sync", action="store_true",
                    help="run the 2-process sync benchmark instead (pysbn.tools.bench_sync); the "
                         "other arguments are passed to it unchanged")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--sync" in argv:
        rest = [a for a in argv if a != "--sync"]
        return int(bench_sync.main(rest, prog=f"{prog} --sync") or 0)
    a = ap.parse_args(argv)
    if a.no_compile:
        if a.compile not in (None, "none"):
            ap.error("--no-compile contradicts --compile " + a.compile)
        a.compile = "none"
    compiled = a.compile or ("first" if a.quick else "all")
    if a.quick and not a.shapes:
        shapes, custom = list(QUICK_SHAPES), {}
    elif a.shapes:
        shapes, custom = _parse_shapes(a.shapes, ap)
    else:
        shapes, custom = list(SHAPES), {}
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    bad = set(formats) - set(FORMATS)
    if bad or not formats:
        ap.error(f"--formats: expected nchw and/or cl, got {a.formats!r}")
    devices = [d.strip() for d in a.devices.split(",")] if a.devices else (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for d in devices:
        if d not in ("cpu", "cuda"):
            ap.error(f"--devices: expected cpu and/or cuda, got {d!r}")
        if d == "cuda" and not torch.cuda.is_available():
            ap.error("--devices cuda: no CUDA device is available")
        if d == "cuda" and not ops.built_with_cuda():
            ap.error("--devices cuda: this pysbn build has no CUDA (see pysbn info)")
    if "cuda" in devices and not ops.built_with_cuda():
        devices.remove("cuda")
        print("note: a GPU is present but pysbn was built without CUDA: CPU rows only",
              file=sys.stderr)
    dtypes: Optional[Dict[str, Sequence[str]]] = None
    if a.dtypes:
        names = [d.strip() for d in a.dtypes.split(",") if d.strip()]
        for d in names:
            if d not in _DTYPES:
                ap.error(f"--dtypes: unknown dtype {d!r}; known: {', '.join(_DTYPES)}")
        dtypes = {"cpu": names, "cuda": names}
    elif a.quick:
        dtypes = {"cpu": ["float32"], "cuda": ["float32"]}
    ncores = torch.get_num_threads()
    try:
        threads = [int(t) for t in a.threads.split(",")] if a.threads else sorted({1, ncores})
    except ValueError:
        ap.error(f"--threads: expected integers, got {a.threads!r}")
    if any(t < 1 for t in threads):
        ap.error("--threads: thread counts must be >= 1")
    if a.quick:
        a.reps, a.rounds, a.warmup, a.min_time = 10, 3, 2, 0.05
    settings = {"warmup": a.warmup, "reps": a.reps, "rounds": a.rounds, "min_time_s": a.min_time,
                "max_time_s": a.max_time, "argv": argv}
    t0 = time.perf_counter()
    result = run(shapes, threads, settings, devices=devices, dtypes=dtypes, formats=formats,
                 numerics=not a.no_numerics, memory=not a.no_memory, custom=custom,
                 progress=not a.no_progress, compiled=compiled)
    if not a.quick and not a.no_act_memory and not a.no_memory:
        result["act_memory"] = act_memory()
    result["settings"]["elapsed_s"] = time.perf_counter() - t0
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(os.path.join(a.out, "bench.md"), "w") as f:
        f.write(md + "\n")
    written = ["bench.json", "bench.md"]
    hint = None
    if not a.no_chart and result["rows"]:
        try:
            write_chart(result, os.path.join(a.out, "bench.png"))
            written.append("bench.png")
        except ImportError as exc:  # matplotlib is optional (the bench extra)
            hint = f"no chart: {exc.msg if hasattr(exc, 'msg') else exc}. {CHART_HINT}"
    print(md)
    if hint:
        print(f"\n{hint}")
    print(f"\nwrote {', '.join(os.path.join(a.out, w) for w in written)} "
          f"({result['settings']['elapsed_s']:.0f} s)")
    return 0
