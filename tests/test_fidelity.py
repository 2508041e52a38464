# SPDX-License-Identifier: MIT
"""Behaviours a PyTorch user expects from nn.BatchNorm, checked against torch itself (float64,
random upstream gradients): edge-case inputs, torch.func, activation checkpointing,
isinstance, and faithful conversion (subclasses, lazy layers, nn.SyncBatchNorm)."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import pysbn
from _support import close, randomize

F64 = torch.float64


def _pair(kind, c, **kw):
    plain = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[kind](c, dtype=F64, **kw)
    randomize(plain)
    sync = pysbn.convert_model(pysbn.revert_model(plain.__class__(c, dtype=F64, **kw)))
    sync.load_state_dict(plain.state_dict())
    return sync, plain


# ---- inputs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["plus", "clamp"])
def test_eps_zero_in_training_raises_as_torch(mode):
    sync, plain = _pair(2, 3, eps=0.0)
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        plain(x)
    pysbn.set_sbn_eps_mode(mode)
    try:
        with pytest.raises(ValueError, match="eps must be positive during training, but got 0.0"):
            sync(x)
        assert int(sync.num_batches_tracked) == 0
        sync.eval()
        plain.eval()
        if mode == "plus":
            close(sync(x), plain(x), 1e-12, "eval output with eps 0")
    finally:
        pysbn.set_sbn_eps_mode("plus")


def test_eval_nan_input_gives_torch_gradients():
    """Eval mode is torch's own op: a NaN in one element leaves the other elements' input
    gradients finite, as nn.BatchNorm does."""
    sync, plain = _pair(2, 3)
    sync.eval()
    plain.eval()
    x = torch.randn(4, 3, 5, 5, dtype=F64)
    x[1, 2, 3, 4] = float("nan")
    dy = torch.randn_like(x)
    xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    sync(xs).backward(dy)
    plain(xp).backward(dy)
    assert torch.equal(torch.isfinite(xs.grad), torch.isfinite(xp.grad))
    close(xs.grad.nan_to_num(), xp.grad.nan_to_num(), 1e-12, "input grad")


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")],
                         ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("kind,shape,fmt", [
    (2, (8, 3, 4, 4), "contiguous"), (2, (8, 3, 4, 4), "channels_last"), (1, (16, 3), "contiguous"),
    (2, (4, 3, 70, 70), "contiguous"), (2, (4, 3, 70, 70), "channels_last")])
def test_non_finite_input_running_stats_as_torch(bad, kind, shape, fmt):
    """One non-finite value in channel 0: the running mean becomes +-inf (or NaN) as
    nn.BatchNorm's does, the other channels are untouched by it."""
    torch.manual_seed(0)
    sync, plain = _pair(kind, 3)
    x = torch.randn(shape, dtype=F64)
    x[(3, 0) + (1,) * (len(shape) - 2)] = bad
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ys, yp = sync(x), plain(x)
    for name in ("running_mean", "running_var"):
        a, e = getattr(sync, name), getattr(plain, name)
        assert torch.equal(a[:1].isnan(), e[:1].isnan()) and (
            a[:1].isnan().all() or torch.equal(a[:1], e[:1])), (name, a, e)
        close(a[1:], e[1:], 1e-12, name)
    assert torch.equal(ys.isnan(), yp.isnan())
    close(ys.nan_to_num(), yp.nan_to_num(), 1e-10, "output")


def test_bn1d_channel_innermost_view_gives_contiguous_output():
    """A (N, C, L) view whose channel dim is innermost (a transposed (N, L, C) tensor): the
    output is contiguous as nn.BatchNorm1d's, so y.view(N, -1) works."""
    sync, plain = _pair(1, 5)
    base = torch.randn(6, 7, 5, dtype=F64)
    x = base.transpose(1, 2)
    xs, xp = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ys, yp = sync(xs), plain(xp)
    assert ys.is_contiguous() and yp.is_contiguous()
    close(ys.view(6, -1), yp.view(6, -1), 1e-12, "output")
    dy = torch.randn_like(yp)
    ys.backward(dy)
    yp.backward(dy)
    close(xs.grad, xp.grad, 1e-12, "input grad")


