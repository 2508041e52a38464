# SPDX-License-Identifier: MIT
"""A small PNG chart writer (numpy, zlib, struct; no plotting library).

:func:`bar_panels` draws panels of horizontal bars side by side, one row per label, with a
built-in 5x7 bitmap font; :func:`write_png` writes an RGB array as an 8-bit truecolor PNG. Used
by ``python -m pysbn bench`` for its chart; small on purpose, not a plotting library.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Dict, List, Sequence, Tuple

import numpy as np

__all__ = ["Canvas", "bar_panels", "write_png"]

Color = Tuple[int, int, int]

# 5x7 glyphs, 7 rows top to bottom, bit 4 is the leftmost pixel.
_FONT_HEX = {
    " ": "00000000000000", "0": "0E111315191 10E", "1": "040C040404040E",
    "2": "0E11010204081F", "3": "1F02040201110E", "4": "02060A121F0202",
    "5": "1F101E0101110E", "6": "0608101E11110E", "7": "1F010204080808",
    "8": "0E11110E11110E", "9": "0E11110F01020C",
    "A": "0E11111F111111", "B": "1E11111E11111E", "C": "0E11101010110E",
    "D": "1C121111111 21C", "E": "1F10101E10101F", "F": "1F10101E101010",
    "G": "0E111017111 10F", "H": "1111111F111111", "I": "0E04040404040E",
    "J": "0702020202120C", "K": "11121418141211", "L": "1010101010101F",
    "M": "111B1515111111", "N": "11111915131111", "O": "0E11111111110E",
    "P": "1E11111E101010", "Q": "0E111111151 20D", "R": "1E11111E141211",
    "S": "0F10100E01011E", "T": "1F040404040404", "U": "1111111111110E",
    "V": "1111111111 0A04", "W": "11111115151 50A", "X": "11110A040A1111",
    "Y": "1111110A040404", "Z": "1F01020408101F",
    "a": "00000E010F110F", "b": "10101619111 11E", "c": "00000E1010110E",
    "d": "01010D1311110F", "e": "00000E111F100E", "f": "0609081C080808",
    "g": "000F11110F010E", "h": "10101619111111", "i": "04000C0404040E",
    "j": "0200060202120C", "k": "10101214181412", "l": "0C04040404040E",
    "m": "00001A15151111", "n": "00001619111111", "o": "00000E1111110E",
    "p": "00001E111E1010", "q": "00000D130F0101", "r": "00001619101010",
    "s": "00000E100E011E", "t": "08081C08080906", "u": "0000111111130D",
    "v": "0000111111 0A04", "w": "0000111115150A", "x": "0000110A040A11",
    "y": "000011110F010E", "z": "00001F0204081F",
    ".": "00000000000C0C", ";": "000C0C000C0408", ",": "00000000 0C0408", ":": "000C0C000C0C00",
    "-": "0000001F000000", "_": "0000000000001F", "+": "0004041F040400",
    "(": "02040808080402", ")": "08040202020408", "/": "00010204081000",
    "%": "18190204081303", "=": "00001F001F0000", "<": "02040810080402",
    ">": "08040201020408", "*": "0004150E150400", "#": "0A0A1F0A1F0A0A",
    "[": "0E08080808080E", "]": "0E02020202020E", "'": "0C040800000000",
    "!": "04040404040004", "?": "0E110102040004", "|": "04040404040404",
}


def _glyphs() -> Dict[str, np.ndarray]:
    out = {}
    for ch, hx in _FONT_HEX.items():
        hx = hx.replace(" ", "")
        rows = [int(hx[i:i + 2], 16) for i in range(0, 14, 2)]
        out[ch] = np.array([[(r >> (4 - b)) & 1 for b in range(5)] for r in rows], dtype=bool)
    return out


_GLYPHS = _glyphs()
CHAR_W, CHAR_H = 6, 8  # advance and line height at scale 1 (5x7 glyph + 1 px spacing)


def write_png(path: str, rgb: np.ndarray) -> None:
    """Writes an ``(H, W, 3)`` uint8 array as an 8-bit RGB PNG (filter 0, zlib level 9)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"write_png: expected an (H, W, 3) array, got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    raw = np.zeros((h, w * 3 + 1), dtype=np.uint8)  # a filter-type byte (0) before each row
    raw[:, 1:] = rgb.reshape(h, w * 3)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


