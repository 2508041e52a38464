# SPDX-License-Identifier: MIT
"""Never hang, always explain: failures of replicas, bad input, atomicity (issue 5).

DataParallel is reproduced on CPU with the protocol of the layers issue: replica 0 is the module,
replicas 1..k-1 are ``copy.deepcopy`` of it, ``pysbn.execute_replication_callbacks`` wires them,
and replica i's forward (then its backward) runs in thread i. ``pysbn.replicate.parallel_apply``
(what ``DataParallelWithCallback`` runs) runs CPU replicas in plain threads, so it is tested here
as well.

Every thread is joined with a bound and every sync wait is bounded by a short
``set_sync_timeout``: a regression fails a test, it never hangs the run. Latencies ("released at
once") are measured from the moment the failing replica starts to fail.
"""

import copy
import threading
import time

import pytest
import torch
from torch import nn

import pysbn
from pysbn import functional as F
from pysbn.replicate import parallel_apply

JOIN_S = 60.0         # no thread of a test may run longer than this
LONG_TIMEOUT = 20.0   # the sync timeout of tests that expect a release at once...
AT_ONCE_S = 4.0       # ...which must come far sooner (measured: about 1 ms; slack for a loaded CI)
SLACK_S = 5.0         # how late past its timeout a timed-out wait may end on a loaded machine


@pytest.fixture(autouse=True)
def _restore_timeout():
    yield
    pysbn.set_sync_timeout(None)


# ---- helpers ------------------------------------------------------------------------------------

class Outcome:
    """What one thread did: ``value`` or ``error``, and when it ended (``time.monotonic``)."""

    def __init__(self):
        self.value = None
        self.error = None
        self.end = None


def in_threads(fns, join_s=JOIN_S):
    """Runs ``fns[i]()`` in thread i, all at once; returns one :class:`Outcome` per thread. A
    thread still running after ``join_s`` seconds fails the test (a hang)."""
    outs = [Outcome() for _ in fns]

    def body(i, fn):
        try:
            outs[i].value = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outs[i].error = exc
        outs[i].end = time.monotonic()

    threads = [threading.Thread(target=body, args=(i, fn), daemon=True) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + join_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [i for i, t in enumerate(threads) if t.is_alive()]
    assert not hung, f"threads {hung} still running after {join_s} s: a hang"
    return outs


def replicas_of(module, k):
    reps = [module] + [copy.deepcopy(module) for _ in range(k - 1)]
    groups = pysbn.execute_replication_callbacks(reps)
    return reps, groups


class Net(nn.Module):
    """conv -> bn (a named Sync layer) -> relu; per-replica knobs set after copying:
    ``fail`` raises before the layer, ``calls`` is how many times the layer runs."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.bn = pysbn.SynchronizedBatchNorm2d(c)
        self.fail = None
        self.calls = 1
        self.gate = None

    def forward(self, x):
        if self.gate is not None:
            assert self.gate.wait(JOIN_S)
        if self.fail is not None:
            raise self.fail
        y = self.conv(x)
        for _ in range(self.calls):
            y = self.bn(y)
        return torch.relu(y)


class Boom(Exception):
    """A user's exception, raised by a replica outside the Sync layer."""


def gated(fn, gate):
    def run():
        assert gate.wait(JOIN_S)
        return fn()
    return run


# ---- 1. every wait is bounded ---------------------------------------------------------------------

def test_set_sync_timeout_api():
    assert pysbn.get_sync_timeout() == pysbn.sync.DEFAULT_SYNC_TIMEOUT == 300.0
    pysbn.set_sync_timeout(0.25)
    assert pysbn.get_sync_timeout() == 0.25
    pysbn.set_sync_timeout(7)
    assert pysbn.get_sync_timeout() == 7.0
    pysbn.set_sync_timeout(None)
    assert pysbn.get_sync_timeout() == 300.0
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="positive and finite"):
            pysbn.set_sync_timeout(bad)
    for bad in ("5", True, [1]):
        with pytest.raises(TypeError, match="number or None"):
            pysbn.set_sync_timeout(bad)
    assert pysbn.get_sync_timeout() == 300.0


