# SPDX-License-Identifier: MIT
"""pysbn: Synchronized Batch Normalization for PyTorch."""

# torch first: it loads its libgomp.so.1, so the core's OpenMP (same soname) binds to that one
# runtime and the process has a single OpenMP thread pool.
import torch  # noqa: F401  (imported for its side effect, before _core)

from . import _core
from . import functional

__version__ = _core.version()

__all__ = ["functional", "__version__"]
