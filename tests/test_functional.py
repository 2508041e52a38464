# SPDX-License-Identifier: MIT
"""pysbn.functional: every op against the torch primitive of the same meaning.

References are computed by torch in float64 from the same (rounded) inputs; nothing is compared
with hard-coded numbers. Backward tests use random upstream gradients (a `.sum()` loss makes dx
vanish and tests nothing).
"""

import math

import pytest
import torch
import torch.nn.functional as tF
from hypothesis import given, settings
from hypothesis import strategies as st

import pysbn
from pysbn import functional as F
from pysbn import ops

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF_DTYPES = (torch.float16, torch.bfloat16)
EPS = 1e-5

# Shapes: 1-D input (N, C), 3-D (N, C, L), 4-D, 5-D, and odd sizes (C=1, L=1, N=1).
SHAPES = [
    (16, 5),
    (4, 3, 19),
    (4, 6, 7, 5),
    (2, 3, 4, 3, 5),
    (9, 1, 4, 4),
    (3, 4, 1, 1),
    (1, 5, 6, 7),
    (1, 1, 2, 3),
    (2, 4, 1, 3, 1),
]
FORMATS = ["contiguous", "channels_last"]

HAS_CUDA = torch.cuda.is_available() and ops.built_with_cuda()


# ---- helpers ------------------------------------------------------------------------------------

def _dims(x):
    return [0] + list(range(2, x.dim()))


def _bshape(x):
    """Shape that broadcasts a (C,) vector against x."""
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _to_format(x, fmt):
    """x with the same values, dense in `fmt` (channels_last: channel dim innermost)."""
    if fmt == "contiguous":
        return x.contiguous()
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def _make(shape, dtype, fmt="contiguous", offset=0.0, scale=1.0, device="cpu"):
    x = torch.randn(shape, dtype=torch.float64) * scale + offset
    return _to_format(x.to(dtype), fmt).to(device)


def _ref_moments(x):
    """(count, mean, m2) of x in float64 by torch.var_mean."""
    var, mean = torch.var_mean(x.double(), dim=_dims(x), correction=0)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    return count, mean, var * count


def _stats_tol(dtype):
    """Tolerance of statistics (accumulation dtype) relative to float64 of the same inputs."""
    return 1e-12 if dtype == torch.float64 else 1e-5


def _out_tol(dtype):
    """(rtol, atol) of outputs in the input dtype vs a float64 reference."""
    return {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
            torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}[dtype]


def _assert_close(actual, expected, dtype, scale=1.0):
    rtol, atol = _out_tol(dtype)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


def _param_dtypes(dtype):
    return [dtype, torch.float32] if dtype in HALF_DTYPES else [dtype]


def _dense_in(t, layout):
    if layout == ops._CM:
        return t.is_contiguous()
    return t.movedim(1, -1).is_contiguous()


def _ref_bn_autograd(x, w, b, g, eps=EPS):
    """dx, dw, db of y = (x - mean) / sqrt(var + eps) * w + b (batch stats, float64) under the
    upstream gradient g, by torch autograd."""
    x = x.detach().double().requires_grad_(True)
    w = w.detach().double().requires_grad_(True)
    b = b.detach().double().requires_grad_(True)
    var, mean = torch.var_mean(x, dim=_dims(x), correction=0, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps) * w.view(_bshape(x)) + b.view(_bshape(x))
    dx, dw, db = torch.autograd.grad(y, (x, w, b), g.double())
    return y.detach(), dx, dw, db


def _forward(x, eps=EPS, eps_mode="plus"):
    stats = F.moments(x)
    mean, invstd = F.finalize(stats, eps, eps_mode)
    return stats, mean, invstd


# ---- dense inputs and their layout -------------------------------------------------------------

def _layout_of(x):
    """The layout the core reads x in (after pysbn.ops.dense)."""
    return ops._layout(ops.dense(x))


def test_dense_contiguous_is_channel_major_in_place():
    x = torch.randn(4, 3, 5, 6)
    xv = ops.dense(x)
    assert xv.data_ptr() == x.data_ptr()
    assert ops._view(x)[1][2:] == (4, 3, 30, ops._CM)


@pytest.mark.parametrize("shape, fmt", [((4, 3, 5, 6), torch.channels_last),
                                        ((2, 3, 4, 5, 6), torch.channels_last_3d)])
def test_dense_channels_last_in_place(shape, fmt):
    x = torch.randn(shape).contiguous(memory_format=fmt)
    xv = ops.dense(x)
    assert xv.data_ptr() == x.data_ptr()
    assert ops._view(x)[1][2:] == (shape[0], shape[1], math.prod(shape[2:]), ops._CL)


def test_dense_3d_channel_innermost_is_copied_to_contiguous():
    """As nn.BatchNorm1d: a (N, C, L) view with the channel dim innermost gives a contiguous
    output (y.view(N, -1) works), so the input is copied to contiguous first."""
    x = torch.randn(4, 7, 3).transpose(1, 2)
    xv = ops.dense(x)
    assert xv.data_ptr() != x.data_ptr() and xv.is_contiguous()
    assert ops._view(x)[1][2:] == (4, 3, 7, ops._CM)
    torch.testing.assert_close(xv, x, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(4, 1, 5, 6), (4, 3, 1, 1), (1, 3, 1, 1)])
def test_dense_prefers_channel_major_when_both_hold(shape):
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    assert x.is_contiguous()
    assert _layout_of(x) == ops._CM


@pytest.mark.parametrize("make", [
    lambda b: b.transpose(2, 3),
    lambda b: b[:, :, ::2],
    lambda b: b[:, 1:],
    lambda b: b[::2],
    lambda b: b[:, :, :1].expand(-1, -1, 5, -1),
    lambda b: b.permute(0, 1, 3, 2).contiguous(memory_format=torch.channels_last).transpose(2, 3),
], ids=["transposed", "sliced_h", "sliced_c", "sliced_n", "expanded", "permuted_cl"])
def test_dense_copies_other_strides(make):
    x = make(torch.randn(6, 4, 6, 5))
    assert not x.is_contiguous() and not x.movedim(1, -1).is_contiguous()
    xv = ops.dense(x)
    assert xv.data_ptr() != x.data_ptr()
    assert ops._layout(xv) == ops._CM and xv.is_contiguous()
    torch.testing.assert_close(xv, x, rtol=0, atol=0)


