# SPDX-License-Identifier: MIT
"""Shared fixtures. The tests import the *installed* pysbn (`import pysbn`): run them as `pytest`
(importlib import mode, from pyproject) so the source folder, which has no compiled _core, never
shadows it. Nothing here touches sys.path."""

import random
import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed(request):
    """Seeds torch and random per test, from the test id: reproducible and independent of the
    order (or subset) of tests run."""
    seed = zlib.crc32(request.node.nodeid.encode("utf-8"))
    torch.manual_seed(seed)
    random.seed(seed)
    yield seed


@pytest.fixture
def seed(_seed):
    """The seed of the running test (to print or to re-seed a generator)."""
    return _seed


@pytest.fixture
def num_threads():
    """Restores torch's intra-op thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)
