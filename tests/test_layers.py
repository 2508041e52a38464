# SPDX-License-Identifier: MIT
"""pysbn.SynchronizedBatchNorm1d/2d/3d in one process against torch.nn.BatchNorm1d/2d/3d.

References are nn.BatchNorm in float64 on the same (rounded) inputs, with the same parameters
and running statistics. Backward passes use random upstream gradients (a `.sum()` loss makes the
input gradient vanish and tests nothing). Every step compares outputs, input gradients,
weight/bias gradients, running statistics and num_batches_tracked.
"""

import inspect

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import pysbn
from _support import close, randomize

SYNC = {1: pysbn.SynchronizedBatchNorm1d, 2: pysbn.SynchronizedBatchNorm2d,
        3: pysbn.SynchronizedBatchNorm3d}
PLAIN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

# (kind, shape, memory format): BN1d with 2-D and 3-D input, BN2d, BN3d; channels-last forms.
CASES = [
    (1, (9, 5), "contiguous"),
    (1, (6, 5, 7), "contiguous"),
    (1, (6, 5, 7), "channels_last"),      # (N, L, C) memory, channel innermost
    (2, (4, 5, 6, 7), "contiguous"),
    (2, (4, 5, 6, 7), "channels_last"),
    (3, (3, 5, 4, 3, 5), "contiguous"),
    (3, (3, 5, 4, 3, 5), "channels_last"),
    (2, (4, 5, 6, 7), "strided"),          # neither layout: a transposed view
]
CASE_IDS = [f"bn{k}d-{'x'.join(map(str, s))}-{f}" for k, s, f in CASES]

OPTIONS = {
    "default": {},
    "momentum_none": {"momentum": None},
    "momentum_0.3": {"momentum": 0.3},
    "affine_false": {"affine": False},
    "bias_false": {"bias": False},
    "no_running_stats": {"track_running_stats": False},
    "eps_1e-3": {"eps": 1e-3},
}


# ---- helpers ------------------------------------------------------------------------------------

def to_format(x, fmt):
    """x with the same values, dense in `fmt`."""
    if fmt == "contiguous":
        return x.contiguous()
    if fmt == "channels_last":
        if x.dim() == 4:
            out = x.contiguous(memory_format=torch.channels_last)
        elif x.dim() == 5:
            out = x.contiguous(memory_format=torch.channels_last_3d)
        else:
            out = x.movedim(1, -1).contiguous().movedim(-1, 1)
        assert not out.is_contiguous() or x.dim() == 2
        return out
    if fmt == "strided":
        out = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not out.is_contiguous()
        return out
    raise AssertionError(fmt)


def make_input(shape, dtype, fmt="contiguous", offset=0.0):
    x = torch.randn(shape, dtype=torch.float64) * 1.7 + 0.3 + offset
    return to_format(x.to(dtype), fmt)


def make_pair(kind, c, dtype=torch.float64, **kw):
    """(sync layer in `dtype`, nn.BatchNorm in float64) with the same random parameters and
    running statistics."""
    ref = PLAIN[kind](c, dtype=torch.float64, **kw)
    randomize(ref)
    sbn = SYNC[kind](c, dtype=dtype, **kw)
    sbn.load_state_dict(ref.state_dict())
    return sbn, ref


def same_format(a, b):
    """Same memory format (contiguous / channels_last / channels_last_3d) as torch's tensor
    (3-D tensors have no channels-last format: torch returns them contiguous, and so does
    pysbn)."""
    fmts = [torch.contiguous_format]
    if a.dim() == 4:
        fmts.append(torch.channels_last)
    if a.dim() == 5:
        fmts.append(torch.channels_last_3d)
    return all(a.is_contiguous(memory_format=f) == b.is_contiguous(memory_format=f) for f in fmts)


def check_state(sbn, ref, tol):
    for name in ("running_mean", "running_var"):
        a, e = getattr(sbn, name), getattr(ref, name)
        assert (a is None) == (e is None), name
        if a is not None:
            close(a, e, tol, name)
    if ref.num_batches_tracked is None:
        assert sbn.num_batches_tracked is None
    else:
        assert int(sbn.num_batches_tracked) == int(ref.num_batches_tracked)


