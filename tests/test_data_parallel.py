# SPDX-License-Identifier: MIT
"""The DataParallel path on CPU, with the protocol of the layers issue.

Replica 0 is the module itself, replicas 1..k-1 are ``copy.deepcopy`` of it; the replication
callbacks wire them (``pysbn.execute_replication_callbacks``); replica i's forward runs in thread
i, then replica i's ``output.backward(grad_i)`` runs in thread i, all threads concurrently (as
DataParallel's per-device autograd threads do). Outputs, input gradients, parameter gradients
summed over the replicas, and replica 0's running statistics must equal one nn.BatchNorm
(float64) over the concatenated batch.

Every thread is joined with a timeout, so a regression fails instead of hanging.
"""

import copy

import pytest
import torch
from torch import nn

import pysbn
from _support import close, make_replicas, randomize, results, run_threads

SYNC = {1: pysbn.SynchronizedBatchNorm1d, 2: pysbn.SynchronizedBatchNorm2d,
        3: pysbn.SynchronizedBatchNorm3d}
PLAIN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@pytest.fixture(autouse=True)
def sync_timeout():
    pysbn.set_sync_timeout(30)
    yield
    pysbn.set_sync_timeout(None)


# ---- helpers ------------------------------------------------------------------------------------

def dp_step(replicas, xs, dys):
    """Forward of replica i in thread i, then output_i.backward(dys[i]) in thread i, all
    concurrently. Returns the outputs."""
    ys = results(run_threads([lambda m=m, x=x: m(x) for m, x in zip(replicas, xs)]))
    results(run_threads([lambda y=y, dy=dy: y.backward(dy) for y, dy in zip(ys, dys)]))
    return ys


def to_format(x, fmt):
    if fmt == "contiguous" or x.dim() == 2:
        return x.contiguous()
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def check_layer_step(replicas, ref, shares, rest, fmt, tol=1e-10, dtype=torch.float64):
    """One DP step of single-layer replicas vs `ref` on the whole batch; grads accumulate."""
    n = sum(shares)
    x = torch.randn((n,) + tuple(rest), dtype=torch.float64) * 1.5 + 0.7
    dy = torch.randn_like(x)
    xs = [to_format(p, fmt).to(dtype).requires_grad_() for p in x.split(shares)]
    dys = [to_format(p, fmt).to(dtype) for p in dy.split(shares)]
    ys = dp_step(replicas, xs, dys)
    xr = torch.cat([p.detach() for p in xs]).double().requires_grad_()
    yr = ref(xr)
    yr.backward(torch.cat(dys).double())
    close(torch.cat(ys), yr, tol, "output")
    close(torch.cat([p.grad for p in xs]), xr.grad, tol, "input grad")
    for name in ("weight", "bias"):
        if getattr(ref, name) is not None:
            g = sum(getattr(r, name).grad.double() for r in replicas)
            close(g, getattr(ref, name).grad, tol, f"{name} grad (sum over replicas)")
    m = replicas[0]
    if ref.running_mean is not None:
        close(m.running_mean, ref.running_mean, tol, "running_mean")
        close(m.running_var, ref.running_var, tol, "running_var")
        assert int(m.num_batches_tracked) == int(ref.num_batches_tracked)


# ---- one layer ----------------------------------------------------------------------------------

LAYER_CASES = [
    # kind, per-sample shape (C, *spatial), memory format, shares
    (1, (5,), "contiguous", [3, 5, 2]),
    (1, (5,), "contiguous", [1, 1, 1]),          # one sample per replica, global count 3
    (1, (5,), "contiguous", [1, 1]),
    (1, (4, 6), "contiguous", [2, 3, 1, 4]),
    (1, (4, 6), "channels_last", [3, 1]),
    (2, (4, 5, 3), "contiguous", [2, 3]),
    (2, (4, 5, 3), "channels_last", [1, 4, 2]),
    (2, (4, 1, 1), "contiguous", [1, 1, 1, 1]),  # one value per channel per replica
    (2, (3, 2, 2), "contiguous", [0, 3, 2]),     # a replica with zero samples
    (2, (3, 2, 2), "channels_last", [3, 0]),
    (3, (3, 3, 2, 4), "contiguous", [2, 1, 3]),
    (3, (3, 3, 2, 4), "channels_last", [2, 2]),
]


@pytest.mark.parametrize("kind,rest,fmt,shares", LAYER_CASES,
                         ids=[f"bn{k}d-{'x'.join(map(str, r))}-{f}-{'+'.join(map(str, s))}"
                              for k, r, f, s in LAYER_CASES])
