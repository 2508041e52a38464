# SPDX-License-Identifier: MIT
"""pysbn: Synchronized Batch Normalization for PyTorch.

Drop-in ``nn.BatchNorm1d/2d/3d`` replacements whose training statistics are computed over the
whole batch spread across DataParallel replicas (:class:`DataParallelWithCallback`) or the ranks
of a torch.distributed process group (DDP, torchrun; NCCL or Gloo), on a native C++/CUDA core.
"""

# torch first: it loads its libgomp.so.1, so the core's OpenMP (same soname) binds to that one
# runtime and the process has a single OpenMP thread pool.
import torch  # noqa: F401  (imported for its side effect, before _core)

from ._version import __version__  # the one version (also the wheel's and the core's)


def _source_folder_error(exc: ImportError) -> ImportError:
    """The clear error for ``import pysbn`` resolving to the source folder of a checkout (the
    working directory comes first on Python's path), which has no compiled ``_core``."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.exists(os.path.join(here, "..", "CMakeLists.txt")):
        return exc
    return ImportError(
        f"pysbn: 'import pysbn' found the source folder {here} (Python puts the working "
        "directory first on its path), which has no compiled _core. Use the installed "
        "package: run the `pysbn` command (pysbn demo, pysbn bench, pysbn info), or run "
        "Python from another directory; install it first with `pip install .`")


try:
    from . import ops  # registers the op set with torch (torch.ops.pysbn.*)
except ImportError as _exc:
    if "_core" not in str(_exc):
        raise
    raise _source_folder_error(_exc) from _exc
from . import functional
from .sync import (SyncAbortedError, get_sync_check, get_sync_timeout, set_sync_check,
                   set_sync_timeout)
from .batchnorm import (
    ChannelMismatchError,
    SynchronizedBatchNorm,
    SynchronizedBatchNormAct2d,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
    convert_model,
    get_sbn_eps_mode,
    patch_sync_batchnorm,
    revert_model,
    set_sbn_eps_mode,
)
from .replicate import (
    CallbackContext,
    DataParallelWithCallback,
    execute_replication_callbacks,
    patch_replication_callback,
)


__all__ = [
    "SynchronizedBatchNorm1d",
    "SynchronizedBatchNorm2d",
    "SynchronizedBatchNorm3d",
    "SynchronizedBatchNorm",
    "SynchronizedBatchNormAct2d",
    "DataParallelWithCallback",
    "patch_replication_callback",
    "execute_replication_callbacks",
    "CallbackContext",
    "convert_model",
    "revert_model",
    "patch_sync_batchnorm",
    "set_sbn_eps_mode",
    "get_sbn_eps_mode",
    "set_sync_timeout",
    "get_sync_timeout",
    "set_sync_check",
    "get_sync_check",
    "SyncAbortedError",
    "ChannelMismatchError",
    "functional",
    "ops",
    "__version__",
]
