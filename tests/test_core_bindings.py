# SPDX-License-Identifier: MIT
"""pysbn._core: the raw bindings (build info, enum constants, pointer calls, error mapping)."""

import importlib.metadata
import threading

import pytest
import torch

import pysbn
from pysbn import _core

TORCH_DTYPES = {
    _core.DTYPE_FLOAT32: torch.float32,
    _core.DTYPE_FLOAT64: torch.float64,
    _core.DTYPE_FLOAT16: torch.float16,
    _core.DTYPE_BFLOAT16: torch.bfloat16,
}


def _ref_moments(x):
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.double(), dim=dims, correction=0)
    count = x.numel() // x.shape[1]
    return count, mean, var * count


def _geometry(x, layout=_core.LAYOUT_CHANNEL_MAJOR):
    l = 1
    for s in x.shape[2:]:
        l *= s
    return (x.shape[0], x.shape[1], l, layout)


# ---- build information -------------------------------------------------------------------------

def test_version_matches_package_metadata():
    assert _core.version() == pysbn.__version__ == importlib.metadata.version("pysbn")
    assert len(_core.version().split(".")) == 3


def test_build_flags_reported():
    assert isinstance(_core.built_with_cuda(), bool)
    assert isinstance(_core.built_with_openmp(), bool)
    archs = _core.cuda_architectures()
    assert isinstance(archs, str)
    assert (archs != "") == _core.built_with_cuda()
    print(f"built_with_cuda={_core.built_with_cuda()} built_with_openmp="
          f"{_core.built_with_openmp()} cuda_architectures={archs!r}")


def test_one_openmp_runtime_in_process():
    # pysbn imports torch before _core, so the core binds to torch's libgomp.so.1 (same soname):
    # one OpenMP runtime, one thread pool.
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "libgomp" in line}
    except OSError:
        pytest.skip("no /proc/self/maps on this platform")
    assert len(libs) <= 1, libs


def test_enum_constants_match_header():
    assert (_core.DTYPE_FLOAT32, _core.DTYPE_FLOAT64, _core.DTYPE_FLOAT16,
            _core.DTYPE_BFLOAT16) == (0, 1, 2, 3)
    assert (_core.LAYOUT_CHANNEL_MAJOR, _core.LAYOUT_CHANNELS_LAST) == (0, 1)
    assert (_core.EPS_PLUS, _core.EPS_CLAMP) == (0, 1)


@pytest.mark.parametrize("code", sorted(TORCH_DTYPES))
def test_acc_dtype_and_dtype_size(code):
    dtype = TORCH_DTYPES[code]
    assert _core.dtype_size(code) == torch.empty((), dtype=dtype).element_size()
    expected_acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert TORCH_DTYPES[_core.acc_dtype(code)] == expected_acc


def test_stub_lists_every_binding():
    import pathlib
    stub = pathlib.Path(pysbn.__file__).with_name("_core.pyi")
    if not stub.exists():
        pytest.skip("stub not installed")
    text = stub.read_text()
    for name in _core.__all__:
        assert name in text, name


# ---- pointer-level calls ------------------------------------------------------------------------

@pytest.mark.parametrize("code", sorted(TORCH_DTYPES))
def test_cpu_moments_raw_pointers(code):
    x = (torch.randn(6, 5, 7, dtype=torch.float64) + 3).to(TORCH_DTYPES[code])
    acc = TORCH_DTYPES[_core.acc_dtype(code)]
    stats = torch.empty(2 * 5 + 1, dtype=torch.float64)  # statistics are float64 for every dtype
    _core.cpu_moments(x.data_ptr(), code, _geometry(x), stats.data_ptr(), 2)
    count, mean, m2 = _ref_moments(x)
    tol = 1e-12 if acc == torch.float64 else 2e-6
    assert stats[0].item() == count
    torch.testing.assert_close(stats[1:6].double(), mean, rtol=tol, atol=tol)
    torch.testing.assert_close(stats[6:].double(), m2, rtol=tol, atol=tol * count)


def test_cpu_moments_channels_last_geometry():
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    stats = torch.empty(7, dtype=torch.float64)
    _core.cpu_moments(x.data_ptr(), _core.DTYPE_FLOAT64, _geometry(x, _core.LAYOUT_CHANNELS_LAST),
                      stats.data_ptr(), 1)
    count, mean, m2 = _ref_moments(x)
    torch.testing.assert_close(stats, torch.cat([torch.tensor([float(count)], dtype=torch.float64),
                                                 mean, m2]))


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_cpu_results_do_not_depend_on_thread_count(threads):
    x = torch.randn(8, 4, 33, 17) * 3 + 100
    ref = torch.empty(9, dtype=torch.float64)
    _core.cpu_moments(x.data_ptr(), _core.DTYPE_FLOAT32, _geometry(x), ref.data_ptr(), 1)
    got = torch.empty(9, dtype=torch.float64)
    _core.cpu_moments(x.data_ptr(), _core.DTYPE_FLOAT32, _geometry(x), got.data_ptr(), threads)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


