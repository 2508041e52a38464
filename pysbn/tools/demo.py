# SPDX-License-Identifier: MIT
"""The main job: ``pysbn demo`` (or ``python -m pysbn demo``).

Trains a small conv net whose batch norms are :class:`pysbn.SynchronizedBatchNorm2d`, under
DistributedDataParallel, on synthetic data (nothing is downloaded), and checks at every step
that the synchronised statistics are those of one batch norm over the global batch: rank 0
gathers every rank's input and output of every synchronized layer and compares them, and every
rank's running statistics, with ``torch.nn.functional.batch_norm`` in float64 over the
concatenated batch. Prints a progress bar, the loss going down (judged from 4 steps on), and a
one-line verdict (PASS or FAIL) with the training throughput; the exit status is 0 on PASS.

- Plain machine (no ``RANK``/``WORLD_SIZE`` in the environment): starts ``--world-size``
  processes itself (default 2), rendezvous through a file in a temporary folder (no port).
- Under ``torchrun``: joins the group torchrun set up (``env://``).
- Backend: NCCL with one GPU per process when there are enough GPUs (``--device auto``), Gloo
  on CPU otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

import pysbn

__all__ = ["main"]

PG_TIMEOUT_S = 120.0
OUT_TOL = 1e-4  # output: max abs error / max |reference|, float32 layers vs float64
STAT_TOL = 1e-5  # running stats: relative error (float32 buffers vs float64)
LOSS_MIN_STEPS = 4  # fewer steps: the loss is only checked to be finite (one SGD step with
#                     momentum may well raise it)


# ---- the job ------------------------------------------------------------------------------------

def _net(classes: int) -> nn.Module:
    SBN = pysbn.SynchronizedBatchNorm2d

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
            self.bn1 = SBN(16)
            self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
            self.bn2 = SBN(32)
            self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
            self.bn3 = SBN(32)
            self.fc = nn.Linear(32, classes)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.bn2(self.conv2(x)))
            x = torch.relu(self.bn3(self.conv3(x)) + x)  # residual
            return self.fc(x.mean(dim=(2, 3)))

    return Net()


class _Data:
    """Synthetic images: a fixed smooth template per class, scaled, shifted and noisy."""

    def __init__(self, classes: int, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        t = torch.randn(classes, 3, size // 4, size // 4, generator=g)
        self.templates = nn.functional.interpolate(t, size=(size, size), mode="bilinear",
                                                   align_corners=False)
        self.classes = classes
        self.size = size
        self.seed = seed

    def batch(self, step: int, n: int):
        g = torch.Generator().manual_seed(self.seed * 100003 + step)
        labels = torch.randint(0, self.classes, (n,), generator=g)
        scale = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
        noise = torch.randn(n, 3, self.size, self.size, generator=g)
        return self.templates[labels] * scale + 1.0 * noise + 2.0, labels


class _Probe:
    """Records a synchronized layer's input, output, parameters and running stats per call."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.before: Optional[tuple] = None
        self.record: Optional[dict] = None
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module, inputs):
        if module.training:
            self.before = (module.running_mean.detach().clone(),
                           module.running_var.detach().clone())

    def _post(self, module, inputs, output):
        if module.training:
            self.record = {
                "x": inputs[0].detach(), "y": output.detach(),
                "w": module.weight.detach().clone(), "b": module.bias.detach().clone(),
                "rm0": self.before[0], "rv0": self.before[1],
                "rm": module.running_mean.detach().clone(),
                "rv": module.running_var.detach().clone(),
                "momentum": module.momentum, "eps": module.eps,
            }


def _gather_flat(t: torch.Tensor, world: int) -> torch.Tensor:
    t = t.contiguous().view(-1)
    out = torch.empty(world * t.numel(), dtype=t.dtype, device=t.device)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, t)
    return out.view(world, -1)


