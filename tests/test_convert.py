# SPDX-License-Identifier: MIT
"""Model conversion (convert_model, revert_model, patch_sync_batchnorm), the eps modes, copies
(deepcopy, pickle, torch.save) of whole and wired modules, and the DataParallel wrappers on CPU.
"""

import copy
import io
import pickle
import threading

import pytest
import torch
from torch import nn

import pysbn
from _support import close, randomize

SYNC = {nn.BatchNorm1d: pysbn.SynchronizedBatchNorm1d, nn.BatchNorm2d: pysbn.SynchronizedBatchNorm2d,
        nn.BatchNorm3d: pysbn.SynchronizedBatchNorm3d}


@pytest.fixture(autouse=True)
def restore_modes():
    yield
    pysbn.set_sbn_eps_mode("plus")
    pysbn.set_sync_timeout(None)


# ---- helpers ------------------------------------------------------------------------------------

def randomize_model(model):
    """Random parameters and running statistics for every batch norm of ``model``."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize(m)
            if m.running_mean is not None:
                m.num_batches_tracked.fill_(3)


class Net(nn.Module):
    """BatchNorm 1d/2d/3d at several depths, with various options."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4, momentum=None, eps=1e-3))
        self.heads = nn.ModuleList([nn.BatchNorm1d(4, affine=False),
                                    nn.BatchNorm1d(4, bias=False)])
        self.deep = nn.ModuleDict({"v": nn.Sequential(nn.BatchNorm3d(4,
                                                                     track_running_stats=False))})

    def forward(self, x):
        x = self.block(self.bn(self.conv(x)))
        v = self.deep["v"](x.unsqueeze(2).expand(-1, -1, 2, -1, -1).contiguous())
        h = x.mean((2, 3))
        h = self.heads[1](self.heads[0](h))
        return v.sum((2, 3, 4)) + h


