# SPDX-License-Identifier: MIT
"""SynchronizedBatchNormAct2d against nn.BatchNorm2d followed by the same activation (what
timm's BatchNormAct2d computes; the comparison with timm's own layer is in
test_model_zoo.py): every activation, fused or not, both memory formats, train and eval, the
four dtypes, DataParallel replicas with uneven shares, torch.compile, and what the layer keeps
for the backward. The 2-process case (uneven shares, every activation) is ``act_w2`` in
test_distributed.py."""

import sys

import pytest
import torch
from torch import nn

import pysbn
from _support import close, make_replicas, randomize, results, run_threads

F64 = torch.float64

# (name, activation module factory, fused by the core)
ACTS = [
    ("relu", lambda: nn.ReLU(), True),
    ("leaky_relu", lambda: nn.LeakyReLU(0.2), True),
    ("silu", lambda: nn.SiLU(), True),
    ("gelu", lambda: nn.GELU(), True),
    ("gelu_tanh", lambda: nn.GELU(approximate="tanh"), True),
    ("hardswish", lambda: nn.Hardswish(), True),
    ("identity", lambda: nn.Identity(), True),
    ("tanh", lambda: nn.Tanh(), False),
    ("mish", lambda: nn.Mish(), False),
]
ACT_IDS = [a[0] for a in ACTS]


def _pair(make_act, c=5, dtype=F64, **kw):
    """(the pysbn layer, nn.BatchNorm2d + act in float64) with the same random state."""
    act = make_act()
    ref = nn.Sequential(nn.BatchNorm2d(c, dtype=F64, **kw), make_act())
    randomize(ref[0])
    layer = pysbn.SynchronizedBatchNormAct2d(c, act_layer=type(act), dtype=dtype, **kw)
    layer.act = act  # the same settings (negative slope, approximation)
    layer.load_state_dict(ref[0].state_dict())
    return layer, ref


def _fmt(x, fmt):
    return x.contiguous(memory_format=torch.channels_last) if fmt == "cl" else x.contiguous()


def _fused(layer):
    from pysbn.batchnorm import _fused_act

    return _fused_act(layer.act) is not None


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
@pytest.mark.parametrize("name,make_act,fused", ACTS, ids=ACT_IDS)
def test_matches_batchnorm_then_activation(name, make_act, fused, fmt):
    """float64, train (two steps) then eval: outputs, input and parameter gradients under a
    random upstream gradient, running statistics; the output keeps the input's layout."""
    torch.manual_seed(0)
    layer, ref = _pair(make_act)
    assert _fused(layer) == fused
    for step in range(2):
        x = _fmt(torch.randn(6, 5, 7, 4, dtype=F64) * 1.5 + 0.3, fmt)
        dy = _fmt(torch.randn(6, 5, 7, 4, dtype=F64), fmt)
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        ys, yr = layer(xs), ref(xr)
        ys.backward(dy)
        yr.backward(dy)
        if fmt == "cl":
            assert ys.is_contiguous(memory_format=torch.channels_last)
            assert xs.grad.is_contiguous(memory_format=torch.channels_last)
        close(ys, yr, 1e-12, f"{name} step {step} output")
        close(xs.grad, xr.grad, 1e-11, f"{name} step {step} input grad")
        close(layer.weight.grad, ref[0].weight.grad, 1e-11, f"{name} weight grad")
        close(layer.bias.grad, ref[0].bias.grad, 1e-11, f"{name} bias grad")
        close(layer.running_mean, ref[0].running_mean, 1e-13, "running_mean")
        close(layer.running_var, ref[0].running_var, 1e-13, "running_var")
        assert int(layer.num_batches_tracked) == int(ref[0].num_batches_tracked)
    layer.eval()
    ref.eval()
    x = _fmt(torch.randn(3, 5, 4, 4, dtype=F64), fmt)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(3, 5, 4, 4, dtype=F64)
    ys, yr = layer(xs), ref(xr)
    ys.backward(dy)
    yr.backward(dy)
    close(ys, yr, 1e-12, f"{name} eval output")
    close(xs.grad, xr.grad, 1e-12, f"{name} eval input grad")


# Tolerances against the float64 reference: a few units of the output type's rounding (the
# kernels accumulate in float), times the size of the values.
DTYPE_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("name,make_act,fused", [a for a in ACTS if a[2]],
                         ids=[a[0] for a in ACTS if a[2]])