def check_step(sbn, ref, x, tol, want_grad=True):
    """One forward + backward with a random upstream gradient; compares everything."""
    xs = x.detach().clone().requires_grad_(want_grad)
    xr = x.detach().double().requires_grad_(want_grad)
    y = sbn(xs)
    yr = ref(xr)
    assert y.dtype == x.dtype
    assert y.shape == x.shape
    close(y, yr, tol, "output")
    assert same_format(y, yr), f"output strides {y.stride()} vs torch's {yr.stride()}"
    dy = torch.randn(y.shape, dtype=torch.float64)
    if y.requires_grad:
        y.backward(dy.to(y.dtype))
        yr.backward(dy)
        if want_grad:
            close(xs.grad, xr.grad, tol, "input grad")
            assert same_format(xs.grad, xr.grad), "input grad memory format"
        for p in ("weight", "bias"):
            a, e = getattr(sbn, p), getattr(ref, p)
            assert (a is None) == (e is None), p
            if a is not None:
                close(a.grad, e.grad, tol, f"{p} grad")
    check_state(sbn, ref, tol)
    return y


# ---- against nn.BatchNorm -----------------------------------------------------------------------

@pytest.mark.parametrize("opt", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("kind,shape,fmt", CASES, ids=CASE_IDS)
def test_float64_matches_batchnorm(kind, shape, fmt, opt):
    sbn, ref = make_pair(kind, shape[1], **OPTIONS[opt])
    for step in range(3):  # grads accumulate over the steps in both
        check_step(sbn, ref, make_input(shape, torch.float64, fmt), 1e-10)
    sbn.eval()
    ref.eval()
    for step in range(2):
        check_step(sbn, ref, make_input(shape, torch.float64, fmt), 1e-10)
    sbn.train()
    ref.train()
    check_step(sbn, ref, make_input(shape, torch.float64, fmt), 1e-10)


@pytest.mark.parametrize("opt", ["default", "momentum_none", "affine_false",
                                 "no_running_stats"])
@pytest.mark.parametrize("kind,shape,fmt", CASES, ids=CASE_IDS)
def test_float32_matches_float64_reference(kind, shape, fmt, opt):
    sbn, ref = make_pair(kind, shape[1], dtype=torch.float32, **OPTIONS[opt])
    for step in range(3):
        check_step(sbn, ref, make_input(shape, torch.float32, fmt), 1e-5)
    sbn.eval()
    ref.eval()
    check_step(sbn, ref, make_input(shape, torch.float32, fmt), 1e-5)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_grad_of_weight_only_and_no_grad(train):
    """Input without requires_grad (weight/bias grads only), and forward under no_grad."""
    sbn, ref = make_pair(2, 4)
    sbn.train(train)
    ref.train(train)
    x = make_input((3, 4, 5, 2), torch.float64)
    check_step(sbn, ref, x, 1e-10, want_grad=False)
    sbn.weight.requires_grad_(False)
    ref.weight.requires_grad_(False)
    check_step(sbn, ref, x, 1e-10)
    with torch.no_grad():
        y, yr = sbn(x), ref(x)
    assert not y.requires_grad
    close(y, yr, 1e-10, "no_grad output")
    check_state(sbn, ref, 1e-10)


def test_num_batches_tracked_momentum_none_many_steps():
    sbn, ref = make_pair(2, 3, momentum=None)
    for step in range(6):
        x = make_input((2 + step, 3, 3, 2), torch.float64, offset=float(step))
        with torch.no_grad():
            close(sbn(x), ref(x), 1e-10, "output")
        check_state(sbn, ref, 1e-10)
    assert int(sbn.num_batches_tracked) == 6


def test_large_offset_float32():
    """float32 x = 1e4 + randn: statistics and outputs as accurate as a float64 reference."""
    for kind, shape, fmt in [(2, (16, 4, 8, 8), "contiguous"), (2, (16, 4, 8, 8), "channels_last"),
                             (1, (64, 6), "contiguous"), (3, (4, 3, 4, 4, 4), "channels_last")]:
        sbn, ref = make_pair(kind, shape[1], dtype=torch.float32, momentum=1.0)
        x = make_input(shape, torch.float32, fmt, offset=1e4)
        xr = x.double().requires_grad_()
        xs = x.clone().requires_grad_()
        y, yr = sbn(xs), ref(xr)
        close(y, yr, 1e-5, f"{shape} {fmt} output")
        rel = ((sbn.running_var.double() - ref.running_var) / ref.running_var).abs().max()
        assert rel <= 1e-5, f"{shape} {fmt} running_var relative error {rel:.3g}"
        rel = ((sbn.running_mean.double() - ref.running_mean) / ref.running_mean).abs().max()
        assert rel <= 1e-7, f"{shape} {fmt} running_mean relative error {rel:.3g}"
        dy = torch.randn(shape, dtype=torch.float64)
        y.backward(dy.float())
        yr.backward(dy)
        close(xs.grad, xr.grad, 1e-5, f"{shape} {fmt} input grad")
        close(sbn.weight.grad, ref.weight.grad, 1e-5, f"{shape} {fmt} weight grad")


# ---- edge cases ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,shape", [(1, (0, 4)), (1, (0, 4, 3)), (2, (0, 4, 3, 2)),
                                        (3, (0, 4, 2, 2, 2))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_zero_size_batch_as_torch(kind, shape, momentum):
    """Compared with nn.BatchNorm directly: empty output, running stats kept,
    num_batches_tracked as torch does, empty/zero gradients."""
    sbn, ref = make_pair(kind, shape[1], momentum=momentum)
    mean0, var0 = ref.running_mean.clone(), ref.running_var.clone()
    x = torch.randn(shape, dtype=torch.float64)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, yr = sbn(xs), ref(xr)
    assert y.shape == yr.shape == x.shape
    assert torch.equal(sbn.running_mean, ref.running_mean)
    assert torch.equal(sbn.running_var, ref.running_var)
    assert torch.equal(ref.running_mean, mean0) and torch.equal(ref.running_var, var0)
    assert int(sbn.num_batches_tracked) == int(ref.num_batches_tracked)
    y.backward(torch.empty_like(y))
    yr.backward(torch.empty_like(yr))
    assert xs.grad.shape == x.shape
    assert torch.equal(sbn.weight.grad, ref.weight.grad)
    assert torch.equal(sbn.bias.grad, ref.bias.grad)
    # a normal batch afterwards still matches
    check_step(sbn, ref, make_input(tuple([3] + list(shape[1:])), torch.float64), 1e-10)


@pytest.mark.parametrize("kind,shape", [(1, (1, 4)), (1, (1, 4, 1)), (2, (1, 4, 1, 1)),
                                        (3, (1, 4, 1, 1, 1))])
def test_one_value_per_channel_raises_in_training(kind, shape):
    sbn, ref = make_pair(kind, shape[1])
    state = {k: v.clone() for k, v in sbn.state_dict().items()}
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ref(torch.randn(shape, dtype=torch.float64))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        sbn(torch.randn(shape, dtype=torch.float64))
    # a failed call leaves the layer's state untouched (torch counts the failed batch in
    # num_batches_tracked; pysbn does not)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(sbn.state_dict()[k], state[k]), k
    ref.num_batches_tracked.zero_()
    # eval mode, and training without running stats on 2 values, are fine
    sbn.eval()
    ref.eval()
    check_step(sbn, ref, torch.randn(shape, dtype=torch.float64), 1e-10)
    sbn.train()
    ref.train()
    two = (2,) + shape[1:] if shape[0] == 1 and len(shape) == 2 else shape[:-1] + (2,)
    check_step(sbn, ref, torch.randn(two, dtype=torch.float64), 1e-10)


@pytest.mark.parametrize("kind,bad_dims,want", [(1, 1, "2D or 3D"), (1, 4, "2D or 3D"),
                                                (2, 3, "4D"), (2, 5, "4D"), (3, 4, "5D"),
                                                (3, 2, "5D")])
def test_wrong_dims_raises_value_error(kind, bad_dims, want):
    sbn = SYNC[kind](3)
    x = torch.randn((2, 3, 2, 2, 2, 2)[:bad_dims])
    with pytest.raises(ValueError, match=f"expected {want} input \\(got {bad_dims}D input\\)"):
        sbn(x)
    sbn.eval()
    with pytest.raises(ValueError, match=f"expected {want} input"):
        sbn(x)


@pytest.mark.parametrize("train", [True, False])
def test_channel_mismatch(train):
    sbn = pysbn.SynchronizedBatchNorm2d(3).train(train)
    assert issubclass(pysbn.ChannelMismatchError, ValueError)
    assert issubclass(pysbn.ChannelMismatchError, RuntimeError)
    x = torch.randn(2, 4, 3, 3)
    for exc in (pysbn.ChannelMismatchError, ValueError, RuntimeError):
        with pytest.raises(exc, match="4 channels"):
            sbn(x)
    assert int(sbn.num_batches_tracked) == 0
    # nn.BatchNorm raises a RuntimeError for the same input: code catching that still works
    with pytest.raises(RuntimeError):
        nn.BatchNorm2d(3).train(train)(x)


def test_bad_input_types():
    sbn = pysbn.SynchronizedBatchNorm2d(3)
    with pytest.raises(TypeError):
        sbn(torch.ones(2, 3, 2, 2, dtype=torch.int64))
    with pytest.raises(TypeError):
        sbn(torch.ones(2, 3, 2, 2, dtype=torch.float64))  # float32 parameters
    with pytest.raises(TypeError):
        sbn([[1.0]])


# ---- half precision -----------------------------------------------------------------------------

HALF_TOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,shape,fmt", [(1, (16, 6), "contiguous"),
                                            (2, (4, 6, 5, 5), "contiguous"),
                                            (2, (4, 6, 5, 5), "channels_last"),
                                            (3, (2, 6, 3, 4, 3), "channels_last")])