def bn_layers(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def make_net(dtype=torch.float64):
    net = Net().to(dtype)
    randomize_model(net)
    net.block[1].weight.requires_grad_(False)
    net.heads[1].eval()
    return net


def fresh_input(dtype=torch.float64):
    return torch.randn(4, 3, 5, 5, dtype=dtype)


# ---- convert_model ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_convert_model_keeps_everything(dtype):
    net = make_net(dtype)
    reference = copy.deepcopy(net)
    before = {n: (type(m), m.weight, m.bias, m.running_mean, m.running_var,
                  m.num_batches_tracked, m.training, m.eps, m.momentum, m.affine,
                  m.track_running_stats,
                  None if m.weight is None else m.weight.requires_grad)
              for n, m in bn_layers(net)}
    params = list(net.parameters())
    out = pysbn.convert_model(net)
    assert out is net
    assert list(out.parameters()) == params  # the same objects, the same order
    after = dict(bn_layers(out))
    assert set(after) == set(before) and len(after) == 5
    for name, (cls, w, b, rm, rv, nbt, training, eps, mom, affine, track, rg) in before.items():
        m = after[name]
        assert type(m) is SYNC[cls], name
        assert m.weight is w and m.bias is b, name
        assert m.running_mean is rm and m.running_var is rv and m.num_batches_tracked is nbt, name
        assert m.training == training, name
        assert (m.eps, m.momentum, m.affine, m.track_running_stats) == (eps, mom, affine, track)
        if w is not None:
            assert m.weight.requires_grad == rg and m.weight.dtype == dtype, name
            assert m.weight.device.type == "cpu"
    assert not after["block.1"].weight.requires_grad
    assert not after["heads.1"].training
    # the converted model computes what the original did (training mode, grads included)
    x = fresh_input(dtype)
    # float32: both sides round (conv.bias's grad is a sum that cancels to ~0)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, yr = out(xs), reference(xr)
    close(y, yr, tol, "converted output")
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    close(xs.grad, xr.grad, tol, "converted input grad")
    ref_params = dict(reference.named_parameters())
    for name, p in out.named_parameters():
        if p.requires_grad:
            close(p.grad, ref_params[name].grad, tol, f"grad of {name}")
    for name, b in reference.named_buffers():
        mine = dict(out.named_buffers())[name]
        close(mine, b, tol, name)
    # an optimizer built on the original parameters still drives the converted model
    opt = torch.optim.SGD(params, lr=0.1)
    w0 = after["bn"].weight.detach().clone()
    opt.step()
    assert not torch.equal(after["bn"].weight, w0)


def test_convert_single_layer_and_idempotent():
    for cls, sync in SYNC.items():
        bn = cls(3, momentum=0.2).double()
        randomize_model(bn)
        bn.eval()
        out = pysbn.convert_model(bn)
        assert type(out) is sync and out is not bn
        assert out.weight is bn.weight and out.running_var is bn.running_var
        assert not out.training
        assert pysbn.convert_model(out) is out
    net = nn.Sequential(pysbn.SynchronizedBatchNorm2d(3))
    layer = net[0]
    assert pysbn.convert_model(net)[0] is layer


def test_convert_data_parallel():
    net = make_net()
    dp = nn.DataParallel(net)
    out = pysbn.convert_model(dp)
    assert isinstance(out, pysbn.DataParallelWithCallback)
    assert out.device_ids == dp.device_ids
    assert out.module is net
    assert type(net.bn) is pysbn.SynchronizedBatchNorm2d
    x = fresh_input()
    ref = copy.deepcopy(net)
    close(out(x), ref(x), 1e-12, "DataParallelWithCallback output")
    # already converted: kept
    assert pysbn.convert_model(out) is out
    back = pysbn.revert_model(out)
    assert type(back) is nn.DataParallel
    assert back.device_ids == out.device_ids
    assert type(back.module.bn) is nn.BatchNorm2d


def test_revert_model():
    net = make_net()
    reference = copy.deepcopy(net)
    synced = pysbn.convert_model(copy.deepcopy(net))
    layers = dict(bn_layers(synced))
    plain = pysbn.revert_model(synced)
    back = dict(bn_layers(plain))
    orig = dict(bn_layers(net))
    for name, m in back.items():
        assert type(m) is type(orig[name]), name
        assert m.weight is layers[name].weight and m.running_mean is layers[name].running_mean
        assert m.training == orig[name].training
        assert (m.eps, m.momentum, m.affine, m.track_running_stats) == (
            orig[name].eps, orig[name].momentum, orig[name].affine,
            orig[name].track_running_stats)
    for mode in ("train", "eval"):
        plain.train(mode == "train")
        reference.train(mode == "train")
        x = fresh_input()
        close(plain(x), reference(x), 1e-10, f"reverted {mode} output")
    assert plain.state_dict().keys() == net.state_dict().keys()
    # a single layer
    s = pysbn.SynchronizedBatchNorm3d(2)
    assert type(pysbn.revert_model(s)) is nn.BatchNorm3d


def test_patch_sync_batchnorm():
    originals = nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d
    with pysbn.patch_sync_batchnorm():
        net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm1d(2),
                            nn.BatchNorm3d(2))
        assert nn.BatchNorm2d is pysbn.SynchronizedBatchNorm2d
    assert (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) == originals
    assert [type(m) for m in net[1:]] == [pysbn.SynchronizedBatchNorm2d,
                                          pysbn.SynchronizedBatchNorm1d,
                                          pysbn.SynchronizedBatchNorm3d]
    assert type(nn.BatchNorm2d(3)) is nn.BatchNorm2d
    with pytest.raises(KeyError):
        with pysbn.patch_sync_batchnorm():
            assert type(nn.BatchNorm1d(3)) is pysbn.SynchronizedBatchNorm1d
            raise KeyError("boom")
    assert (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) == originals
    assert type(torch.nn.modules.batchnorm.BatchNorm2d(3)) is nn.BatchNorm2d


# ---- eps modes ----------------------------------------------------------------------------------