def test_fused_dtypes_against_float64(name, make_act, fused, dtype, fmt):
    """The fused kernels in float32, float16 and bfloat16 (float32 parameters for the half
    types, as under autocast) against float64 on the same (rounded) input."""
    torch.manual_seed(1)
    pdt = torch.float32 if dtype != torch.float32 else dtype
    layer, ref = _pair(make_act, c=6, dtype=pdt)
    x = _fmt(torch.randn(8, 6, 9, 5) * 1.5 + 0.5, fmt).to(dtype)
    dy = _fmt(torch.randn(8, 6, 9, 5), fmt).to(dtype)
    xs, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    ys, yr = layer(xs), ref(xr)
    ys.backward(dy)
    yr.backward(dy.double())
    tol = DTYPE_TOL[dtype]
    assert ys.dtype == dtype and xs.grad.dtype == dtype and layer.weight.grad.dtype == pdt
    close(ys, yr, tol, f"{name} output")
    close(xs.grad, xr.grad, tol, f"{name} input grad")
    # parameter gradients are sums over the batch: relative to their size
    close(layer.weight.grad, ref[0].weight.grad, tol * 10, f"{name} weight grad")
    close(layer.bias.grad, ref[0].bias.grad, tol * 10, f"{name} bias grad")
    close(layer.running_var, ref[0].running_var, 1e-5, "running_var")


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
@pytest.mark.parametrize("name,make_act", [("silu", lambda: nn.SiLU()),
                                           ("leaky_relu", lambda: nn.LeakyReLU(0.1)),
                                           ("tanh", lambda: nn.Tanh())],
                         ids=["silu", "leaky_relu", "tanh"])
def test_data_parallel_replicas(name, make_act, fmt):
    """DataParallel replicas (threads, uneven shares 1, 4, 2): outputs, input gradients, the
    parameter gradients summed over the replicas and replica 0's running statistics equal one
    batch norm + activation over the whole batch."""
    pysbn.set_sync_timeout(30)
    try:
        torch.manual_seed(2)
        layer, ref = _pair(make_act, c=4)
        replicas = make_replicas(layer, 3)
        shares = [1, 4, 2]
        x = torch.randn(7, 4, 5, 3, dtype=F64) * 2 - 0.5
        dy = torch.randn_like(x)
        xs = [_fmt(p, fmt).requires_grad_() for p in x.split(shares)]
        ys = results(run_threads([lambda m=m, v=v: m(v) for m, v in zip(replicas, xs)]))
        results(run_threads([lambda y=y, g=g: y.backward(g) for y, g in zip(ys, dy.split(shares))]))
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        yr.backward(dy)
        close(torch.cat(ys), yr, 1e-12, f"{name} output")
        close(torch.cat([v.grad for v in xs]), xr.grad, 1e-11, f"{name} input grad")
        gw = sum(r.weight.grad for r in replicas)
        gb = sum(r.bias.grad for r in replicas)
        close(gw, ref[0].weight.grad, 1e-11, "weight grad (summed)")
        close(gb, ref[0].bias.grad, 1e-11, "bias grad (summed)")
        close(layer.running_mean, ref[0].running_mean, 1e-13, "running_mean")
        close(layer.running_var, ref[0].running_var, 1e-13, "running_var")
    finally:
        pysbn.set_sync_timeout(None)


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves while fn() runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def test_fused_layer_keeps_only_its_input_for_the_backward():
    """Fused: the input, the parameters and 3C+1 float64 statistics; batch norm then activation
    also keeps the pre-activation (one more input-sized tensor). An unfused activation (tanh)
    keeps its own tensor too, as the composition does."""
    c, shape = 16, (8, 16, 32, 32)
    x = torch.randn(shape, requires_grad=True)
    one = x.numel() * x.element_size()
    small = 2 * c * 4 + (3 * c + 1) * 8  # weight, bias (float32) and the statistics
    fused = pysbn.SynchronizedBatchNormAct2d(c, act_layer=nn.SiLU)
    got, _ = _saved_bytes(lambda: fused(x))
    assert got == one + small, (got, one, small)
    plain = nn.Sequential(nn.BatchNorm2d(c), nn.SiLU())
    ref, _ = _saved_bytes(lambda: plain(x))
    assert ref >= 2 * one
    unfused = pysbn.SynchronizedBatchNormAct2d(c, act_layer=nn.Tanh)
    got_u, _ = _saved_bytes(lambda: unfused(x))
    assert got_u >= 2 * one