# ---- torch.func ---------------------------------------------------------------------------------

def test_torch_func_grad_matches_batchnorm():
    """torch.func.grad over functional_call: gradients of the parameters and the input equal
    those of nn.BatchNorm (without running stats, which torch.func requires for nn.BatchNorm;
    pysbn's layer also works with them and updates them as a side effect)."""
    from torch.func import functional_call, grad

    torch.manual_seed(1)
    for track in (False, True):
        sync, _ = _pair(2, 3, track_running_stats=track)
        plain = nn.BatchNorm2d(3, track_running_stats=False, dtype=F64)
        with torch.no_grad():
            plain.weight.copy_(sync.weight)
            plain.bias.copy_(sync.bias)
        x = torch.randn(4, 3, 3, 3, dtype=F64)
        g = torch.randn_like(x)

        def loss(module, params, x):
            return (functional_call(module, params, (x,)) * g).sum()

        p_s = {k: v.detach() for k, v in sync.named_parameters()}
        p_p = {k: v.detach() for k, v in plain.named_parameters()}
        gs = grad(loss, argnums=(1, 2))(sync, p_s, x)
        gp = grad(loss, argnums=(1, 2))(plain, p_p, x)
        for k in p_p:
            close(gs[0][k], gp[0][k], 1e-12, f"grad {k} (track={track})")
        close(gs[1], gp[1], 1e-12, f"grad x (track={track})")


def test_torch_func_vmap():
    """vmap over independent batch norms (track_running_stats=False) equals a loop; with
    running statistics it raises torch's error; eval mode is torch's op."""
    from torch.func import vmap

    torch.manual_seed(2)
    sync, plain = _pair(1, 4, track_running_stats=False)
    xs = torch.randn(5, 8, 4, dtype=F64)
    ys = vmap(sync)(xs)
    for i in range(5):
        close(ys[i], plain(xs[i]), 1e-12, f"vmap entry {i}")
    ws = torch.rand(5, 4, dtype=F64) + 0.5
    out = vmap(lambda x, w: torch.nn.functional.relu(
        torch.func.functional_call(sync, {"weight": w, "bias": sync.bias}, (x,))))(xs, ws)
    for i in range(5):
        ref = torch.nn.functional.batch_norm(xs[i], None, None, ws[i], plain.bias, True, 0.0,
                                             1e-5).relu()
        close(out[i], ref, 1e-12, f"vmap over weights, entry {i}")
    tracked, _ = _pair(1, 4)
    with pytest.raises(RuntimeError, match="track_running_stats"):
        vmap(tracked)(xs)
    tracked.eval()
    close(vmap(tracked)(xs)[2], pysbn.revert_model(tracked)(xs[2]), 1e-12, "vmap eval")


# ---- activation checkpointing -------------------------------------------------------------------

@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointing_updates_running_stats_as_torch(reentrant):
    """Checkpointed segments recompute their batch norms in the backward; torch's then update
    the running statistics a second time (non-reentrant checkpointing stops the recomputation
    after the last saved tensor, after that layer's update): the same here."""
    def make(bn):
        torch.manual_seed(4)
        return nn.ModuleList([nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn(4), nn.ReLU(),
                                            nn.Conv2d(4, 4, 3, padding=1), bn(4)),
                              nn.Conv2d(4, 2, 1)]).double()

    outs = []
    for bn in (nn.BatchNorm2d, pysbn.SynchronizedBatchNorm2d):
        m = make(bn)
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(4, 3, 6, 6, dtype=F64, generator=gen, requires_grad=True)
        for _ in range(2):
            y = m[1](checkpoint(m[0], x, use_reentrant=reentrant))
            y.backward(torch.randn(y.shape, dtype=F64, generator=gen))
        outs.append((m, x.grad))
    (ms, gs), (mp, gp) = outs[1], outs[0]
    for i in (1, 4):
        assert int(ms[0][i].num_batches_tracked) == int(mp[0][i].num_batches_tracked) == 4
        close(ms[0][i].running_mean, mp[0][i].running_mean, 1e-12, f"layer {i} running_mean")
        close(ms[0][i].running_var, mp[0][i].running_var, 1e-12, f"layer {i} running_var")
    close(gs, gp, 1e-10, "input grad")