def _check(probes: List[_Probe], rank: int, world: int) -> Dict[str, float]:
    """Every rank sends its (x, y, running stats) of every probed layer; rank 0 compares them
    with one float64 batch norm over the global batch. Returns the worst errors (rank 0)."""
    worst = {"out": 0.0, "stats": 0.0}
    for p in probes:
        r = p.record
        assert r is not None, f"{p.name}: no training forward recorded"
        x, y = r["x"], r["y"]
        c = x.shape[1]
        flat = torch.cat([x.reshape(-1), y.reshape(-1), r["rm"], r["rv"]])
        allv = _gather_flat(flat, world)
        if rank != 0:
            continue
        nx = x.numel()
        shape = (world * x.shape[0],) + tuple(x.shape[1:])
        xg = allv[:, :nx].reshape(shape).double()
        yg = allv[:, nx:2 * nx].reshape(shape).double()
        rm = r["rm0"].double().clone()
        rv = r["rv0"].double().clone()
        yref = nn.functional.batch_norm(xg, rm, rv, r["w"].double(), r["b"].double(),
                                        training=True, momentum=r["momentum"], eps=r["eps"])
        worst["out"] = max(worst["out"], float((yg - yref).abs().max() / yref.abs().max()))
        got_rm = allv[:, 2 * nx:2 * nx + c].double()  # every rank's running stats
        got_rv = allv[:, 2 * nx + c:].double()
        err_m = float(((got_rm - rm).abs() / (rm.abs() + 1e-3)).max())
        err_v = float(((got_rv - rv).abs() / rv.abs()).max())
        worst["stats"] = max(worst["stats"], err_m, err_v)
    return worst