@pytest.mark.parametrize("params", ["float32_params", "half_module"])
def test_half_inputs(dtype, kind, shape, fmt, params):
    """Half input with float32 parameters (mixed precision), and .half()/.bfloat16() modules:
    compared with nn.BatchNorm on the same half input."""
    sbn, ref64 = make_pair(kind, shape[1], dtype=torch.float32)
    ref = PLAIN[kind](shape[1])
    ref.load_state_dict(sbn.state_dict())
    if params == "half_module":
        convert = (lambda m: m.half()) if dtype == torch.float16 else (lambda m: m.bfloat16())
        sbn, ref = convert(sbn), convert(ref)
        assert sbn.weight.dtype == dtype and sbn.running_var.dtype == dtype
    tol = HALF_TOL[dtype]
    for step in range(2):
        x = make_input(shape, dtype, fmt)
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, yr = sbn(xs), ref(xr)
        assert y.dtype == dtype
        close(y, yr, tol, "output")
        dy = torch.randn(shape).to(dtype)
        y.backward(dy)
        yr.backward(dy)
        assert xs.grad.dtype == dtype
        close(xs.grad, xr.grad, tol, "input grad")
        for p in ("weight", "bias"):
            g, gr = getattr(sbn, p).grad, getattr(ref, p).grad
            assert g.dtype == getattr(sbn, p).dtype
            close(g, gr, tol * 4, f"{p} grad")
        for b in ("running_mean", "running_var"):
            assert getattr(sbn, b).dtype == getattr(ref, b).dtype
            close(getattr(sbn, b), getattr(ref, b), tol, b)
    sbn.eval()
    ref.eval()
    x = make_input(shape, dtype, fmt)
    close(sbn(x), ref(x), tol, "eval output")


