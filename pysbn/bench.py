# SPDX-License-Identifier: MIT
"""``python -m pysbn bench``: the benchmark protocol (../shared/BENCHMARK-PROTOCOL.md) on this machine.

Every claim is a ratio measured in one process, implementations interleaved round-robin:

- ``torch``: ``F.batch_norm`` in training mode, autograd backward;
- ``pysbn``: the core chain through the tensor layer -- forward ``moments``, ``finalize``,
  ``normalize``; backward ``backward_reduce``, ``backward_elemt`` (what a synchronised layer runs);
- ``seed``: the seed's composition -- per-channel sum and sum of squares with torch ops,
  ``(x - mean) * (invstd * w) + b``, autograd backward;
- probes at the same size and thread count: a read-only sum and a copy.

Times are medians (p10, p90 also in the JSON) of forward and forward+backward; backward is the
difference. "x of limit" is time / (5 tensor passes at the probe bandwidth), the minimal traffic
of forward+backward. Numerics: max relative error of the per-channel variance against float64
at offsets 0, 1e2, 1e3, 1e4.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _core
from . import functional as PF

# (id, shape, memory formats)
PROTOCOL_SHAPES = [
    ("bn2d_56", (32, 64, 56, 56), ("nchw", "cl")),
    ("bn2d_14", (64, 256, 14, 14), ("nchw", "cl")),
    ("bn2d_128", (8, 32, 128, 128), ("nchw", "cl")),
    ("bn1d", (256, 512), ("nchw",)),
    ("bn3d", (4, 16, 16, 64, 64), ("nchw", "cl")),
    ("bn2d_112", (32, 64, 112, 112), ("nchw", "cl")),
]
QUICK_SHAPES = [
    ("bn2d_14", (64, 256, 14, 14), ("nchw", "cl")),
    ("bn1d", (256, 512), ("nchw",)),
]
EPS = 1e-5


# ---- implementations ---------------------------------------------------------------------------
def _torch_impl(x, w, b, dy):
    def fwd():
        return F.batch_norm(x, None, None, w, b, True, 0.1, EPS)

    def fwd_bwd():
        xg = x.detach().requires_grad_()
        y = F.batch_norm(xg, None, None, w, b, True, 0.1, EPS)
        y.backward(dy)

    return fwd, fwd_bwd


def _pysbn_impl(x, w, b, dy):
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
    """The seed's composition (vacancy's _sum_ft / _compute_mean_std, eps clamp)."""
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


def _seed_impl(x, w, b, dy):
    def fwd():
        return _seed_forward(x, w, b)[0]

    def fwd_bwd():
        xg = x.detach().requires_grad_()
        y, _ = _seed_forward(xg, w, b)
        y.backward(dy)

    return fwd, fwd_bwd


def _probes(x):
    out = torch.empty_like(x)

    def read():
        return x.sum()

    def copy():
        return out.copy_(x)

    return read, copy


# ---- timing ------------------------------------------------------------------------------------
@dataclass
class Timing:
    samples: list

    @property
    def median(self):
        return statistics.median(self.samples)

    def pct(self, q):
        s = sorted(self.samples)
        return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def _time_round(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(fns: dict, warmup: int, reps: int, rounds: int, min_time: float) -> dict:
    """Interleaved round-robin: each round runs every fn `reps/rounds` times (more if fast)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    # Repetitions per round: enough for reps in total and for about min_time per fn.
    per = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        dt = max(time.perf_counter() - t0, 1e-6)
        per[name] = max(math.ceil(reps / rounds), math.ceil(min_time / rounds / dt))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += _time_round(fn, per[name])
    return {name: Timing(s) for name, s in samples.items()}


