# SPDX-License-Identifier: MIT
"""Helpers shared by the layer tests (importable because pyproject sets pytest's
``pythonpath = ["tests"]``): a float64 comparison, random layer parameters, the DataParallel CPU
protocol (replicas by deepcopy wired with the replication callbacks, one thread per replica,
bounded joins), and the launcher of the process-group tests (one subprocess per rank running
``_dist_worker.py``, bounded joins)."""

import copy
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

import pysbn

JOIN_TIMEOUT = 60.0
DIST_WORKER = Path(__file__).with_name("_dist_worker.py")
PG_TIMEOUT_S = 60  # init_process_group(timeout=...): a collective missing a peer fails after this


def close(actual, expected, tol, what):
    """max |actual - expected| <= tol * max(1, max |expected|), compared in float64 on the CPU
    (a NaN anywhere fails)."""
    assert actual is not None and expected is not None, what
    assert tuple(actual.shape) == tuple(expected.shape), \
        f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if e.numel() == 0:
        return
    err = (a - e).abs().max().item()
    scale = max(1.0, e.abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def run_threads(fns, timeout=JOIN_TIMEOUT):
    """Runs fns[i]() in thread i, all at once; returns [(result, exception)] per thread. A thread
    still alive after ``timeout`` seconds fails the test (a hang)."""
    out = [(None, None)] * len(fns)

    def worker(i, fn):
        try:
            out[i] = (fn(), None)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            out[i] = (None, exc)

    threads = [threading.Thread(target=worker, args=(i, fn), daemon=True)
               for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for i, t in enumerate(threads):
        t.join(timeout)
        assert not t.is_alive(), f"thread {i} still running after {timeout} s (hang)"
    return out


def results(outs):
    """The results of :func:`run_threads`, raising the first exception."""
    for res, exc in outs:
        if exc is not None:
            raise exc
    return [res for res, _ in outs]


def make_replicas(module, k):
    """Replica 0 is ``module`` itself, replicas 1..k-1 deep copies; all wired as DataParallel
    replicas by ``pysbn.execute_replication_callbacks``."""
    replicas = [module] + [copy.deepcopy(module) for _ in range(k - 1)]
    pysbn.execute_replication_callbacks(replicas)
    return replicas


def randomize(bn):
    """Random weight, bias and running statistics (in place) for a batch-norm layer."""
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 1.5)
        if bn.bias is not None:
            bn.bias.uniform_(-0.5, 0.5)
        if bn.running_mean is not None:
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.8, 1.2)


def run_group(world, cases, folder, join_timeout, env=None, log_tail=3000, pg_timeout=None):
    """Runs ``_dist_worker.py`` as ``world`` ranks (one subprocess each, rendezvous through a
    file in ``folder``) on the named ``cases``; waits at most ``join_timeout`` seconds for the
    whole group, then kills what is left (``pg_timeout``: the process group's timeout, default
    PG_TIMEOUT_S). Returns ``{"timed_out": bool, "ranks": {rank: {"rc",
    "results", "log"}}}`` with each rank's JSON results and the tail of its log."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="default", **(env or {}))
    procs = []
    for rank in range(world):
        log = open(folder / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, str(DIST_WORKER), str(rank), str(world), str(folder / "store"),
             str(folder), str(pg_timeout or PG_TIMEOUT_S), *cases],
            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + join_timeout
    timed_out = False
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    for proc, log in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    out = {"timed_out": timed_out, "ranks": {}}
    for rank, (proc, _) in enumerate(procs):
        res_file = folder / f"rank{rank}.json"
        try:
            log_text = (folder / f"rank{rank}.log").read_text(errors="replace")[-log_tail:]
        except OSError:
            log_text = ""
        out["ranks"][rank] = {
            "rc": proc.returncode,
            "results": json.loads(res_file.read_text()) if res_file.exists() else {},
            "log": log_text}
    return out


def case_problems(group, case):
    """What went wrong with ``case`` on each rank of a :func:`run_group` result: one line per
    rank that did not report "ok" (its status, or why it reported nothing, with its log tail);
    empty when every rank passed."""
    problems = []
    for rank, r in group["ranks"].items():
        status = r["results"].get(case)
        if status == "ok":
            continue
        if status is None:
            why = "timed out" if group["timed_out"] else f"exit code {r['rc']}"
            problems.append(f"rank {rank}: no result ({why}); log tail:\n{r['log']}")
        else:
            problems.append(f"rank {rank}: {status}")
    return problems



def model_zoos():
    """(timm, torchvision), imported for tests on their models (random weights, no download).

    The registry's torchvision wheel is a CUDA build: beside the CPU torch its C ops do not
    register, and its import fails on registering a fake kernel for ``torchvision::nms``.
    Declaring the two op schemas it registers unconditionally (nms, qnms) lets its pure-Python
    models load; the C ops themselves (detection ops) are not used by these tests.
    """
    if not hasattr(torch.ops.torchvision, "nms"):
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(lib)
    import timm
    import torchvision

    return timm, torchvision


_KEEP = []  # libraries that must stay alive