def test_constructor_as_timm(monkeypatch):
    """timm's BatchNormAct2d arguments: act_layer by name or class, act_kwargs, apply_act,
    inplace, drop_layer (applied between norm and act; not fused, still correct); a clear error
    for an unknown activation name."""
    assert type(pysbn.SynchronizedBatchNormAct2d(4).act) is nn.ReLU  # timm's default
    assert pysbn.SynchronizedBatchNormAct2d(4).act.inplace is True
    assert pysbn.SynchronizedBatchNormAct2d(4, inplace=False).act.inplace is False
    assert type(pysbn.SynchronizedBatchNormAct2d(4, act_layer="silu").act) is nn.SiLU
    assert type(pysbn.SynchronizedBatchNormAct2d(4, apply_act=False).act) is nn.Identity
    assert type(pysbn.SynchronizedBatchNormAct2d(4, act_layer=None).act) is nn.Identity
    leaky = pysbn.SynchronizedBatchNormAct2d(4, act_layer=nn.LeakyReLU,
                                             act_kwargs={"negative_slope": 0.3})
    assert leaky.act.negative_slope == 0.3
    assert list(leaky.state_dict()) == list(nn.BatchNorm2d(4).state_dict())
    with pytest.raises(ValueError, match="act_layer 'no_such_act'"):
        pysbn.SynchronizedBatchNormAct2d(4, act_layer="no_such_act")  # timm's names, or...
    with monkeypatch.context() as m:  # ...pysbn's own table when timm cannot be imported
        m.setitem(sys.modules, "timm", None)
        m.setitem(sys.modules, "timm.layers", None)
        assert type(pysbn.SynchronizedBatchNormAct2d(4, act_layer="hard_swish").act) is nn.Hardswish
        gelu = pysbn.SynchronizedBatchNormAct2d(4, act_layer="gelu_tanh").act
        assert type(gelu) is nn.GELU and gelu.approximate == "tanh"
        with pytest.raises(ValueError, match="act_layer 'no_such_act'"):
            pysbn.SynchronizedBatchNormAct2d(4, act_layer="no_such_act")

    class Drop(nn.Module):  # a deterministic stand-in for a drop layer
        def forward(self, x):
            return x * 0.5

    torch.manual_seed(3)
    layer = pysbn.SynchronizedBatchNormAct2d(3, act_layer=nn.SiLU, drop_layer=Drop, dtype=F64)
    assert type(layer.drop) is Drop  # with a drop layer the activation runs after it, unfused
    ref = nn.BatchNorm2d(3, dtype=F64)
    x = torch.randn(4, 3, 5, 5, dtype=F64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    dy = torch.randn(4, 3, 5, 5, dtype=F64)
    y = layer(x)
    yr = nn.functional.silu(ref(xr) * 0.5)
    y.backward(dy)
    yr.backward(dy)
    close(y, yr, 1e-12, "drop layer output")
    close(x.grad, xr.grad, 1e-11, "drop layer input grad")


def test_fused_layer_under_torch_compile():
    """fullgraph=True, the fused activation in the graph: the same outputs, gradients and
    running statistics as eager."""
    torch.manual_seed(4)
    eager, _ = _pair(lambda: nn.SiLU(), c=4)
    comp, _ = _pair(lambda: nn.SiLU(), c=4)
    comp.load_state_dict(eager.state_dict())
    step = torch.compile(comp, fullgraph=True)
    for _ in range(2):
        x = torch.randn(5, 4, 6, 6, dtype=F64)
        dy = torch.randn_like(x)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), step(xc)
        ye.backward(dy)
        yc.backward(dy)
        close(yc, ye, 1e-13, "compiled output")
        close(xc.grad, xe.grad, 1e-13, "compiled input grad")
        close(comp.weight.grad, eager.weight.grad, 1e-13, "compiled weight grad")
        close(comp.running_var, eager.running_var, 1e-14, "compiled running_var")
        eager.zero_grad(set_to_none=True)
        comp.zero_grad(set_to_none=True)
    assert int(comp.num_batches_tracked) == 2


def test_eval_layer_exports_as_standard_ops():
    """Eval mode is torch's batch norm then the act module: torch.export gives a graph of
    standard ops (no pysbn op), which computes what the layer does."""
    torch.manual_seed(5)
    layer, _ = _pair(lambda: nn.Hardswish(), c=3)
    layer.eval()
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    ep = torch.export.export(layer, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("pysbn" in t for t in targets), targets
    assert any("batch_norm" in t for t in targets) and any("hardswish" in t for t in targets)
    close(ep.module()(x), layer(x), 1e-14, "exported eval output")
