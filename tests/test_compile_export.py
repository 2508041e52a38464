# SPDX-License-Identifier: MIT
"""pysbn inside torch.compile, torch.export, ONNX, jit and FX (one process, CPU).

Training under torch.compile(fullgraph=True) against eager pysbn and against nn.BatchNorm in
float64, with random upstream gradients; no graph break; eval mode and export through torch's
own batch-norm op, so an exported model runs in a process that never imports pysbn. The
2-process compiled steps (fullgraph, compile(DDP), DDP(compile)) are in test_distributed.py.
"""

import io
import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import pysbn
from _support import close, make_replicas, randomize, results, run_threads

SYNC = {1: pysbn.SynchronizedBatchNorm1d, 2: pysbn.SynchronizedBatchNorm2d,
        3: pysbn.SynchronizedBatchNorm3d}
PLAIN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class Net(nn.Module):
    """conv -> BN2d (channels_last capable) -> ReLU -> BN3d over a view -> BN1d head."""

    def __init__(self, bn2d=nn.BatchNorm2d, bn3d=nn.BatchNorm3d, bn1d=nn.BatchNorm1d):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn2 = bn2d(4)
        self.bn3 = bn3d(4, momentum=None)
        self.bn1 = bn1d(4 * 64)

    def forward(self, x):
        y = torch.relu(self.bn2(self.conv(x)))
        y = self.bn3(y.reshape(y.shape[0], 4, 2, 4, 8))
        return self.bn1(torch.relu(y).flatten(1))


def _models():
    torch.manual_seed(11)
    ref = Net()
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize(m)
    sync = pysbn.convert_model(Net())
    sync.load_state_dict(ref.state_dict())
    return sync, ref.double()


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_compiled_training_steps_match_eager_and_float64(fmt):
    """Three training steps of torch.compile(fullgraph=True) (inductor): outputs, input and
    parameter gradients, running statistics and num_batches_tracked (updated once per call)
    equal eager pysbn, and nn.BatchNorm in float64."""
    torch._dynamo.reset()
    compiled, ref = _models()
    eager, _ = _models()
    run = torch.compile(compiled, fullgraph=True)
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        x = torch.randn(6, 3, 8, 8, generator=gen, dtype=torch.float64) * 2 + 1
        dy = torch.randn(6, 4 * 64, generator=gen, dtype=torch.float64)
        xf = x.float()
        if fmt == "channels_last":
            xf = xf.contiguous(memory_format=torch.channels_last)
        xs = [xf.clone().requires_grad_() for _ in range(2)]
        xr = x.clone().requires_grad_()
        outs = []
        for model, xi in ((run, xs[0]), (eager, xs[1])):
            y = model(xi)
            y.backward(dy.float())
            outs.append(y)
        yr = ref(xr)
        yr.backward(dy)
        close(outs[0], outs[1], 1e-5, f"step {step}: compiled vs eager output")
        close(outs[0], yr, 1e-4, f"step {step}: compiled vs float64 output")
        close(xs[0].grad, xs[1].grad, 1e-5, f"step {step}: compiled vs eager input grad")
        close(xs[0].grad, xr.grad, 1e-4, f"step {step}: compiled vs float64 input grad")
        sd_c, sd_r = compiled.state_dict(), ref.state_dict()
        for name, p in ref.named_parameters():
            got = dict(compiled.named_parameters())[name].grad
            close(got, p.grad, 1e-4, f"step {step}: grad {name}")
        for name, b in sd_r.items():
            if b.dtype.is_floating_point:
                close(sd_c[name], b, 1e-5, f"step {step}: {name}")
            else:
                assert int(sd_c[name]) == int(b) == step + 1, name
        for m in (compiled, eager):
            m.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_no_graph_break(train):
    torch._dynamo.reset()
    model, _ = _models()
    model.train(train)
    explain = torch._dynamo.explain(model)(torch.randn(4, 3, 8, 8))
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1


def test_compiled_eval_is_torch_batch_norm():
    torch._dynamo.reset()
    model, ref = _models()
    model.eval()
    ref.eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.compile(model, fullgraph=True)(x.float())
    close(y, ref(x), 1e-5, "compiled eval output")