def test_concurrent_calls_from_python_threads():
    # The wrappers release the GIL; concurrent calls on separate buffers must not interfere.
    xs = [torch.randn(16, 8, 64, dtype=torch.float64) + i for i in range(4)]
    outs = [torch.empty(17, dtype=torch.float64) for _ in xs]
    errors = []

    def work(i):
        try:
            for _ in range(20):
                _core.cpu_moments(xs[i].data_ptr(), _core.DTYPE_FLOAT64, _geometry(xs[i]),
                                  outs[i].data_ptr(), 1)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for x, out in zip(xs, outs):
        count, mean, m2 = _ref_moments(x)
        torch.testing.assert_close(out[1:9], mean)
        torch.testing.assert_close(out[9:], m2)


# ---- errors: std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError ------------

def test_bad_dtype_code_raises_value_error():
    x = torch.randn(2, 3)
    out = torch.empty(7, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        _core.cpu_moments(x.data_ptr(), 7, _geometry(x), out.data_ptr(), 1)


def test_bad_layout_raises_value_error():
    x = torch.randn(2, 3)
    out = torch.empty(7, dtype=torch.float64)
    with pytest.raises(ValueError, match="layout"):
        _core.cpu_moments(x.data_ptr(), _core.DTYPE_FLOAT32, (2, 3, 1, 5), out.data_ptr(), 1)


def test_negative_geometry_raises_value_error():
    out = torch.empty(7, dtype=torch.float64)
    with pytest.raises(ValueError, match="geometry"):
        _core.cpu_moments(0, _core.DTYPE_FLOAT32, (-1, 3, 1, 0), out.data_ptr(), 1)


def test_bad_thread_count_raises_value_error():
    x = torch.randn(2, 3)
    out = torch.empty(7, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_threads"):
        _core.cpu_moments(x.data_ptr(), _core.DTYPE_FLOAT32, _geometry(x), out.data_ptr(), 0)


def test_null_pointer_raises_value_error():
    out = torch.empty(7, dtype=torch.float64)
    with pytest.raises(ValueError, match="x"):
        _core.cpu_moments(0, _core.DTYPE_FLOAT32, (2, 3, 1, 0), out.data_ptr(), 1)


def test_bad_param_dtype_raises_value_error():
    x = torch.randn(2, 3)
    mean, invstd = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = torch.empty(2, 3)
    with pytest.raises(ValueError, match="param_dtype"):
        _core.cpu_normalize(x.data_ptr(), _core.DTYPE_FLOAT32, _geometry(x), mean.data_ptr(),
                            invstd.data_ptr(), 0, 0, _core.DTYPE_FLOAT64, y.data_ptr(), 1)


def test_bad_eps_mode_raises_value_error():
    stats = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    mean, invstd = torch.empty(1, dtype=torch.float64), torch.empty(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="mode"):
        _core.cpu_finalize(1, stats.data_ptr(), 1e-5, 9, mean.data_ptr(),
                           invstd.data_ptr(), 0, 0, _core.DTYPE_FLOAT32, 0.1)


def test_geometry_must_have_four_entries():
    x = torch.randn(2, 3)
    out = torch.empty(7, dtype=torch.float64)
    with pytest.raises(ValueError):
        _core.cpu_moments(x.data_ptr(), _core.DTYPE_FLOAT32, (2, 3, 1), out.data_ptr(), 1)


def test_negative_pointer_is_rejected():
    out = torch.empty(7, dtype=torch.float64)
    with pytest.raises(OverflowError):
        _core.cpu_moments(-1, _core.DTYPE_FLOAT32, (2, 3, 1, 0), out.data_ptr(), 1)


@pytest.mark.skipif(_core.built_with_cuda(), reason="build has CUDA: cuda_* ops are real")
def test_cuda_ops_without_cuda_raise_runtime_error():
    f32, g = _core.DTYPE_FLOAT32, (2, 3, 1, _core.LAYOUT_CHANNEL_MAJOR)
    calls = {
        "sum_ft": lambda: _core.cuda_sum_ft(0, f32, g, 0, 0),
        "moments": lambda: _core.cuda_moments(0, f32, g, 0, 0),
        "merge_moments": lambda: _core.cuda_merge_moments(1, 3, 0, 0, 0),
        "finalize": lambda: _core.cuda_finalize(3, 0, 1e-5, _core.EPS_PLUS, 0, 0, 0, 0, f32,
                                                0.1, 0),
        "normalize": lambda: _core.cuda_normalize(0, f32, g, 0, 0, 0, 0, f32, 0, 0),
        "backward_reduce": lambda: _core.cuda_backward_reduce(0, 0, f32, g, 0, 0, 0, 0, 0, f32, 0),
        "backward_elemt": lambda: _core.cuda_backward_elemt(0, 0, f32, g, 0, 0, 0, f32, 0, 0, 0, 0),
        "fused_forward": lambda: _core.cuda_fused_forward(0, f32, g, 0, 0, f32, 1e-5,
                                                          _core.EPS_PLUS, 0, 0, 0, 0, 0, f32, 0.1,
                                                          0, 0, 0),
        "fused_backward": lambda: _core.cuda_fused_backward(0, 0, f32, g, 0, 0, 0, f32, 0, 0, 0,
                                                            0, 0, 0),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="without CUDA"):
            call()


# ---- the fused ops ------------------------------------------------------------------------------

@pytest.mark.parametrize("cl", [False, True], ids=["channel_major", "channels_last"])
def test_cpu_fused_ops_are_the_composed_ops(cl):
    """fused_forward / fused_backward give the bits of moments -> finalize -> normalize and
    backward_reduce -> backward_elemt (which the other tests check against references)."""
    f32, f64 = _core.DTYPE_FLOAT32, torch.float64
    x = torch.randn(8, 6, 5, 7) * 3 + 2
    dy = torch.randn(8, 6, 5, 7)
    if cl:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    g = (8, 6, 35, _core.LAYOUT_CHANNELS_LAST if cl else _core.LAYOUT_CHANNEL_MAJOR)
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    rm0, rv0 = torch.randn(6), torch.rand(6) + 0.5
    # composed
    st, mean, inv = (torch.empty(n, dtype=f64) for n in (13, 6, 6))
    rm, rv, y = rm0.clone(), rv0.clone(), torch.empty_like(x)
    _core.cpu_moments(x.data_ptr(), f32, g, st.data_ptr(), 2)
    _core.cpu_finalize(6, st.data_ptr(), 1e-3, _core.EPS_PLUS, mean.data_ptr(), inv.data_ptr(),
                       rm.data_ptr(), rv.data_ptr(), f32, 0.2)
    _core.cpu_normalize(x.data_ptr(), f32, g, mean.data_ptr(), inv.data_ptr(), w.data_ptr(),
                        b.data_ptr(), f32, y.data_ptr(), 2)
    # fused
    buf = torch.full((4 * 6 + 1,), float("nan"), dtype=f64)
    p = buf.data_ptr()
    rm_f, rv_f, y_f = rm0.clone(), rv0.clone(), torch.full_like(x, float("nan"))
    nbt = torch.tensor(5, dtype=torch.int64)
    _core.cpu_fused_forward(x.data_ptr(), f32, g, w.data_ptr(), b.data_ptr(), f32, 1e-3,
                            _core.EPS_PLUS, p, p + 8 * 13, p + 8 * 19, rm_f.data_ptr(),
                            rv_f.data_ptr(), f32, 0.2, nbt.data_ptr(), y_f.data_ptr(), 2)
    for got, want, what in [(buf[:13], st, "record"), (buf[13:19], mean, "mean"),
                            (buf[19:], inv, "invstd"), (y_f, y, "y"), (rm_f, rm, "running_mean"),
                            (rv_f, rv, "running_var")]:
        assert torch.equal(got, want), what
    assert int(nbt) == 6
    # backward: composed with the record's count, fused with the grad sums over the record
    sums, gw, gb, dx = torch.empty(12, dtype=f64), torch.empty(6), torch.empty(6), torch.empty_like(x)
    _core.cpu_backward_reduce(dy.data_ptr(), x.data_ptr(), f32, g, mean.data_ptr(), inv.data_ptr(),
                              sums.data_ptr(), gw.data_ptr(), gb.data_ptr(), f32, 2)
    _core.cpu_backward_elemt(dy.data_ptr(), x.data_ptr(), f32, g, mean.data_ptr(), inv.data_ptr(),
                             w.data_ptr(), f32, sums.data_ptr(), st.data_ptr(), dx.data_ptr(), 2)
    gw_f, gb_f, dx_f = torch.empty(6), torch.empty(6), torch.empty_like(x)
    _core.cpu_fused_backward(dy.data_ptr(), x.data_ptr(), f32, g, p + 8 * 13, p + 8 * 19,
                             w.data_ptr(), f32, p, p + 8, gw_f.data_ptr(), gb_f.data_ptr(),
                             dx_f.data_ptr(), 2)
    for got, want, what in [(buf[1:13], sums, "sums"), (gw_f, gw, "grad_weight"),
                            (gb_f, gb, "grad_bias"), (dx_f, dx, "dx")]:
        assert torch.equal(got, want), what


def test_cpu_fused_forward_error_changes_nothing():
    x = torch.randn(4, 3)
    g = (4, 3, 1, _core.LAYOUT_CHANNEL_MAJOR)
    buf, y = torch.zeros(13, dtype=torch.float64), torch.zeros(4, 3)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(2, dtype=torch.int64)
    p = buf.data_ptr()
    with pytest.raises(ValueError, match="running_dtype"):
        _core.cpu_fused_forward(x.data_ptr(), _core.DTYPE_FLOAT32, g, 0, 0, _core.DTYPE_FLOAT32,
                                1e-5, _core.EPS_PLUS, p, p + 56, p + 80, rm.data_ptr(),
                                rv.data_ptr(), 7, 0.1, nbt.data_ptr(), y.data_ptr(), 1)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3)) and int(nbt) == 2
    assert torch.equal(y, torch.zeros(4, 3)) and torch.equal(buf, torch.zeros(13, dtype=torch.float64))

