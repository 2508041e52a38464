# SPDX-License-Identifier: MIT
"""The benchmark's chart (bench.png), drawn with matplotlib (the ``bench`` extra).

One panel per metric, one group of horizontal bars per row of the benchmark (shape, memory
format, dtype, threads or GPU); CPU and GPU rows in separate bands (their scales differ):

- speedup vs ``nn.BatchNorm``, forward+backward: the eager layers, and both layers under
  ``torch.compile`` where the row has compiled figures (> 1: pysbn faster);
- speedup vs the seed's composition, forward+backward;
- fraction of the bandwidth limit (limit / time; 1 = at the limit): pysbn, pysbn compiled,
  ``nn.BatchNorm`` for reference;
- peak memory of one forward+backward relative to ``nn.BatchNorm`` (< 1: less), when measured;
- compile time (first calls until warm) of the two compiled layers, when measured.

A dashed line marks 1.0 where a ratio has a reference. Drawn off screen (the Agg canvas, no
pyplot and no display); :func:`write_chart` raises ImportError without matplotlib.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ._env import SHORT_DTYPES

__all__ = ["CHART_HINT", "write_chart"]

CHART_HINT = ('For the chart (bench.png), install matplotlib: pip install "pysbn[bench]" '
              "(or pip install matplotlib), then run the bench again.")
"""What to install for the chart; printed by ``pysbn bench`` when matplotlib is missing."""

_Getter = Callable[[Dict[str, Any]], Optional[float]]

# colour-blind-safe (Okabe-Ito) colours per series
_BLUE, _ORANGE, _GREEN, _GREY, _PURPLE = "#0072B2", "#E69F00", "#009E73", "#999999", "#CC79A7"


def _impl(name: str, key: str) -> _Getter:
    def get(r: Dict[str, Any]) -> Optional[float]:
        d = r.get(name)
        if not isinstance(d, dict) or "error" in d or d.get(key) is None:
            return None
        return float(d[key])
    return get


def _inv(get: _Getter) -> _Getter:
    def inv(r: Dict[str, Any]) -> Optional[float]:
        v = get(r)
        return None if not v else 1.0 / v
    return inv


def _field(key: str) -> _Getter:
    def get(r: Dict[str, Any]) -> Optional[float]:
        v = r.get(key)
        return None if v is None else float(v)
    return get


def _label(r: Dict[str, Any]) -> str:
    where = f"{r['threads']}t" if r["device"] == "cpu" else "gpu"
    return f"{r['id']} {r['format']} {SHORT_DTYPES.get(r['dtype'], r['dtype'])} {where}"


def _panels(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The metrics: title, reference line, value format, series (label, colour, getter)."""
    rows = result["rows"]
    compiled = any("speedup_compiled" in r for r in rows)
    mem = {(m["id"], m["format"], m["dtype"], m["device"]): m
           for m in result.get("memory", []) if "error" not in m}

    def mem_ratio(r: Dict[str, Any]) -> Optional[float]:
        m = mem.get((r["id"], r["format"], r["dtype"], r["device"]))
        if m is None or not m["torch"]["peak_bytes"] or m["pysbn"]["peak_bytes"] is None:
            return None
        return m["pysbn"]["peak_bytes"] / m["torch"]["peak_bytes"]

    speed = [("eager", _BLUE, _field("speedup_vs_torch"))]
    if compiled:
        speed.append(("both torch.compile'd", _ORANGE, _field("speedup_compiled")))
    if any(r.get("speedup_act_vs_unfused") is not None for r in rows):
        speed.append(("BN+SiLU fused vs BN, SiLU", _GREEN, _field("speedup_act_vs_unfused")))
    frac = [("pysbn", _BLUE, _inv(_impl("pysbn", "x_of_limit")))]
    if compiled:
        frac.append(("pysbn compiled", _ORANGE, _inv(_impl("pysbn_compiled", "x_of_limit"))))
    frac.append(("nn.BatchNorm", _GREY, _inv(_impl("torch", "x_of_limit"))))
    panels = [
        {"title": "speedup vs nn.BatchNorm, fwd+bwd\n(> 1: pysbn faster)", "ref": 1.0,
         "fmt": "{:.2f}x", "series": speed},
        {"title": "speedup vs the seed, fwd+bwd", "ref": 1.0, "fmt": "{:.1f}x",
         "series": [("eager", _GREEN, _field("speedup_vs_seed"))], "log": True},
        {"title": "fraction of the bandwidth limit\n(limit / time; 1 = at the limit)",
         "ref": 1.0, "fmt": "{:.2f}", "series": frac},
    ]
    if mem:
        panels.append({"title": "peak memory / nn.BatchNorm, fwd+bwd\n(< 1: less)", "ref": 1.0,
                       "fmt": "{:.2f}", "series": [("pysbn", _PURPLE, mem_ratio)]})
    if compiled:
        panels.append({"title": "compile time, s\n(first fwd and fwd+bwd calls)", "ref": None,
                       "fmt": "{:.1f}", "series": [
                           ("pysbn (fullgraph)", _ORANGE, _impl("pysbn_compiled", "compile_s")),
                           ("nn.BatchNorm", _GREY, _impl("torch_compiled", "compile_s"))]})
    return panels


