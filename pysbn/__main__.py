# SPDX-License-Identifier: MIT
"""``python -m pysbn {demo,bench,info}``."""
from __future__ import annotations

import argparse
import sys

import torch

from . import ops


def info() -> int:
    """Prints the version, the build (CUDA and its archs, OpenMP), torch, threads and devices."""
    import os
    import platform

    print(f"pysbn {ops.core_version()} ({os.path.dirname(os.path.abspath(__file__))})")
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
    return 0


def main(argv=None) -> int:
    """Entry point of ``python -m pysbn``: ``demo`` (the main job), ``bench``, ``info``."""
    ap = argparse.ArgumentParser(prog="python -m pysbn")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="run the main job", add_help=False)
    sub.add_parser("bench", help="run the benchmark protocol", add_help=False)
    sub.add_parser("info", help="version, build and devices")
    args, rest = ap.parse_known_args(argv)
    if args.cmd == "bench":
        from . import bench

        return bench.main(rest)
    if args.cmd == "demo":
        from . import demo as demo_job

        return demo_job.main(rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    return info()


if __name__ == "__main__":
    sys.exit(main())
