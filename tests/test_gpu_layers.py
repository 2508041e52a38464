# SPDX-License-Identifier: MIT
"""The synchronized layers on CUDA (issue 7): everything here needs a GPU and a CUDA build.

Run on a GPU machine (after ``pip install .`` there, which builds the CUDA core when nvcc is
found; ``python -m pysbn info`` says whether it did)::

    pytest -rs tests/test_gpu_layers.py            # or: pytest -m gpu -rs

On a machine without a GPU (or with a build without CUDA) every test is skipped with the reason.

What is checked:

- layers (1d/2d/3d; contiguous and channels_last; float32/float64/float16/bfloat16) forward and
  backward under random upstream gradients against ``nn.BatchNorm`` on the same GPU (cuDNN or
  torch's native kernels) and against pysbn's own CPU path; running statistics over several
  steps (``momentum`` 0.1 and None); eval mode;
- ``model.half()`` / ``model.bfloat16()`` and ``torch.autocast`` training of a conv + BN net,
  against the same net with ``nn.BatchNorm2d`` under the same precision;
- the DataParallel protocol of tests/test_data_parallel.py (threads, deepcopy replicas,
  ``pysbn.execute_replication_callbacks``) with every replica on cuda:0, and the real
  ``pysbn.DataParallelWithCallback`` when there are two GPUs;
- process-group synchronisation with 2 processes (tests/_dist_worker.py with
  ``PYSBN_TEST_DEVICE=cuda``; both ranks share the GPU when there is one), Gloo over CUDA
  tensors and NCCL;
- CUDA-graph capture of a training step of a lone layer, equal to eager execution;
- no host synchronisation in the forward and backward of a lone layer
  (``torch.cuda.set_sync_debug_mode("error")``).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import pysbn
from _support import (case_problems, close, make_replicas, randomize, results, run_group,
                      run_threads)
from pysbn import ops


def _skip_reason() -> str:
    if not torch.cuda.is_available():
        return "needs a CUDA device (torch.cuda.is_available() is False)"
    if not ops.built_with_cuda():
        return ("needs pysbn built with CUDA (pysbn.ops.built_with_cuda() is False); "
                "rebuild with nvcc on the PATH or PYSBN_WITH_CUDA=ON")
    return ""


_REASON = _skip_reason()

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_REASON), reason=_REASON or "-")]

SYNC = {1: pysbn.SynchronizedBatchNorm1d, 2: pysbn.SynchronizedBatchNorm2d,
        3: pysbn.SynchronizedBatchNorm3d}
PLAIN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF = (torch.float16, torch.bfloat16)

# max |actual - expected| <= TOL * max(1, max |expected|), per input dtype (half types: one or
# two units in the last place of values of a few units, as in tests/test_layers.py).
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}

CUDA = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _cuda_state():
    """Each test starts and ends with an idle device and default settings."""
    torch.cuda.synchronize()
    yield
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("default")
    pysbn.set_sync_timeout(None)


# ---- helpers ------------------------------------------------------------------------------------

def to_format(x, fmt):
    if fmt == "contiguous" or x.dim() < 4:
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                        else torch.channels_last_3d)


def is_format(t, fmt):
    if t.dim() < 4 or fmt == "contiguous":
        return t.is_contiguous()
    return t.is_contiguous(memory_format=torch.channels_last if t.dim() == 4
                           else torch.channels_last_3d)


def param_dtype(dtype):
    """Parameters of the layers under test: float32 for half inputs (mixed precision, as cuDNN
    and autocast models have), the input dtype otherwise."""
    return torch.float32 if dtype in HALF else dtype


def make_trio(kind, c, dtype, **kw):
    """pysbn on CUDA, nn.BatchNorm on CUDA, pysbn on CPU: same parameters and buffers."""
    ref = PLAIN[kind](c, dtype=param_dtype(dtype), device=CUDA, **kw)
    randomize(ref)
    sbn = SYNC[kind](c, dtype=param_dtype(dtype), device=CUDA, **kw)
    sbn.load_state_dict(ref.state_dict())
    cpu = SYNC[kind](c, dtype=param_dtype(dtype), **kw)
    cpu.load_state_dict(ref.state_dict())
    return sbn, ref, cpu


def make_input(shape, dtype, fmt, offset=0.5, scale=2.0):
    x = torch.randn(shape, dtype=torch.float64) * scale + offset
    return to_format(x.to(dtype), fmt)


def run_step(module, x, dy):
    """forward + backward(dy) of a copy of x (a leaf); returns (y, x.grad)."""
    xs = x.detach().clone().requires_grad_()
    y = module(xs)
    y.backward(dy)
    return y, xs.grad


def compare_modules(mine, ref, tol, what, grads=True):
    for p in ("weight", "bias"):
        a, e = getattr(mine, p), getattr(ref, p)
        assert (a is None) == (e is None), f"{what}: {p}"
        if a is not None and grads:
            assert a.grad is not None and a.grad.dtype == a.dtype, f"{what}: {p}.grad"
            close(a.grad, e.grad, tol * 4, f"{what}: {p} grad")
    for b in ("running_mean", "running_var"):
        a, e = getattr(mine, b), getattr(ref, b)
        assert (a is None) == (e is None), f"{what}: {b}"
        if a is not None:
            assert a.dtype == e.dtype, f"{what}: {b} dtype {a.dtype} vs {e.dtype}"
            close(a, e, tol, f"{what}: {b}")
    if ref.num_batches_tracked is not None:
        assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked), what


# ---- layers against cuDNN and against the CPU path ----------------------------------------------

LAYER_CASES = [
    # kind, shape, memory format
    (1, (32, 8), "contiguous"),
    (1, (8, 6, 20), "contiguous"),
    (2, (4, 16, 12, 10), "contiguous"),
    (2, (4, 16, 12, 10), "channels_last"),
    (2, (3, 5, 7, 9), "channels_last"),  # odd sizes: the scalar (unvectorised) kernels
    (3, (2, 8, 4, 6, 5), "contiguous"),
    (3, (2, 8, 4, 6, 5), "channels_last"),
]
LAYER_IDS = [f"bn{k}d-{'x'.join(map(str, s))}-{f}" for k, s, f in LAYER_CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kind,shape,fmt", LAYER_CASES, ids=LAYER_IDS)
def test_layer_matches_cudnn_and_cpu(kind, shape, fmt, dtype):
    """Training forward + backward (random upstream gradients), 3 steps with gradients
    accumulating: pysbn on CUDA vs nn.BatchNorm on CUDA (same dtypes) and vs pysbn on CPU;
    output and input gradient keep the input's memory format."""
    tol = TOL[dtype]
    sbn, ref, cpu = make_trio(kind, shape[1], dtype)
    for step in range(3):
        x = make_input(shape, dtype, fmt)
        dy = to_format(torch.randn(shape, dtype=torch.float64).to(dtype), fmt)
        xg, dyg = x.to(CUDA), dy.to(CUDA)
        y, gx = run_step(sbn, xg, dyg)
        yr, gxr = run_step(ref, xg, dyg)
        yc, gxc = run_step(cpu, x, dy)
        assert y.device == xg.device and y.dtype == dtype and gx.dtype == dtype
        assert is_format(y, fmt) and is_format(gx, fmt), f"step {step}: memory format"
        what = f"step {step}"
        close(y, yr, tol, f"{what} output vs nn.BatchNorm")
        close(gx, gxr, tol, f"{what} input grad vs nn.BatchNorm")
        compare_modules(sbn, ref, tol, f"{what} vs nn.BatchNorm")
        close(y, yc, tol, f"{what} output vs CPU")
        close(gx, gxc, tol, f"{what} input grad vs CPU")
        compare_modules(sbn, cpu, tol, f"{what} vs CPU")


