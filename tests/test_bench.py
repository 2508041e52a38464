# SPDX-License-Identifier: MIT
"""The programs of pysbn.tools work: the benchmark (JSON, Markdown, chart, compiled rows), its
optional extras (matplotlib, tqdm) missing, the command line and its console script. No speed
assertions: benchmarks are programs."""

import ast
import importlib
import importlib.metadata
import inspect
import io
import json
import pathlib
import struct
import subprocess
import sys

import pytest

import pysbn
from pysbn.tools import bench, cli

TOOLS = pathlib.Path(bench.__file__).parent
TINY = ["--threads", "1", "--reps", "1", "--rounds", "1", "--warmup", "0", "--min-time", "0",
        "--devices", "cpu"]


def _png_size(path):
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _hide(monkeypatch, name):
    """Makes ``import name`` (and its submodules) fail, as if the package were not installed."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        monkeypatch.setitem(sys.modules, key, None)
    monkeypatch.setitem(sys.modules, name, None)


def test_bench_tiny(tmp_path, capsys):
    """A --quick-style run: JSON, Markdown and the matplotlib chart; compiled rows on the first
    format of each shape (--compile first, the --quick default)."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    rc = bench.main(["--shapes", "8x4x6x6,bn1d", *TINY, "--compile", "first", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "bench.json").read_text())
    assert set(result) >= {"environment", "rows", "settings", "memory", "numerics"}
    assert result["settings"]["compiled"] == "first"
    env = result["environment"]
    for key in ("cpu", "cores", "caches", "torch", "pysbn", "pysbn_core", "pysbn_cuda",
                "pysbn_openmp", "threads", "allocator"):
        assert key in env
    assert env["pysbn"] == pysbn.__version__
    rows = result["rows"]
    assert [(r["id"], r["format"]) for r in rows] == [("8x4x6x6", "nchw"), ("8x4x6x6", "cl"),
                                                      ("bn1d", "nchw")]
    for r in rows:
        for impl in ("torch", "pysbn", "core", "seed"):
            assert r[impl]["fwd_ms"] > 0 and r[impl]["fwdbwd_ms"] > 0, (impl, r[impl])
        assert r["speedup_vs_torch"] > 0 and r["speedup_vs_seed"] > 0
        assert r["pysbn"]["x_of_limit"] > 0
    compiled = [r for r in rows if "speedup_compiled" in r]
    assert [(r["id"], r["format"]) for r in compiled] == [("8x4x6x6", "nchw"), ("bn1d", "nchw")]
    for r in compiled:
        for impl in ("torch_compiled", "pysbn_compiled"):
            assert "error" not in r[impl], r[impl]
            assert r[impl]["fwd_ms"] > 0 and r[impl]["fwdbwd_ms"] > 0
            assert r[impl]["compile_s"] > 0
            assert r[impl]["compile_s"] == pytest.approx(
                r[impl]["compile_fwd_s"] + r[impl]["compile_fwdbwd_s"])
        assert r["speedup_compiled"] > 0 and r["speedup_compiled_fwd"] > 0
    assert "torch_compiled" not in rows[1]  # channels_last: not the shape's first format
    # 4-D rows also time batch norm + SiLU, fused and not; the 2-D row has no such layer
    for r in rows[:2]:
        for impl in ("bn_silu", "pysbn_silu"):
            assert r[impl]["fwd_ms"] > 0 and r[impl]["fwdbwd_ms"] > 0
        assert r["speedup_act_vs_unfused"] > 0 and r["speedup_act_vs_unfused_fwd"] > 0
    assert "bn_silu" not in rows[2] and "speedup_act_vs_unfused" not in rows[2]
    for m in result["memory"]:
        for impl in ("torch", "pysbn", "seed"):
            assert "peak_bytes" in m[impl] and "saved_bytes" in m[impl]
    for fmt in ("nchw", "cl"):
        assert set(result["numerics"][fmt]) == {"0", "100", "1000", "10000"}
        # the layer's own statistics meet the protocol's numerics target
        assert result["numerics"][fmt]["10000"]["pysbn"] < 1e-5
    md = (out / "bench.md").read_text()
    assert md.startswith("| shape |")
    assert "| torch_compiled f+b ms | pysbn_compiled f+b ms |" in md
    assert "speedup pysbn_compiled vs torch_compiled" in md
    assert "batch norm + SiLU, geometric-mean speedup of the fused layer" in md
    w, h = _png_size(out / "bench.png")
    assert w > 300 and h > 200
    assert "bench.png" in capsys.readouterr().out


def test_act_memory_fused_layer_keeps_two_of_three_activations():
    """act_memory, each variant in a fresh process: per (conv -> BN + SiLU) block the unfused
    layers keep the conv's input, the BN's input and the SiLU's input for the backward, the fused
    layer one fewer (plus per-channel statistics): 2/3 of the bytes."""
    am = bench.act_memory(blocks=2, shape=(4, 16, 64, 64))  # 1 MiB activations
    unfused, fused = am["unfused"]["saved_bytes"], am["fused"]["saved_bytes"]
    act = 4 * 16 * 64 * 64 * 4  # one activation, float32
    assert unfused >= 6 * act and fused < unfused
    assert am["ratio_saved"] == pytest.approx(2 / 3, abs=0.02)
    # resident growth over the forward = what it leaves alive (fixed mmap threshold), give or
    # take the kernel's lazily updated resident counters (up to 64 pages per thread and
    # counter) and the input, which is saved but was resident before
    for k in ("unfused", "fused"):
        assert am[k]["rss_growth_bytes"] == pytest.approx(am[k]["saved_bytes"], abs=2 * act)
    md = bench.markdown({"environment": {}, "settings": {}, "rows": [], "act_memory": am})
    assert "fused / unfused: saved 0.6" in md