def test_eps_mode_clamp_matches_formula():
    assert pysbn.get_sbn_eps_mode() == "plus"
    eps = 1e-5
    x = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    x[:, 0] = 1.0 + 1e-4 * x[:, 0]   # variance ~1e-8 < eps: clamped
    x[:, 1] = 2.0 + 3e-3 * x[:, 1]   # variance ~1e-5 ~ eps: where plus and clamp differ most
    w = torch.rand(3, dtype=torch.float64) + 0.5
    b = torch.rand(3, dtype=torch.float64) - 0.5

    def formula(x, w, b, var, mean):
        v = var.view(1, -1, 1, 1)
        return (x - mean.view(1, -1, 1, 1)) / torch.sqrt(torch.clamp(v, min=eps)) \
            * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)

    for mode in ("plus", "clamp"):
        pysbn.set_sbn_eps_mode(mode)
        assert pysbn.get_sbn_eps_mode() == mode
        sbn = pysbn.SynchronizedBatchNorm2d(3, eps=eps, momentum=1.0, dtype=torch.float64)
        with torch.no_grad():
            sbn.weight.copy_(w)
            sbn.bias.copy_(b)
        xs = x.clone().requires_grad_()
        y = sbn(xs)
        dy = torch.randn_like(y)
        y.backward(dy)
        # float64 reference through autograd
        xr = x.clone().requires_grad_()
        wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
        var, mean = torch.var_mean(xr, (0, 2, 3), correction=0)
        if mode == "clamp":
            yr = formula(xr, wr, br, var, mean)
        else:
            yr = nn.functional.batch_norm(xr, None, None, wr, br, True, 0.0, eps)
        yr.backward(dy)
        close(y, yr, 1e-9, f"{mode} output")
        close(xs.grad, xr.grad, 1e-9, f"{mode} input grad")
        close(sbn.weight.grad, wr.grad, 1e-9, f"{mode} weight grad")
        close(sbn.bias.grad, br.grad, 1e-9, f"{mode} bias grad")
        # eval: the running variance (unbiased, momentum 1) through the same eps rule
        sbn.eval()
        rv = x.var((0, 2, 3), correction=1)
        close(sbn.running_var, rv, 1e-12, "running_var")
        x2 = torch.randn(2, 3, 3, 3, dtype=torch.float64)
        if mode == "clamp":
            want = formula(x2, w, b, rv, sbn.running_mean)
        else:
            want = nn.functional.batch_norm(x2, sbn.running_mean, sbn.running_var, w, b, False,
                                            0.0, eps)
        close(sbn(x2), want, 1e-10, f"{mode} eval output")
    pysbn.set_sbn_eps_mode("clamp")
    plus = (x[:, 1] - x[:, 1].mean()) / torch.sqrt(x[:, 1].var(correction=0) + eps)
    sbn = pysbn.SynchronizedBatchNorm2d(3, affine=False, dtype=torch.float64)
    assert (sbn(x)[:, 1] - plus).abs().max() > 1e-2  # clamp differs from plus there


def test_eps_mode_clamp_gradcheck():
    pysbn.set_sbn_eps_mode("clamp")
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    x[:, 0] = 0.5 + 1e-4 * x[:, 0]
    sbn = pysbn.SynchronizedBatchNorm1d(2, dtype=torch.float64)
    assert torch.autograd.gradcheck(sbn, (x.requires_grad_(),), eps=1e-7, atol=1e-5)


def test_eps_mode_bad_value():
    with pytest.raises(ValueError, match="plus"):
        pysbn.set_sbn_eps_mode("max")
    with pytest.raises(ValueError):
        pysbn.set_sbn_eps_mode(None)
    assert pysbn.get_sbn_eps_mode() == "plus"


# ---- copies -------------------------------------------------------------------------------------

def _save_load(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIERS = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": _save_load,
}


def run_alone(fn, timeout=30.0):
    """fn() in a thread joined with a timeout: a copy that still waits for replicas fails."""
    out = {}

    def worker():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            out["error"] = exc

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the copy waited for other replicas"
    if "error" in out:
        raise out["error"]
    return out["value"]


def train_steps(model, xs):
    """Training steps with random upstream gradients; returns outputs and input grads."""
    outs = []
    for x, dy in xs:
        x = x.clone().requires_grad_()
        y = model(x)
        y.backward(dy)
        outs.append((y.detach(), x.grad))
    return outs


