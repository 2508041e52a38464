# SPDX-License-Identifier: MIT
"""pysbn._core: the raw bindings (build info, enum constants, struct tuples, pointer calls,
error mapping). The ops proper are tested through pysbn.ops / pysbn.functional."""

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
CPU1 = (_core.DEVICE_CPU, 1, 0)
NO_RUNNING = (0, 0, _core.DTYPE_FLOAT32, 0.1, False, 0)
NO_AFFINE = (0, 0, _core.DTYPE_FLOAT32)
IDENTITY = (_core.ACT_IDENTITY, 0.01)


def _ref_moments(x):
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.double(), dim=dims, correction=0)
    count = x.numel() // x.shape[1]
    return count, mean, var * count


def _view(x, layout=_core.LAYOUT_CHANNEL_MAJOR, dtype=None):
    l = 1
    for s in x.shape[2:]:
        l *= s
    code = dtype if dtype is not None else {v: k for k, v in TORCH_DTYPES.items()}[x.dtype]
    return (x.data_ptr(), code, x.shape[0], x.shape[1], l, layout)


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
    assert (_core.DEVICE_CPU, _core.DEVICE_CUDA) == (0, 1)
    assert (_core.ACT_IDENTITY, _core.ACT_RELU, _core.ACT_LEAKY_RELU, _core.ACT_SILU,
            _core.ACT_GELU, _core.ACT_GELU_TANH, _core.ACT_HARDSWISH) == tuple(range(7))


def test_buffer_sizes_match_header():
    for c in (0, 1, 5, 512):
        assert (_core.record_size(c), _core.stats_size(c), _core.sums_size(c)) == (
            2 * c + 1, 3 * c + 1, 2 * c)


@pytest.mark.parametrize("code", sorted(TORCH_DTYPES))
def test_acc_dtype_and_dtype_size(code):
    dtype = TORCH_DTYPES[code]
    assert _core.dtype_size(code) == torch.empty((), dtype=dtype).element_size()
    expected_acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert TORCH_DTYPES[_core.acc_dtype(code)] == expected_acc


def test_stub_matches_the_module(tmp_path):
    """mypy's stubtest: the hand-written _core.pyi states every binding of the module with the
    same arguments (and nothing the module lacks). Stubtest builds the whole package; the mypy
    configuration keeps the type errors of the other modules (torch's stubs, dynamic module
    attributes) out of this check, which is about the stub."""
    stubtest = pytest.importorskip("mypy.stubtest")
    import contextlib
    import io

    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n\n[mypy-pysbn.*]\nignore_errors = True\n\n"
                      "[mypy-pysbn._core]\nignore_errors = False\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = stubtest.test_stubs(stubtest.parse_options(
            ["pysbn._core", "--ignore-missing-stub", "--mypy-config-file", str(config)]))
    assert code == 0, out.getvalue()


def test_only_ops_imports_core():
    """One Python module imports _core (the torch op layer); everything else uses its ops."""
    import pathlib
    import re

    pkg = pathlib.Path(pysbn.__file__).parent
    importers = sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
                       if re.search(r"^\s*from \.+ import _core|^\s*import pysbn\._core|"
                                    r"^\s*from pysbn import _core", p.read_text(), re.M))
    assert importers == ["ops.py"], importers


# ---- pointer calls ------------------------------------------------------------------------------

@pytest.mark.parametrize("code", sorted(TORCH_DTYPES))
def test_moments_raw_pointers(code):
    x = (torch.randn(6, 5, 7, dtype=torch.float64) + 3).to(TORCH_DTYPES[code])
    acc = TORCH_DTYPES[_core.acc_dtype(code)]
    record = torch.empty(_core.record_size(5), dtype=torch.float64)  # float64 for every dtype
    _core.moments(_view(x), record.data_ptr(), CPU1)
    count, mean, m2 = _ref_moments(x)
    tol = 1e-12 if acc == torch.float64 else 1e-5
    assert record[0].item() == count
    torch.testing.assert_close(record[1:6], mean, rtol=tol, atol=tol)
    torch.testing.assert_close(record[6:], m2, rtol=tol, atol=tol * count)


