# SPDX-License-Identifier: MIT
"""Property tests (hypothesis): the tensor ops and the layers against a float64 reference.

Random small shapes (1-D to 3-D batch norm inputs, zero-size dims included where legal), random
strides (contiguous, channels-last, permuted storage, sliced / stepped views, storage offsets),
dtypes (float32, float64, float16, bfloat16), offsets far from zero, and random replica splits
(the merge of the moments of the parts equals the moments of the whole; DataParallel replicas
equal one nn.BatchNorm over the whole batch).

The reference is computed in float64 by torch from the very values the op sees (inputs rounded
to their dtype first), so the tolerances measure pysbn's arithmetic only.
"""

import copy
import threading

import torch
import torch.nn.functional as tF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pysbn
from pysbn import functional as F
from pysbn.replicate import parallel_apply

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# relative tolerance of values computed from inputs of each dtype (accumulation in float for
# the three narrower dtypes, float64 statistics everywhere)
RTOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
# tolerance of an output rounded to the dtype
OUT_TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FORMATS = ["contiguous", "channels_last", "permuted", "sliced", "offset"]
EPS = 1e-5


# ---- strategies ---------------------------------------------------------------------------------

@st.composite
def shapes(draw, min_count=0, max_side=5):
    """(N, C, *spatial) with 0 to 3 spatial dims; N * L >= min_count."""
    spatial = draw(st.lists(st.integers(1, max_side), min_size=0, max_size=3))
    c = draw(st.integers(1, 6))
    l = 1
    for s in spatial:
        l *= s
    n_min = -(-min_count // l) if min_count else 0
    n = draw(st.integers(n_min, max(n_min, 6)))
    return (n, c, *spatial)


def make_x(shape, dtype, fmt, seed, offset=0.0, scale=1.0):
    """A tensor of ``shape`` and ``dtype`` laid out as ``fmt`` (values from ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    dim = len(shape)

    def rnd(s):
        return (torch.randn(s, generator=g, dtype=torch.float64) * scale + offset).to(dtype)

    if fmt == "contiguous" or dim < 3 and fmt == "channels_last":
        return rnd(shape)
    if fmt == "channels_last":
        return rnd(shape).movedim(1, -1).contiguous().movedim(-1, 1)
    if fmt == "permuted":  # storage in a random order of the dims
        perm = torch.randperm(dim, generator=g).tolist()
        base = rnd([shape[p] for p in perm])
        inv = [perm.index(i) for i in range(dim)]
        return base.permute(inv)
    if fmt == "sliced":  # every other element along a random dim
        d = int(torch.randint(dim, (1,), generator=g))
        big = list(shape)
        big[d] *= 2
        return rnd(big)[(slice(None),) * d + (slice(None, None, 2),)]
    if fmt == "offset":  # a view starting inside its storage, with a gap after each sample
        big = list(shape)
        big[0] += 1
        if dim >= 2:
            big[1] += 1
        return rnd(big)[1:, : shape[1]]
    raise AssertionError(fmt)


def _dims(x):
    return [0] + list(range(2, x.dim()))


def _bshape(x):
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def ref_moments(x):
    xd = x.double()
    count = xd.numel() // xd.shape[1] if xd.shape[1] else 0
    if count == 0:
        z = torch.zeros(xd.shape[1], dtype=torch.float64)
        return 0, z, z
    mean = xd.mean(_dims(xd))
    m2 = ((xd - mean.view(_bshape(xd))) ** 2).sum(_dims(xd))
    return count, mean, m2


def check_record(rec, x, rtol):
    count, mean, m2 = ref_moments(x)
    c = x.shape[1]
    assert rec.dtype == torch.float64 and rec.shape == (2 * c + 1,)
    assert rec[0].item() == count
    if count:
        xd = x.double()
        scale = xd.abs().amax(_dims(xd)) + 1e-30
        std = (m2 / count).sqrt()
        torch.testing.assert_close(rec[1:c + 1], mean, rtol=0, atol=float((scale * rtol).max()))
        # m2 relative to the spread and to the magnitude (a float mean at offset M is off by
        # about ulp(M); the variance by that much times the std)
        tol = (rtol * (m2 + count * scale * std + count * (scale * rtol) ** 2)).max()
        torch.testing.assert_close(rec[c + 1:], m2, rtol=0, atol=float(tol) + 1e-300)


common = dict(shape=shapes(), dtype=st.sampled_from(DTYPES), fmt=st.sampled_from(FORMATS),
              seed=st.integers(0, 2**31 - 1))


# ---- tensor ops ---------------------------------------------------------------------------------

@settings(max_examples=60, **SETTINGS)
@given(offset=st.sampled_from([0.0, 3.0, -100.0, 1e4]), **common)
def test_moments_matches_reference(shape, dtype, fmt, seed, offset):
    if dtype in (torch.float16, torch.bfloat16) and abs(offset) > 100:
        offset = 10.0  # half cannot hold 1e4 with a unit spread
    x = make_x(shape, dtype, fmt, seed, offset=offset)
    rec = F.moments(x)
    check_record(rec, x, RTOL[dtype])
    # sum_ft is the per-channel sum
    count, mean, _ = ref_moments(x)
    if count:
        torch.testing.assert_close(F.sum_ft(x), mean * count, rtol=RTOL[dtype] * 4,
                                   atol=RTOL[dtype] * float(x.double().abs().sum()) + 1e-12)


@settings(max_examples=60, **SETTINGS)
@given(k=st.integers(1, 4), cuts=st.lists(st.integers(0, 100), min_size=3, max_size=3),
       offset=st.sampled_from([0.0, 1e4]), **common)
def test_merge_of_random_splits_is_moments_of_whole(shape, dtype, fmt, seed, k, cuts, offset):
    if dtype != torch.float64:
        dtype = torch.float32
    x = make_x(shape, dtype, fmt, seed, offset=offset)
    n = shape[0]
    bounds = sorted(c * n // 100 for c in cuts[:k - 1])
    parts = [x[a:b] for a, b in zip([0] + bounds, bounds + [n])]
    assert sum(p.shape[0] for p in parts) == n
    records = [F.moments(p) for p in parts]
    merged = F.merge_moments(torch.stack(records))
    whole = F.moments(x)
    assert merged[0].item() == whole[0].item()
    c = shape[1]
    if whole[0].item():
        check_record(merged, x, RTOL[dtype])
        # exact merge: the parts' rounding only, never the seed's catastrophic cancellation
        torch.testing.assert_close(merged[1:c + 1], whole[1:c + 1], rtol=1e-12,
                                   atol=RTOL[dtype] * (abs(offset) + 10))
    # the sequence form of merge_moments is the stacked form
    torch.testing.assert_close(F.merge_moments(records), merged, rtol=0, atol=0)


@settings(max_examples=40, **SETTINGS)
@given(shape=shapes(min_count=2), fmt=st.sampled_from(FORMATS), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(DTYPES), eps_mode=st.sampled_from(["plus", "clamp"]),
       factor=st.sampled_from([0.0, 0.1, 1.0, 0.37]), affine=st.booleans())
def test_forward_ops_match_reference(shape, fmt, seed, dtype, eps_mode, factor, affine):
    x = make_x(shape, dtype, fmt, seed, offset=2.0, scale=3.0)
    c = shape[1]
    g = torch.Generator().manual_seed(seed + 1)
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = torch.randn(c, generator=g, dtype=torch.float64).to(pdt) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64).to(pdt) if affine else None
    rm = torch.randn(c, generator=g, dtype=torch.float64).to(pdt)
    rv = torch.rand(c, generator=g, dtype=torch.float64).to(pdt) + 0.5
    rm0, rv0 = rm.double().clone(), rv.double().clone()
    stats = F.moments(x)
    mean, invstd = F.finalize(stats, EPS, eps_mode, rm, rv, factor)
    count, rmean, m2 = ref_moments(x)
    var = m2 / count
    rinv = 1 / (var + EPS).sqrt() if eps_mode == "plus" else 1 / var.clamp_min(EPS).sqrt()
    tol = RTOL[dtype] * 10
    torch.testing.assert_close(mean, rmean, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(invstd, rinv, rtol=tol * 10, atol=0)
    ptol = max(tol * 10, OUT_TOL[pdt])
    torch.testing.assert_close(rm.double(), (1 - factor) * rm0 + factor * rmean, rtol=ptol,
                               atol=ptol)
    torch.testing.assert_close(rv.double(), (1 - factor) * rv0 + factor * m2 / (count - 1),
                               rtol=ptol, atol=ptol)
    y = F.normalize(x, mean, invstd, w, b)
    assert y.shape == x.shape and y.dtype == x.dtype
    want = (x.double() - mean.view(_bshape(x))) * invstd.view(_bshape(x))
    if affine:
        want = want * w.double().view(_bshape(x)) + b.double().view(_bshape(x))
    atol = OUT_TOL[dtype] * (1 + float(want.abs().max()))
    torch.testing.assert_close(y.double(), want, rtol=OUT_TOL[dtype], atol=atol)


@settings(max_examples=40, **SETTINGS)
@given(shape=shapes(min_count=2), fmt=st.sampled_from(FORMATS),
       dy_fmt=st.sampled_from(FORMATS), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float64]), affine=st.booleans(),
       k=st.integers(1, 3))
def test_backward_ops_match_autograd(shape, fmt, dy_fmt, seed, dtype, affine, k):
    """backward_reduce + (sum over replica splits) + backward_elemt == float64 autograd of the
    training-mode batch norm over the whole batch."""
    x = make_x(shape, dtype, fmt, seed, offset=1.0)
    dy = make_x(shape, dtype, dy_fmt, seed + 7)
    c = shape[1]
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) if affine else None
    # reference: autograd in float64 from the same rounded values
    xr = x.double().requires_grad_(True)
    wr = (w.double() if affine else torch.ones(c, dtype=torch.float64)).requires_grad_(True)
    br = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    yr = tF.batch_norm(xr, None, None, wr, br, training=True, eps=EPS)
    yr.backward(dy.double())
    # pysbn: the whole batch's statistics, the backward sums of k parts summed (as replicas do)
    stats = F.moments(x)
    mean, invstd = F.finalize(stats, EPS)
    n = shape[0]
    cuts = sorted(int(v) for v in torch.randint(0, n + 1, (k - 1,), generator=g))
    total = torch.zeros(2 * c, dtype=torch.float64)
    gw = torch.zeros(c, dtype=torch.float64)
    gb = torch.zeros(c, dtype=torch.float64)
    for a, b in zip([0] + cuts, cuts + [n]):
        sums, pw, pb = F.backward_reduce(dy[a:b], x[a:b], mean, invstd)
        total += sums
        gw += pw.double()
        gb += pb.double()
    whole, _, _ = F.backward_reduce(dy, x, mean, invstd, False, False)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    scale = float(dy.double().abs().sum(_dims(dy)).max()) + 1
    torch.testing.assert_close(total, whole, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(gb, br.grad, rtol=tol, atol=tol * scale)
    if affine:
        torch.testing.assert_close(gw, wr.grad, rtol=tol, atol=tol * scale)
    dx = F.backward_elemt(dy, x, mean, invstd, w, total, stats[:1])
    assert dx.shape == x.shape and dx.dtype == x.dtype
    dtol = 1e-9 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(dx.double(), xr.grad, rtol=dtol,
                               atol=dtol * (1 + float(xr.grad.abs().max())))


# ---- layers ---------------------------------------------------------------------------------------

SYNC = {1: pysbn.SynchronizedBatchNorm1d, 2: pysbn.SynchronizedBatchNorm2d,
        3: pysbn.SynchronizedBatchNorm3d}
PLAIN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _kind(shape):
    return max(1, len(shape) - 2)


@settings(max_examples=40, **SETTINGS)
@given(shape=shapes(min_count=2, max_side=4), fmt=st.sampled_from(FORMATS),
       seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.float64]),
       train=st.booleans(), affine=st.booleans(), momentum=st.sampled_from([0.1, None, 1.0]),
       steps=st.integers(1, 2))
def test_layer_matches_float64_batchnorm(shape, fmt, seed, dtype, train, affine, momentum,
                                         steps):
    kind = _kind(shape)  # (N, C) and (N, C, L) are BatchNorm1d inputs
    sync = SYNC[kind](shape[1], affine=affine, momentum=momentum).to(dtype).train(train)
    plain = PLAIN[kind](shape[1], affine=affine, momentum=momentum).double().train(train)
    if affine:
        g = torch.Generator().manual_seed(seed + 3)
        with torch.no_grad():
            w = torch.randn(shape[1], generator=g, dtype=torch.float64)
            sync.weight.copy_(w)
            plain.weight.copy_(sync.weight.double())
    for step in range(steps):
        x = make_x(shape, dtype, fmt, seed + step, offset=5.0)
        xs = x.detach().requires_grad_(True)
        xr = x.double().requires_grad_(True)
        dy = make_x(shape, torch.float64, "contiguous", seed + 100 + step)
        y, yr = sync(xs), plain(xr)
        tol = 1e-9 if dtype == torch.float64 else 5e-5
        torch.testing.assert_close(y.double(), yr, rtol=tol, atol=tol * 10)
        y.backward(dy.to(dtype))
        yr.backward(dy)
        torch.testing.assert_close(xs.grad.double(), xr.grad, rtol=tol * 10,
                                   atol=tol * 10 * (1 + float(xr.grad.abs().max())))
        if affine:
            for a, b in ((sync.weight.grad, plain.weight.grad),
                         (sync.bias.grad, plain.bias.grad)):
                torch.testing.assert_close(a.double(), b, rtol=tol * 10,
                                           atol=tol * 10 * (1 + float(b.abs().max())))
            sync.zero_grad()
            plain.zero_grad()
    torch.testing.assert_close(sync.running_mean.double(), plain.running_mean, rtol=tol,
                               atol=tol * 10)
    torch.testing.assert_close(sync.running_var.double(), plain.running_var, rtol=tol * 10,
                               atol=tol * 10)
    assert int(sync.num_batches_tracked) == int(plain.num_batches_tracked)


@settings(max_examples=12, **SETTINGS)
@given(shape=shapes(min_count=2, max_side=3), fmt=st.sampled_from(FORMATS),
       seed=st.integers(0, 2**31 - 1), k=st.integers(2, 3),
       cuts=st.lists(st.integers(0, 100), min_size=2, max_size=2))
def test_replica_splits_match_one_batchnorm(shape, fmt, seed, k, cuts):
    """k DataParallel replicas (CPU protocol, through parallel_apply) over a random split of the
    batch, some parts possibly empty, equal one nn.BatchNorm over the whole batch (float64)."""
    kind = _kind(shape)
    c = shape[1]
    pysbn.set_sync_timeout(20)
    try:
        sync = SYNC[kind](c).double()
        plain = PLAIN[kind](c).double()
        reps = [sync] + [copy.deepcopy(sync) for _ in range(k - 1)]
        groups = pysbn.execute_replication_callbacks(reps)
        x = make_x(shape, torch.float64, fmt, seed, offset=-3.0)
        n = shape[0]
        bounds = sorted(v * n // 100 for v in cuts[:k - 1])
        xs = [x[a:b].detach().requires_grad_(True)
              for a, b in zip([0] + bounds, bounds + [n])]
        dy = make_x(shape, torch.float64, "contiguous", seed + 1)
        dys = [dy[a:b] for a, b in zip([0] + bounds, bounds + [n])]
        out = {}

        def forward():
            out["ys"] = parallel_apply(reps, xs, groups=groups)

        t = threading.Thread(target=forward, daemon=True)
        t.start()
        t.join(30)
        assert not t.is_alive(), "parallel_apply hung"
        ys = out["ys"]
        errors = []

        def backward(i):
            try:
                ys[i].backward(dys[i])
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=backward, args=(i,), daemon=True) for i in range(k)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
            assert not th.is_alive(), "backward hung"
        assert not errors, errors
        xr = x.detach().clone().requires_grad_(True)
        yr = plain(xr)
        yr.backward(dy)
        torch.testing.assert_close(torch.cat(ys), yr)
        torch.testing.assert_close(torch.cat([p.grad for p in xs]), xr.grad)
        torch.testing.assert_close(sum(r.weight.grad for r in reps), plain.weight.grad)
        torch.testing.assert_close(sum(r.bias.grad for r in reps), plain.bias.grad)
        torch.testing.assert_close(sync.running_mean, plain.running_mean)
        torch.testing.assert_close(sync.running_var, plain.running_var)
    finally:
        pysbn.set_sync_timeout(None)


@settings(max_examples=20, **SETTINGS)
@given(shape=shapes(min_count=2, max_side=4), fmt=st.sampled_from(FORMATS),
       seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_layer_half_inputs_match_reference(shape, fmt, seed, dtype):
    """float16/bfloat16 input with float32 parameters: the output equals the float64
    computation on the same (rounded) input, to the output dtype's rounding."""
    kind = _kind(shape)
    sync = SYNC[kind](shape[1])
    x = make_x(shape, dtype, fmt, seed, offset=1.0)
    y = sync(x)
    assert y.dtype == dtype
    count, mean, m2 = ref_moments(x)
    want = (x.double() - mean.view(_bshape(x))) / (m2 / count + EPS).sqrt().view(_bshape(x))
    torch.testing.assert_close(y.double(), want, rtol=OUT_TOL[dtype],
                               atol=OUT_TOL[dtype] * (1 + float(want.abs().max())))
    torch.testing.assert_close(sync.running_mean.double(), 0.1 * mean, rtol=1e-5, atol=1e-6)
