# SPDX-License-Identifier: MIT
"""What the benchmark programs share: the record of the machine and software a result depends
on (:func:`environment`) and short dtype names."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from typing import Any, Dict, Optional, Sequence

import torch

import pysbn
from pysbn import ops

__all__ = ["SHORT_DTYPES", "environment"]

SHORT_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64"}
"""Short dtype names for labels."""


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def environment(threads: Sequence[int]) -> Dict[str, Any]:
    """The machine, the software and the settings a result depends on."""
    cpu = platform.processor() or platform.machine()
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
            level, kind, size = (_read(os.path.join(p, k)) for k in ("level", "type", "size"))
            if level and kind and size:
                caches[f"L{level}{kind[0].lower()}"] = size
    except OSError:
        pass
    mem = None
    meminfo = _read("/proc/meminfo")
    if meminfo:
        for line in meminfo.splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    env: Dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "caches": caches,
        "memory": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "pysbn": pysbn.__version__,
        "pysbn_core": ops.core_version(),
        "pysbn_cuda": ops.built_with_cuda(),
        "pysbn_cuda_archs": ops.cuda_architectures() if ops.built_with_cuda() else None,
        "pysbn_openmp": ops.built_with_openmp(),
        "threads": list(threads),
        "allocator": os.environ.get("GLIBC_TUNABLES", "glibc default"),
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "PYSBN_NO_HUGEPAGE",
                                           "THP_MEM_ALLOC_ENABLE", "PYTORCH_CUDA_ALLOC_CONF")
                if k in os.environ},
    }
    if torch.cuda.is_available():
        gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                         "memory_GiB": round(props.total_memory / 2**30, 1),
                         "multiprocessors": props.multi_processor_count})
        env["gpus"] = gpus
        env["gpu"] = gpus[0]["name"]
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = None
    return env