# ---- gradcheck ----------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind,shape,fmt,opt", [
    (1, (4, 3), "contiguous", {}),
    (1, (3, 2, 3), "channels_last", {}),
    (2, (2, 3, 2, 3), "contiguous", {}),
    (2, (2, 3, 2, 3), "channels_last", {}),
    (3, (2, 2, 2, 1, 2), "contiguous", {}),
    (2, (3, 2, 2, 2), "contiguous", {"track_running_stats": False}),
])
def test_gradcheck(kind, shape, fmt, opt, train):
    sbn, _ = make_pair(kind, shape[1], **opt)
    sbn.train(train)
    x = make_input(shape, torch.float64, fmt).requires_grad_()
    w = sbn.weight.detach().clone().requires_grad_()
    b = sbn.bias.detach().clone().requires_grad_()

    def fn(x, w, b):  # the parameters as inputs of the check
        return torch.func.functional_call(sbn, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


# ---- the lone layer's fused path ----------------------------------------------------------------

class _Echo(pysbn.sync.Synchronizer):
    """A synchronizer with nothing to add: it exchanges, with itself alone."""

    def forward(self, record):
        return record.clone()

    def backward(self, sums):
        return sums.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("kind,shape,fmt", CASES, ids=CASE_IDS)
def test_lone_path_is_the_composed_path(kind, shape, fmt, dtype, monkeypatch):
    """A lone training layer computes its statistics inside batch_norm_forward and its backward
    in one batch_norm_backward call; it must give the bits of the synchronised path (moments ->
    sync -> batch_norm_forward with the record; backward_reduce -> sync -> backward_elemt),
    including the running stats and num_batches_tracked."""
    import pysbn.batchnorm as bn_module

    layers = []
    for _ in range(2):
        sbn = SYNC[kind](shape[1])
        randomize(sbn)
        layers.append(sbn.float())
    layers[1].load_state_dict(layers[0].state_dict())
    x = make_input(shape, torch.float32, fmt).to(dtype)
    dy = torch.randn(shape).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = layers[0](xa)
    ya.backward(dy)
    monkeypatch.setattr(bn_module, "synchronizer_for", lambda layer, x: _Echo())
    yb = layers[1](xb)
    yb.backward(dy)
    a, b = layers
    assert torch.equal(ya, yb) and ya.stride() == yb.stride()
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(a.weight.grad, b.weight.grad) and torch.equal(a.bias.grad, b.bias.grad)
    assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var,
                                                                       b.running_var)
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 1