# ---- numerics ----------------------------------------------------------------------------------
def variance_errors(shape, memory_format, offsets=(0.0, 1e2, 1e3, 1e4)) -> dict:
    """Max relative error of the per-channel (unbiased) variance vs float64, per implementation."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for off in offsets:
        x = (torch.randn(shape, generator=g) + off).contiguous(memory_format=memory_format)
        dims = [0] + list(range(2, x.dim()))
        ref = x.double().var(dim=dims, unbiased=True)
        c = x.shape[1]
        rv = torch.zeros(c)
        F.batch_norm(x, torch.zeros(c), rv, None, None, True, 1.0, EPS)
        stats = PF.moments(x)
        count = stats[0].double()
        ours = stats[1 + c:].double() / (count - 1)
        _, seed_var = _seed_forward(x, torch.ones(c), torch.zeros(c))

        def err(v):
            return float(((v.double() - ref).abs() / ref).max())

        out[f"{off:g}"] = {"torch": err(rv), "pysbn": err(ours), "seed": err(seed_var)}
    return out


# ---- environment -------------------------------------------------------------------------------
def environment(threads) -> dict:
    cpu = platform.processor()
    caches = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        base = "/sys/devices/system/cpu/cpu0/cache"
        for idx in sorted(os.listdir(base)):
            p = os.path.join(base, idx)
            with open(os.path.join(p, "level")) as f1, open(os.path.join(p, "type")) as f2, open(
                os.path.join(p, "size")
            ) as f3:
                caches[f"L{f1.read().strip()}{f2.read().strip()[0].lower()}"] = f3.read().strip()
    except OSError:
        pass
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "caches": caches,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pysbn": _core.version(),
        "pysbn_cuda": _core.built_with_cuda(),
        "pysbn_openmp": _core.built_with_openmp(),
        "threads": list(threads),
        "allocator": os.environ.get("GLIBC_TUNABLES", "glibc default"),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


# ---- driver ------------------------------------------------------------------------------------
def _progress(i, n, label):
    width = 30
    done = int(width * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label:<32}")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


def run(shapes, threads, warmup, reps, rounds, min_time, numerics=True) -> dict:
    rows = []
    jobs = [(sid, shp, fmt, t) for t in threads for sid, shp, fmts in shapes for fmt in fmts]
    old_threads = torch.get_num_threads()
    for i, (sid, shape, fmt, nt) in enumerate(jobs):
        _progress(i, len(jobs), f"{sid} {fmt} {nt}t")
        torch.set_num_threads(nt)
        mf = _memory_format(shape, fmt)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(shape, generator=g).contiguous(memory_format=mf)
        dy = torch.randn(shape, generator=g).contiguous(memory_format=mf)
        c = shape[1]
        w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
        impls = {"torch": _torch_impl(x, w, b, dy), "pysbn": _pysbn_impl(x, w, b, dy), "seed": _seed_impl(x, w, b, dy)}
        read, copy = _probes(x)
        fns = {}
        for name, (f, fb) in impls.items():
            fns[name + ".fwd"] = f
            fns[name + ".fwdbwd"] = fb
        fns["probe.read"] = read
        fns["probe.copy"] = copy
        t = measure(fns, warmup, reps, rounds, min_time)
        nbytes = x.numel() * x.element_size()
        bw = max(nbytes / t["probe.read"].median, 2 * nbytes / t["probe.copy"].median)
        limit = 5 * nbytes / bw
        row = {"id": sid, "shape": list(shape), "format": fmt, "threads": nt, "bytes": nbytes,
               "probe_GBps": bw / 1e9, "limit_fwdbwd_ms": limit * 1e3}
        for name in impls:
            tf, tfb = t[name + ".fwd"], t[name + ".fwdbwd"]
            row[name] = {"fwd_ms": tf.median * 1e3, "fwd_p10_ms": tf.pct(0.1) * 1e3, "fwd_p90_ms": tf.pct(0.9) * 1e3,
                         "fwdbwd_ms": tfb.median * 1e3, "fwdbwd_p10_ms": tfb.pct(0.1) * 1e3,
                         "fwdbwd_p90_ms": tfb.pct(0.9) * 1e3, "bwd_ms": (tfb.median - tf.median) * 1e3,
                         "x_of_limit": tfb.median / limit}
        row["speedup_vs_torch"] = row["torch"]["fwdbwd_ms"] / row["pysbn"]["fwdbwd_ms"]
        row["speedup_vs_torch_fwd"] = row["torch"]["fwd_ms"] / row["pysbn"]["fwd_ms"]
        row["speedup_vs_seed"] = row["seed"]["fwdbwd_ms"] / row["pysbn"]["fwdbwd_ms"]
        rows.append(row)
    _progress(len(jobs), len(jobs), "done")
    torch.set_num_threads(old_threads)
    result = {"environment": environment(threads), "rows": rows,
              "settings": {"warmup": warmup, "reps": reps, "rounds": rounds, "min_time_s": min_time}}
    if numerics:
        result["numerics"] = {fmt: variance_errors((32, 64, 28, 28), _memory_format((32, 64, 28, 28), fmt))
                              for fmt in ("nchw", "cl")}
    return result


def _memory_format(shape, fmt):
    if fmt == "cl":
        return torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    return torch.contiguous_format


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def markdown(result) -> str:
    lines = ["| shape | fmt | thr | torch fwd ms | pysbn fwd ms | torch f+b ms | pysbn f+b ms | seed f+b ms "
             "| vs torch f+b | vs torch fwd | vs seed | pysbn x of limit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['id']} {tuple(r['shape'])} | {r['format']} | {r['threads']} | {r['torch']['fwd_ms']:.3f} "
            f"| {r['pysbn']['fwd_ms']:.3f} | {r['torch']['fwdbwd_ms']:.3f} | {r['pysbn']['fwdbwd_ms']:.3f} "
            f"| {r['seed']['fwdbwd_ms']:.3f} | {r['speedup_vs_torch']:.2f}x | {r['speedup_vs_torch_fwd']:.2f}x "
            f"| {r['speedup_vs_seed']:.2f}x | {r['pysbn']['x_of_limit']:.2f} |")
    lines.append("")
    for nt in result["environment"]["threads"]:
        for fmt in ("nchw", "cl"):
            sel = [r["speedup_vs_torch"] for r in result["rows"] if r["threads"] == nt and r["format"] == fmt]
            if sel:
                lines.append(f"- {nt} thread(s), {fmt}: geometric-mean speedup vs torch f+b {geomean(sel):.2f}x "
                             f"(min {min(sel):.2f}x over {len(sel)} shapes)")
    if "numerics" in result:
        lines += ["", "| fmt | offset | torch var rel err | pysbn | seed |", "|---|---|---|---|---|"]
        for fmt, d in result["numerics"].items():
            for off, e in d.items():
                lines.append(f"| {fmt} | {off} | {e['torch']:.2e} | {e['pysbn']:.2e} | {e['seed']:.2e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pysbn bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two small shapes, few repetitions (about a minute)")
    ap.add_argument("--shapes", default=None, help="comma-separated shape ids (default: the protocol's CPU shapes)")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and all)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per implementation and row")
    ap.add_argument("--out", default="bench-out", help="output folder for bench.json and bench.md")
    ap.add_argument("--no-numerics", action="store_true")
    a = ap.parse_args(argv)
    shapes = QUICK_SHAPES if a.quick else PROTOCOL_SHAPES
    if a.shapes:
        want = set(a.shapes.split(","))
        unknown = want - {s[0] for s in PROTOCOL_SHAPES}
        if unknown:
            ap.error(f"--shapes: unknown id(s) {sorted(unknown)}; known: {[s[0] for s in PROTOCOL_SHAPES]}")
        shapes = [s for s in PROTOCOL_SHAPES if s[0] in want]
    ncores = torch.get_num_threads()
    threads = [int(t) for t in a.threads.split(",")] if a.threads else sorted({1, ncores})
    if a.quick:
        a.reps, a.rounds, a.warmup, a.min_time = 10, 3, 2, 0.05
    result = run(shapes, threads, a.warmup, a.reps, a.rounds, a.min_time, numerics=not a.no_numerics)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(os.path.join(a.out, "bench.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"\nwrote {a.out}/bench.json and {a.out}/bench.md")
    return 0