def test_moments_channels_last_view():
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    record = torch.empty(7, dtype=torch.float64)
    _core.moments(_view(x, _core.LAYOUT_CHANNELS_LAST), record.data_ptr(), CPU1)
    count, mean, m2 = _ref_moments(x)
    torch.testing.assert_close(record[1:4], mean)
    torch.testing.assert_close(record[4:], m2)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_results_do_not_depend_on_thread_count(threads):
    x = torch.randn(8, 4, 33, 17) * 3 + 100
    ref = torch.empty(9, dtype=torch.float64)
    _core.moments(_view(x), ref.data_ptr(), CPU1)
    out = torch.empty(9, dtype=torch.float64)
    _core.moments(_view(x), out.data_ptr(), (_core.DEVICE_CPU, threads, 0))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-4)


def test_concurrent_calls_from_python_threads():
    # The wrappers release the GIL; concurrent calls on separate buffers must not interfere.
    xs = [torch.randn(16, 8, 64, dtype=torch.float64) + i for i in range(4)]
    outs = [torch.empty(17, dtype=torch.float64) for _ in xs]
    errors = []

    def run(i):
        try:
            for _ in range(20):
                _core.moments(_view(xs[i]), outs[i].data_ptr(), CPU1)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for x, out in zip(xs, outs):
        _, mean, _ = _ref_moments(x)
        torch.testing.assert_close(out[1:9], mean)


def test_fused_forward_and_backward_are_the_composed_ops():
    """batch_norm_forward / batch_norm_backward give the bits of moments -> finalize ->
    normalize and backward_reduce -> backward_elemt."""
    x = torch.randn(6, 4, 5, 5) * 2 + 1
    dy = torch.randn_like(x)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    affine = (w.data_ptr(), b.data_ptr(), _core.DTYPE_FLOAT32)
    rm1, rv1, rm2, rv2 = torch.zeros(4), torch.ones(4), torch.zeros(4), torch.ones(4)
    n1, n2 = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)
    stats1, y1 = torch.empty(13, dtype=torch.float64), torch.empty_like(x)
    _core.batch_norm_forward(_view(x), 0, 1e-5, _core.EPS_PLUS, affine, IDENTITY,
                             stats1.data_ptr(), y1.data_ptr(),
                             (rm1.data_ptr(), rv1.data_ptr(), _core.DTYPE_FLOAT32, 0.1, False,
                              n1.data_ptr()), CPU1)
    rec, stats2, y2 = (torch.empty(9, dtype=torch.float64), torch.empty(13, dtype=torch.float64),
                       torch.empty_like(x))
    _core.moments(_view(x), rec.data_ptr(), CPU1)
    _core.finalize(4, rec.data_ptr(), 1e-5, _core.EPS_PLUS, stats2.data_ptr(),
                   (rm2.data_ptr(), rv2.data_ptr(), _core.DTYPE_FLOAT32, 0.1, False,
                    n2.data_ptr()), CPU1)
    _core.normalize(_view(x), stats2.data_ptr(), affine, IDENTITY, y2.data_ptr(), CPU1)
    for a, b_ in ((stats1, stats2), (y1, y2), (rm1, rm2), (rv1, rv2), (n1, n2)):
        assert torch.equal(a, b_)
    assert n1.item() == 1
    sums1, gw1, gb1, dx1 = (torch.empty(8, dtype=torch.float64), torch.empty(4),
                            torch.empty(4), torch.empty_like(x))
    _core.batch_norm_backward(_view(x), dy.data_ptr(), stats1.data_ptr(), 1e-5, _core.EPS_PLUS,
                              affine, IDENTITY, sums1.data_ptr(),
                              (gw1.data_ptr(), gb1.data_ptr(), _core.DTYPE_FLOAT32),
                              dx1.data_ptr(), CPU1)
    sums2, gw2, gb2, dx2 = (torch.empty(8, dtype=torch.float64), torch.empty(4),
                            torch.empty(4), torch.empty_like(x))
    _core.backward_reduce(_view(x), dy.data_ptr(), stats1.data_ptr(), affine, IDENTITY,
                          sums2.data_ptr(), (gw2.data_ptr(), gb2.data_ptr(), _core.DTYPE_FLOAT32),
                          CPU1)
    _core.backward_elemt(_view(x), dy.data_ptr(), stats1.data_ptr(), 1e-5, _core.EPS_PLUS, affine,
                         IDENTITY, sums2.data_ptr(), dx2.data_ptr(), CPU1)
    for a, b_ in ((sums1, sums2), (gw1, gw2), (gb1, gb2), (dx1, dx2)):
        assert torch.equal(a, b_)