def test_layer_matches_one_batchnorm(kind, rest, fmt, shares):
    c = rest[0]
    ref = PLAIN[kind](c, dtype=torch.float64)
    randomize(ref)
    module = SYNC[kind](c, dtype=torch.float64)
    module.load_state_dict(ref.state_dict())
    replicas = make_replicas(module, len(shares))
    for step in range(3):
        check_layer_step(replicas, ref, shares, rest, fmt)


@pytest.mark.parametrize("opt", [{"momentum": None}, {"affine": False}, {"bias": False},
                                 {"track_running_stats": False}],
                         ids=["momentum_none", "affine_false", "bias_false", "no_running_stats"])
def test_layer_options(opt):
    ref = nn.BatchNorm2d(3, dtype=torch.float64, **opt)
    randomize(ref)
    module = pysbn.SynchronizedBatchNorm2d(3, dtype=torch.float64, **opt)
    module.load_state_dict(ref.state_dict())
    replicas = make_replicas(module, 3)
    for step in range(3):
        check_layer_step(replicas, ref, [2, 1, 3], (3, 2, 3), "contiguous")


def test_layer_float32_large_offset():
    """float32 replicas at offset 1e4, uneven shares: merged statistics as a float64 reference."""
    ref = nn.BatchNorm2d(4, dtype=torch.float64, momentum=1.0)
    module = pysbn.SynchronizedBatchNorm2d(4, momentum=1.0)
    replicas = make_replicas(module, 3)
    shares = [1, 6, 3]
    x = (torch.randn(10, 4, 5, 5, dtype=torch.float64) + 1e4).float()
    xs = [p.clone().requires_grad_() for p in x.split(shares)]
    dy = torch.randn(10, 4, 5, 5)
    ys = dp_step(replicas, xs, list(dy.split(shares)))
    xr = x.double().requires_grad_()
    yr = ref(xr)
    yr.backward(dy.double())
    close(torch.cat(ys), yr, 1e-5, "output")
    close(torch.cat([p.grad for p in xs]), xr.grad, 1e-5, "input grad")
    rel = ((module.running_var.double() - ref.running_var) / ref.running_var).abs().max()
    assert rel <= 1e-5, f"running_var relative error {rel:.3g}"


# ---- several layers -----------------------------------------------------------------------------

def make_net(bn2d):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn2d(4), nn.ReLU(),
                         nn.Conv2d(4, 5, 1), bn2d(5)).double()


@pytest.mark.parametrize("k,fmt", [(2, "contiguous"), (3, "channels_last"), (4, "contiguous")])
def test_sequential_matches_plain_net(k, fmt):
    ref = make_net(nn.BatchNorm2d)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize(m)
    net = make_net(pysbn.SynchronizedBatchNorm2d)
    net.load_state_dict(ref.state_dict())
    replicas = make_replicas(net, k)
    shares = [1 + (i * 2) % 3 for i in range(k)]
    n = sum(shares)
    for step in range(3):
        x = to_format(torch.randn(n, 3, 5, 4, dtype=torch.float64), fmt)
        dy = to_format(torch.randn(n, 5, 5, 4, dtype=torch.float64), fmt)
        xs = [p.clone().requires_grad_() for p in x.split(shares)]
        ys = dp_step(replicas, xs, list(dy.split(shares)))
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        yr.backward(dy)
        close(torch.cat(ys), yr, 1e-10, f"step {step} output")
        close(torch.cat([p.grad for p in xs]), xr.grad, 1e-10, f"step {step} input grad")
        ref_params = dict(ref.named_parameters())
        for name, p in net.named_parameters():
            g = sum(dict(r.named_parameters())[name].grad for r in replicas)
            close(g, ref_params[name].grad, 1e-10, f"step {step} grad of {name}")
        for name, b in ref.named_buffers():
            mine = dict(net.named_buffers())[name]
            if b.dtype == torch.long:
                assert int(mine) == int(b), name
            else:
                close(mine, b, 1e-10, f"step {step} {name}")


class TwiceNet(nn.Module):
    """One synchronized layer called twice per forward, on independent branches."""

    def __init__(self, bn):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = bn

    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn(x * 2.0 + 1.0)


