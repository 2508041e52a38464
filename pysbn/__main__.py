# SPDX-License-Identifier: MIT
"""``python -m pysbn {demo,bench,info}``."""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from . import _core
from . import functional as PF


def info() -> int:
    """Prints the version, the build (CUDA and its archs, OpenMP), torch, threads and devices."""
    import os
    import platform

    print(f"pysbn {_core.version()} ({os.path.dirname(os.path.abspath(__file__))})")
    cuda = (f"yes, archs {_core.cuda_architectures()}" if _core.built_with_cuda() else "no")
    print(f"  native core: CUDA {cuda}; OpenMP {'yes' if _core.built_with_openmp() else 'no'}")
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
        if not _core.built_with_cuda():
            print("  note: this pysbn build has no CUDA; CUDA tensors raise a clear error "
                  "(rebuild with nvcc on PATH)")
    else:
        print("  no CUDA device" + (" (the CUDA build still runs on CPU)"
                                    if _core.built_with_cuda() else ""))
    return 0


def demo(args) -> int:
    """A short demonstration of the native core, as a synchronised layer would use it.

    Two simulated replicas hold uneven shares of one batch whose mean is far from zero. Each
    computes its moments; the records are merged (Chan) and finalised; every replica normalises
    its share and runs the backward with the globally summed gradient sums. The result is
    compared with one torch batch norm over the whole batch, in float64.
    """
    torch.manual_seed(0)
    shape = (12, 16, 20, 20)
    c = shape[1]
    x = 1e4 + torch.randn(shape)
    dy = torch.randn(shape)
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    shares = [x[:3], x[3:]]  # 3 and 9 samples: uneven
    dys = [dy[:3], dy[3:]]
    steps = [
        "local moments per replica",
        "merge moments (Chan)",
        "finalize mean / invstd",
        "normalize each share",
        "backward_reduce per replica",
        "sum the grad-sums records",
        "backward_elemt each share",
    ]
    t0 = time.perf_counter()
    out = []

    def bar(i):
        width = 28
        done = int(width * i / len(steps))
        label = steps[i] if i < len(steps) else "done"
        sys.stdout.write(f"\r[{'#' * done}{'.' * (width - done)}] {label:<32}")
        sys.stdout.flush()

    bar(0)
    records = torch.stack([PF.moments(s) for s in shares])
    bar(1)
    merged = PF.merge_moments(records)
    bar(2)
    mean, invstd = PF.finalize(merged, 1e-5)
    bar(3)
    ys = [PF.normalize(s, mean, invstd, w, b) for s in shares]
    bar(4)
    red = [PF.backward_reduce(d, s, mean, invstd, True, True) for d, s in zip(dys, shares)]
    bar(5)
    sums = sum(r[0] for r in red)
    bar(6)
    dxs = [PF.backward_elemt(d, s, mean, invstd, w, sums, merged[:1]) for d, s in zip(dys, shares)]
    bar(7)
    print()
    elapsed = time.perf_counter() - t0

    # Reference: one batch norm over the whole batch, float64, autograd.
    xr = x.double().requires_grad_()
    wr, br = w.double().requires_grad_(), b.double().requires_grad_()
    yr = F.batch_norm(xr, None, None, wr, br, True, 0.1, 1e-5)
    yr.backward(dy.double())
    var_ref = x.double().var(dim=(0, 2, 3), unbiased=False)
    var_ours = merged[1 + c:].double() / merged[0].double()
    seed_var = ((x * x).sum(dim=(0, 2, 3)) / x[:, 0].numel() - x.mean(dim=(0, 2, 3)) ** 2)
    y = torch.cat(ys)
    dx = torch.cat(dxs)
    gw = sum(r[1] for r in red)
    gb = sum(r[2] for r in red)
    errs = {
        "variance (rel)": float(((var_ours - var_ref).abs() / var_ref).max()),
        "output": float((y.double() - yr.detach()).abs().max()),
        "grad input": float((dx.double() - xr.grad).abs().max() / xr.grad.abs().max()),
        "grad weight": float((gw.double() - wr.grad).abs().max() / wr.grad.abs().max()),
        "grad bias": float((gb.double() - br.grad).abs().max() / br.grad.abs().max()),
    }
    seed_err = float(((seed_var.double() - var_ref).abs() / var_ref).max())
    print(f"2 replicas, shares {[s.shape[0] for s in shares]} of {tuple(shape)}, mean offset 1e4, float32")
    for k, v in errs.items():
        print(f"  {k:<16} max error vs float64 batch norm: {v:.2e}")
    print(f"  (raw sum / sum-of-squares variance in float32, as the seed: rel error {seed_err:.2e})")
    # float32 data at offset 1e4: the statistics are float64, so errors stay near float32's
    # resolution of the data itself.
    ok = errs["variance (rel)"] < 1e-5 and errs["output"] < 1e-4 and max(
        errs["grad input"], errs["grad weight"], errs["grad bias"]) < 1e-4
    n = x.numel()
    print(f"{'PASS' if ok else 'FAIL'}: synchronised statistics and gradients match one batch norm over the "
          f"global batch; {n / elapsed / 1e6:.1f} M values/s through the core on {torch.get_num_threads()} thread(s)")
    return 0 if ok else 1


def main(argv=None) -> int:
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