class Canvas:
    """An RGB raster with the few drawing primitives the charts need."""

    def __init__(self, width: int, height: int, background: Color = (255, 255, 255)) -> None:
        """A ``width`` x ``height`` canvas filled with ``background``."""
        self.pixels = np.empty((height, width, 3), dtype=np.uint8)
        self.pixels[:] = background

    @property
    def width(self) -> int:
        """Width in pixels."""
        return self.pixels.shape[1]

    @property
    def height(self) -> int:
        """Height in pixels."""
        return self.pixels.shape[0]

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Fills the pixels x0 <= x < x1, y0 <= y < y1 (clipped)."""
        x0, x1 = max(0, int(x0)), min(self.width, int(x1))
        y0, y1 = max(0, int(y0)), min(self.height, int(y1))
        if x0 < x1 and y0 < y1:
            self.pixels[y0:y1, x0:x1] = color

    def hline(self, x0: int, x1: int, y: int, color: Color) -> None:
        """A horizontal line from x0 to x1 (exclusive) at row y."""
        self.rect(x0, y, x1, y + 1, color)

    def vline(self, x: int, y0: int, y1: int, color: Color, dash: int = 0) -> None:
        """A vertical line from y0 to y1 (exclusive) at column x; dashed when ``dash`` > 0."""
        if dash <= 0:
            self.rect(x, y0, x + 1, y1, color)
            return
        for y in range(int(y0), int(y1), 2 * dash):
            self.rect(x, y, x + 1, min(y + dash, int(y1)), color)

    @staticmethod
    def text_width(s: str, scale: int = 1) -> int:
        """Width in pixels of ``s`` drawn by :meth:`text`."""
        return len(s) * CHAR_W * scale

    def text(self, x: int, y: int, s: str, color: Color = (0, 0, 0), scale: int = 1) -> None:
        """Draws ``s`` with its top-left corner at (x, y); unknown characters print as '?'."""
        for i, ch in enumerate(s):
            g = _GLYPHS.get(ch, _GLYPHS["?"])
            if scale > 1:
                g = np.kron(g, np.ones((scale, scale), dtype=bool))
            gx, gy = int(x) + i * CHAR_W * scale, int(y)
            h, w = g.shape
            sx0, sy0 = max(0, -gx), max(0, -gy)
            sx1, sy1 = min(w, self.width - gx), min(h, self.height - gy)
            if sx0 >= sx1 or sy0 >= sy1:
                continue
            region = self.pixels[gy + sy0:gy + sy1, gx + sx0:gx + sx1]
            region[g[sy0:sy1, sx0:sx1]] = color

    def save(self, path: str) -> None:
        """Writes the canvas as a PNG file."""
        write_png(path, self.pixels)


def _nice_step(vmax: float) -> float:
    """A 1/2/5 x 10^k tick step giving 2 to 5 ticks up to vmax."""
    raw = vmax / 4
    k = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * k >= raw:
            return m * k
    return 10 * k


PALETTE: List[Color] = [(49, 110, 180), (222, 125, 44), (70, 150, 80), (150, 90, 170),
                        (190, 60, 60), (110, 110, 110)]


def bar_panels(path: str, labels: Sequence[str], panels: Sequence[dict], title: str = "",
               notes: Sequence[str] = (), panel_width: int = 250,
               row_height: int = 14) -> Tuple[int, int]:
    """Writes a PNG of horizontal bar panels that share their row labels.

    Parameters
    ----------
    path : str
        Output file.
    labels : sequence of str
        One label per row (left column).
    panels : sequence of dict
        Each with ``title`` (str), ``values`` (one float or None per row; None draws "n/a"),
        and optionally ``ref`` (a value marked by a dashed line, e.g. 1.0 for parity),
        ``fmt`` (format of the value printed after each bar, default ``"{:.2f}"``) and
        ``color``.
    title : str
        Printed at the top, at twice the font size.
    notes : sequence of str
        Lines printed under the panels.

    Returns
    -------
    (int, int)
        The image's width and height in pixels.
    """
    n = len(labels)
    label_w = max([Canvas.text_width(s) for s in labels] + [40]) + 12
    top = 12 + (2 * CHAR_H + 8 if title else 0) + CHAR_H + 8
    axis_h = CHAR_H + 10
    width = label_w + len(panels) * (panel_width + 16) + 8
    height = top + n * row_height + axis_h + len(notes) * (CHAR_H + 3) + 14
    cv = Canvas(width, height)
    if title:
        cv.text(8, 10, title, scale=2)
    grid, ink, faint = (150, 150, 150), (0, 0, 0), (235, 235, 235)
    for i, s in enumerate(labels):
        y = top + i * row_height
        if i % 2 == 1:
            cv.rect(0, y, width, y + row_height, (246, 246, 246))
        cv.text(6, y + (row_height - 7) // 2, s, ink)
    for p, panel in enumerate(panels):
        x0 = label_w + p * (panel_width + 16)
        value_w = 6 * CHAR_W
        bar_w = panel_width - value_w - 4
        fmt = panel.get("fmt", "{:.2f}")
        color = tuple(panel.get("color", PALETTE[p % len(PALETTE)]))
        vals = [v for v in panel["values"] if v is not None and math.isfinite(v)]
        ref = panel.get("ref")
        vmax = max(vals + ([ref] if ref is not None else []) + [1e-12])
        step = _nice_step(vmax)
        vmax = step * math.ceil(vmax / step)
        cv.text(x0, top - CHAR_H - 6, panel.get("title", ""), ink)
        y_end = top + n * row_height
        ticks = [k * step for k in range(int(round(vmax / step)) + 1)]
        for t in ticks:
            tx = x0 + int(round(bar_w * t / vmax))
            cv.vline(tx, top, y_end, faint)
            s = f"{t:g}"
            cv.text(tx - cv.text_width(s) // 2, y_end + 5, s, grid)
        for i, v in enumerate(panel["values"]):
            y = top + i * row_height
            if v is None or not math.isfinite(v):
                cv.text(x0 + 2, y + (row_height - 7) // 2, "n/a", grid)
                continue
            bw = max(1, int(round(bar_w * max(v, 0.0) / vmax)))
            cv.rect(x0, y + 2, x0 + bw, y + row_height - 2, color)
            cv.text(x0 + bw + 3, y + (row_height - 7) // 2, fmt.format(v), ink)
        cv.vline(x0, top, y_end, ink)
        cv.hline(x0, x0 + bar_w + 1, y_end, ink)
        if ref is not None:
            cv.vline(x0 + int(round(bar_w * ref / vmax)), top - 2, y_end, (200, 0, 0), dash=3)
    y = top + n * row_height + axis_h + 4
    for s in notes:
        cv.text(8, y, s, (60, 60, 60))
        y += CHAR_H + 3
    cv.save(path)
    return width, height