@pytest.mark.parametrize("missing", [2, 0], ids=["slave_missing", "master_missing"])
def test_missing_replica_times_out_naming_layer_and_replica(missing):
    timeout = 0.5
    pysbn.set_sync_timeout(timeout)
    reps, _ = replicas_of(Net(), 3)
    xs = [torch.randn(2, 4, 3, 3) for _ in reps]
    called = [i for i in range(3) if i != missing]
    t0 = time.monotonic()
    outs = in_threads([lambda i=i: reps[i](xs[i]) for i in called])
    for i, out in zip(called, outs):
        assert isinstance(out.error, RuntimeError), f"replica {i}: {out.error!r}"
        assert isinstance(out.error, pysbn.SyncAbortedError)
        msg = str(out.error)
        assert "'bn'" in msg                       # the layer
        assert f"replicas [{missing}] never" in msg  # who never arrived
        assert "timed out after 0.5 s" in msg and "set_sync_timeout" in msg
        took = out.end - t0
        assert timeout * 0.9 <= took < timeout + SLACK_S, took


def test_backward_missing_replica_times_out():
    pysbn.set_sync_timeout(LONG_TIMEOUT)
    reps, groups = replicas_of(Net(), 3)
    xs = [torch.randn(2, 4, 3, 3, requires_grad=True) for _ in reps]
    ys = in_threads([lambda i=i: reps[i](xs[i]) for i in range(3)])
    assert all(o.error is None for o in ys)
    timeout = 0.5
    pysbn.set_sync_timeout(timeout)
    t0 = time.monotonic()
    # replica 2 never runs its backward
    outs = in_threads([lambda i=i: ys[i].value.sum().backward() for i in (0, 1)])
    for out in outs:
        assert isinstance(out.error, pysbn.SyncAbortedError), repr(out.error)
        msg = str(out.error)
        assert "'bn'" in msg and "backward" in msg and "replicas [2] never" in msg
        assert timeout * 0.9 <= out.end - t0 < timeout + SLACK_S


# ---- 2. a failing replica releases the others ---------------------------------------------------

@pytest.mark.parametrize("bad", ["channels", "dtype", "dims"])
def test_failure_inside_layer_releases_at_once(bad):
    pysbn.set_sync_timeout(LONG_TIMEOUT)
    reps, _ = replicas_of(pysbn.SynchronizedBatchNorm2d(4), 3)
    xs = [torch.randn(2, 4, 3, 3) for _ in reps]
    xs[1] = {"channels": torch.randn(2, 5, 3, 3),
             "dtype": torch.ones(2, 4, 3, 3, dtype=torch.int32),
             "dims": torch.randn(2, 4, 3)}[bad]
    want = {"channels": pysbn.ChannelMismatchError, "dtype": TypeError, "dims": ValueError}[bad]
    gate = threading.Event()
    fns = [lambda i=i: reps[i](xs[i]) for i in range(3)]
    fns[1] = gated(fns[1], gate)
    start = {}

    def trigger():
        time.sleep(0.2)  # replicas 0 and 2 are waiting in the layer by now
        start["t"] = time.monotonic()
        gate.set()

    outs = in_threads(fns + [trigger])
    assert isinstance(outs[1].error, want)
    for i in (0, 2):
        err = outs[i].error
        assert isinstance(err, pysbn.SyncAbortedError), repr(err)
        assert "replica 1 failed" in str(err) and want.__name__ in str(err)
        assert isinstance(err.__cause__, want)  # points to the original error
        assert outs[i].end - start["t"] < AT_ONCE_S


def test_failure_elsewhere_under_parallel_apply_releases_at_once():
    pysbn.set_sync_timeout(LONG_TIMEOUT)
    reps, groups = replicas_of(Net(), 3)
    assert len(groups) == 1 and groups[0].name == "bn"
    reps[1].fail = Boom("replica 1 broke before the layer")
    reps[1].gate = gate = threading.Event()
    xs = [torch.randn(2, 4, 3, 3) for _ in reps]
    start = {}

    def trigger():
        time.sleep(0.2)
        start["t"] = time.monotonic()
        gate.set()

    outs = in_threads([lambda: parallel_apply(reps, xs, groups=groups), trigger])
    err = outs[0].error
    assert isinstance(err, Boom), repr(err)  # the original, not the SyncAbortedError
    assert "replica 1 broke before the layer" in str(err) and "replica 1" in str(err)
    assert outs[0].end - start["t"] < AT_ONCE_S