@pytest.mark.parametrize("opt", [{"momentum": None}, {"affine": False}, {"bias": False},
                                 {"track_running_stats": False}],
                         ids=["momentum_none", "affine_false", "bias_false", "no_running_stats"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_layer_options_and_running_stats(opt, dtype):
    """Options of nn.BatchNorm over 4 steps (the cumulative average of momentum=None included),
    then eval mode (running stats, or batch stats without them)."""
    if "bias" in opt:
        try:
            nn.BatchNorm2d(1, bias=False)
        except TypeError:
            pytest.skip("this torch's nn.BatchNorm2d has no bias keyword")
    tol = TOL[dtype]
    shape = (6, 5, 7, 3)
    sbn, ref, _ = make_trio(2, shape[1], dtype, **opt)
    for step in range(4):
        x = make_input(shape, dtype, "channels_last" if step % 2 else "contiguous")
        dy = torch.randn(shape, dtype=torch.float64).to(dtype).to(CUDA)
        y, gx = run_step(sbn, x.to(CUDA), dy)
        yr, gxr = run_step(ref, x.to(CUDA), dy)
        close(y, yr, tol, f"step {step} output")
        close(gx, gxr, tol, f"step {step} input grad")
        compare_modules(sbn, ref, tol, f"step {step}")
    sbn.eval()
    ref.eval()
    x = make_input(shape, dtype, "contiguous").to(CUDA)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype).to(CUDA)
    sbn.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    y, gx = run_step(sbn, x, dy)
    yr, gxr = run_step(ref, x, dy)
    close(y, yr, tol, "eval output")
    close(gx, gxr, tol, "eval input grad")
    compare_modules(sbn, ref, tol, "eval")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kind,shape,fmt", [LAYER_CASES[0], LAYER_CASES[3], LAYER_CASES[6]],
                         ids=[LAYER_IDS[0], LAYER_IDS[3], LAYER_IDS[6]])