def _bar(step: int, steps: int, loss: float, worst: Dict[str, float], tty: bool) -> None:
    width = 24
    done = int(width * step / steps)
    line = (f"[{'#' * done}{'.' * (width - done)}] step {step:>3}/{steps}  loss {loss:7.4f}  "
            f"sync check: output err {worst['out']:.1e}, running-stat err {worst['stats']:.1e}")
    if tty:
        sys.stdout.write("\r" + line)
        if step == steps:
            sys.stdout.write("\n")
    else:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _train(rank: int, world: int, local_rank: int, use_cuda: bool, args) -> int:
    """The job on one rank of an initialised process group; returns the exit status (the same
    on every rank)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    classes, size = 4, 16
    data = _Data(classes, size, seed=args.seed)
    torch.manual_seed(args.seed)
    model = _net(classes).to(device)
    probes = [_Probe(n, m) for n, m in model.named_modules() if n.startswith("bn")]
    ddp = DDP(model, device_ids=[local_rank] if use_cuda else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    lossf = nn.CrossEntropyLoss()
    tty = rank == 0 and sys.stdout.isatty()
    if rank == 0:
        where = (f"NCCL, {world} GPU(s)" if use_cuda else
                 f"Gloo, CPU, {torch.get_num_threads()} thread(s) per process")
        print(f"pysbn demo: {world} process(es) ({where}); a small conv net with "
              f"{len(probes)} SynchronizedBatchNorm2d layers under DistributedDataParallel")
        print(f"  synthetic data, {args.batch} samples per process "
              f"(global batch {args.batch * world}), {args.steps} SGD steps; each step rank 0 "
              "checks every layer against one float64 batch norm over the global batch")
        sys.stdout.flush()
    losses: List[float] = []
    worst_all = {"out": 0.0, "stats": 0.0}
    train_s = 0.0
    for step in range(1, args.steps + 1):
        xg, tg = data.batch(step, args.batch * world)
        x = xg[rank * args.batch:(rank + 1) * args.batch].to(device)
        t = tg[rank * args.batch:(rank + 1) * args.batch].to(device)
        if use_cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = lossf(ddp(x), t)
        loss.backward()
        opt.step()
        if use_cuda:
            torch.cuda.synchronize(device)
        if step > 1 or args.steps == 1:  # the first step warms up (allocations, DDP buckets)
            train_s += time.perf_counter() - t0
        # outside the timed part: the global loss and the statistics check
        gl = loss.detach().clone().reshape(1)
        dist.all_reduce(gl)
        losses.append(float(gl) / world)
        worst = _check(probes, rank, world)
        for name in worst_all:
            worst_all[name] = max(worst_all[name], worst[name])
        if rank == 0:
            _bar(step, args.steps, losses[-1], worst, tty)
    k = max(1, min(3, len(losses) // 3))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    stats_ok = worst_all["out"] <= OUT_TOL and worst_all["stats"] <= STAT_TOL
    judged = args.steps >= LOSS_MIN_STEPS
    loss_ok = math.isfinite(last) and (last < first or not judged)
    ok = torch.tensor([1.0 if (stats_ok and loss_ok) else 0.0], device=device)
    dist.broadcast(ok, 0)  # rank 0 holds the verdict
    passed = bool(ok.item() == 1.0)
    if rank == 0:
        timed = args.steps - 1 if args.steps > 1 else 1
        rate = timed * args.batch * world / max(train_s, 1e-9)
        print(f"loss {first:.4f} -> {last:.4f} (mean of the first and last {k} step(s))"
              f"{'' if loss_ok else ': NOT going down'}"
              f"{'' if judged else f' (not judged: fewer than {LOSS_MIN_STEPS} steps)'}")
        agree = ("equal one BatchNorm over the global batch at every step" if stats_ok else
                 "DIFFER from one BatchNorm over the global batch")
        print(f"{'PASS' if passed else 'FAIL'}: synchronised statistics {agree} (worst output "
              f"error {worst_all['out']:.1e}, running stats {worst_all['stats']:.1e}, limits "
              f"{OUT_TOL:g}, {STAT_TOL:g}); {world} process(es), throughput {rate:,.0f} "
              f"samples/s ({'cuda' if use_cuda else 'cpu'}, training steps after the first)")
        sys.stdout.flush()
    return 0 if passed else 1


# ---- launching ------------------------------------------------------------------------------------

def _init(backend: str, rank: int, world: int, init_method: str) -> None:
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))


def _all_done() -> None:
    """A barrier after a finished run, before the process group is torn down: no rank closes
    its connections while another still has collectives in flight (a rank that tore down early
    made its peer abort at exit, "terminate called without an active exception", about once in
    tens of Gloo runs). Only after success: after a failure the peers may never arrive."""
    dist.barrier()


def _child(rank: int, world: int, store: str, use_cuda: bool, threads: int, args) -> None:
    """Entry of a process started by :func:`main` (torch.multiprocessing)."""
    torch.set_num_threads(threads)
    _init("nccl" if use_cuda else "gloo", rank, world, f"file://{store}")
    try:
        code = _train(rank, world, rank, use_cuda, args)
        _all_done()
    finally:
        dist.destroy_process_group()
    if code:
        raise SystemExit(code)


def _want_cuda(device: str, world: int) -> bool:
    if device == "cpu":
        return False
    enough = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if device == "cuda" and not enough:
        raise SystemExit(f"pysbn demo: --device cuda needs {world} GPUs, found "
                         f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    return enough


def _parse(argv: Optional[Sequence[str]], prog: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog,
                                 description="Train a small conv net with synchronized batch "
                                 "norm over several processes and check the statistics.")
    ap.add_argument("--steps", type=int, default=20, help="SGD steps (default 20)")
    ap.add_argument("--world-size", type=int, default=2,
                    help="processes to start when not under torchrun (default 2)")
    ap.add_argument("--batch", type=int, default=16, help="samples per process (default 16)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: one GPU per process (NCCL) when there are enough, else CPU "
                         "(Gloo)")
    ap.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data and the model")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds before the started processes are stopped (default 300)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.world_size < 1 or args.batch < 1:
        ap.error("--steps, --world-size and --batch must be >= 1")
    if args.batch * args.world_size < 2:
        ap.error("the global batch needs at least 2 samples")
    return args


def main(argv: Optional[Sequence[str]] = None, prog: str = "pysbn demo") -> int:
    """``pysbn demo [--steps N] [--world-size W] [--batch B]``; returns the exit status
    (0: PASS)."""
    args = _parse(argv, prog)
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # under torchrun (or another env:// launcher)
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", "0"))
        use_cuda = args.device != "cpu" and torch.cuda.is_available() and \
            local_rank < torch.cuda.device_count()
        if args.device == "cuda" and not use_cuda:
            print("pysbn demo: --device cuda but no GPU for this rank", file=sys.stderr)
            return 2
        _init("nccl" if use_cuda else "gloo", rank, world, "env://")
        try:
            code = _train(rank, world, local_rank, use_cuda, args)
            _all_done()
            return code
        finally:
            dist.destroy_process_group()

    import torch.multiprocessing as mp

    world = args.world_size
    use_cuda = _want_cuda(args.device, world)
    threads = max(1, (os.cpu_count() or 1) // world) if not use_cuda else 1
    folder = tempfile.mkdtemp(prefix="pysbn-demo-")
    store = os.path.join(folder, "store")
    try:
        ctx = mp.start_processes(_child, args=(world, store, use_cuda, threads, args),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + args.timeout
        while True:
            try:
                if ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                    break
            except mp.ProcessExitedException as exc:
                if exc.exit_code == 1:  # a FAIL verdict, already printed
                    return 1
                print(f"pysbn demo: FAIL: {exc}", file=sys.stderr)
                return 1
            except mp.ProcessRaisedException as exc:
                print(f"pysbn demo: FAIL: a process raised:\n{exc}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                for p in ctx.processes:
                    p.join(5)
                print(f"pysbn demo: FAIL: not done after {args.timeout:g} s; processes stopped",
                      file=sys.stderr)
                return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
