# SPDX-License-Identifier: MIT
"""Sync benchmark: the cost of synchronising a layer over a torch.distributed process group.

``pysbn bench --sync`` (or ``pysbn.tools.bench_sync.main([...])``). Starts 2 Gloo processes
on this machine (CPU, a file rendezvous, no port) and, per shape, in both processes at once:

- ``local``: the layer with no synchronisation (a process group of one member: the layer never
  communicates), the per-process shape: t(1 process);
- ``sync``: the same layer synchronised over the 2 processes: t(2 processes);
- ``all_reduce`` and ``all_gather``: one collective of the layer's payload, ``2C+3`` float64
  values (the forward record with its header), on the same group, in a tight loop;
- ``ideal``: the local layer with one bare all_gather after its forward and one all_reduce
  after its backward: the least a synchronised layer can cost here, since a collective right
  after compute waits longer than one in a tight loop (wake-ups of the peer's Gloo thread).

Per-layer sync overhead = t(2 processes) - t(1 process), forward and forward+backward, next to
the collective latencies (protocol target: overhead <= 2 collective latencies + 5 us). The four
are interleaved round-robin over several rounds (barrier before each block) and the medians of
all repetitions reported (p10/p90 in the JSON). Collectives per step are counted by wrapping
``torch.distributed``'s collective functions (the layer looks them up at each call); host
synchronisations per step are 0 on CPU by construction: there is no device to wait for (the
header check reads a CPU tensor the collective has already filled).

Figures are rank 0's; both ranks run the same work at the same time, so ``local`` sees the same
contention for cores and memory as ``sync``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

import pysbn

from ._env import environment

__all__ = ["main"]

SHAPES_FULL = [
    ("bn1d", (256, 512)),
    ("bn2d_14", (64, 256, 14, 14)),
    ("bn2d_56", (32, 64, 56, 56)),
    ("bn2d_c1024", (8, 1024, 7, 7)),
]
SHAPES_QUICK = [
    ("bn1d", (256, 512)),
    ("bn2d_small", (8, 64, 14, 14)),
]
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce",
               "broadcast", "reduce_scatter_tensor", "all_to_all_single", "barrier")

_counts: Dict[str, int] = {}


def _install_counters() -> None:
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None or getattr(fn, "_pysbn_counted", False):
            continue

        def counted(*args, __fn=fn, __name=name, **kwargs):
            _counts[__name] = _counts.get(__name, 0) + 1
            return __fn(*args, **kwargs)

        setattr(counted, "_pysbn_counted", True)
        setattr(dist, name, counted)


def _pct(v: List[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def _summary(v: List[float]) -> dict:
    return {"median_us": statistics.median(v) * 1e6, "p10_us": _pct(v, 0.1) * 1e6,
            "p90_us": _pct(v, 0.9) * 1e6, "n": len(v)}


def _child(rank: int, world: int, store: str, out: str, quick: bool, threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    _install_counters()
    try:
        lone = [dist.new_group([r]) for r in range(world)][rank]  # every rank makes every group
        shapes = SHAPES_QUICK if quick else SHAPES_FULL
        rounds, reps, warm = (3, 15, 3) if quick else (5, 40, 5)
        rows = []
        for sid, shape in shapes:
            c = shape[1]
            kind = {2: pysbn.SynchronizedBatchNorm1d, 3: pysbn.SynchronizedBatchNorm1d,
                    4: pysbn.SynchronizedBatchNorm2d, 5: pysbn.SynchronizedBatchNorm3d}[len(shape)]
            g = torch.Generator().manual_seed(rank)
            x = torch.randn(shape, generator=g).requires_grad_()
            dy = torch.randn(shape, generator=g)
            layers = {"local": kind(c, process_group=lone), "sync": kind(c)}
            payload = torch.randn(2 * c + 3, dtype=torch.float64)
            gathered = torch.empty(world * (2 * c + 3), dtype=torch.float64)
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

            # collectives per step of each layer (one fwd+bwd)
            per_step = {}
            for name, layer in layers.items():
                dist.barrier()
                _counts.clear()
                x.grad = None
                layer(x).backward(dy)
                per_step[name] = {k: v for k, v in _counts.items() if k != "barrier"}

            times: Dict[str, List[float]] = {"local_fwd": [], "local_fb": [], "sync_fwd": [],
                                             "sync_fb": [], "all_reduce": [], "all_gather": [],
                                             "ideal_fwd": [], "ideal_fb": []}
            sums = torch.randn(2 * c, dtype=torch.float64)

            def layer_block(name: str, n: int, record: bool) -> None:
                layer = layers[name]
                for _ in range(n):
                    x.grad = None
                    t0 = time.perf_counter()
                    y = layer(x)
                    t1 = time.perf_counter()
                    y.backward(dy)
                    t2 = time.perf_counter()
                    if record:
                        times[f"{name}_fwd"].append(t1 - t0)
                        times[f"{name}_fb"].append(t2 - t0)

            def coll_block(name: str, n: int, record: bool) -> None:
                for _ in range(n):
                    t0 = time.perf_counter()
                    if name == "all_reduce":
                        dist.all_reduce(payload)
                    else:
                        gather(gathered, payload)
                    t1 = time.perf_counter()
                    if record:
                        times[name].append(t1 - t0)

            def ideal_block(name: str, n: int, record: bool) -> None:
                """The local layer plus one bare collective per direction, where the sync
                would be: the least a synchronised layer can cost on this machine (a collective
                right after compute waits longer than one in a tight loop)."""
                layer = layers["local"]
                for _ in range(n):
                    x.grad = None
                    t0 = time.perf_counter()
                    y = layer(x)
                    gather(gathered, payload)
                    t1 = time.perf_counter()
                    y.backward(dy)
                    dist.all_reduce(sums)
                    t2 = time.perf_counter()
                    if record:
                        times["ideal_fwd"].append(t1 - t0)
                        times["ideal_fb"].append(t2 - t0)

            blocks = [("local", layer_block), ("sync", layer_block),
                      ("all_reduce", coll_block), ("all_gather", coll_block),
                      ("ideal", ideal_block)]
            for name, fn in blocks:  # warm-up
                dist.barrier()
                fn(name, warm, False)
            for r in range(rounds):
                order = blocks if r % 2 == 0 else blocks[::-1]
                for name, fn in order:
                    dist.barrier()
                    fn(name, reps, True)
            row = {"id": sid, "shape": list(shape), "channels": c,
                   "payload_doubles": 2 * c + 3, "collectives_per_step": per_step,
                   "host_syncs_per_step": 0}
            row.update({k: _summary(v) for k, v in times.items()})
            rows.append(row)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(rows, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _env(threads: int, world: int) -> dict:
    """The benchmarks' environment record (machine, caches, software, settings) plus the sync
    setup."""
    env = environment([threads])
    env.update({"backend": "gloo", "processes": world, "threads_per_process": threads})
    return env


def _table(rows: List[dict]) -> str:
    head = ("| shape | C | payload (doubles) | local f+b us | sync f+b us | overhead f+b us | "
            "overhead fwd us | all_reduce us | all_gather us | target (2 lat + 5) us | "
            "local + bare collectives f+b us | sync - that us | collectives/step | "
            "host syncs/step |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        ofb = r["sync_fb"]["median_us"] - r["local_fb"]["median_us"]
        ofw = r["sync_fwd"]["median_us"] - r["local_fwd"]["median_us"]
        ar, ag = r["all_reduce"]["median_us"], r["all_gather"]["median_us"]
        target = ag + ar + 5.0
        cps = r["collectives_per_step"]["sync"]
        cps_s = ", ".join(f"{v} {k}" for k, v in sorted(cps.items())) or "0"
        lines.append(
            f"| {r['id']} {tuple(r['shape'])} | {r['channels']} | {r['payload_doubles']} | "
            f"{r['local_fb']['median_us']:.1f} | {r['sync_fb']['median_us']:.1f} | {ofb:.1f} | "
            f"{ofw:.1f} | {ar:.1f} | {ag:.1f} | {target:.1f} | {r['ideal_fb']['median_us']:.1f} | "
            f"{r['sync_fb']['median_us'] - r['ideal_fb']['median_us']:.1f} | {cps_s} | "
            f"{r['host_syncs_per_step']} (CPU) |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, prog: str = "pysbn bench --sync") -> int:
    """``--quick`` (small shapes, few repetitions), ``--out FILE`` (JSON). Returns the exit
    status (0; 1 when the processes did not finish in time)."""
    ap = argparse.ArgumentParser(prog=prog,
                                 description="Per-layer sync overhead over 2 Gloo processes "
                                 "next to the collective latency of the same payload.")
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    ap.add_argument("--out", help="write the results (JSON) here")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds before the processes are stopped (default 600)")
    args = ap.parse_args(argv)

    import torch.multiprocessing as mp

    world = 2
    threads = max(1, (os.cpu_count() or 1) // world)
    folder = tempfile.mkdtemp(prefix="pysbn-bench-sync-")
    store, out = os.path.join(folder, "store"), os.path.join(folder, "rows.json")
    try:
        ctx = mp.start_processes(_child, args=(world, store, out, args.quick, threads),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + args.timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                print(f"bench --sync: not done after {args.timeout:g} s", file=sys.stderr)
                return 1
        with open(out) as f:
            rows = json.load(f)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    env = _env(threads, world)
    print(f"## Sync overhead: {world} Gloo processes, {threads} thread(s) each, float32, "
          f"{'quick' if args.quick else 'full'} run")
    print()
    print(f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, pysbn {env['pysbn']}, "
          f"{env['date']}")
    print()
    print(_table(rows))
    print()
    print("local = the layer unsynchronised (t(1 process), same per-process shape, run in both "
          "processes at once); sync = synchronised over the 2 processes; overhead = sync - "
          "local (medians); all_reduce / all_gather = one collective of the forward payload "
          "(2C+3 float64) on the same group; target from the protocol: overhead <= 2 collective "
          "latencies + 5 us (here all_gather + all_reduce + 5). local + bare collectives = the "
          "local layer with one all_gather and one all_reduce of the same payloads where the "
          "sync happens (a collective right after compute costs more than in a tight loop); "
          "sync - that = what pysbn's synchronisation adds beyond the collectives themselves. "
          "Host syncs: 0 on CPU by construction (no device).")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
        print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
