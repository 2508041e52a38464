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
"more than 1 value per channel" error on every rank, the header check's RuntimeError naming the
layers when the ranks are at different calls or layers (eager and compiled, forward and
backward; different channel counts in check mode and under TORCH_DISTRIBUTED_DEBUG=DETAIL; a
rank that stops calling a layer), a small ResNet-like net under DistributedDataParallel against
the plain-BN net trained on the whole batch in one process (also with non-reentrant activation
checkpointing, and timm/torchvision models), SynchronizedBatchNormAct2d with every activation
on uneven shares, and compiled training steps (fullgraph,
compile(DDP), DDP(compile)) with their collectives counted in the graphs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from _support import case_problems, run_group

JOIN_TIMEOUT_S = 240  # the whole group; then every rank is killed

# group name: (world size, cases, extra environment, process-group timeout in s or None)
SUITES = {
    "2procs": (2, ["layers_w2", "offset_w2", "too_few_w2", "mismatch_w2", "ddp_w2",
                   "identity_w2", "check_mode_w2", "checkpoint_w2", "zoo_ddp_w2", "act_w2",
                   "compile_w2", "compile_ddp_w2", "compile_mismatch_w2"], {}, None),
    "2procs-detail": (2, ["sizes_detail_w2"], {"TORCH_DISTRIBUTED_DEBUG": "DETAIL"}, None),
    "2procs-timeout": (2, ["stops_calling_w2"], {}, 5),
    "3procs": (3, ["empty_rank_w3", "too_few_w3", "subgroup_w3"], {}, None),
    "4procs": (4, ["layers_w4", "subgroups_w4", "ddp_w4"], {}, None),
}


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """Runs each group once per module, lazily (a -k selection starts only the groups it
    needs)."""
    cache = {}

    def get(name: str) -> dict:
        if name not in cache:
            world, cases, env, pg_timeout = SUITES[name]
            cache[name] = run_group(world, cases, tmp_path_factory.mktemp(name), JOIN_TIMEOUT_S,
                                    env=env, pg_timeout=pg_timeout)
        return cache[name]

    return get


@pytest.mark.parametrize("group,case", [(g, c) for g, s in SUITES.items() for c in s[1]],
                         ids=[f"{g}-{c}" for g, s in SUITES.items() for c in s[1]])
def test_distributed(groups, group, case):
    g = groups(group)
    problems = case_problems(g, case)
    assert not problems, f"{group}, case {case}:\n" + "\n".join(problems)


def test_all_ranks_exit_cleanly(groups):
    """Every rank of every group ran all its cases and exited with 0 within the deadline."""
    for name in SUITES:
        g = groups(name)
        assert not g["timed_out"], f"{name}: timed out after {JOIN_TIMEOUT_S} s"
        for rank, r in g["ranks"].items():
            assert r["rc"] == 0, f"{name}, rank {rank}: exit {r['rc']}\n{r['log']}"


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
