# SPDX-License-Identifier: MIT
"""The benchmark program and its PNG writer work (no speed assertions: benchmarks are programs)."""

import json
import struct
import zlib

import numpy as np
import pytest

from pysbn import _chart, bench


def _chunks(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        out.append((kind, body))
        pos += 12 + n
    return out


def _decode(path):
    with open(path, "rb") as f:
        chunks = _chunks(f.read())
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color) == (8, 2)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == h * (3 * w + 1)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, 3 * w + 1)
    assert (rows[:, 0] == 0).all()  # filter type 0 on every row
    return rows[:, 1:].reshape(h, w, 3)


def test_write_png_roundtrip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(7, 13, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    _chart.write_png(str(path), rgb)
    np.testing.assert_array_equal(_decode(path), rgb)


def test_write_png_rejects_bad_shape(tmp_path):
    with pytest.raises(ValueError):
        _chart.write_png(str(tmp_path / "b.png"), np.zeros((4, 4), dtype=np.uint8))


def test_bar_panels(tmp_path):
    path = tmp_path / "c.png"
    w, h = _chart.bar_panels(str(path), ["bn2d_56 nchw 1t", "bn1d nchw 2t"],
                             [{"title": "speedup vs torch", "values": [2.0, None], "ref": 1.0},
                              {"title": "vs seed", "values": [10.0, 3.0]}],
                             title="t", notes=["a note; with 0.5x (x)"])
    img = _decode(path)
    assert img.shape == (h, w, 3)
    assert (img != 255).any()  # something was drawn


def test_text_draws_known_glyphs():
    cv = _chart.Canvas(60, 10)
    cv.text(0, 0, "0.5x", (0, 0, 0))
    assert (cv.pixels[:8, :24] == 0).any() and (cv.pixels[:, 30:] == 255).all()


def test_bench_tiny(tmp_path):
    out = tmp_path / "out"
    rc = bench.main(["--shapes", "8x4x6x6,bn1d", "--threads", "1", "--reps", "1", "--rounds", "1",
                     "--warmup", "0", "--min-time", "0", "--devices", "cpu",
                     "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "bench.json").read_text())
    assert set(result) >= {"environment", "rows", "settings", "memory", "numerics"}
    env = result["environment"]
    for key in ("cpu", "cores", "caches", "torch", "pysbn", "pysbn_cuda", "pysbn_openmp",
                "threads", "allocator"):
        assert key in env
    rows = result["rows"]
    assert [(r["id"], r["format"]) for r in rows] == [("8x4x6x6", "nchw"), ("8x4x6x6", "cl"),
                                                      ("bn1d", "nchw")]
    for r in rows:
        for impl in ("torch", "pysbn", "core", "seed"):
            assert r[impl]["fwd_ms"] > 0 and r[impl]["fwdbwd_ms"] > 0, (impl, r[impl])
        assert r["speedup_vs_torch"] > 0 and r["speedup_vs_seed"] > 0
        assert r["pysbn"]["x_of_limit"] > 0
    for m in result["memory"]:
        for impl in ("torch", "pysbn", "seed"):
            assert "peak_bytes" in m[impl] and "saved_bytes" in m[impl]
    for fmt in ("nchw", "cl"):
        assert set(result["numerics"][fmt]) == {"0", "100", "1000", "10000"}
        # the layer's own statistics meet the protocol's numerics target
        assert result["numerics"][fmt]["10000"]["pysbn"] < 1e-5
    assert (out / "bench.md").read_text().startswith("| shape |")
    _decode(out / "bench.png")


def test_bench_rejects_unknown_shape(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "nope", "--out", str(tmp_path)])