def test_eval_mode(kind, shape, fmt, dtype):
    """Eval mode (normalisation with the running statistics): output, input and parameter
    gradients vs nn.BatchNorm; the running statistics do not change."""
    tol = TOL[dtype]
    sbn, ref, cpu = make_trio(kind, shape[1], dtype)
    for m in (sbn, ref, cpu):
        m.eval()
    before = (sbn.running_mean.clone(), sbn.running_var.clone())
    x = make_input(shape, dtype, fmt, offset=0.3)
    dy = to_format(torch.randn(shape, dtype=torch.float64).to(dtype), fmt)
    y, gx = run_step(sbn, x.to(CUDA), dy.to(CUDA))
    yr, gxr = run_step(ref, x.to(CUDA), dy.to(CUDA))
    yc, gxc = run_step(cpu, x, dy)
    assert is_format(y, fmt) and is_format(gx, fmt)
    close(y, yr, tol, "eval output vs nn.BatchNorm")
    close(gx, gxr, tol, "eval input grad vs nn.BatchNorm")
    compare_modules(sbn, ref, tol, "eval vs nn.BatchNorm")
    close(y, yc, tol, "eval output vs CPU")
    close(gx, gxc, tol, "eval input grad vs CPU")
    assert torch.equal(sbn.running_mean, before[0]) and torch.equal(sbn.running_var, before[1])
    assert int(sbn.num_batches_tracked) == 0


# ---- half modules and autocast -------------------------------------------------------------------

def conv_net(bn2d):
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), bn2d(16), nn.ReLU(),
                         nn.Conv2d(16, 8, 3, padding=1, bias=False), bn2d(8))


def twin_nets(seed):
    """A conv + BN net with nn.BatchNorm2d and the same net converted to pysbn, on CUDA."""
    torch.manual_seed(seed)
    ref = conv_net(nn.BatchNorm2d)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize(m)
    net = pysbn.convert_model(copy.deepcopy(ref))
    assert sum(isinstance(m, pysbn.SynchronizedBatchNorm2d) for m in net.modules()) == 2
    return net.to(CUDA), ref.to(CUDA)


NET_TOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1}


