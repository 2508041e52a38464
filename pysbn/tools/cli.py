# SPDX-License-Identifier: MIT
"""The command line: ``pysbn {demo,bench,info}`` (console script) or ``python -m pysbn ...``.

- ``demo``: the main job (:mod:`pysbn.tools.demo`);
- ``bench``: the benchmark protocol (:mod:`pysbn.tools.bench`; ``bench --sync``:
  :mod:`pysbn.tools.bench_sync`);
- ``info``: version, build (CUDA and its archs, OpenMP), torch, threads and devices.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Optional, Sequence

import torch

import pysbn
from pysbn import ops

__all__ = ["info", "main"]


def info() -> int:
    """Prints the version, the build (CUDA and its archs, OpenMP), torch, threads and devices;
    returns 0."""
    core = ops.core_version()
    print(f"pysbn {pysbn.__version__} ({os.path.dirname(os.path.abspath(pysbn.__file__))})")
    if core != pysbn.__version__:
        print(f"  warning: the native core reports version {core}: a stale build "
              "(reinstall pysbn)")
    cuda = (f"yes, archs {ops.cuda_architectures()}" if ops.built_with_cuda() else "no")
    print(f"  native core: CUDA {cuda}; OpenMP {'yes' if ops.built_with_openmp() else 'no'}")
    print(f"  python {platform.python_version()}, torch {torch.__version__} (CUDA "
          f"{torch.version.cuda or 'none'}), {torch.get_num_threads()} CPU thread(s) of "
          f"{os.cpu_count()} core(s)")
    if torch.distributed.is_available():
        backends = [name for name, ok in (
            ("gloo", torch.distributed.is_gloo_available()),
            ("nccl", torch.distributed.is_nccl_available()),
            ("mpi", torch.distributed.is_mpi_available())) if ok]
        print(f"  torch.distributed: {', '.join(backends) or 'no backend'}")
    else:
        print("  torch.distributed: not available in this torch build")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                  f"cuDNN {torch.backends.cudnn.version()}")
        if not ops.built_with_cuda():
            print("  note: this pysbn build has no CUDA; CUDA tensors raise a clear error "
                  "(rebuild with nvcc on PATH)")
    else:
        print("  no CUDA device" + (" (the CUDA build still runs on CPU)"
                                    if ops.built_with_cuda() else ""))
    sys.stdout.flush()
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Entry point of the ``pysbn`` console script and of ``python -m pysbn``: ``demo`` (the
    main job), ``bench``, ``info``. ``argv``: the arguments (default ``sys.argv[1:]``);
    ``prog``: the program name in messages (default ``pysbn``). Returns the exit status."""
    prog = prog or "pysbn"
    ap = argparse.ArgumentParser(prog=prog, description="Synchronized BatchNorm for PyTorch: "
                                 "the main job, the benchmark, build information.")
    ap.add_argument("--version", action="version", version=f"pysbn {pysbn.__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="run the main job (synchronised training, checked)",
                   add_help=False)
    sub.add_parser("bench", help="run the benchmark protocol", add_help=False)
    sub.add_parser("info", help="version, build and devices")
    args, rest = ap.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.cmd == "bench":
        from . import bench

        return int(bench.main(rest, prog=f"{prog} bench") or 0)
    if args.cmd == "demo":
        from . import demo

        return int(demo.main(rest, prog=f"{prog} demo") or 0)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    return info()