def test_layer_called_twice_per_forward():
    ref = TwiceNet(nn.BatchNorm2d(3)).double()
    randomize(ref.bn)
    net = TwiceNet(pysbn.SynchronizedBatchNorm2d(3)).double()
    net.load_state_dict(ref.state_dict())
    replicas = make_replicas(net, 3)
    shares = [2, 1, 3]
    for step in range(2):
        x = torch.randn(6, 3, 2, 3, dtype=torch.float64)
        dy = torch.randn_like(x)
        xs = [p.clone().requires_grad_() for p in x.split(shares)]
        ys = dp_step(replicas, xs, list(dy.split(shares)))
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        yr.backward(dy)
        close(torch.cat(ys), yr, 1e-10, "output")
        close(torch.cat([p.grad for p in xs]), xr.grad, 1e-10, "input grad")
        for name, p in ref.named_parameters():
            g = sum(dict(r.named_parameters())[name].grad for r in replicas)
            close(g, p.grad, 1e-10, f"grad of {name}")
        close(net.bn.running_var, ref.bn.running_var, 1e-10, "running_var")
        assert int(net.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == 2 * step + 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_replicas(dtype):
    """Half inputs with float32 parameters across replicas vs nn.BatchNorm on the whole half
    batch (loose tolerance: both round to half)."""
    ref = nn.BatchNorm2d(4)
    randomize(ref)
    module = pysbn.SynchronizedBatchNorm2d(4)
    module.load_state_dict(ref.state_dict())
    replicas = make_replicas(module, 2)
    shares = [3, 2]
    x = (torch.randn(5, 4, 3, 3) * 2 + 1).to(dtype)
    dy = torch.randn(5, 4, 3, 3).to(dtype)
    xs = [p.clone().requires_grad_() for p in x.split(shares)]
    ys = dp_step(replicas, xs, list(dy.split(shares)))
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    yr.backward(dy)
    tol = 1e-2 if dtype == torch.float16 else 6e-2
    assert ys[0].dtype == dtype
    close(torch.cat(ys), yr, tol, "output")
    close(torch.cat([p.grad for p in xs]), xr.grad, tol, "input grad")
    close(sum(r.weight.grad for r in replicas), ref.weight.grad, 4 * tol, "weight grad")
    close(module.running_var, ref.running_var, 1e-3, "running_var")


# ---- semantics ----------------------------------------------------------------------------------

def test_only_replica_zero_updates_running_stats():
    module = pysbn.SynchronizedBatchNorm2d(3, dtype=torch.float64)
    randomize(module)
    replicas = make_replicas(module, 3)
    before = [(r.running_mean.clone(), r.running_var.clone()) for r in replicas]
    assert replicas[1].running_mean is not module.running_mean
    xs = [torch.randn(2, 3, 2, 2, dtype=torch.float64) for _ in replicas]
    dp_step(replicas, xs, [torch.randn_like(x) for x in xs])
    assert not torch.equal(module.running_mean, before[0][0])
    assert not torch.equal(module.running_var, before[0][1])
    for i in (1, 2):
        assert torch.equal(replicas[i].running_mean, before[i][0]), i
        assert torch.equal(replicas[i].running_var, before[i][1]), i


def test_eval_mode_never_communicates():
    pysbn.set_sync_timeout(5)
    ref = nn.BatchNorm2d(3, dtype=torch.float64)
    randomize(ref)
    module = pysbn.SynchronizedBatchNorm2d(3, dtype=torch.float64)
    module.load_state_dict(ref.state_dict())
    replicas = make_replicas(module, 3)
    for r in replicas:
        r.eval()
    ref.eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for i in (1, 0, 2):  # each replica alone, the others never called
        xi = x.clone().requires_grad_()
        (y, dx), = results(run_threads([lambda r=replicas[i], xi=xi: (
            r(xi), torch.autograd.grad(r(xi), xi, torch.ones_like(xi))[0])], timeout=20))
        close(y, ref(x), 1e-10, f"replica {i} eval output")
    # eval without running stats: batch statistics, still local
    module2 = pysbn.SynchronizedBatchNorm2d(3, track_running_stats=False, dtype=torch.float64)
    replicas2 = make_replicas(module2, 2)
    replicas2[1].eval()
    y, = results(run_threads([lambda: replicas2[1](x)], timeout=20))
    close(y, nn.BatchNorm2d(3, track_running_stats=False, dtype=torch.float64)(x), 1e-10,
          "eval batch-stat output")


def test_lone_wired_replica_is_local():
    """A group of one replica never waits: it is a plain layer (N=1 still rejected)."""
    ref = nn.BatchNorm1d(4, dtype=torch.float64)
    module = pysbn.SynchronizedBatchNorm1d(4, dtype=torch.float64)
    make_replicas(module, 1)
    check_layer_step([module], ref, [5], (4,), "contiguous")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        results(run_threads([lambda: module(torch.randn(1, 4, dtype=torch.float64))]))


@pytest.mark.parametrize("shares", [[1, 0], [0, 1, 0], [0, 0, 1, 0]])
def test_one_value_per_channel_globally_raises(shares):
    """The count check is global: a single value per channel over all replicas is an error in
    every replica (the ones holding no sample included); nothing is updated."""
    module = pysbn.SynchronizedBatchNorm1d(3, dtype=torch.float64)
    randomize(module)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    replicas = make_replicas(module, len(shares))
    outs = run_threads([lambda r=r, n=n: r(torch.randn(n, 3, dtype=torch.float64))
                        for r, n in zip(replicas, shares)])
    excs = [exc for _, exc in outs]
    assert all(exc is not None for exc in excs), excs
    assert any(isinstance(exc, ValueError) for exc in excs), excs
    for exc in excs:
        assert isinstance(exc, ValueError), f"{type(exc).__name__}: {exc}"
        assert "Expected more than 1 value per channel when training" in str(exc)
    for k in ("running_mean", "running_var"):
        assert torch.equal(module.state_dict()[k], before[k]), k


def test_all_replicas_empty_is_a_zero_size_batch():
    """Global count 0: as nn.BatchNorm on an empty batch (empty outputs, running stats kept,
    num_batches_tracked counted), not an error."""
    ref = nn.BatchNorm2d(3, dtype=torch.float64)
    randomize(ref)
    module = pysbn.SynchronizedBatchNorm2d(3, dtype=torch.float64)
    module.load_state_dict(ref.state_dict())
    replicas = make_replicas(module, 3)
    check_layer_step(replicas, ref, [0, 0, 0], (3, 2, 2), "contiguous")
    assert int(module.num_batches_tracked) == 1
    # and the group still works for a normal step afterwards
    check_layer_step(replicas, ref, [2, 0, 1], (3, 2, 2), "contiguous")


def test_global_count_two_is_legal():
    ref = nn.BatchNorm1d(3, dtype=torch.float64)
    module = pysbn.SynchronizedBatchNorm1d(3, dtype=torch.float64)
    replicas = make_replicas(module, 3)
    check_layer_step(replicas, ref, [1, 0, 1], (3,), "contiguous")


def test_rewiring_each_step():
    """As DataParallel does: new replicas and new callbacks at every step."""
    ref = nn.BatchNorm2d(3, dtype=torch.float64)
    module = pysbn.SynchronizedBatchNorm2d(3, dtype=torch.float64)
    for step in range(3):
        replicas = make_replicas(module, 2 + step)
        shares = [1 + i for i in range(2 + step)]
        for r in replicas + [ref]:
            r.weight.grad = None
            r.bias.grad = None
        check_layer_step(replicas, ref, shares, (3, 2, 2), "contiguous")


def test_replica_failure_releases_the_others():
    """A replica that raises before the layer releases the waiting replicas (no hang)."""
    module = pysbn.SynchronizedBatchNorm2d(3, dtype=torch.float64)
    replicas = make_replicas(module, 2)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    good = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    bad = torch.randn(2, 4, 2, 2, dtype=torch.float64)  # wrong channel count
    outs = run_threads([lambda: replicas[0](good), lambda: replicas[1](bad)], timeout=20)
    assert isinstance(outs[1][1], pysbn.ChannelMismatchError)
    assert isinstance(outs[0][1], pysbn.SyncAbortedError)
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k]), k