def test_forward_error_changes_nothing():
    x = torch.randn(4, 3)
    stats, y = torch.zeros(10, dtype=torch.float64), torch.zeros(4, 3)
    rm, rv, n = torch.zeros(3), torch.ones(3), torch.zeros((), dtype=torch.int64)
    bad_affine = (torch.ones(3, dtype=torch.float64).data_ptr(), 0, _core.DTYPE_FLOAT64)
    with pytest.raises(ValueError, match="affine"):
        _core.batch_norm_forward(_view(x), 0, 1e-5, _core.EPS_PLUS, bad_affine, IDENTITY,
                                 stats.data_ptr(), y.data_ptr(),
                                 (rm.data_ptr(), rv.data_ptr(), _core.DTYPE_FLOAT32, 0.1, False,
                                  n.data_ptr()), CPU1)
    assert not stats.any() and not y.any() and not rm.any() and torch.equal(rv, torch.ones(3))
    assert n.item() == 0


# ---- errors -------------------------------------------------------------------------------------

def _moments_err(view, exec_=CPU1):
    out = torch.empty(64, dtype=torch.float64)
    _core.moments(view, out.data_ptr(), exec_)


def test_bad_dtype_code_raises_value_error():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="dtype"):
        _moments_err((x.data_ptr(), 9, 2, 3, 1, 0))


def test_bad_layout_raises_value_error():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="layout"):
        _moments_err((x.data_ptr(), 0, 2, 3, 1, 5))


def test_negative_geometry_raises_value_error():
    with pytest.raises(ValueError, match="geometry"):
        _moments_err((0, 0, -1, 3, 1, 0))


def test_overflowing_geometry_raises_value_error():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="overflows"):
        _moments_err((x.data_ptr(), 0, 2 ** 40, 2 ** 40, 1, 0))


@pytest.mark.parametrize("exec_", [(_core.DEVICE_CPU, 0, 0), (_core.DEVICE_CPU, -3, 0),
                                   (7, 1, 0)], ids=["zero_threads", "negative_threads", "device"])
def test_bad_exec_raises_value_error(exec_):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="exec"):
        _moments_err(_view(x), exec_)


def test_null_pointer_raises_value_error():
    with pytest.raises(ValueError, match="x data is null"):
        _moments_err((0, 0, 2, 3, 1, 0))


def test_bad_param_dtype_raises_value_error():
    x = torch.randn(2, 3)
    stats = torch.zeros(10, dtype=torch.float64)
    w = torch.ones(3, dtype=torch.float64)
    y = torch.empty(2, 3)
    with pytest.raises(ValueError, match="affine dtype float64"):
        _core.normalize(_view(x), stats.data_ptr(), (w.data_ptr(), 0, _core.DTYPE_FLOAT64),
                        IDENTITY, y.data_ptr(), CPU1)


def test_bad_eps_mode_and_act_raise_value_error():
    rec = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    stats = torch.empty(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="mode"):
        _core.finalize(1, rec.data_ptr(), 1e-5, 7, stats.data_ptr(), NO_RUNNING, CPU1)
    x, y = torch.randn(2, 1), torch.empty(2, 1)
    with pytest.raises(ValueError, match="act"):
        _core.normalize(_view(x), stats.data_ptr(), NO_AFFINE, (99, 0.01), y.data_ptr(), CPU1)


def test_tuples_must_have_their_sizes():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError):
        _moments_err((x.data_ptr(), 0, 2, 3, 1))
    with pytest.raises(TypeError):
        _moments_err([x.data_ptr(), 0, 2, 3, 1, 0])  # a list, not the tuple the struct maps to


def test_negative_pointer_is_rejected():
    with pytest.raises(OverflowError):
        _moments_err((-1, 0, 2, 3, 1, 0))


@pytest.mark.skipif(_core.built_with_cuda(), reason="this build has CUDA")
def test_cuda_exec_without_cuda_raises_runtime_error():
    x = torch.randn(2, 3)
    out = torch.zeros(7, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _core.moments(_view(x), out.data_ptr(), (_core.DEVICE_CUDA, 1, 0))
    assert not out.any()