# ---- classes and conversion ---------------------------------------------------------------------

def test_isinstance_of_the_torch_classes():
    """The layers subclass nn.BatchNorm1d/2d/3d: code that finds batch norms by class (weight
    decay exclusion, freezing) finds them."""
    net = pysbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                                            nn.Flatten(), nn.BatchNorm1d(4 * 36)))
    found = [m for m in net.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert [type(m) for m in found] == [pysbn.SynchronizedBatchNorm2d,
                                        pysbn.SynchronizedBatchNorm1d]
    no_decay = [p for m in net.modules() if isinstance(m, nn.BatchNorm2d)
                for p in m.parameters(recurse=False)]
    assert len(no_decay) == 2
    assert not isinstance(pysbn.SynchronizedBatchNorm2d(3), nn.BatchNorm1d)


def test_convert_models_from_nn_sync_batchnorm():
    """A model converted by nn.SyncBatchNorm.convert_sync_batchnorm converts too (any input
    rank, as nn.SyncBatchNorm), computes the same, and reverts to nn.SyncBatchNorm."""
    torch.manual_seed(6)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double()
    randomize(plain[1])
    tsbn = nn.SyncBatchNorm.convert_sync_batchnorm(plain)
    assert type(tsbn[1]) is nn.SyncBatchNorm
    conv = pysbn.convert_model(tsbn)
    assert type(conv[1]) is pysbn.SynchronizedBatchNorm and conv[1].weight is plain[1].weight
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double()
    ref.load_state_dict(conv.state_dict())
    close(conv(x), ref(x), 1e-12, "train output")
    close(conv[1].running_var, ref[1].running_var, 1e-12, "running_var")
    back = pysbn.revert_model(conv)
    assert type(back[1]) is nn.SyncBatchNorm


def test_convert_uninitialised_lazy_batchnorm():
    """An uninitialised nn.LazyBatchNorm2d becomes the synchronized layer when its first forward
    materialises it (instead of a plain nn.BatchNorm2d)."""
    net = pysbn.convert_model(nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d()))
    x = torch.randn(4, 3, 6, 6)
    net(x)
    assert type(net[1]) is pysbn.SynchronizedBatchNorm2d and net[1].num_features == 4
    assert int(net[1].num_batches_tracked) == 1
    assert type(pysbn.revert_model(net)[1]) is nn.BatchNorm2d
    lazy = pysbn.convert_model(nn.LazyBatchNorm1d())
    pysbn.revert_model(lazy)
    lazy(torch.randn(4, 3))
    assert type(lazy) is nn.BatchNorm1d


class _OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class _SameForward(nn.BatchNorm2d):
    """A subclass that only adds a method: nn.BatchNorm2d's computation."""

    def describe(self):
        return f"bn({self.num_features})"


def test_subclasses_with_a_forward_of_their_own_are_kept_with_a_warning():
    net = nn.Sequential(_OwnForward(3), _SameForward(3))
    with pytest.warns(UserWarning, match="'0' .*_OwnForward.* left as it is"):
        conv = pysbn.convert_model(net)
    assert type(conv[0]) is _OwnForward
    assert type(conv[1]) is pysbn.SynchronizedBatchNorm2d
    back = pysbn.revert_model(conv)
    assert type(back[1]) is _SameForward and back[1].describe() == "bn(3)"


def test_revert_gives_the_original_classes_and_tensors():
    plain = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm3d(2))
    tensors = [id(t) for t in list(plain.parameters()) + list(plain.buffers())]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = pysbn.revert_model(pysbn.convert_model(plain))
    assert [type(m) for m in back] == [nn.BatchNorm1d, nn.BatchNorm3d]
    assert [id(t) for t in list(back.parameters()) + list(back.buffers())] == tensors
