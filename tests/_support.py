# SPDX-License-Identifier: MIT
"""Helpers shared by the layer tests (importable because pyproject sets pytest's
``pythonpath = ["tests"]``): a float64 comparison, and the DataParallel CPU protocol (replicas
by deepcopy wired with the replication callbacks, one thread per replica, bounded joins)."""

import copy
import threading

import pysbn

JOIN_TIMEOUT = 60.0


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