def train_twins(net, ref, dtype, fmt, autocast, steps=3):
    """SGD steps of both nets on the same data; after each step outputs, input grads, parameter
    grads and buffers must agree (half-precision tolerance: the convs see inputs that differ by
    the BN's rounding)."""
    tol = NET_TOL[dtype]
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    in_dtype = torch.float32 if autocast else dtype
    for step in range(steps):
        x = to_format(torch.randn(8, 3, 12, 12, device=CUDA) * 1.5 + 0.5, fmt).to(in_dtype)
        outs = []
        for model, o in ((net, opt), (ref, opt_ref)):
            o.zero_grad(set_to_none=True)
            xs = x.clone().requires_grad_()
            with torch.autocast("cuda", dtype=dtype, enabled=autocast):
                y = model(xs)
                loss = (y.float() * torch.linspace(-1, 1, y.numel(), device=CUDA)
                        .view_as(y)).sum() / y.shape[0]
            assert y.dtype == dtype, f"output dtype {y.dtype}"
            loss.backward()
            assert torch.isfinite(loss), f"step {step}: loss {loss}"
            outs.append((y, xs.grad, loss))
            o.step()
        (y, gx, loss), (yr, gxr, loss_r) = outs
        close(y, yr, tol, f"step {step} output")
        close(gx, gxr, tol, f"step {step} input grad")
        close(loss, loss_r, tol, f"step {step} loss")
        ref_params = dict(ref.named_parameters())
        for name, p in net.named_parameters():
            assert p.grad is not None and p.grad.dtype == p.dtype, name
            close(p.grad, ref_params[name].grad, tol * 2, f"step {step} grad of {name}")
            close(p, ref_params[name], tol, f"step {step} {name}")
        ref_bufs = dict(ref.named_buffers())
        for name, b in net.named_buffers():
            assert b.dtype == ref_bufs[name].dtype, name
            if b.dtype.is_floating_point:
                close(b, ref_bufs[name], tol, f"step {step} {name}")
            else:
                assert int(b) == int(ref_bufs[name]), name
    # eval mode, same precision
    net.eval()
    ref.eval()
    x = torch.randn(4, 3, 12, 12, device=CUDA).to(in_dtype)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=autocast):
        close(net(x), ref(x), tol, "eval output")


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_half_module_training(dtype, fmt):
    """``model.half()`` / ``model.bfloat16()``: parameters and buffers in half precision."""
    net, ref = twin_nets(11)
    net, ref = net.to(dtype), ref.to(dtype)
    for m in net.modules():
        if isinstance(m, pysbn.SynchronizedBatchNorm2d):
            assert m.weight.dtype == dtype and m.running_var.dtype == dtype
    if fmt == "channels_last":
        net, ref = net.to(memory_format=torch.channels_last), ref.to(
            memory_format=torch.channels_last)
    train_twins(net, ref, dtype, fmt, autocast=False)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_autocast_training(dtype, fmt):
    """``torch.autocast("cuda", dtype)`` with float32 parameters: the convs produce half
    activations, the BN layers take them with float32 parameters (mixed precision)."""
    net, ref = twin_nets(12)
    if fmt == "channels_last":
        net, ref = net.to(memory_format=torch.channels_last), ref.to(
            memory_format=torch.channels_last)
    train_twins(net, ref, dtype, fmt, autocast=True)
    for m in net.modules():
        if isinstance(m, pysbn.SynchronizedBatchNorm2d):
            assert m.weight.dtype == torch.float32 and m.running_var.dtype == torch.float32


# ---- DataParallel --------------------------------------------------------------------------------


DP_CASES = [
    # kind, per-sample shape, memory format, shares, dtype
    (1, (5,), "contiguous", [3, 5, 2], torch.float64),
    (2, (4, 5, 3), "contiguous", [2, 3], torch.float32),
    (2, (4, 5, 3), "channels_last", [1, 4, 2], torch.float64),
    (2, (3, 2, 2), "contiguous", [0, 3, 2], torch.float64),  # a replica with zero samples
    (3, (3, 3, 2, 4), "channels_last", [2, 1, 3], torch.float32),
]
DP_IDS = [f"bn{k}d-{'x'.join(map(str, r))}-{f}-{'+'.join(map(str, s))}-{str(d)[6:]}"
          for k, r, f, s, d in DP_CASES]


def _dp_setup(kind, rest, shares, dtype):
    c = rest[0]
    ref = PLAIN[kind](c, dtype=torch.float64)
    randomize(ref)
    module = SYNC[kind](c, dtype=dtype)
    module.load_state_dict(ref.state_dict())
    replicas = make_replicas(module.to(CUDA), len(shares))
    assert all(p.device == CUDA for r in replicas for p in r.parameters())
    return ref, replicas


def _dp_batch(rest, shares, fmt, dtype):
    n = sum(shares)
    x = torch.randn((n,) + tuple(rest), dtype=torch.float64) * 1.5 + 0.7
    dy = torch.randn_like(x)
    xs = [to_format(p, fmt).to(dtype).to(CUDA).requires_grad_() for p in x.split(shares)]
    dys = [to_format(p, fmt).to(dtype).to(CUDA) for p in dy.split(shares)]
    return xs, dys