def test_lone_path_backward_twice_with_retain_graph():
    """The backward reuses the forward's statistics buffer for its sums: a second backward
    through the same graph must give the same gradients."""
    sbn, ref = make_pair(2, 4)
    x = make_input((3, 4, 5, 2), torch.float64).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y, yr = sbn(x), ref(xr)
    dy1, dy2 = torch.randn_like(y), torch.randn_like(y)
    g1, = torch.autograd.grad(y, x, dy1, retain_graph=True)
    g2, = torch.autograd.grad(y, x, dy2)
    r1, = torch.autograd.grad(yr, xr, dy1, retain_graph=True)
    r2, = torch.autograd.grad(yr, xr, dy2)
    close(g1, r1, 1e-10, "first backward")
    close(g2, r2, 1e-10, "second backward")


# ---- module behaviour ---------------------------------------------------------------------------

def test_isinstance_and_signature():
    want = inspect.signature(nn.SyncBatchNorm.__init__).parameters
    for kind, cls in SYNC.items():
        m = cls(4)
        assert isinstance(m, _BatchNorm)
        assert isinstance(m, nn.Module)
        assert isinstance(m, PLAIN[kind]), "a subclass of the nn.BatchNorm class it replaces"
        got = inspect.signature(cls.__init__).parameters
        assert list(got) == list(want)
        for name, p in want.items():
            assert got[name].kind == p.kind, name
            assert got[name].default == p.default, name
        assert m.num_features == 4 and m.eps == 1e-5 and m.momentum == 0.1
        assert m.affine and m.track_running_stats and m.process_group is None
        m = cls(4, 1e-3, None, False, False, None, "cpu", torch.float64, bias=False)
        assert m.eps == 1e-3 and m.momentum is None and m.weight is None and m.bias is None
        assert m.running_mean is None and m.num_batches_tracked is None
        m = cls(4, bias=False, dtype=torch.float64)
        assert m.weight.dtype == torch.float64 and m.bias is None


@pytest.mark.parametrize("opt", ["default", "affine_false", "bias_false", "no_running_stats"])
@pytest.mark.parametrize("kind", [1, 2, 3])
def test_state_dict_interchangeable(kind, opt):
    kw = OPTIONS[opt]
    plain = PLAIN[kind](5, **kw)
    sync = SYNC[kind](5, **kw)
    assert list(sync.state_dict()) == list(plain.state_dict())
    for k, v in plain.state_dict().items():
        assert sync.state_dict()[k].dtype == v.dtype and sync.state_dict()[k].shape == v.shape
    shape = {1: (6, 5), 2: (3, 5, 2, 2), 3: (2, 5, 2, 2, 2)}[kind]
    # plain -> sync
    for _ in range(2):
        plain(torch.randn(shape))
    if plain.weight is not None:
        with torch.no_grad():
            plain.weight.uniform_(0.5, 1.5)
    assert sync.load_state_dict(plain.state_dict()) is not None
    for k, v in plain.state_dict().items():
        assert torch.equal(sync.state_dict()[k], v), k
    # sync -> plain
    for _ in range(2):
        sync(torch.randn(shape))
    if sync.bias is not None:
        with torch.no_grad():
            sync.bias.uniform_(-1, 1)
    plain2 = PLAIN[kind](5, **kw)
    plain2.load_state_dict(sync.state_dict())
    for k, v in sync.state_dict().items():
        assert torch.equal(plain2.state_dict()[k], v), k
    x = torch.randn(shape)
    sync.eval()
    plain2.eval()
    close(sync(x), plain2(x), 1e-5, "eval output after load")