# ---- sum_ft and moments -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_sum_ft(dtype, shape, fmt):
    x = _make(shape, dtype, fmt, offset=2.0)
    out = F.sum_ft(x)
    assert out.dtype == F.STATS_DTYPE and out.shape == (shape[1],)
    ref = x.double().sum(dim=_dims(x))
    tol = _stats_tol(dtype)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * x.numel() / shape[1])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_moments(dtype, shape, fmt):
    x = _make(shape, dtype, fmt, offset=-3.0, scale=2.0)
    stats = F.moments(x)
    c = shape[1]
    assert stats.dtype == F.STATS_DTYPE and stats.shape == (2 * c + 1,)
    count, mean, m2 = _ref_moments(x)
    tol = _stats_tol(dtype)
    assert stats[0].item() == count
    torch.testing.assert_close(stats[1:c + 1].double(), mean, rtol=tol, atol=tol)
    torch.testing.assert_close(stats[c + 1:].double(), m2, rtol=tol, atol=tol * count)


@pytest.mark.parametrize("fmt", FORMATS)
def test_moments_float32_far_from_zero(fmt):
    # The seed's raw sum / sum of squares loses the variance at mean 1e4 in float32.
    x = _to_format(1e4 + torch.randn(32, 64, 28, 28), fmt)
    stats = F.moments(x)
    count, mean, m2 = _ref_moments(x)
    var = stats[65:].double() / stats[0].double()
    rel = ((var - m2 / count).abs() / (m2 / count)).max().item()
    assert rel <= 1e-5, rel
    torch.testing.assert_close(stats[1:65].double(), mean, rtol=1e-7, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_moments_float64_far_from_zero(fmt):
    x = _to_format(1e6 + torch.randn(16, 8, 20, 20, dtype=torch.float64), fmt)
    stats = F.moments(x)
    count, mean, m2 = _ref_moments(x)
    var = stats[9:] / stats[0]
    rel = ((var - m2 / count).abs() / (m2 / count)).max().item()
    assert rel <= 1e-9, rel


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_moments_of_empty_batch(dtype):
    x = torch.empty(0, 3, 4, dtype=dtype)
    stats = F.moments(x)
    torch.testing.assert_close(stats, torch.zeros(7, dtype=F.STATS_DTYPE), rtol=0, atol=0)
    torch.testing.assert_close(F.sum_ft(x), torch.zeros(3, dtype=F.STATS_DTYPE))


@pytest.mark.parametrize("num", [1, 2, 3])
def test_moments_independent_of_torch_threads(num, num_threads):
    x = _make((8, 6, 31, 9), torch.float32, offset=50.0)
    ref = F.moments(x)
    torch.set_num_threads(num)
    torch.testing.assert_close(F.moments(x), ref, rtol=1e-6, atol=1e-6)


# ---- merge_moments ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", [[5, 0, 3, 1, 11], [0, 7], [1, 1], [20]])
def test_merge_moments_uneven_splits(dtype, sizes, fmt):
    x = _make((sum(sizes), 4, 5, 3), dtype, offset=1e3, scale=3.0)
    parts = [_to_format(p, fmt) for p in torch.split(x, sizes)]
    records = torch.stack([F.moments(p) for p in parts])
    merged = F.merge_moments(records)
    whole = F.moments(x)
    count, mean, m2 = _ref_moments(x)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(merged, whole, rtol=tol, atol=tol)
    assert merged[0].item() == count
    torch.testing.assert_close(merged[1:5].double(), mean, rtol=tol, atol=0)
    torch.testing.assert_close(merged[5:].double(), m2, rtol=tol, atol=0)
    # A sequence of records gives the same.
    torch.testing.assert_close(F.merge_moments([F.moments(p) for p in parts]), merged)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=6)
       .filter(lambda s: sum(s) > 0),
       offset=st.sampled_from([0.0, 1e2, 1e4]))
def test_merge_moments_property(sizes, offset):
    x = torch.randn(sum(sizes), 3, 7, dtype=torch.float64) + offset
    merged = F.merge_moments(torch.stack([F.moments(p) for p in torch.split(x, sizes)]))
    count, mean, m2 = _ref_moments(x)
    assert merged[0].item() == count
    torch.testing.assert_close(merged[1:4], mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged[4:], m2, rtol=1e-9, atol=1e-9)


def test_merge_moments_all_empty():
    records = torch.stack([F.moments(torch.empty(0, 2, 3)) for _ in range(3)])
    torch.testing.assert_close(F.merge_moments(records), torch.zeros(5, dtype=torch.float64), rtol=0, atol=0)


# ---- finalize -----------------------------------------------------------------------------------