@pytest.mark.parametrize("kind,rest,fmt,shares,dtype", DP_CASES, ids=DP_IDS)
def test_data_parallel_protocol_one_device_forward(kind, rest, fmt, shares, dtype):
    """The CPU DataParallel protocol (replica i's forward in thread i, deepcopy replicas wired by
    execute_replication_callbacks) with every replica on cuda:0: outputs and replica 0's running
    statistics equal one float64 nn.BatchNorm over the whole batch, for 2 steps."""
    pysbn.set_sync_timeout(30)
    tol = TOL[dtype] * (10 if dtype == torch.float32 else 1)
    ref, replicas = _dp_setup(kind, rest, shares, dtype)
    for step in range(2):
        xs, _ = _dp_batch(rest, shares, fmt, dtype)
        ys = results(run_threads([lambda m=m, x=x: m(x) for m, x in zip(replicas, xs)]))
        yr = ref(torch.cat([x.detach().cpu() for x in xs]).double())
        for y, x in zip(ys, xs):
            assert y.device == CUDA and is_format(y, fmt)
        close(torch.cat(ys), yr, tol, f"step {step} output")
        close(replicas[0].running_mean, ref.running_mean, tol, f"step {step} running_mean")
        close(replicas[0].running_var, ref.running_var, tol, f"step {step} running_var")
        assert int(replicas[0].num_batches_tracked) == step + 1


def _dp_backward_check(ref, replicas, xs, dys, ys):
    xr = torch.cat([x.detach().cpu() for x in xs]).requires_grad_()
    yr = ref(xr)
    yr.backward(torch.cat([d.cpu() for d in dys]))
    close(torch.cat(ys), yr, 1e-10, "output")
    close(torch.cat([x.grad for x in xs]), xr.grad, 1e-10, "input grad")
    for name in ("weight", "bias"):
        g = sum(getattr(r, name).grad.cpu() for r in replicas)
        close(g, getattr(ref, name).grad, 1e-10, f"{name} grad (sum over replicas)")
    close(replicas[0].running_mean, ref.running_mean, 1e-10, "running_mean")
    close(replicas[0].running_var, ref.running_var, 1e-10, "running_var")


@pytest.mark.parametrize("kind,rest,fmt,shares,dtype", DP_CASES, ids=DP_IDS)
def test_data_parallel_protocol_one_device_backward_in_caller_threads(kind, rest, fmt, shares,
                                                                      dtype):
    """Forward and backward of replica i in thread i, every replica on cuda:0, with autograd
    multithreading disabled in each thread (torch.autograd.set_multithreading_enabled(False)),
    so that replica i's CUDA backward runs in thread i, concurrently with the others: outputs,
    input gradients, parameter gradients summed over the replicas and running statistics equal
    one float64 nn.BatchNorm over the whole batch (float64 replicas), 2 steps."""
    if not hasattr(torch.autograd, "set_multithreading_enabled"):
        pytest.skip("torch.autograd.set_multithreading_enabled is missing")
    pysbn.set_sync_timeout(30)
    ref, replicas = _dp_setup(kind, rest, shares, torch.float64)

    def backward(y, dy):
        with torch.autograd.set_multithreading_enabled(False):
            y.backward(dy)

    for step in range(2):
        for m in [ref] + replicas:
            m.zero_grad(set_to_none=True)
        xs, dys = _dp_batch(rest, shares, fmt, torch.float64)
        ys = results(run_threads([lambda m=m, x=x: m(x) for m, x in zip(replicas, xs)]))
        results(run_threads([lambda y=y, dy=dy: backward(y, dy) for y, dy in zip(ys, dys)]))
        _dp_backward_check(ref, replicas, xs, dys, ys)


@pytest.mark.xfail(raises=pysbn.SyncAbortedError, strict=False,
                   reason="by default torch's autograd engine runs all CUDA backward work of one "
                          "device on that device's single worker thread: the replicas' backward "
                          "calls are serialised, so the first one waits at the layer for the "
                          "others until the sync timeout (real DataParallel replicas are on "
                          "distinct devices, each with its own worker thread)")
def test_data_parallel_protocol_one_device_backward_default_engine():
    """Replica i's output.backward(grad_i) in thread i, every replica on cuda:0, autograd
    defaults. Expected to fail fast with SyncAbortedError (the sync timeout) rather than hang;
    an XPASS means the backward of replicas sharing a device works with the default engine (it
    must then match nn.BatchNorm, as checked here)."""
    pysbn.set_sync_timeout(5)
    kind, rest, fmt, shares, _ = DP_CASES[1]
    ref, replicas = _dp_setup(kind, rest, shares, torch.float64)
    xs, dys = _dp_batch(rest, shares, fmt, torch.float64)
    ys = results(run_threads([lambda m=m, x=x: m(x) for m, x in zip(replicas, xs)]))
    results(run_threads([lambda y=y, dy=dy: y.backward(dy) for y, dy in zip(ys, dys)]))
    _dp_backward_check(ref, replicas, xs, dys, ys)