def test_base_exception_in_a_replica_under_parallel_apply_releases_at_once():
    pysbn.set_sync_timeout(LONG_TIMEOUT)
    reps, groups = replicas_of(Net(), 2)
    reps[1].fail = SystemExit("replica 1 exited")
    xs = [torch.randn(2, 4, 3, 3) for _ in reps]
    t0 = time.monotonic()
    outs = in_threads([lambda: parallel_apply(reps, xs, groups=groups)])
    assert isinstance(outs[0].error, SystemExit), repr(outs[0].error)
    assert "replica 1 exited" in str(outs[0].error)
    assert outs[0].end - t0 < AT_ONCE_S


def test_failure_elsewhere_without_parallel_apply_times_out():
    timeout = 0.5
    pysbn.set_sync_timeout(timeout)
    reps, _ = replicas_of(Net(), 3)
    reps[1].fail = Boom("broken")
    xs = [torch.randn(2, 4, 3, 3) for _ in reps]
    t0 = time.monotonic()
    outs = in_threads([lambda i=i: reps[i](xs[i]) for i in range(3)])
    assert isinstance(outs[1].error, Boom)
    for i in (0, 2):
        assert isinstance(outs[i].error, pysbn.SyncAbortedError)
        assert "replicas [1] never" in str(outs[i].error)
        assert outs[i].end - t0 < timeout + SLACK_S


def test_parallel_apply_success_and_lone_layer_after():
    """The failure machinery does not disturb a good step: parallel_apply equals one
    nn.BatchNorm over the whole batch (float64)."""
    pysbn.set_sync_timeout(LONG_TIMEOUT)
    sbn = pysbn.SynchronizedBatchNorm2d(3).double()
    ref = nn.BatchNorm2d(3).double()
    reps, groups = replicas_of(sbn, 3)
    xs = [torch.randn(n, 3, 4, 4, dtype=torch.float64) for n in (2, 0, 5)]
    outs = in_threads([lambda: parallel_apply(reps, xs, groups=groups)])
    assert outs[0].error is None, repr(outs[0].error)
    want = ref(torch.cat(xs))
    torch.testing.assert_close(torch.cat(outs[0].value), want)
    torch.testing.assert_close(sbn.running_mean, ref.running_mean)
    torch.testing.assert_close(sbn.running_var, ref.running_var)


# ---- 3. calls and channels that do not match ----------------------------------------------------

def test_fewer_calls_under_parallel_apply_fail_at_once():
    pysbn.set_sync_timeout(LONG_TIMEOUT)
    reps, groups = replicas_of(Net(), 3)
    for r in (reps[0], reps[2]):
        r.calls = 2
    xs = [torch.randn(2, 4, 3, 3) for _ in reps]
    t0 = time.monotonic()
    outs = in_threads([lambda: parallel_apply(reps, xs, groups=groups)])
    err = outs[0].error
    assert isinstance(err, pysbn.SyncAbortedError), repr(err)
    msg = str(err)
    assert "'bn'" in msg and "same number of times" in msg and "[1] returned" in msg
    assert outs[0].end - t0 < AT_ONCE_S


def test_more_calls_under_parallel_apply_fail_at_once():
    pysbn.set_sync_timeout(LONG_TIMEOUT)
    reps, groups = replicas_of(Net(), 2)
    reps[1].calls = 3
    xs = [torch.randn(2, 4, 3, 3) for _ in reps]
    t0 = time.monotonic()
    outs = in_threads([lambda: parallel_apply(reps, xs, groups=groups)])
    assert isinstance(outs[0].error, pysbn.SyncAbortedError), repr(outs[0].error)
    assert "same number of times" in str(outs[0].error)
    assert outs[0].end - t0 < AT_ONCE_S


def test_call_count_mismatch_without_parallel_apply_times_out():
    timeout = 1.5  # the first call of both replicas must meet within it, even on a loaded CI
    pysbn.set_sync_timeout(timeout)
    reps, _ = replicas_of(Net(), 2)
    reps[0].calls = 2
    xs = [torch.randn(2, 4, 3, 3) for _ in reps]
    t0 = time.monotonic()
    outs = in_threads([lambda i=i: reps[i](xs[i]) for i in range(2)])
    assert outs[1].error is None  # replica 1 made its one call and returned
    err = outs[0].error
    assert isinstance(err, pysbn.SyncAbortedError)
    assert "forward call 2" in str(err) and "replicas [1] never" in str(err)
    assert outs[0].end - t0 < timeout + SLACK_S