@pytest.mark.parametrize("how", list(COPIERS))
def test_copy_whole_module(how):
    net = pysbn.convert_model(make_net())
    net(fresh_input())  # some state
    twin = COPIERS[how](net)
    assert type(twin.bn) is pysbn.SynchronizedBatchNorm2d
    assert twin.bn.weight is not net.bn.weight
    for (k, v), (k2, v2) in zip(net.state_dict().items(), twin.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert not twin.heads[1].training
    data = [(fresh_input(), torch.randn(4, 4, dtype=torch.float64)) for _ in range(2)]
    a = train_steps(net, data)
    b = train_steps(twin, data)
    for (ya, ga), (yb, gb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(ga, gb)
    for (k, v), v2 in zip(net.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(v, v2), k


@pytest.mark.parametrize("how", list(COPIERS))
def test_copy_of_wired_replica_is_unwired(how):
    pysbn.set_sync_timeout(5)
    module = pysbn.SynchronizedBatchNorm2d(3, dtype=torch.float64)
    randomize_model(module)
    replicas = [module, copy.deepcopy(module)]
    pysbn.execute_replication_callbacks(replicas)
    for r in replicas:
        twin = COPIERS[how](r)
        assert type(twin) is pysbn.SynchronizedBatchNorm2d
        ref = nn.BatchNorm2d(3, dtype=torch.float64)
        ref.load_state_dict(twin.state_dict())
        data = [(torch.randn(3, 3, 2, 2, dtype=torch.float64),
                 torch.randn(3, 3, 2, 2, dtype=torch.float64)) for _ in range(2)]
        a = run_alone(lambda: train_steps(twin, data))
        b = train_steps(ref, data)
        for (ya, ga), (yb, gb) in zip(a, b):
            close(ya, yb, 1e-10, f"{how} copy output")
            close(ga, gb, 1e-10, f"{how} copy input grad")
        close(twin.running_var, ref.running_var, 1e-10, "running_var")
        close(twin.weight.grad, ref.weight.grad, 1e-10, "weight grad")
    # a Sequential holding wired replicas copies the same way
    net = nn.Sequential(nn.Conv2d(3, 3, 1), pysbn.SynchronizedBatchNorm2d(3)).double()
    nets = [net, copy.deepcopy(net)]
    pysbn.execute_replication_callbacks(nets)
    twin = COPIERS[how](nets[1])
    run_alone(lambda: twin(torch.randn(2, 3, 2, 2, dtype=torch.float64)))
    # the originals are still wired together
    outs = []
    threads = [threading.Thread(target=lambda m=m: outs.append(
        m(torch.randn(2, 3, 2, 2, dtype=torch.float64))), daemon=True) for m in nets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(outs) == 2


# ---- DataParallel wrappers on CPU ---------------------------------------------------------------

def test_patch_replication_callback_and_wrapper_on_cpu():
    net = pysbn.convert_model(make_net())
    ref = copy.deepcopy(net)
    dp = nn.DataParallel(net)
    pysbn.patch_replication_callback(dp)
    x = fresh_input()
    close(dp(x), ref(x), 1e-12, "patched DataParallel")
    wrapped = pysbn.DataParallelWithCallback(copy.deepcopy(ref))
    close(wrapped(x), ref(x), 1e-12, "DataParallelWithCallback")
    # the wrapper survives copies too
    twin = COPIERS["torch.save"](wrapped)
    assert isinstance(twin, pysbn.DataParallelWithCallback)
    close(twin(x), ref(x), 1e-12, "DataParallelWithCallback copy")
    twin = copy.deepcopy(wrapped)
    close(twin(x), ref(x), 1e-12, "DataParallelWithCallback deepcopy")


@pytest.mark.parametrize("how", sorted(COPIERS))
def test_patched_data_parallel_survives_copies(how):
    net = pysbn.convert_model(make_net())
    ref = copy.deepcopy(net)
    dp = nn.DataParallel(net)
    pysbn.patch_replication_callback(dp)
    twin = COPIERS[how](dp)
    assert type(twin) is nn.DataParallel
    # the copy's patch drives the copy, not the original
    assert twin.replicate.data_parallel is twin
    assert twin.parallel_apply.data_parallel is twin
    x = fresh_input()
    close(twin(x), ref(x), 1e-12, f"patched DataParallel after {how}")