@pytest.mark.parametrize("eps_mode", ["plus", "clamp"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_finalize_mean_invstd(dtype, eps_mode):
    x = _make((6, 5, 4, 4), dtype, offset=1.0)
    x[:, 0] = 1.0  # a zero-variance channel: eps decides
    eps = 1e-3
    stats = F.moments(x)
    mean, invstd = F.finalize(stats, eps, eps_mode)
    acc = F.STATS_DTYPE
    assert mean.dtype == invstd.dtype == acc and mean.shape == invstd.shape == (5,)
    count, ref_mean, m2 = _ref_moments(x)
    var = m2 / count
    den = var + eps if eps_mode == "plus" else torch.clamp(var, min=eps)
    tol = _stats_tol(dtype)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(invstd.double(), torch.rsqrt(den), rtol=tol * 10, atol=0)


@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finalize_running_stats_as_nn_batchnorm(dtype, momentum):
    bn = torch.nn.BatchNorm2d(4, momentum=momentum, dtype=dtype).train()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for step in range(1, 4):
        x = _make((5, 4, 3, 3), dtype, offset=float(step), scale=float(step))
        with torch.no_grad():
            bn(x)
        factor = 1.0 / step if momentum is None else momentum
        mean, invstd = F.finalize(F.moments(x), bn.eps, running_mean=rm, running_var=rv,
                                  factor=factor)
    tol = _stats_tol(dtype) * 10
    torch.testing.assert_close(rm, bn.running_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(rv, bn.running_var, rtol=tol, atol=tol)


@pytest.mark.parametrize("param_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_finalize_running_stats_in_param_dtype(param_dtype):
    x = _make((8, 3, 5), param_dtype if param_dtype in HALF_DTYPES else torch.float32)
    rm = torch.rand(3).to(param_dtype)
    rv = torch.rand(3).add(0.5).to(param_dtype)
    ref_m, ref_v = rm.double().clone(), rv.double().clone()
    count, mean, m2 = _ref_moments(x)
    F.finalize(F.moments(x), EPS, running_mean=rm, running_var=rv, factor=0.25)
    assert rm.dtype == rv.dtype == param_dtype
    _assert_close(rm, 0.75 * ref_m + 0.25 * mean, param_dtype)
    _assert_close(rv, 0.75 * ref_v + 0.25 * m2 / (count - 1), param_dtype)


def test_finalize_updates_strided_running_stats_in_place():
    storage_m, storage_v = torch.zeros(8), torch.ones(8)
    rm, rv = storage_m[::2], storage_v[::2]
    x = _make((6, 4, 5), torch.float32)
    count, mean, m2 = _ref_moments(x)
    F.finalize(F.moments(x), EPS, running_mean=rm, running_var=rv, factor=0.5)
    _assert_close(storage_m[::2], 0.5 * mean, torch.float32)
    _assert_close(storage_v[::2], 0.5 + 0.5 * m2 / (count - 1), torch.float32)
    assert torch.all(storage_m[1::2] == 0) and torch.all(storage_v[1::2] == 1)


def test_finalize_empty_batch_leaves_running_stats():
    rm, rv = torch.rand(3), torch.rand(3)
    before = rm.clone(), rv.clone()
    mean, invstd = F.finalize(F.moments(torch.empty(0, 3)), EPS, running_mean=rm,
                              running_var=rv, factor=0.1)
    torch.testing.assert_close((rm, rv), before, rtol=0, atol=0)
    torch.testing.assert_close(mean, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(invstd, torch.full((3,), 1 / math.sqrt(EPS), dtype=torch.float64))


# ---- normalize ----------------------------------------------------------------------------------

@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_normalize_as_batch_norm_with_given_stats(dtype, shape, fmt, affine):
    # F.batch_norm in eval mode with running stats := (mean, var) is exactly normalize with
    # invstd = 1 / sqrt(var + eps).
    x = _make(shape, dtype, fmt, offset=0.5, scale=2.0)
    c, acc = shape[1], F.STATS_DTYPE
    for param_dtype in _param_dtypes(dtype):
        mean = torch.randn(c, dtype=torch.float64)
        var = torch.rand(c, dtype=torch.float64) + 0.5
        w = torch.randn(c, dtype=torch.float64).to(param_dtype)
        b = torch.randn(c, dtype=torch.float64).to(param_dtype)
        w_arg = w if affine in ("both", "weight") else None
        b_arg = b if affine in ("both", "bias") else None
        mean_a, invstd_a = mean.to(acc), torch.rsqrt(var + EPS).to(acc)
        y = F.normalize(x, mean_a, invstd_a, w_arg, b_arg)
        ref = tF.batch_norm(x.double(), mean_a.double(), invstd_a.double().pow(-2) - EPS,
                            None if w_arg is None else w.double(),
                            None if b_arg is None else b.double(), training=False, eps=EPS)
        assert y.dtype == dtype and y.shape == x.shape
        assert _dense_in(y, _layout_of(x))
        if fmt == "channels_last" and x.dim() in (4, 5) and not x.is_contiguous():
            assert y.stride() == x.stride()
        if x.dim() == 3:  # as nn.BatchNorm1d: contiguous, whatever the input's strides
            assert y.is_contiguous()
        _assert_close(y, ref, dtype, scale=4.0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalize_matches_training_batch_norm(dtype, fmt):
    x = _make((8, 5, 6, 7), dtype, fmt, offset=3.0)
    w, b = torch.randn(5, dtype=dtype), torch.randn(5, dtype=dtype)
    _, mean, invstd = _forward(x)
    y = F.normalize(x, mean, invstd, w, b)
    ref = torch.batch_norm(x, w, b, None, None, True, 0.1, EPS, False)
    _assert_close(y, ref, dtype, scale=2.0)
    _assert_close(y, tF.batch_norm(x, None, None, w, b, training=True, eps=EPS), dtype, scale=2.0)


def test_normalize_empty_batch():
    x = torch.empty(0, 3, 4, 4)
    y = F.normalize(x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    assert y.shape == x.shape


# ---- backward -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_backward_vs_autograd(dtype, shape, fmt):
    if math.prod(shape) // shape[1] < 2:
        pytest.skip("one value per channel: the batch variance is 0")
    x = _make(shape, dtype, fmt, offset=1.5, scale=2.0)
    g = _make(shape, dtype, fmt)
    c = shape[1]
    for param_dtype in _param_dtypes(dtype):
        w = (torch.rand(c, dtype=torch.float64) + 0.5).to(param_dtype)
        b = torch.randn(c, dtype=torch.float64).to(param_dtype)
        stats, mean, invstd = _forward(x)
        sums, gw, gb = F.backward_reduce(g, x, mean, invstd, True, True, param_dtype=param_dtype)
        dx = F.backward_elemt(g, x, mean, invstd, w, sums, stats[:1])
        y_ref, dx_ref, dw_ref, db_ref = _ref_bn_autograd(x, w, b, g)

        # The grad-sums record against its definition.
        xd, gd = x.double(), g.double()
        sum_dy = gd.sum(dim=_dims(x))
        sum_dy_xmu = (gd * (xd - mean.double().view(_bshape(x)))).sum(dim=_dims(x))
        assert sums.dtype == F.STATS_DTYPE and sums.shape == (2 * c,)
        n = x.numel() // c
        tol = _stats_tol(dtype) * 10
        torch.testing.assert_close(sums[:c].double(), sum_dy, rtol=tol, atol=tol * n)
        torch.testing.assert_close(sums[c:].double(), sum_dy_xmu, rtol=tol, atol=tol * n)

        assert gw.dtype == gb.dtype == param_dtype
        assert dx.dtype == dtype and dx.shape == x.shape
        assert _dense_in(dx, _layout_of(x))
        _assert_close(gb, db_ref, param_dtype if dtype != torch.float64 else dtype,
                      scale=math.sqrt(n))
        _assert_close(gw, dw_ref, param_dtype if dtype != torch.float64 else dtype,
                      scale=math.sqrt(n))
        _assert_close(dx, dx_ref, dtype, scale=4.0)
        _assert_close(F.normalize(x, mean, invstd, w, b), y_ref, dtype, scale=4.0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_vs_native_batch_norm_backward(dtype, fmt):
    x = _make((6, 5, 7, 4), dtype, fmt, offset=-2.0)
    g = _make((6, 5, 7, 4), dtype, fmt)
    w = torch.rand(5, dtype=dtype) + 0.5
    stats, mean, invstd = _forward(x)
    sums, gw, gb = F.backward_reduce(g, x, mean, invstd, True, True)
    dx = F.backward_elemt(g, x, mean, invstd, w, sums, stats[:1])
    dx_ref, dw_ref, db_ref = torch.ops.aten.native_batch_norm_backward(
        g, x, w, None, None, mean.to(F.acc_dtype(dtype)), invstd.to(F.acc_dtype(dtype)), True, EPS,
        [True, True, True])
    _assert_close(dx, dx_ref, dtype, scale=4.0)
    _assert_close(gw, dw_ref, dtype, scale=10.0)
    _assert_close(gb, db_ref, dtype, scale=10.0)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_backward_without_weight(dtype):
    x = _make((5, 3, 8), dtype, offset=1.0)
    g = _make((5, 3, 8), dtype)
    stats, mean, invstd = _forward(x)
    sums, gw, gb = F.backward_reduce(g, x, mean, invstd, False, False)
    assert gw is None and gb is None
    dx = F.backward_elemt(g, x, mean, invstd, None, sums, stats[:1])
    ones = torch.ones(3, dtype=torch.float64)
    _, dx_ref, _, _ = _ref_bn_autograd(x, ones, ones * 0, g)
    _assert_close(dx, dx_ref, dtype, scale=4.0)
    # Only one of the two gradients.
    _, gw, gb = F.backward_reduce(g, x, mean, invstd, False, True)
    assert gw is None and gb is not None
    _, gw, gb = F.backward_reduce(g, x, mean, invstd, True, False)
    assert gw is not None and gb is None


@pytest.mark.parametrize("x_fmt, dy_kind", [("contiguous", "channels_last"),
                                            ("channels_last", "contiguous"),
                                            ("channels_last", "transposed"),
                                            ("contiguous", "expanded")])
def test_backward_dy_in_other_layout_is_copied(x_fmt, dy_kind):
    shape = (4, 3, 6, 6)
    x = _make(shape, torch.float64, x_fmt, offset=2.0)
    if dy_kind == "transposed":
        g = torch.randn(4, 3, 6, 6, dtype=torch.float64).transpose(2, 3)
    elif dy_kind == "expanded":
        g = torch.randn(1, 3, 6, 6, dtype=torch.float64).expand(shape)
    else:
        g = _make(shape, torch.float64, dy_kind)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    stats, mean, invstd = _forward(x)
    sums, gw, gb = F.backward_reduce(g, x, mean, invstd, True, True)
    dx = F.backward_elemt(g, x, mean, invstd, w, sums, stats[:1])
    _, dx_ref, dw_ref, db_ref = _ref_bn_autograd(x, w, w * 0, g)
    _assert_close(dx, dx_ref, torch.float64)
    _assert_close(gw, dw_ref, torch.float64)
    _assert_close(gb, db_ref, torch.float64)


def test_backward_of_empty_batch():
    # A replica (or the whole batch) with no samples: zero sums, empty dx, count 0 allowed.
    x = torch.empty(0, 3, 4)
    stats, mean, invstd = _forward(x)
    sums, gw, gb = F.backward_reduce(x, x, mean, invstd, True, True)
    torch.testing.assert_close((sums, gw, gb), (torch.zeros(6, dtype=torch.float64), torch.zeros(3), torch.zeros(3)))
    dx = F.backward_elemt(x, x, mean, invstd, torch.ones(3), sums, stats[:1])
    assert dx.shape == x.shape


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(8, 40, 33, 37), (3, 130, 170), (2, 7, 5, 9, 11), (4099, 3),
                                   (1, 3, 257, 129),
                                   # >= 2**20 values with C > 64: channels-last reductions keep
                                   # their accumulators in memory (C <= 256: moments too)
                                   (9, 160, 27, 29), (5, 300, 26, 30)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_every_op_on_larger_shapes(dtype, shape, fmt, num_threads):
    # Sizes that span several cache blocks and threads in the kernels.
    torch.set_num_threads(max(2, num_threads))
    x = _make(shape, dtype, fmt, offset=100.0, scale=5.0)
    g = _make(shape, dtype, fmt)
    c = shape[1]
    n = x.numel() // c
    w = (torch.rand(c, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, dtype=torch.float64).to(dtype)
    stats, mean, invstd = _forward(x)
    count, ref_mean, m2 = _ref_moments(x)
    tol = _stats_tol(dtype)
    torch.testing.assert_close(stats[c + 1:].double(), m2, rtol=tol, atol=0)
    torch.testing.assert_close(stats[1:c + 1].double(), ref_mean, rtol=tol, atol=0)
    torch.testing.assert_close(F.sum_ft(x).double(), x.double().sum(dim=_dims(x)), rtol=tol,
                               atol=tol * n)
    sums, gw, gb = F.backward_reduce(g, x, mean, invstd, True, True)
    dx = F.backward_elemt(g, x, mean, invstd, w, sums, stats[:1])
    y_ref, dx_ref, dw_ref, db_ref = _ref_bn_autograd(x, w, b, g)
    _assert_close(F.normalize(x, mean, invstd, w, b), y_ref, dtype, scale=4.0)
    _assert_close(dx, dx_ref, dtype, scale=4.0)
    _assert_close(gw, dw_ref, dtype, scale=math.sqrt(n))
    _assert_close(gb, db_ref, dtype, scale=math.sqrt(n))


# ---- strided inputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda b: b.transpose(2, 3),
    lambda b: b[:, :, ::2],
    lambda b: b[:, 1:],
    lambda b: b[:, :, :1].expand(-1, -1, 4, -1),
], ids=["transposed", "sliced_h", "sliced_c", "expanded"])
def test_every_op_on_strided_input_equals_dense(make):
    x = make(torch.randn(5, 4, 8, 6, dtype=torch.float64) + 3)
    g = make(torch.randn(5, 4, 8, 6, dtype=torch.float64))
    xc, gc = x.contiguous(), g.contiguous()
    c = x.shape[1]
    w, b = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
    torch.testing.assert_close(F.sum_ft(x), F.sum_ft(xc))
    stats, mean, invstd = _forward(x)
    torch.testing.assert_close(stats, F.moments(xc))
    torch.testing.assert_close(F.normalize(x, mean, invstd, w, b),
                               F.normalize(xc, mean, invstd, w, b))
    sums, gw, gb = F.backward_reduce(g, x, mean, invstd, True, True)
    sums_c, gw_c, gb_c = F.backward_reduce(gc, xc, mean, invstd, True, True)
    torch.testing.assert_close((sums, gw, gb), (sums_c, gw_c, gb_c))
    torch.testing.assert_close(F.backward_elemt(g, x, mean, invstd, w, sums, stats[:1]),
                               F.backward_elemt(gc, xc, mean, invstd, w, sums, stats[:1]))
    y_ref, dx_ref, _, _ = _ref_bn_autograd(x, w, b, g)
    _assert_close(F.normalize(x, mean, invstd, w, b), y_ref, torch.float64)
    _assert_close(F.backward_elemt(g, x, mean, invstd, w, sums, stats[:1]), dx_ref,
                  torch.float64)


def test_strided_parameters_are_accepted():
    x = _make((4, 3, 5), torch.float32)
    _, mean, invstd = _forward(x)
    wb = torch.rand(3, 2) + 0.5
    y = F.normalize(x, mean, invstd, wb[:, 0], wb[:, 1])
    y_ref = F.normalize(x, mean, invstd, wb[:, 0].contiguous(), wb[:, 1].contiguous())
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


# ---- a full training step against nn.BatchNorm2d -------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_full_chain_equals_nn_batchnorm2d(fmt):
    c = 6
    bn = torch.nn.BatchNorm2d(c, momentum=0.3, dtype=torch.float64).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
    x = _make((7, c, 5, 9), torch.float64, fmt, offset=4.0, scale=3.0).requires_grad_(True)
    g = _make((7, c, 5, 9), torch.float64, fmt)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    w, b = bn.weight.detach().clone(), bn.bias.detach().clone()

    y_ref = bn(x)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, (x, bn.weight, bn.bias), g)

    xd = x.detach()
    stats = F.moments(xd)
    mean, invstd = F.finalize(stats, bn.eps, "plus", rm, rv, factor=bn.momentum)
    y = F.normalize(xd, mean, invstd, w, b)
    sums, dw, db = F.backward_reduce(g, xd, mean, invstd, True, True)
    dx = F.backward_elemt(g, xd, mean, invstd, w, sums, stats[:1])

    for got, ref in [(y, y_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref),
                     (rm, bn.running_mean), (rv, bn.running_var)]:
        torch.testing.assert_close(got, ref.detach(), rtol=1e-10, atol=1e-10)


def test_synchronised_chain_over_uneven_shares_equals_one_batch_norm():
    # What a synchronised layer does across replicas, done here in one process: local moments,
    # merge, finalize; local grad sums, summed; local dx. Equals one BN over the whole batch.
    c = 3
    x = torch.randn(12, c, 4, 4, dtype=torch.float64) * 2 + 10
    g = torch.randn_like(x)
    w, b = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
    sizes = [5, 0, 6, 1]
    xs, gs = torch.split(x, sizes), torch.split(g, sizes)
    stats = F.merge_moments(torch.stack([F.moments(s) for s in xs]))
    mean, invstd = F.finalize(stats, EPS)
    ys = [F.normalize(s, mean, invstd, w, b) for s in xs]
    red = [F.backward_reduce(d, s, mean, invstd, True, True) for d, s in zip(gs, xs)]
    sums = torch.stack([r[0] for r in red]).sum(0)
    dxs = [F.backward_elemt(d, s, mean, invstd, w, sums, stats[:1]) for d, s in zip(gs, xs)]
    y_ref, dx_ref, dw_ref, db_ref = _ref_bn_autograd(x, w, b, g)
    torch.testing.assert_close(torch.cat(ys), y_ref)
    torch.testing.assert_close(torch.cat(dxs), dx_ref)
    torch.testing.assert_close(torch.stack([r[1] for r in red]).sum(0), dw_ref)
    torch.testing.assert_close(torch.stack([r[2] for r in red]).sum(0), db_ref)


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [torch.int64, torch.int32, torch.uint8, torch.bool,
                                 torch.complex64])
def test_input_dtype_rejected(bad):
    x = torch.zeros(4, 3, 2, dtype=bad)
    for op in (F.moments, F.sum_ft):
        with pytest.raises(TypeError, match="input x"):
            op(x)
    with pytest.raises(TypeError, match="input x"):
        F.normalize(x, torch.zeros(3), torch.ones(3))


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], None, 3.0])
def test_input_must_be_tensor(bad):
    with pytest.raises(TypeError, match="input x must be a torch.Tensor"):
        F.moments(bad)


@pytest.mark.parametrize("shape", [(3,), (), (2, 3, 1, 1, 1, 1)])
def test_input_rank_rejected(shape):
    with pytest.raises(ValueError, match="input x"):
        F.moments(torch.zeros(shape))


def test_meta_tensors_give_shapes_only():
    """The ops are registered with a fake (meta) kernel: meta inputs give meta outputs of the
    right shapes, as torch's own ops do (shape propagation, FakeTensor tracing)."""
    x = torch.zeros(2, 3, 4, device="meta")
    rec = F.moments(x)
    assert rec.device.type == "meta" and rec.shape == (7,) and rec.dtype == torch.float64
    mean, invstd = F.finalize(rec, EPS)
    assert mean.shape == (3,) and invstd.device.type == "meta"
    y = F.normalize(x, mean, invstd)
    assert y.shape == x.shape and y.device.type == "meta"


def test_sparse_input_rejected():
    x = torch.zeros(2, 3).to_sparse()
    with pytest.raises(ValueError, match="input x"):
        F.moments(x)


@pytest.mark.parametrize("name", ["mean", "invstd", "weight", "bias"])
def test_normalize_per_channel_shape_checked(name):
    x = torch.randn(4, 3, 5)
    args = dict(mean=torch.zeros(3, dtype=torch.float64), invstd=torch.ones(3, dtype=torch.float64),
                weight=torch.ones(3), bias=torch.zeros(3))
    args[name] = torch.zeros(4)
    with pytest.raises(ValueError, match=f"{name} must have shape \\(3,\\)"):
        F.normalize(x, **args)
    args[name] = torch.zeros(3, 1)
    with pytest.raises(ValueError, match=name):
        F.normalize(x, **args)


@pytest.mark.parametrize("name", ["mean", "invstd"])
def test_stats_dtype_must_be_float64(name):
    x = torch.randn(4, 3, 5)
    args = dict(mean=torch.zeros(3, dtype=torch.float64), invstd=torch.ones(3, dtype=torch.float64))
    args[name] = args[name].float()  # float32 input still has float64 statistics
    with pytest.raises(TypeError, match=name):
        F.normalize(x, **args)
    xh = x.half()
    args = dict(mean=torch.zeros(3, dtype=torch.float64), invstd=torch.ones(3, dtype=torch.float64))
    args[name] = args[name].half()
    with pytest.raises(TypeError, match=name):
        F.normalize(xh, **args)


@pytest.mark.parametrize("dtype, param_dtype", [(torch.float32, torch.float64),
                                                (torch.float64, torch.float32),
                                                (torch.float16, torch.bfloat16),
                                                (torch.bfloat16, torch.float16),
                                                (torch.float16, torch.float64),
                                                (torch.float32, torch.int64)])
def test_param_dtype_rule(dtype, param_dtype):
    x = torch.randn(4, 3, 5).to(dtype)
    acc = F.STATS_DTYPE
    mean, invstd = torch.zeros(3, dtype=acc), torch.ones(3, dtype=acc)
    p = torch.ones(3).to(param_dtype)
    with pytest.raises(TypeError, match="weight"):
        F.normalize(x, mean, invstd, p, None)
    with pytest.raises(TypeError, match="bias"):
        F.normalize(x, mean, invstd, None, p)
    stats = F.moments(x)
    sums = torch.zeros(6, dtype=acc)
    with pytest.raises(TypeError, match="weight"):
        F.backward_elemt(x, x, mean, invstd, p, sums, stats[:1])
    with pytest.raises(TypeError, match="param_dtype"):
        F.backward_reduce(x, x, mean, invstd, True, True, param_dtype=param_dtype)


def test_weight_and_bias_must_share_dtype():
    x = torch.randn(4, 3, 5).half()
    mean, invstd = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="bias"):
        F.normalize(x, mean, invstd, torch.ones(3), torch.zeros(3).half())


def test_grad_output_checked():
    x = torch.randn(4, 3, 5)
    _, mean, invstd = _forward(x)
    with pytest.raises(ValueError, match="dy"):
        F.backward_reduce(torch.randn(4, 3, 6), x, mean, invstd, True, True)
    with pytest.raises(TypeError, match="dy"):
        F.backward_reduce(torch.randn(4, 3, 5).double(), x, mean, invstd, True, True)
    with pytest.raises(TypeError, match="dy"):
        F.backward_reduce("dy", x, mean, invstd, True, True)
    with pytest.raises(ValueError, match="dy"):
        F.backward_elemt(torch.randn(4, 3, 6), x, mean, invstd, None, torch.zeros(6),
                         torch.ones(1))


def test_backward_elemt_sums_and_count_checked():
    x = torch.randn(4, 3, 5)
    stats, mean, invstd = _forward(x)
    sums, _, _ = F.backward_reduce(x, x, mean, invstd, False, False)
    with pytest.raises(ValueError, match="sums"):
        F.backward_elemt(x, x, mean, invstd, None, sums[:3], stats[:1])
    with pytest.raises(TypeError, match="sums"):
        F.backward_elemt(x, x, mean, invstd, None, sums.float(), stats[:1])
    with pytest.raises(ValueError, match="count"):
        F.backward_elemt(x, x, mean, invstd, None, sums, stats[:2])
    with pytest.raises(TypeError, match="count"):
        F.backward_elemt(x, x, mean, invstd, None, sums, stats[:1].float())
    with pytest.raises(TypeError, match="count"):
        F.backward_elemt(x, x, mean, invstd, None, sums, 60.0)


def test_finalize_checks():
    stats = F.moments(torch.randn(4, 3))
    with pytest.raises(ValueError, match="stats"):
        F.finalize(stats[:6], EPS)
    with pytest.raises(ValueError, match="stats"):
        F.finalize(stats.view(1, 7), EPS)
    with pytest.raises(TypeError, match="stats"):
        F.finalize(stats.half(), EPS)
    with pytest.raises(TypeError, match="stats"):
        F.finalize(stats.tolist(), EPS)
    with pytest.raises(ValueError, match="eps_mode"):
        F.finalize(stats, EPS, "max")
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="eps"):
            F.finalize(stats, bad)
    with pytest.raises(ValueError, match="factor"):
        F.finalize(stats, EPS, running_mean=torch.zeros(3), running_var=torch.ones(3),
                   factor=math.nan)
    with pytest.raises(ValueError, match="running_var"):
        F.finalize(stats, EPS, running_mean=torch.zeros(3))
    with pytest.raises(ValueError, match="running_mean"):
        F.finalize(stats, EPS, running_mean=torch.zeros(4), running_var=torch.ones(4))
    with pytest.raises(TypeError, match="running_var"):
        F.finalize(stats, EPS, running_mean=torch.zeros(3), running_var=torch.ones(3).half())
    with pytest.raises(TypeError, match="stats"):
        F.finalize(stats.float(), EPS, running_mean=torch.zeros(3), running_var=torch.ones(3))
    with pytest.raises(TypeError, match="running_mean"):
        F.finalize(stats, EPS, running_mean=torch.zeros(3, dtype=torch.int64),
                   running_var=torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="running_mean"):
        F.finalize(stats, EPS, running_mean=torch.zeros(3, device="meta"),
                   running_var=torch.ones(3))