def test_bench_without_matplotlib_writes_json_markdown_and_a_hint(tmp_path, monkeypatch, capsys):
    _hide(monkeypatch, "matplotlib")
    out = tmp_path / "out"
    rc = bench.main(["--shapes", "bn1d", *TINY, "--no-compile", "--no-memory", "--no-numerics",
                     "--out", str(out)])
    assert rc == 0
    assert json.loads((out / "bench.json").read_text())["settings"]["compiled"] == "none"
    assert (out / "bench.md").read_text().startswith("| shape |")
    assert not (out / "bench.png").exists()
    printed = capsys.readouterr().out
    assert 'pip install "pysbn[bench]"' in printed and "pip install matplotlib" in printed


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_only(monkeypatch):
    """tqdm draws on a terminal; on a pipe, or without tqdm, nothing is drawn and nothing
    fails."""
    pytest.importorskip("tqdm")
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    bar = bench._progress_bar(10, True)
    bar.set_postfix_str("tim bn1d nchw f32 1t")
    bar.update(4)
    bar.close()
    assert "40%" in tty.getvalue() and "left" in tty.getvalue()
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    bar = bench._progress_bar(10, True)
    bar.update(10)
    bar.close()
    assert pipe.getvalue() == ""
    _hide(monkeypatch, "tqdm")
    monkeypatch.setattr(sys, "stderr", tty)
    tty.truncate(0)
    bar = bench._progress_bar(10, True)
    bar.set_postfix_str("x")
    bar.update(10)
    bar.close()
    assert tty.getvalue() == ""


def test_bench_rejects_unknown_shape(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "nope", "--out", str(tmp_path)])


def test_bench_rejects_contradictory_compile_flags(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--no-compile", "--compile", "all", "--out", str(tmp_path)])


def test_cli_info_returns_zero(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"pysbn {pysbn.__version__} (")
    assert "native core: CUDA" in out and "torch" in out


def test_cli_rejects_unknown_command():
    with pytest.raises(SystemExit) as exc:
        cli.main(["nope"])
    assert exc.value.code == 2


def test_console_script_is_the_cli():
    """The installed metadata declares ``pysbn = pysbn.tools.cli:main``."""
    eps = tuple(importlib.metadata.entry_points(group="console_scripts", name="pysbn"))
    assert [ep.value for ep in eps] == ["pysbn.tools.cli:main"]
    assert eps[0].load() is cli.main


def test_python_m_pysbn(tmp_path):
    """``python -m pysbn`` (the 3-line shim) from a foreign folder."""
    proc = subprocess.run([sys.executable, "-m", "pysbn", "--version"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"pysbn {pysbn.__version__}"


def _imports(path):
    """(absolute module names, relative imports as (level, module)) of one file."""
    absolute, relative = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            absolute |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                relative |= ({(node.level, node.module)} if node.module else
                             {(node.level, a.name) for a in node.names})
            else:
                absolute |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return absolute, relative


def test_tools_use_the_public_api_and_import_no_cycle():
    """pysbn.tools imports the library as a user would (``pysbn`` and the names of
    ``pysbn.__all__``), and its modules import one another without a cycle."""
    public = {"pysbn"} | {f"pysbn.{n}" for n in pysbn.__all__}
    graph = {}
    for path in sorted(TOOLS.glob("*.py")):
        absolute, relative = _imports(path)
        used = {m for m in absolute if m == "pysbn" or m.startswith("pysbn.")}
        assert used <= public, (path.name, used - public)
        assert all(level == 1 for level, _ in relative), (path.name, relative)
        graph[path.stem] = {mod.split(".")[0] for _, mod in relative if mod}
        text = path.read_text()
        assert "../" not in text and "shared/" not in text, path.name
    seen, done = set(), set()

    def visit(node, stack):
        assert node not in stack, f"import cycle: {' -> '.join(stack + [node])}"
        if node in done:
            return
        for nxt in graph.get(node, ()):
            visit(nxt, stack + [node])
        done.add(node)

    for node in graph:
        visit(node, [])
    assert (pathlib.Path(pysbn.__file__).parent / "py.typed").exists()


@pytest.mark.parametrize("module", ["cli", "bench", "bench_sync", "demo", "chart", "_env"])
def test_public_tools_functions_are_annotated(module):
    """What a tools module exports is typed (the package ships py.typed)."""
    mod = importlib.import_module(f"pysbn.tools.{module}")
    for name in mod.__all__:
        obj = getattr(mod, name)
        fns = [obj] if inspect.isfunction(obj) else [
            f for n, f in vars(obj).items() if inspect.isfunction(f) and not n.startswith("__")
        ] if inspect.isclass(obj) else []
        for fn in fns:
            sig = inspect.signature(fn)
            assert sig.return_annotation is not inspect.Signature.empty, (module, fn.__name__)
            for p in sig.parameters.values():
                assert p.name == "self" or p.annotation is not inspect.Parameter.empty, (
                    module, fn.__name__, p.name)