def test_channel_count_mismatch_across_replicas():
    pysbn.set_sync_timeout(LONG_TIMEOUT)
    a, b = pysbn.SynchronizedBatchNorm2d(4), pysbn.SynchronizedBatchNorm2d(5)
    pysbn.execute_replication_callbacks([a, b])
    t0 = time.monotonic()
    outs = in_threads([lambda: a(torch.randn(2, 4, 3, 3)), lambda: b(torch.randn(2, 5, 3, 3))])
    assert isinstance(outs[0].error, ValueError)
    assert "disagree on the number of channels" in str(outs[0].error)
    assert "{0: 4, 1: 5}" in str(outs[0].error)
    assert isinstance(outs[1].error, pysbn.SyncAbortedError)
    assert "disagree on the number of channels" in str(outs[1].error)
    assert max(o.end for o in outs) - t0 < AT_ONCE_S
    # the master's running stats are untouched
    assert torch.equal(a.running_mean, torch.zeros(4)) and int(a.num_batches_tracked) == 0


# ---- 4. bad input names the argument ------------------------------------------------------------

def _layer(**kw):
    return pysbn.SynchronizedBatchNorm2d(3, **kw)


def _with(attr, value):
    m = _layer()
    setattr(m, attr, value)
    return m


BAD_INPUTS = [
    # (id, layer factory, input factory, exception, words in the message)
    ("dims", _layer, lambda: torch.randn(2, 3, 4), ValueError, ["expected 4D input", "3D"]),
    ("channels", _layer, lambda: torch.randn(2, 4, 4, 4), pysbn.ChannelMismatchError,
     ["4 channels", "num_features=3"]),
    ("int64", _layer, lambda: torch.ones(2, 3, 4, 4, dtype=torch.int64), TypeError,
     ["input", "torch.int64"]),
    ("bool", _layer, lambda: torch.ones(2, 3, 4, 4, dtype=torch.bool), TypeError,
     ["input", "torch.bool"]),
    ("complex", _layer, lambda: torch.ones(2, 3, 4, 4, dtype=torch.complex64), TypeError,
     ["input", "complex64"]),
    ("not_a_tensor", _layer, lambda: [[1.0]], TypeError, ["input", "list"]),
    ("sparse", _layer, lambda: torch.randn(2, 3, 4, 4).to_sparse(), ValueError,
     ["input", "dense", "sparse"]),
    ("input_f64_weight_f32", _layer, lambda: torch.randn(2, 3, 4, 4, dtype=torch.float64),
     TypeError, ["weight", "float32", "float64"]),
    ("half_weight_f32_input", lambda: _layer().half(), lambda: torch.randn(2, 3, 4, 4), TypeError,
     ["weight", "float16"]),
    ("bias_dtype", lambda: _with("bias", nn.Parameter(torch.zeros(3, dtype=torch.float64))),
     lambda: torch.randn(2, 3, 4, 4), TypeError, ["bias", "float64"]),
    ("running_mean_int", lambda: _with("running_mean", torch.zeros(3, dtype=torch.int64)),
     lambda: torch.randn(2, 3, 4, 4), TypeError, ["running_mean", "int64"]),
    ("running_var_dtype", lambda: _with("running_var", torch.ones(3, dtype=torch.float64)),
     lambda: torch.randn(2, 3, 4, 4), TypeError, ["running_var", "running_mean"]),
    ("weight_shape", lambda: _with("weight", nn.Parameter(torch.ones(2))),
     lambda: torch.randn(2, 3, 4, 4), ValueError, ["weight", "(2,)", "(3,)"]),
    ("input_on_meta", _layer, lambda: torch.randn(2, 3, 4, 4, device="meta"), ValueError,
     ["input", "meta"]),
    ("layer_on_meta", lambda: _layer(device="meta"), lambda: torch.randn(2, 3, 4, 4), ValueError,
     ["weight", "meta", "cpu"]),
    ("running_var_on_meta", lambda: _with("running_var", torch.ones(3, device="meta")),
     lambda: torch.randn(2, 3, 4, 4), ValueError, ["running_var", "meta"]),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_the_argument(case, train):
    _, make_layer, make_input, exc, words = case
    m = make_layer().train(train)
    before = {k: v.clone() for k, v in m.state_dict().items() if v.device.type != "meta"}
    with pytest.raises(exc) as info:
        m(make_input())
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    after = {k: v for k, v in m.state_dict().items() if v.device.type != "meta"}
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


class _FakeCuda(torch.Tensor):
    """A CPU tensor that reports a CUDA device: the checks see a CUDA tensor."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def test_cuda_tensor_on_build_without_cuda(monkeypatch):
    # torch here has no CUDA, so a real CUDA tensor cannot exist: a tensor that reports a CUDA
    # device, and a core that reports no CUDA, exercise the same checks.
    from pysbn import ops

    monkeypatch.setattr(ops, "_RUNNABLE", ("cpu",))
    x = torch.randn(2, 3, 4, 4).as_subclass(_FakeCuda)
    assert x.device.type == "cuda"
    for fn in (F.moments, F.sum_ft):
        with pytest.raises(RuntimeError, match="input x is a CUDA tensor but pysbn was built "
                                               "without CUDA"):
            fn(x)
    with pytest.raises(RuntimeError, match="input is a CUDA tensor but pysbn was built without"):
        pysbn.SynchronizedBatchNorm2d(3)(x)


# ---- NaN and Inf stay in their channel ------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("shape,fmt", [((8, 3, 32, 32), "contiguous"), ((8, 3, 32, 32), "channels_last"),
                                       ((4, 3, 5, 5), "contiguous"), ((64, 3), "contiguous"),
                                       ((2, 3, 4, 3, 5), "channels_last")])
def test_non_finite_values_stay_in_their_channel(bad, shape, fmt):
    kind = len(shape) - 2 if len(shape) > 2 else 1
    sync = {1: pysbn.SynchronizedBatchNorm1d, 2: pysbn.SynchronizedBatchNorm2d,
            3: pysbn.SynchronizedBatchNorm3d}[kind](3)
    plain = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[kind](3).double()
    x64 = torch.randn(shape, dtype=torch.float64)
    x64[(1, 1) + (2,) * (len(shape) - 2)] = bad
    x = x64.float()
    if fmt == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    x.requires_grad_(True)
    xr = x64.clone().requires_grad_(True)
    dy = torch.randn(shape, dtype=torch.float64)
    y = sync(x)
    y.backward(dy.float())
    yr = plain(xr)
    yr.backward(dy)
    ok = [0, 2]
    assert torch.isnan(y[:, 1]).all()                  # the channel is poisoned...
    assert torch.isfinite(y[:, ok]).all()               # ...and nothing else
    torch.testing.assert_close(y[:, ok].double(), yr[:, ok], atol=1e-5, rtol=1e-5)
    assert not torch.isfinite(x.grad[:, 1]).any()
    assert torch.isfinite(x.grad[:, ok]).all()
    torch.testing.assert_close(x.grad[:, ok].double(), xr.grad[:, ok], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(sync.weight.grad[ok]).all() and torch.isfinite(sync.bias.grad[ok]).all()
    torch.testing.assert_close(sync.weight.grad[ok].double(), plain.weight.grad[ok], atol=1e-3,
                               rtol=1e-4)
    assert torch.isfinite(sync.running_mean[ok]).all() and torch.isfinite(sync.running_var[ok]).all()
    assert not torch.isfinite(sync.running_mean[1])


def test_non_finite_values_across_replicas_stay_in_their_channel():
    pysbn.set_sync_timeout(LONG_TIMEOUT)
    reps, groups = replicas_of(pysbn.SynchronizedBatchNorm2d(3), 2)
    xs = [torch.randn(2, 3, 4, 4) for _ in reps]
    xs[1][0, 2, 1, 1] = float("nan")
    outs = in_threads([lambda: parallel_apply(reps, xs, groups=groups)])
    ys = outs[0].value
    for y in ys:  # the NaN of replica 1 reaches channel 2 of every replica, and only that
        assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, :2]).all()


# ---- strided views -------------------------------------------------------------------------------

def _views():
    g = torch.Generator().manual_seed(5)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    return [
        ("transposed_nc", r(3, 6, 5, 4).transpose(0, 1)),
        ("transposed_hw", r(6, 3, 5, 4).transpose(2, 3)),
        ("sliced_channels", r(6, 7, 5, 4)[:, 1:4]),
        ("stepped_channels", r(6, 9, 5, 4)[:, ::3]),
        ("stepped_batch", r(12, 3, 5, 4)[::2]),
        ("stepped_spatial", r(6, 3, 10, 4)[:, :, ::2]),
        ("expanded_batch", r(1, 3, 5, 4).expand(6, 3, 5, 4)),
        ("expanded_spatial", r(6, 3, 1, 4).expand(6, 3, 5, 4)),
        ("channels_last_sliced", r(6, 3, 5, 8).contiguous(memory_format=torch.channels_last)
         [:, :, :, ::2]),
        ("permuted", r(5, 4, 6, 3).permute(2, 3, 0, 1)),
        ("offset", r(7, 3, 5, 4)[1:]),
    ]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,x", _views(), ids=[v[0] for v in _views()])
def test_strided_views_match_batchnorm(name, x, train):
    sync = pysbn.SynchronizedBatchNorm2d(3).double().train(train)
    plain = nn.BatchNorm2d(3).double().train(train)
    with torch.no_grad():
        for m in (sync, plain):
            m.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
            m.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
            m.running_mean.copy_(torch.tensor([0.2, -0.1, 0.0]))
            m.running_var.copy_(torch.tensor([1.5, 0.7, 2.0]))
    xs = x.detach()  # the view itself, strides and all
    xr = x.detach().clone()
    xs.requires_grad_(True)
    xr.requires_grad_(True)
    snapshot = x.detach().clone()
    dy = torch.randn(x.shape, dtype=torch.float64)
    y, yr = sync(xs), plain(xr)
    torch.testing.assert_close(y, yr)
    y.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(xs.grad, xr.grad)
    torch.testing.assert_close(sync.weight.grad, plain.weight.grad)
    torch.testing.assert_close(sync.bias.grad, plain.bias.grad)
    torch.testing.assert_close(sync.running_mean, plain.running_mean)
    torch.testing.assert_close(sync.running_var, plain.running_var)
    assert torch.equal(x, snapshot)  # the input was not written


# ---- zero-size dims --------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0), (0, 3, 0, 0)])
def test_zero_size_dims_as_batchnorm(shape, train):
    sync = pysbn.SynchronizedBatchNorm2d(3).train(train)
    plain = nn.BatchNorm2d(3).train(train)
    x = torch.randn(shape, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = sync(x), plain(xr)
    assert y.shape == yr.shape == shape
    y.sum().backward()
    yr.sum().backward()
    assert x.grad.shape == xr.grad.shape
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(sync.state_dict()[k], v, equal_nan=True)
    torch.testing.assert_close(sync.weight.grad, plain.weight.grad)
    torch.testing.assert_close(sync.bias.grad, plain.bias.grad)


# ---- 5. atomicity --------------------------------------------------------------------------------

def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_same_state(m, before):
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed step"


@pytest.mark.parametrize("momentum", [0.1, None])
def test_master_whose_sync_times_out_keeps_its_state(momentum):
    pysbn.set_sync_timeout(0.3)
    sbn = pysbn.SynchronizedBatchNorm2d(4, momentum=momentum)
    with torch.no_grad():
        sbn.running_mean.uniform_()
    sbn.num_batches_tracked.fill_(3)
    before = _state(sbn)
    reps, _ = replicas_of(sbn, 2)
    outs = in_threads([lambda: reps[0](torch.randn(2, 4, 3, 3))])  # replica 1 never comes
    assert isinstance(outs[0].error, pysbn.SyncAbortedError)
    _assert_same_state(sbn, before)


def test_master_released_by_failing_replica_keeps_its_state():
    pysbn.set_sync_timeout(LONG_TIMEOUT)
    net = Net()
    before = _state(net)
    reps, groups = replicas_of(net, 3)
    reps[2].fail = Boom("late failure")
    reps[2].gate = gate = threading.Event()
    xs = [torch.randn(2, 4, 3, 3) for _ in reps]

    def trigger():
        time.sleep(0.2)
        gate.set()

    outs = in_threads([lambda: parallel_apply(reps, xs, groups=groups), trigger])
    assert isinstance(outs[0].error, Boom)
    _assert_same_state(net, before)


class _Echo(pysbn.sync.Synchronizer):
    """A synchronizer that exchanges with itself alone (the synchronised path, one member)."""

    def __init__(self, fail=False):
        self.fail = fail

    def forward(self, record):
        if self.fail:
            raise RuntimeError("injected failure in the exchange")
        return record.clone()

    def backward(self, sums):
        return sums.clone()


@pytest.mark.parametrize("path,op", [
    ("lone", "batch_norm_forward"),  # the lone layer's one native call
    ("sync", "moments"), ("sync", "exchange"), ("sync", "batch_norm_forward")])
@pytest.mark.parametrize("mode", ["plus", "clamp"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_core_failure_keeps_state(monkeypatch, path, op, mode, momentum):
    """A step that fails anywhere (a native op, the exchange) leaves the running statistics
    and num_batches_tracked as they were; the layer works afterwards."""
    import pysbn.batchnorm as bn_module
    from pysbn import ops

    monkeypatch.setattr(bn_module, "_eps_mode", mode)
    sbn = pysbn.SynchronizedBatchNorm2d(4, momentum=momentum)
    sbn(torch.randn(3, 4, 2, 2))  # some non-trivial state
    before = _state(sbn)
    if path == "sync":
        monkeypatch.setattr(bn_module, "synchronizer_for",
                            lambda layer, x: _Echo(fail=op == "exchange"))
    if op != "exchange":
        real = getattr(ops._core, op)

        def failing(*args):
            raise RuntimeError(f"injected failure in {op}")

        monkeypatch.setattr(ops._core, op, failing)
    with pytest.raises(RuntimeError, match=f"injected failure in (the )?{op}"):
        sbn(torch.randn(3, 4, 2, 2))
    _assert_same_state(sbn, before)
    monkeypatch.undo()
    sbn(torch.randn(3, 4, 2, 2))  # the layer still works
    assert int(sbn.num_batches_tracked) == int(before["num_batches_tracked"]) + 1


def test_strided_running_stats_are_updated_in_place():
    """Running statistics that are strided views (e.g. slices of one buffer) are read and
    updated in place, as nn.BatchNorm does."""
    store_s, store_r = torch.zeros(2, 6), torch.zeros(2, 6)
    sbn, ref = pysbn.SynchronizedBatchNorm2d(3), nn.BatchNorm2d(3)
    for m, store in ((sbn, store_s), (ref, store_r)):
        store[1] = 1.0
        m.running_mean = store[0, ::2]
        m.running_var = store[1, ::2]
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    sbn(x)
    ref(x)
    torch.testing.assert_close(store_s, store_r)
    # the elements between the views are untouched
    assert torch.equal(store_s[0, 1::2], torch.zeros(3)) and torch.equal(store_s[1, 1::2], torch.ones(3))
    sbn.eval()
    ref.eval()
    torch.testing.assert_close(sbn(x), ref(x))


def test_failed_step_in_eval_and_bad_input_keeps_state():
    sbn = pysbn.SynchronizedBatchNorm2d(4)
    sbn(torch.randn(3, 4, 2, 2))
    before = _state(sbn)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sbn(torch.randn(1, 4, 1, 1))
    with pytest.raises(pysbn.ChannelMismatchError):
        sbn(torch.randn(3, 5, 2, 2))
    _assert_same_state(sbn, before)


def test_failure_in_backward_before_the_sync_releases_at_once(monkeypatch):
    """A replica whose backward fails before its sync (here: in backward_reduce) releases the
    replicas waiting in that layer's backward at once."""
    from pysbn.ops import _core

    pysbn.set_sync_timeout(LONG_TIMEOUT)
    reps, _ = replicas_of(pysbn.SynchronizedBatchNorm2d(4), 3)
    xs = [torch.randn(2, 4, 3, 3, requires_grad=True) for _ in reps]
    ys = in_threads([lambda i=i: reps[i](xs[i]) for i in range(3)])
    assert all(o.error is None for o in ys)
    real = _core.backward_reduce

    def flaky(*args):
        if threading.get_ident() == owner.get("t"):
            raise MemoryError("simulated out of memory in backward_reduce")
        return real(*args)

    owner = {}
    monkeypatch.setattr(_core, "backward_reduce", flaky)

    def bwd(i):
        if i == 1:
            owner["t"] = threading.get_ident()
            time.sleep(0.2)  # replicas 0 and 2 are waiting in the backward sync by now
            start["t"] = time.monotonic()
        ys[i].value.backward(torch.randn_like(ys[i].value))

    start = {}
    outs = in_threads([lambda i=i: bwd(i) for i in range(3)])
    assert isinstance(outs[1].error, MemoryError)
    for i in (0, 2):
        err = outs[i].error
        assert isinstance(err, pysbn.SyncAbortedError), repr(err)
        assert "replica 1 failed" in str(err) and "MemoryError" in str(err)
        assert outs[i].end - start["t"] < AT_ONCE_S