def _title(result: Dict[str, Any]) -> Tuple[str, str]:
    env = result["environment"]
    rows = result["rows"]
    dtypes = sorted({r["dtype"] for r in rows})
    threads = sorted({r["threads"] for r in rows if r["device"] == "cpu"})
    parts = [f"{env.get('cpu')}, {env.get('cores')} cores"]
    if threads:
        parts.append(f"CPU threads {', '.join(map(str, threads))}")
    if any(r["device"] == "cuda" for r in rows) and env.get("gpu"):
        parts.append(f"GPU {env['gpu']} (CUDA {env.get('cuda')})")
    parts.append(f"dtype {', '.join(dtypes)}")
    parts.append(f"torch {env.get('torch')}, pysbn {env.get('pysbn')}, {env.get('date')}")
    return "pysbn bench: SynchronizedBatchNorm vs nn.BatchNorm, one process", "; ".join(parts)


def write_chart(result: Dict[str, Any], path: str, dpi: int = 110) -> None:
    """Writes the chart of a :func:`pysbn.tools.bench.run` result as a PNG file.

    Raises ImportError when matplotlib is not installed (see :data:`CHART_HINT`).
    """
    import matplotlib  # noqa: F401  (ImportError here: the bench extra is not installed)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["rows"]
    bands = [(dev, [r for r in rows if r["device"] == dev]) for dev in ("cpu", "cuda")]
    bands = [(dev, sel) for dev, sel in bands if sel]
    panels = _panels(result)
    if not bands:
        raise ValueError("the result has no rows to chart")
    group_h = max(0.22 * max(len(p["series"]) for p in panels), 0.32)  # inches per row
    heights = [max(len(sel) * group_h, 1.0) for _, sel in bands]
    fig = Figure(figsize=(2.0 + 3.6 * len(panels), sum(heights) + 1.9), layout="constrained")
    FigureCanvasAgg(fig)
    title, subtitle = _title(result)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=9.5)
    grid = fig.add_gridspec(len(bands), len(panels), height_ratios=heights)
    for bi, (dev, sel) in enumerate(bands):
        labels = [_label(r) for r in sel]
        for pi, panel in enumerate(panels):
            ax = fig.add_subplot(grid[bi, pi])
            _draw_panel(ax, panel, sel, labels, show_labels=(pi == 0))
            if bi == 0:
                ax.set_title(panel["title"], fontsize=8.5)
            if pi == 0:
                ax.set_ylabel("CPU rows" if dev == "cpu" else "GPU rows", fontsize=8.5)
            if bi == len(bands) - 1 and len(panel["series"]) > 1:
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09),
                          ncol=len(panel["series"]), frameon=False, handlelength=1.2,
                          columnspacing=1.0)
    fig.supxlabel("limit: 5 tensor passes (forward+backward) at the probe bandwidth (read-only "
                  "sum, copy) of the same size and thread count; seed: the original "
                  "sum / sum-of-squares composition with autograd; n/a: not measured or failed "
                  "(see bench.md)", fontsize=6.5, color="#444444")
    fig.savefig(path, dpi=dpi)


def _draw_panel(ax: Any, panel: Dict[str, Any], rows: Sequence[Dict[str, Any]],
                labels: Sequence[str], show_labels: bool) -> None:
    series = panel["series"]
    k = len(series)
    width = 0.8 / k
    n = len(rows)
    values = [[get(r) for r in rows] for _, _, get in series]
    present = [v for vs in values for v in vs if v is not None and v > 0]
    log = bool(panel.get("log")) and present and max(present) / min(present) > 10
    for si, ((name, color, _), vs) in enumerate(zip(series, values)):
        ys = [i - 0.4 + width * (si + 0.5) for i in range(n)]
        xs = [v if v is not None else 0.0 for v in vs]
        ax.barh(ys, xs, height=width * 0.92, color=color, label=name)
        for y, v in zip(ys, vs):
            text = "n/a" if v is None else panel["fmt"].format(v)
            ax.text(v if v else 0.0, y, " " + text, va="center", ha="left", fontsize=6,
                    color="#222222" if v is not None else "#888888")
    if log:
        ax.set_xscale("log")
    top = max(present + [panel["ref"] or 0.0]) if present else 1.0
    if log:
        bottom = min(present + [panel["ref"] or top]) if present else 0.1
        ax.set_xlim(bottom / 1.5, top * 3.0)
    else:
        ax.set_xlim(0, top * 1.28 if math.isfinite(top) and top > 0 else 1.0)
    if panel["ref"] is not None:
        ax.axvline(panel["ref"], color="#333333", linestyle="--", linewidth=0.9)
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels if show_labels else [""] * n, fontsize=7)
    ax.set_ylim(n - 0.5, -0.5)  # first row at the top
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