def _dp_nets():
    torch.manual_seed(5)
    ref = conv_net(nn.BatchNorm2d).double()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize(m)
    net = pysbn.convert_model(copy.deepcopy(ref)).to("cuda:0")
    return net, ref


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("wrapper", ["DataParallelWithCallback", "patched_nn_DataParallel"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_data_parallel_two_gpus(wrapper, fmt):
    """Real DataParallel over cuda:0 and cuda:1 (float64 net, batch of 7 split 4 + 3) vs the
    same net with nn.BatchNorm2d over the whole batch on the CPU: outputs, input gradients,
    parameter gradients and buffers, 3 SGD steps."""
    pysbn.set_sync_timeout(60)
    net, ref = _dp_nets()
    if wrapper == "DataParallelWithCallback":
        dp = pysbn.DataParallelWithCallback(net, device_ids=[0, 1])
    else:
        dp = nn.DataParallel(net, device_ids=[0, 1])
        pysbn.patch_replication_callback(dp)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        x = to_format(torch.randn(7, 3, 9, 8, dtype=torch.float64) + 1.0, fmt)
        dy = torch.randn(7, 8, 9, 8, dtype=torch.float64)
        opt.zero_grad(set_to_none=True)
        opt_ref.zero_grad(set_to_none=True)
        xg = x.to("cuda:0").requires_grad_()
        y = dp(xg)
        y.backward(dy.to(y.device))
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        yr.backward(dy)
        close(y, yr, 1e-9, f"step {step} output")
        close(xg.grad, xr.grad, 1e-9, f"step {step} input grad")
        ref_params = dict(ref.named_parameters())
        for name, p in net.named_parameters():
            close(p.grad, ref_params[name].grad, 1e-9, f"step {step} grad of {name}")
        opt.step()
        opt_ref.step()
        ref_bufs = dict(ref.named_buffers())
        for name, b in net.named_buffers():
            if b.dtype.is_floating_point:
                close(b, ref_bufs[name], 1e-9, f"step {step} {name}")
            else:
                assert int(b) == int(ref_bufs[name]), name


# ---- process groups: 2 processes on the GPU(s) ---------------------------------------------------

GPU_CASES = ["layers_cuda_w2", "too_few_w2", "ddp_w2"]
GROUP_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def cuda_groups(tmp_path_factory):
    cache = {}

    def get(backend: str) -> dict:
        if backend not in cache:
            cache[backend] = run_group(
                2, GPU_CASES, tmp_path_factory.mktemp(f"{backend}2"), GROUP_TIMEOUT_S,
                env={"PYSBN_TEST_DEVICE": "cuda", "PYSBN_TEST_BACKEND": backend}, log_tail=4000)
        return cache[backend]

    return get


@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_process_group_two_ranks(cuda_groups, backend, case):
    """2 processes, each with its layers on cuda:{rank % device_count} (both on cuda:0 with one
    GPU), checking their share against one float64 nn.BatchNorm over the global batch (see
    tests/_dist_worker.py: layers, the global "more than 1 value" check, DDP)."""
    import torch.distributed as dist

    if not dist.is_available() or not getattr(dist, f"is_{backend}_available")():
        pytest.skip(f"torch.distributed backend {backend} not available")
    g = cuda_groups(backend)
    problems = case_problems(g, case)
    evidence = "".join(r["log"] + json.dumps(r["results"]) for r in g["ranks"].values())
    if problems and backend == "nccl" and torch.cuda.device_count() < 2 and (
            "Duplicate GPU" in evidence or "ncclInvalidUsage" in evidence):
        pytest.skip("NCCL refuses two ranks of one communicator on the same GPU (Duplicate GPU "
                    "detected); the Gloo-over-CUDA variant covers this machine")
    assert not problems, f"{backend}, case {case}:\n" + "\n".join(problems)


# ---- CUDA graphs and host synchronisation -------------------------------------------------------

@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_cuda_graph_capture_of_a_training_step(fmt):
    """Capture forward + backward of a lone SynchronizedBatchNorm2d (training, running stats)
    in a CUDA graph; replaying it on new data equals eager execution: output, input and
    parameter gradients, running statistics and num_batches_tracked (updated in place by every
    replay)."""
    shape = (8, 16, 10, 12)
    bn = pysbn.SynchronizedBatchNorm2d(16, device=CUDA)
    randomize(bn)
    eager = copy.deepcopy(bn)
    static_x = to_format(torch.randn(shape, device=CUDA), fmt).requires_grad_()
    static_dy = to_format(torch.randn(shape, device=CUDA), fmt)

    # warm-up on a side stream (as torch.cuda.graphs requires), then restore the state
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            bn(static_x).backward(static_dy)
    torch.cuda.current_stream().wait_stream(side)
    bn.load_state_dict(eager.state_dict())
    bn.zero_grad(set_to_none=True)
    static_x.grad = None

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = bn(static_x)
        static_y.backward(static_dy)
    torch.cuda.synchronize()
    # capturing records the work without running it
    assert int(bn.num_batches_tracked) == 0
    close(bn.running_mean, eager.running_mean, 0.0, "running_mean after capture")

    for step in range(3):
        x = to_format(torch.randn(shape, device=CUDA) * 2.0 + 0.5, fmt)
        dy = to_format(torch.randn(shape, device=CUDA), fmt)
        with torch.no_grad():
            static_x.copy_(x)
            static_dy.copy_(dy)
        graph.replay()
        eager.zero_grad(set_to_none=True)  # the graph writes fresh gradients each replay
        y, gx = run_step(eager, x, dy)
        torch.cuda.synchronize()
        close(static_y, y, 1e-5, f"replay {step} output")
        close(static_x.grad, gx, 1e-5, f"replay {step} input grad")
        close(bn.weight.grad, eager.weight.grad, 1e-5, f"replay {step} weight grad")
        close(bn.bias.grad, eager.bias.grad, 1e-5, f"replay {step} bias grad")
        close(bn.running_mean, eager.running_mean, 1e-6, f"replay {step} running_mean")
        close(bn.running_var, eager.running_var, 1e-6, f"replay {step} running_var")
        assert int(bn.num_batches_tracked) == int(eager.num_batches_tracked) == step + 1


@pytest.mark.parametrize("case", ["train_f32_nchw", "train_f16_channels_last", "train_bn1d_f64",
                                  "eval_f32"])
def test_no_host_synchronisation(case):
    """One forward + backward of a lone layer under torch.cuda.set_sync_debug_mode("error"):
    any host synchronisation (``.item()``, a device-to-host copy, a stream sync) raises."""
    if case == "train_bn1d_f64":
        layer = pysbn.SynchronizedBatchNorm1d(12, dtype=torch.float64, device=CUDA)
        x = torch.randn(64, 12, dtype=torch.float64, device=CUDA)
    else:
        layer = pysbn.SynchronizedBatchNorm2d(16, device=CUDA)
        dtype = torch.float16 if case == "train_f16_channels_last" else torch.float32
        fmt = "channels_last" if case == "train_f16_channels_last" else "contiguous"
        x = to_format(torch.randn(4, 16, 8, 8, device=CUDA), fmt).to(dtype)
    if case == "eval_f32":
        layer.eval()
    x.requires_grad_()
    dy = torch.randn_like(x)
    layer(x).backward(dy)  # first call outside the check (lazy initialisation)
    layer.zero_grad(set_to_none=True)
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x)
        y.backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(x.grad).all())
    assert layer.weight.grad is not None


