# SPDX-License-Identifier: MIT
"""Synchronisation over torch.distributed: 2, 3 and 4 Gloo processes on this machine.

Each world size is one group of processes started here (``tests/_dist_worker.py``, one
subprocess per rank, a FileStore in a temporary folder: no ports to pick), running many cases
in a row, since starting a group costs seconds. The process group has a fixed timeout and the
wait for the group a fixed deadline, after which every rank is killed: a regression fails, it
never hangs. Each case below is one test item that reads its result from every rank.

Every rank checks its share against one ``nn.BatchNorm`` (float64) over the global batch:
outputs, input gradients under random upstream gradients, weight/bias gradients summed over
the group, running statistics, one collective per direction; 1d/2d/3d, contiguous and
channels_last, uneven shares with an empty rank, sub-groups, float32 at offset 1e4, the global
"more than 1 value per channel" error on every rank, the header check's RuntimeError when the
ranks are at different calls of a layer, and a small ResNet-like net under
DistributedDataParallel against the plain-BN net trained on the whole batch in one process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from _support import case_problems, run_group

JOIN_TIMEOUT_S = 150  # the whole group; then every rank is killed

SUITES = {
    2: ["layers_w2", "offset_w2", "too_few_w2", "mismatch_w2", "ddp_w2"],
    3: ["empty_rank_w3", "too_few_w3", "subgroup_w3"],
    4: ["layers_w4", "subgroups_w4", "ddp_w4"],
}


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """Runs each world size's group once per module, lazily (a -k selection starts only the
    groups it needs)."""
    cache = {}

    def get(world: int) -> dict:
        if world not in cache:
            cache[world] = run_group(world, SUITES[world],
                                     tmp_path_factory.mktemp(f"gloo{world}"), JOIN_TIMEOUT_S)
        return cache[world]

    return get


@pytest.mark.parametrize("world,case", [(w, c) for w, cs in SUITES.items() for c in cs],
                         ids=[f"{w}procs-{c}" for w, cs in SUITES.items() for c in cs])
def test_distributed(groups, world, case):
    g = groups(world)
    problems = case_problems(g, case)
    assert not problems, f"{world} processes, case {case}:\n" + "\n".join(problems)


def test_all_ranks_exit_cleanly(groups):
    """Every rank of every group ran all its cases and exited with 0 within the deadline."""
    for world in SUITES:
        g = groups(world)
        assert not g["timed_out"], f"{world} processes: timed out after {JOIN_TIMEOUT_S} s"
        for rank, r in g["ranks"].items():
            assert r["rc"] == 0, f"{world} processes, rank {rank}: exit {r['rc']}\n{r['log']}"


def test_demo_main_job(tmp_path):
    """``python -m pysbn demo`` from a foreign folder: 2 Gloo processes, PASS, exit 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pysbn", "demo", "--steps", "4", "--batch", "6"],
                          cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=JOIN_TIMEOUT_S)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert lines and lines[-1].startswith("PASS: "), proc.stdout[-3000:]
    assert "2 process(es)" in lines[-1] and "samples/s" in lines[-1]
    assert sum(ln.startswith("[") and "loss" in ln for ln in lines) == 4