def test_to_and_double():
    sbn, ref = make_pair(2, 4, dtype=torch.float32)
    d = sbn.double()
    assert d is sbn
    for t in (sbn.weight, sbn.bias, sbn.running_mean, sbn.running_var):
        assert t.dtype == torch.float64
    assert sbn.num_batches_tracked.dtype == torch.long
    sbn.load_state_dict(ref.state_dict())  # the float32 round trip rounded them
    check_step(sbn, ref, make_input((3, 4, 3, 3), torch.float64), 1e-10)
    sbn.to(torch.float32)
    assert sbn.weight.dtype == torch.float32
    sbn.to("cpu", torch.float64)
    assert sbn.running_var.dtype == torch.float64
    sbn.load_state_dict(ref.state_dict())
    sbn.weight.grad = sbn.bias.grad = ref.weight.grad = ref.bias.grad = None
    check_step(sbn, ref, make_input((3, 4, 3, 3), torch.float64), 1e-10)
    sbn.float()
    sbn.weight.grad = sbn.bias.grad = ref.weight.grad = ref.bias.grad = None
    check_step(sbn, ref, make_input((3, 4, 3, 3), torch.float32), 1e-5)


def test_eval_without_running_stats_uses_batch_stats():
    sbn, ref = make_pair(2, 3, track_running_stats=False, affine=False)
    sbn.eval()
    ref.eval()
    x = make_input((4, 3, 2, 2), torch.float64)
    y = check_step(sbn, ref, x, 1e-10)
    var, mean = torch.var_mean(x, (0, 2, 3), correction=0, keepdim=True)
    close(y, (x - mean) / torch.sqrt(var + 1e-5), 1e-10, "batch-stat output")


@pytest.mark.parametrize("eps_mode", ["plus", "clamp"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_double_backward_as_batchnorm(train, affine, eps_mode):
    """create_graph=True (gradient penalties): the second-order gradients through the layer
    are those of nn.BatchNorm (in clamp mode: of the same formula written with torch ops)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 3, 1).double()
    conv_r = nn.Conv2d(3, 3, 1).double()
    conv_r.load_state_dict(conv.state_dict())
    sbn, ref = make_pair(2, 3, affine=affine)
    sbn.train(train)
    ref.train(train)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    dy = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    pysbn.set_sbn_eps_mode(eps_mode)
    try:
        g, = torch.autograd.grad(sbn(conv(x)), x, dy, create_graph=True)
    finally:
        pysbn.set_sbn_eps_mode("plus")
    if eps_mode == "plus":
        gr, = torch.autograd.grad(ref(conv_r(xr)), xr, dy, create_graph=True)
    else:
        gr, = torch.autograd.grad(_clamp_bn(ref, conv_r(xr), train), xr, dy, create_graph=True)
    close(g, gr, 1e-10, "first-order grad under create_graph")
    (g.pow(2) * dy).sum().backward()
    (gr.pow(2) * dy).sum().backward()
    if train:
        close(x.grad, xr.grad, 1e-9, "second-order input grad")
    else:  # an eval-mode batch norm is linear in x: no second-order term in x
        assert x.grad is None and xr.grad is None
    close(conv.weight.grad, conv_r.weight.grad, 1e-9, "second-order conv weight grad")
    if affine:
        close(sbn.weight.grad, ref.weight.grad, 1e-9, "second-order bn weight grad")


def _clamp_bn(ref, x, train):
    """The clamp eps mode with torch ops: invstd = 1 / sqrt(max(var, eps))."""
    shape = (1, -1, 1, 1)
    if train:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    else:
        var, mean = ref.running_var, ref.running_mean
    y = (x - mean.view(shape)) * var.clamp_min(ref.eps).rsqrt().view(shape)
    if ref.weight is not None:
        y = y * ref.weight.view(shape) + ref.bias.view(shape)
    return y


@pytest.mark.parametrize("xfmt,dyfmt", [("contiguous", "channels_last"),
                                        ("channels_last", "contiguous"),
                                        ("channels_last", "strided")])
def test_upstream_grad_in_another_layout(xfmt, dyfmt):
    sbn, ref = make_pair(2, 4)
    x = make_input((3, 4, 5, 6), torch.float64, xfmt)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = to_format(torch.randn(3, 4, 5, 6, dtype=torch.float64), dyfmt)
    sbn(xs).backward(dy)
    ref(xr).backward(dy)
    close(xs.grad, xr.grad, 1e-10, "input grad")
    close(sbn.weight.grad, ref.weight.grad, 1e-10, "weight grad")
    close(sbn.bias.grad, ref.bias.grad, 1e-10, "bias grad")