# ---- the op set, torch.compile, fused activations on CUDA ----------------------------------------

@pytest.mark.parametrize("name", ["sum_ft", "moments", "merge_moments", "finalize", "normalize",
                                  "batch_norm_forward", "backward_reduce", "backward_elemt",
                                  "batch_norm_backward"])
@pytest.mark.parametrize("dtype,fmt", [(torch.float32, "contiguous"),
                                       (torch.bfloat16, "channels_last")])
def test_opcheck_cuda(name, dtype, fmt):
    """torch.library.opcheck of every op on CUDA tensors (schema, fake kernel, autograd
    registration, AOT dispatch)."""
    x = to_format(torch.randn(4, 3, 5, 6, device=CUDA) * 2 + 1, fmt).to(dtype)
    pdt = param_dtype(dtype)
    w, b = torch.rand(3, device=CUDA, dtype=pdt) + 0.5, torch.randn(3, device=CUDA, dtype=pdt)
    rec = ops.moments(x)
    stats = ops.finalize(rec, 1e-5, 0, None, None, None, 0.1)
    dy = torch.randn_like(x)

    def run():
        return (torch.zeros(3, device=CUDA, dtype=pdt), torch.ones(3, device=CUDA, dtype=pdt),
                torch.zeros((), dtype=torch.int64, device=CUDA))

    args = {
        "sum_ft": (x,), "moments": (x,), "merge_moments": (torch.stack([rec, rec]),),
        "finalize": (rec, 1e-5, 0, *run(), None),
        "normalize": (x, stats, w, b, ops.ACTIVATIONS["silu"], 0.01),
        "batch_norm_forward": (x, w, b, None, 1e-5, 0, ops.ACTIVATIONS["relu"], 0.01, *run(), 0.1),
        "backward_reduce": (dy, x, stats, w, b, ops.ACTIVATIONS["gelu"], 0.01, None),
        "backward_elemt": (dy, x, stats, w, b, torch.randn(6, device=CUDA, dtype=torch.float64),
                           1e-5, 0, 0, 0.01),
        "batch_norm_backward": (dy, x, stats, w, b, 1e-5, 0, ops.ACTIVATIONS["hardswish"], 0.01,
                                [True, True, True]),
    }[name]
    result = torch.library.opcheck(getattr(torch.ops.pysbn, name).default, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_step_cuda(mode):
    """torch.compile(fullgraph=True) of a conv + BN + SiLU-fused block on CUDA, three training
    steps (mode "reduce-overhead": replayed from a CUDA graph) against eager pysbn."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                        pysbn.SynchronizedBatchNormAct2d(8, act_layer=nn.SiLU),
                        nn.Conv2d(8, 8, 3, padding=1, bias=False),
                        pysbn.SynchronizedBatchNorm2d(8, momentum=None)).to(CUDA)
    eager = copy.deepcopy(net)
    run = torch.compile(net, fullgraph=True, mode=None if mode == "default" else mode)
    for step in range(3):
        x = torch.randn(8, 3, 16, 16, device=CUDA)
        dy = torch.randn(8, 8, 16, 16, device=CUDA)
        outs = []
        for model in (run, eager):
            xi = x.clone().requires_grad_()
            y = model(xi)
            y.backward(dy)
            outs.append((y.detach().clone(), xi.grad))
        close(outs[0][0], outs[1][0], 1e-4, f"step {step} output")
        close(outs[0][1], outs[1][1], 1e-4, f"step {step} input grad")
        for (name, p), q in zip(net.named_parameters(), eager.parameters()):
            close(p.grad, q.grad, 1e-3, f"step {step} grad {name}")
        for (name, b), c in zip(net.named_buffers(), eager.buffers()):
            close(b.double(), c.double(), 1e-5, f"step {step} {name}")
        net.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "hard_swish"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_activation_cuda(act, fmt, dtype):
    """SynchronizedBatchNormAct2d on CUDA (activation fused in the kernels) against the same
    layer's CPU path in float64 (composition of batch norm and torch's activation)."""
    torch.manual_seed(1)
    layer = pysbn.SynchronizedBatchNormAct2d(6, act_layer=act, dtype=param_dtype(dtype),
                                             device=CUDA)
    randomize(layer)
    ref = pysbn.SynchronizedBatchNormAct2d(6, act_layer=act, dtype=torch.float64)
    ref.load_state_dict({k: v.double() if v.is_floating_point() else v
                         for k, v in layer.state_dict().items()})
    x = to_format(torch.randn(5, 6, 9, 7, device=CUDA), fmt).to(dtype)
    dy = to_format(torch.randn(5, 6, 9, 7, device=CUDA), fmt).to(dtype)
    xs, xr = x.clone().requires_grad_(), x.double().cpu().requires_grad_()
    ys, yr = layer(xs), ref(xr)
    ys.backward(dy)
    yr.backward(dy.double().cpu())
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    close(ys, yr, tol, f"{act} output")
    close(xs.grad, xr.grad, tol * 10, f"{act} input grad")
    close(layer.weight.grad, ref.weight.grad, tol * 10, f"{act} weight grad")
    close(layer.running_var, ref.running_var, 1e-5, f"{act} running_var")