def test_compiled_data_parallel_replicas_synchronise():
    """DataParallel replicas (threads) that run compiled: the replica synchronizer cannot be
    traced, so the layer's call runs eagerly (a graph break), with the same results as one
    nn.BatchNorm on the whole batch."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), pysbn.SynchronizedBatchNorm2d(4), nn.ReLU()).double()
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).double()
    ref.load_state_dict(net.state_dict())
    reps = make_replicas(net, 2)
    compiled = [torch.compile(r) for r in reps]
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    dy = torch.randn(6, 4, 6, 6, dtype=torch.float64)
    xs, dys = list(x.split([2, 4])), list(dy.split([2, 4]))
    ys = results(run_threads([lambda i=i: compiled[i](xs[i]) for i in range(2)]))
    results(run_threads([lambda i=i: ys[i].backward(dys[i]) for i in range(2)]))
    yr = ref(x)
    yr.backward(dy)
    close(torch.cat(ys), yr, 1e-10, "output")
    close(net[1].running_var, ref[1].running_var, 1e-10, "running_var")
    close(net[0].weight.grad + reps[1][0].weight.grad, ref[0].weight.grad, 1e-9, "conv grad")
    assert int(net[1].num_batches_tracked) == 1


# ---- export -------------------------------------------------------------------------------------

_RUN_ELSEWHERE = r"""
import json, sys, torch
kind, path, x_path = sys.argv[1:4]
x = torch.load(x_path)
if kind == "export":
    y = torch.export.load(path).module()(x)
else:
    y = torch.jit.load(path)(x)
assert "pysbn" not in sys.modules, "pysbn was imported"
torch.save(y, x_path + ".out")
print(json.dumps({"ok": True}))
"""


def _run_elsewhere(kind, path, x, tmp_path):
    """Loads and runs a saved model in a fresh process that never imports pysbn."""
    x_path = tmp_path / "x.pt"
    torch.save(x, x_path)
    proc = subprocess.run([sys.executable, "-c", _RUN_ELSEWHERE, kind, str(path), str(x_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"]
    return torch.load(str(x_path) + ".out")


def _eval_model():
    model, ref = _models()
    return model.eval(), ref.float().eval()


def test_export_of_an_eval_model_runs_without_pysbn(tmp_path):
    model, ref = _eval_model()
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("pysbn" in t for t in targets), targets
    assert any("batch_norm" in t for t in targets), targets
    path = tmp_path / "model.pt2"
    torch.export.save(ep, path)
    close(_run_elsewhere("export", path, x, tmp_path), ref(x), 1e-5, "exported output")


def test_jit_trace_of_an_eval_model_saves_and_runs_without_pysbn(tmp_path):
    model, ref = _eval_model()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # nothing data-dependent
        traced = torch.jit.trace(model, x)
    path = tmp_path / "model.jit"
    torch.jit.save(traced, str(path))
    close(_run_elsewhere("jit", path, x, tmp_path), ref(x), 1e-5, "traced output")


def test_jit_script_is_a_clear_error_naming_revert_model():
    model, _ = _eval_model()
    with pytest.raises(RuntimeError, match="revert_model"):
        torch.jit.script(model)
    torch.jit.script(pysbn.revert_model(model))  # the documented way works


def test_onnx_export_sees_a_standard_batch_norm(tmp_path):
    """torch.onnx.export (dynamo): a BatchNormalization node; with ONNX's optimizer, folded into
    the convolution; the reference evaluator reproduces torch's eval output either way."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), pysbn.SynchronizedBatchNorm2d(4), nn.ReLU())
    randomize(model[1])
    model.eval()
    ref = pysbn.revert_model(nn.Sequential(*[m for m in model]))
    x = torch.randn(2, 3, 8, 8)
    for optimize, want in ((False, "BatchNormalization"), (True, None)):
        path = tmp_path / f"m{int(optimize)}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=optimize)
        proto = onnx.load(str(path))
        ops = [n.op_type for n in proto.graph.node]
        if want:
            assert want in ops, ops
        else:
            assert "BatchNormalization" not in ops and "Conv" in ops, ops
        out = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})[0]
        close(torch.from_numpy(out), ref(x), 1e-5, f"onnx output (optimize={optimize})")


def test_fx_symbolic_trace_keeps_the_synchronized_layer():
    """torch.fx tracing (torchvision / timm feature extraction): the layer is one call_module
    node, so the traced module runs the synchronized layer itself (here: its running stats and
    counter move in training)."""
    model, _ = _models()
    gm = torch.fx.symbolic_trace(model)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"bn2", "bn3", "bn1"} <= called, called
    x = torch.randn(4, 3, 8, 8)
    close(gm(x), model(x), 0.0, "traced vs module output")
    assert int(model.bn2.num_batches_tracked) == 2


def test_export_sees_the_registered_ops_in_training():
    """A training-mode export holds pysbn's ops (they are registered with torch, with fake
    kernels), not a graph break or a data pointer read."""
    model, _ = _models()
    ep = torch.export.export(model.train(), (torch.randn(4, 3, 8, 8),))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("pysbn.batch_norm_forward" in t for t in targets) == 3, targets