def test_merge_moments_checks():
    rec = F.moments(torch.randn(4, 3))
    with pytest.raises(ValueError, match="records"):
        F.merge_moments(rec)  # one record, not (k, 2C+1)
    with pytest.raises(ValueError, match="records"):
        F.merge_moments(torch.zeros(2, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="records"):
        F.merge_moments(torch.stack([rec, rec]).half())
    with pytest.raises(TypeError, match="records"):
        F.merge_moments([])
    with pytest.raises(ValueError, match=r"records\[1\]"):
        F.merge_moments([rec, rec[:5]])
    with pytest.raises(TypeError, match=r"records\[1\]"):
        F.merge_moments([rec, rec.float()])
    with pytest.raises(ValueError, match="k"):
        F.merge_moments(torch.zeros(0, 7, dtype=torch.float64))


def test_mismatched_devices_rejected():
    x = torch.randn(4, 3, 5)
    meta = torch.zeros(3, device="meta", dtype=torch.float64)
    with pytest.raises(ValueError, match="mean is on meta"):
        F.normalize(x, meta, torch.ones(3, dtype=torch.float64))


def test_package_reports_build():
    assert pysbn.__version__ == ops.core_version()
    assert isinstance(ops.built_with_cuda(), bool)


@pytest.mark.skipif(not torch.cuda.is_available() or ops.built_with_cuda(),
                    reason="needs a CUDA device and a pysbn build without CUDA")
def test_cuda_tensor_with_cpu_only_build_raises_clearly():
    x = torch.randn(4, 3, device="cuda")
    with pytest.raises(RuntimeError, match="built without CUDA"):
        F.moments(x)


# ---- CUDA ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a pysbn build with CUDA")
class TestCUDA:
    """Every op on CUDA against the CPU path and against torch's CUDA batch-norm primitives."""

    @pytest.mark.parametrize("fmt", FORMATS)
    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("dtype", ALL_DTYPES)
    def test_forward_ops_match_cpu_and_torch(self, dtype, shape, fmt):
        x = _make(shape, dtype, fmt, offset=2.0, scale=3.0)
        xg = x.cuda()
        c, acc = shape[1], F.STATS_DTYPE
        tol = _stats_tol(dtype) * 10
        n = x.numel() // c
        torch.testing.assert_close(F.sum_ft(xg).cpu(), F.sum_ft(x), rtol=tol, atol=tol * n)
        stats_g, stats = F.moments(xg), F.moments(x)
        assert stats_g.dtype == acc and stats_g.device == xg.device
        torch.testing.assert_close(stats_g.cpu(), stats, rtol=tol, atol=tol * n)
        count, mean, m2 = _ref_moments(x)
        torch.testing.assert_close(stats_g[1:c + 1].cpu().double(), mean, rtol=tol, atol=tol)
        torch.testing.assert_close(stats_g[c + 1:].cpu().double(), m2, rtol=tol, atol=tol * n)
        exact_torch = dtype in (torch.float32, torch.float64)  # torch's ops, same dtypes
        if exact_torch:
            mean_t, invstd_t = torch.batch_norm_stats(xg, EPS)
            mean_g, invstd_g = F.finalize(stats_g, EPS)
            torch.testing.assert_close(mean_g, mean_t.to(acc), rtol=tol, atol=tol)
            torch.testing.assert_close(invstd_g, invstd_t.to(acc), rtol=1e-4, atol=1e-4)
        for param_dtype in _param_dtypes(dtype):
            w = (torch.rand(c, dtype=torch.float64) + 0.5).to(param_dtype)
            b = torch.randn(c, dtype=torch.float64).to(param_dtype)
            mean_g, invstd_g = F.finalize(stats_g, EPS)
            y_g = F.normalize(xg, mean_g, invstd_g, w.cuda(), b.cuda())
            assert _dense_in(y_g, _layout_of(xg))
            mean_c, invstd_c = F.finalize(stats, EPS)
            _assert_close(y_g.cpu(), F.normalize(x, mean_c, invstd_c, w, b), dtype, scale=4.0)
            if exact_torch:
                ref = torch.batch_norm_elemt(xg, w.cuda(), b.cuda(), mean_g, invstd_g, EPS)
                _assert_close(y_g, ref, dtype, scale=4.0)

    @pytest.mark.parametrize("fmt", FORMATS)
    @pytest.mark.parametrize("dtype", ALL_DTYPES)
    def test_merge_and_finalize_match_cpu_and_torch(self, dtype, fmt):
        sizes = [5, 0, 3, 9]
        x = _make((sum(sizes), 4, 6, 5), dtype, fmt, offset=1e3).cuda()
        parts = torch.split(x, sizes)
        records = torch.stack([F.moments(_to_format(p, fmt)) for p in parts])
        merged = F.merge_moments(records)
        tol = _stats_tol(dtype) * 10
        torch.testing.assert_close(merged.cpu(), F.merge_moments(records.cpu()), rtol=tol,
                                   atol=tol)
        torch.testing.assert_close(merged, F.moments(x), rtol=tol, atol=tol)
        rm_g = torch.zeros(4, dtype=merged.dtype, device="cuda")
        rv_g = torch.ones(4, dtype=merged.dtype, device="cuda")
        rm_c, rv_c = rm_g.cpu(), rv_g.cpu()
        for mode in ("plus", "clamp"):
            m_g, i_g = F.finalize(merged, EPS, mode, rm_g, rv_g, 0.1)
            m_c, i_c = F.finalize(merged.cpu(), EPS, mode, rm_c, rv_c, 0.1)
            torch.testing.assert_close((m_g.cpu(), i_g.cpu(), rm_g.cpu(), rv_g.cpu()),
                                       (m_c, i_c, rm_c, rv_c), rtol=tol, atol=tol)
        if dtype in (torch.float32, torch.float64):
            # torch's gather: means and invstds per part, with counts.
            nonempty = [p for p in parts if p.shape[0] > 0]
            ms, ivs = zip(*(torch.batch_norm_stats(_to_format(p, fmt), EPS) for p in nonempty))
            counts = torch.tensor([p.numel() // 4 for p in nonempty], dtype=dtype, device="cuda")
            mean_t, invstd_t = torch.batch_norm_gather_stats_with_counts(
                x, torch.stack(ms), torch.stack(ivs), None, None, 0.1, EPS, counts)
            m_g, i_g = F.finalize(merged, EPS)
            torch.testing.assert_close(m_g, mean_t, rtol=tol, atol=tol)
            torch.testing.assert_close(i_g, invstd_t, rtol=1e-4, atol=1e-4)

    @pytest.mark.parametrize("fmt", FORMATS)
    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("dtype", ALL_DTYPES)
    def test_backward_ops_match_cpu_and_torch(self, dtype, shape, fmt):
        if math.prod(shape) // shape[1] < 2:
            pytest.skip("one value per channel")
        x = _make(shape, dtype, fmt, offset=1.0, scale=2.0)
        g = _make(shape, dtype, fmt)
        xg, gg = x.cuda(), g.cuda()
        c = shape[1]
        n = x.numel() // c
        for param_dtype in _param_dtypes(dtype):
            w = (torch.rand(c, dtype=torch.float64) + 0.5).to(param_dtype)
            b = torch.zeros(c, dtype=param_dtype)
            stats_g, mean_g, invstd_g = _forward(xg)
            sums_g, gw_g, gb_g = F.backward_reduce(gg, xg, mean_g, invstd_g, True, True,
                                                   param_dtype=param_dtype)
            dx_g = F.backward_elemt(gg, xg, mean_g, invstd_g, w.cuda(), sums_g, stats_g[:1])
            assert _dense_in(dx_g, _layout_of(xg))
            # The CPU path with the same statistics.
            mean_c, invstd_c = mean_g.cpu(), invstd_g.cpu()
            sums_c, gw_c, gb_c = F.backward_reduce(g, x, mean_c, invstd_c, True, True,
                                                   param_dtype=param_dtype)
            dx_c = F.backward_elemt(g, x, mean_c, invstd_c, w, sums_c, stats_g[:1].cpu())
            tol = _stats_tol(dtype) * 10
            torch.testing.assert_close(sums_g.cpu(), sums_c, rtol=tol, atol=tol * n)
            _assert_close(gw_g.cpu(), gw_c, param_dtype, scale=math.sqrt(n))
            _assert_close(gb_g.cpu(), gb_c, param_dtype, scale=math.sqrt(n))
            _assert_close(dx_g.cpu(), dx_c, dtype, scale=4.0)
            _, dx_ref, dw_ref, db_ref = _ref_bn_autograd(x, w, b, g)
            xd, gd = x.double(), g.double()
            sum_dy = gd.sum(dim=_dims(x))
            sum_dy_xmu = (gd * (xd - mean_g.cpu().double().view(_bshape(x)))).sum(dim=_dims(x))
            torch.testing.assert_close(sums_g[:c].cpu().double(), sum_dy, rtol=tol, atol=tol * n)
            torch.testing.assert_close(sums_g[c:].cpu().double(), sum_dy_xmu, rtol=tol,
                                       atol=tol * n)
            pd = param_dtype if dtype != torch.float64 else dtype
            _assert_close(gw_g.cpu(), dw_ref, pd, scale=math.sqrt(n))
            _assert_close(gb_g.cpu(), db_ref, pd, scale=math.sqrt(n))
            _assert_close(dx_g.cpu(), dx_ref, dtype, scale=4.0)
            if dtype in (torch.float32, torch.float64) and param_dtype == dtype:
                sdy, sdxmu, gw_t, gb_t = torch.batch_norm_backward_reduce(
                    gg, xg, mean_g, invstd_g, w.cuda(), True, True, True)
                torch.testing.assert_close(sums_g, torch.cat([sdy, sdxmu]), rtol=tol,
                                           atol=tol * n)
                _assert_close(gw_g, gw_t, dtype, scale=math.sqrt(n))
                _assert_close(gb_g, gb_t, dtype, scale=math.sqrt(n))
                count = torch.tensor([n], dtype=torch.int32, device="cuda")
                dx_t = torch.batch_norm_backward_elemt(gg, xg, mean_g, invstd_g, w.cuda(),
                                                       sdy, sdxmu, count)
                _assert_close(dx_g, dx_t, dtype, scale=4.0)

    def test_no_host_synchronisation(self):
        x = _make((8, 4, 6, 6), torch.float32, offset=3.0).cuda()
        g = torch.randn_like(x)
        w, b = torch.ones(4, device="cuda"), torch.zeros(4, device="cuda")
        rm, rv = torch.zeros(4, device="cuda"), torch.ones(4, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            stats = F.merge_moments(torch.stack([F.moments(x[:3]), F.moments(x[3:])]))
            mean, invstd = F.finalize(stats, EPS, "plus", rm, rv, 0.1)
            F.normalize(x, mean, invstd, w, b)
            F.sum_ft(x)
            sums, gw, gb = F.backward_reduce(g, x, mean, invstd, True, True)
            F.backward_elemt(g, x, mean, invstd, w, sums, stats[:1])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()

    def test_runs_on_the_current_stream(self):
        x = _make((64, 16, 32, 32), torch.float32, offset=5.0).cuda()
        ref = F.moments(x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            y = x * 2.0  # enqueued on the side stream; moments must run after it on that stream
            stats = F.moments(y)
            mean, invstd = F.finalize(stats, EPS)
        torch.cuda.current_stream().wait_stream(side)
        torch.testing.assert_close(stats[1:17], ref[1:17] * 2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats[17:], ref[17:] * 4, rtol=1e-5, atol=1e-2)

    @pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
    def test_second_device(self):
        x = _make((6, 3, 5, 5), torch.float64, offset=1.0)
        x1 = x.to("cuda:1")
        stats = F.moments(x1)
        assert stats.device == x1.device
        torch.testing.assert_close(stats.cpu(), F.moments(x))
        mean, invstd = F.finalize(stats, EPS)
        torch.testing.assert_close(F.normalize(x1, mean, invstd).cpu(),
                                   F.normalize(x, mean.cpu(), invstd.cpu()))

    def test_mixed_devices_rejected(self):
        x = torch.randn(4, 3, 5, device="cuda")
        with pytest.raises(ValueError, match="mean is on cpu"):
            F.normalize(x, torch.zeros(3), torch.ones(3, device="cuda"))
        with pytest.raises(ValueError, match="dy"):
            F.backward_reduce(x.cpu(), x, torch.zeros(3, device="cuda"),
                              torch.ones(3, device="cuda"), True, True)