# ---- DataParallel classes on CPU ----------------------------------------------------------------

def test_data_parallel_classes_forward_on_cpu():
    net = make_net(pysbn.SynchronizedBatchNorm2d)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    ref = copy.deepcopy(net)
    dp = pysbn.DataParallelWithCallback(net)
    assert dp.device_ids == []
    close(dp(x), ref(x), 1e-12, "DataParallelWithCallback output")
    plain = nn.DataParallel(copy.deepcopy(ref))
    pysbn.patch_replication_callback(plain)
    close(plain(x), ref(x), 1e-12, "patched DataParallel output")
    with pytest.raises(TypeError):
        pysbn.patch_replication_callback(net)


def test_execute_replication_callbacks_contexts():
    seen = []

    class Probe(nn.Module):
        def __data_parallel_replicate__(self, ctx, copy_id):
            assert isinstance(ctx, pysbn.CallbackContext)
            seen.append((id(ctx), copy_id))

    net = nn.Sequential(Probe(), nn.Sequential(Probe()))
    replicas = [net] + [copy.deepcopy(net) for _ in range(2)]
    pysbn.execute_replication_callbacks(replicas)
    assert [c for _, c in seen] == [0, 0, 1, 1, 2, 2]
    ctx_ids = [i for i, _ in seen]
    assert ctx_ids[0] == ctx_ids[2] == ctx_ids[4] and ctx_ids[1] == ctx_ids[3] == ctx_ids[5]
    assert ctx_ids[0] != ctx_ids[1]
    with pytest.raises(ValueError):
        pysbn.execute_replication_callbacks([net, nn.Sequential()])
