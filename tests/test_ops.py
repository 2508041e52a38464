# SPDX-License-Identifier: MIT
"""The op set registered with torch (torch.ops.pysbn): torch.library.opcheck for every op
(schema and declared mutations, fake kernel, autograd registration, AOT dispatch with static
and dynamic shapes), gradcheck of the ops that are differentiable on their own, and the layers'
eager route (ops.trusted) against the registered ops."""

import pytest
import torch

from pysbn import ops

F64 = torch.float64


def _input(dtype, fmt, shape=(4, 3, 5, 6)):
    torch.manual_seed(1)
    x = (torch.randn(shape, dtype=F64) * 2 + 1).to(dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif fmt == "strided":
        x = x.transpose(2, 3)
    return x


def _params(dtype, c=3):
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return torch.rand(c, dtype=pdt) + 0.5, torch.randn(c, dtype=pdt)


def _cases(dtype, fmt):
    x = _input(dtype, fmt)
    w, b = _params(dtype)
    c = x.shape[1]
    rec = ops.moments(x)
    stats = ops.finalize(rec, 1e-5, 0, None, None, None, 0.1)
    dy = torch.randn(x.shape, dtype=F64).to(dtype)
    run = lambda: (torch.zeros(c, dtype=w.dtype), torch.ones(c, dtype=w.dtype),  # noqa: E731
                   torch.zeros((), dtype=torch.int64))
    return {
        "sum_ft": (x,),
        "moments": (x,),
        "merge_moments": (torch.stack([rec, ops.moments(x[:1])]),),
        "finalize": (rec, 1e-5, 1, *run(), None),
        "normalize": (x, stats, w, b, ops.ACTIVATIONS["identity"], 0.01),
        "batch_norm_forward": (x, w, b, None, 1e-5, 0, 0, 0.01, *run(), 0.1),
        "batch_norm_forward_record": (x, w, b, rec, 1e-5, 1, 0, 0.01, *run(), None),
        "backward_reduce": (dy, x, stats, w, b, 0, 0.01, None),
        "backward_elemt": (dy, x, stats, w, b, torch.randn(2 * c, dtype=F64), 1e-5, 0, 0, 0.01),
        "batch_norm_backward": (dy, x, stats, w, b, 1e-5, 1, 0, 0.01, [True, True, False]),
    }


@pytest.mark.parametrize("dtype,fmt", [(F64, "contiguous"), (torch.float32, "channels_last"),
                                       (torch.bfloat16, "strided"), (torch.float16, "contiguous")],
                         ids=["f64", "f32-channels_last", "bf16-strided", "f16"])
@pytest.mark.parametrize("name", list(_cases(F64, "contiguous")))
def test_opcheck(name, dtype, fmt):
    args = _cases(dtype, fmt)[name]
    op = getattr(torch.ops.pysbn, name.replace("_record", "")).default
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("name", ["sum_ft", "moments", "merge_moments", "normalize"])
def test_differentiable_ops_gradcheck(name):
    """Autograd of the ops that are differentiable on their own, against finite differences."""
    torch.manual_seed(2)
    x = (torch.randn(3, 2, 4, dtype=F64) + 1).requires_grad_()
    if name == "sum_ft":
        fn, inputs = ops.sum_ft, (x,)
    elif name == "moments":
        fn, inputs = (lambda t: ops.moments(t)[1:]), (x,)  # the count is not differentiable
    elif name == "merge_moments":
        # counts too (all records non-empty), then means and m2 with an empty record among them
        recs = torch.stack([ops.moments(x.detach()[:1]), ops.moments(x.detach()[1:] * 3 + 2)])
        assert torch.autograd.gradcheck(ops.merge_moments, (recs.requires_grad_(),), eps=1e-6,
                                        atol=1e-6)
        recs = torch.stack([ops.moments(x.detach()[:1]), ops.moments(x.detach()[1:] * 3),
                            ops.moments(x.detach()[:0])])
        counts = recs[:, :1]
        fn = lambda rest: ops.merge_moments(torch.cat((counts, rest), dim=1))  # noqa: E731
        inputs = (recs[:, 1:].clone().requires_grad_(),)
    else:
        stats = ops.finalize(ops.moments(x.detach()), 1e-5, 0, None, None, None, 0.1)
        stats = stats.clone().requires_grad_()
        w = (torch.rand(2, dtype=F64) + 0.5).requires_grad_()
        b = torch.randn(2, dtype=F64, requires_grad=True)
        fn, inputs = (lambda t, s, ww, bb: ops.normalize(t, s, ww, bb)), (x, stats, w, b)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_moments_gradient_is_the_batch_statistics_gradient():
    """d(mean, var)/dx through moments equals torch's var_mean autograd."""
    torch.manual_seed(3)
    x = torch.randn(5, 3, 7, dtype=F64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    rec = ops.moments(x)
    g = torch.randn(6, dtype=F64)
    ((rec[1:4] * g[:3]).sum() + (rec[4:] / rec[0] * g[3:]).sum()).backward()
    var, mean = torch.var_mean(xr, dim=(0, 2), correction=0)
    ((mean * g[:3]).sum() + (var * g[3:]).sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("dtype,fmt", [(F64, "contiguous"), (torch.float32, "channels_last"),
                                       (torch.bfloat16, "strided")],
                         ids=["f64", "f32-channels_last", "bf16-strided"])
def test_trusted_route_is_the_registered_op(dtype, fmt):
    """ops.trusted (the layers' eager route: no dispatcher, no checks) gives the bits of the
    registered ops, mutations included."""
    for name, args in _cases(dtype, fmt).items():
        name = name.replace("_record", "")
        clone = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        a = getattr(torch.ops.pysbn, name).default(*args)
        b = getattr(ops.trusted, name)(*clone)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(u, v), name
            assert u.stride() == v.stride(), name
        for u, v in zip(args, clone):
            if isinstance(u, torch.Tensor):
                assert torch.equal(u, v), f"{name}: mutated arguments differ"


def test_trusted_route_goes_through_the_dispatcher_under_modes():
    """Under a dispatch mode (here FakeTensorMode) the layers' route calls the registered op,
    so the mode sees it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(4, 3, 5))
        rec = ops.trusted.moments(x)
        y, stats = ops.trusted.batch_norm_forward(x, None, None, None, 1e-5, 0, 0, 0.01, None,
                                                  None, None, 0.1)
    assert rec.shape == (7,) and y.shape == x.shape and stats.shape == (10,)


def test_ops_check_their_arguments():
    x = torch.randn(4, 3, 5)
    with pytest.raises(TypeError, match="batch_norm_forward: weight has dtype"):
        ops.batch_norm_forward(x, torch.ones(3, dtype=F64), None, None, 1e-5, 0, 0, 0.01, None,
                               None, None, 0.1)
    with pytest.raises(ValueError, match="batch_norm_forward: record must have shape"):
        ops.batch_norm_forward(x, None, None, torch.zeros(5, dtype=F64), 1e-5, 0, 0, 0.01, None,
                               None, None, 0.1)
    with pytest.raises(ValueError, match="act must be one of"):
        ops.normalize(x, torch.zeros(10, dtype=F64), None, None, 42, 0.01)
    with pytest.raises(ValueError, match="momentum None .* needs num_batches_tracked"):
        ops.finalize(ops.moments(x), 1e-5, 0, torch.zeros(3), torch.ones(3), None, None)
    with pytest.raises(TypeError, match="num_batches_tracked must be one int64"):
        ops.finalize(ops.moments(x), 1e-5, 0, torch.zeros(3), torch.ones(3),
                     torch.zeros(2, dtype=torch.int64), 0.1)
    with pytest.raises(ValueError, match="sums must have shape"):
        ops.backward_elemt(x, x, torch.zeros(10, dtype=F64), None, None, torch.zeros(5, dtype=F64),
                           1e-5, 0)


def test_finalize_counts_and_cumulative_average():
    """num_batches_tracked counts every call, the cumulative factor is 1/count after the
    increment (nn.BatchNorm's momentum=None), and a count of 0 leaves the running stats."""
    x = torch.randn(6, 2, 3, dtype=F64)
    rm, rv, nbt = torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64), torch.tensor(2)
    ops.finalize(ops.moments(x), 1e-5, 0, rm, rv, nbt, None)
    var, mean = torch.var_mean(x, dim=(0, 2), correction=1)
    assert int(nbt) == 3
    torch.testing.assert_close(rm, mean / 3)
    torch.testing.assert_close(rv, (2 + var) / 3)
    before = rm.clone(), rv.clone()
    ops.finalize(ops.moments(x[:0]), 1e-5, 0, rm, rv, nbt, None)
    assert int(nbt) == 4 and torch.equal(rm, before[0]) and torch.equal(rv, before[1])
