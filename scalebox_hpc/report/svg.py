"""Small inline-SVG charts for the report: lines over time, bars, a timeline (Gantt).

Our own code rather than a plotting library: four chart kinds, a few hundred lines, no
dependency, no script in the output (a tooltip is an SVG ``<title>``), and every text that
reaches the markup goes through :func:`esc`. Pure functions: plain values in, markup out.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f",
           "#bab0ac", "#86bcb6", "#8cd17d", "#d4a6c8")
FAILED = "#e15759"
WIDTH = 920

# what a task prints is untrusted: escape sequences and control characters go (as the CLI's
# terminal_safe does), the rest is HTML-escaped, quotes included (it also lands in attributes)
_ESCAPE_SEQ = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[\]PX^_][^\x07\x1b\n]*(?:\x07|\x1b\\)|\x1b[ -/]*[0-~]")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffe\uffff\ud800-\udfff]")


def clean(text: str) -> str:
    """``text`` without escape sequences, control characters (tab and newline kept), lone
    surrogates and non-characters: nothing a browser, an XML parser or a terminal acts on."""
    return _CONTROL.sub("", _ESCAPE_SEQ.sub("", text))


def esc(text: object) -> str:
    """Any value as HTML/SVG text or attribute content: cleaned, then escaped (``<>&"'``)."""
    return html.escape(clean(str(text)), quote=True)


def color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def fmt_seconds(s: float) -> str:
    """A duration the way people read it: 850 ms, 12.5 s, 3m20s, 2h05m, 3d04h."""
    if not math.isfinite(s):
        return "?"
    if s < 0.001:
        return f"{s * 1e6:.0f} µs" if s > 0 else "0 s"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.3g} s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d{int(s % 86400 // 3600):02d}h"


def fmt_number(x: float) -> str:
    """Counts with thousands separators, other numbers with 3 significant digits."""
    if float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:.3g}"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover - unreachable


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """0 and round steps (1, 2, 5 times 10^k) up to at least ``top``."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    n = math.ceil(top / step - 1e-9)
    return [i * step for i in range(n + 1)]


@dataclass(frozen=True)
class _Frame:
    """Plot area inside an SVG of WIDTH by height."""

    height: int
    left: int = 64
    right: int = 16
    top: int = 12
    bottom: int = 30

    @property
    def w(self) -> int:
        return WIDTH - self.left - self.right

    @property
    def h(self) -> int:
        return self.height - self.top - self.bottom


def _svg(height: int, body: list[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{esc(label)}">' + "".join(body) + "</svg>")


def _time_axis(f: _Frame, span: float, body: list[str]) -> None:
    """x ticks as elapsed time since the start of the span."""
    for t in nice_ticks(span, 6):
        if t > span * 1.0001:
            break
        x = f.left + f.w * (t / span if span else 0)
        body.append(f'<line x1="{x:.1f}" y1="{f.top + f.h}" x2="{x:.1f}" y2="{f.top + f.h + 4}" class="ax"/>'
                    f'<text x="{x:.1f}" y="{f.top + f.h + 17}" class="tick" text-anchor="middle">'
                    f"{esc(fmt_seconds(t) if t else '0')}</text>")


def _value_axis(f: _Frame, ticks: list[float], body: list[str], fmt: str = "n") -> None:
    top = ticks[-1] or 1
    for v in ticks:
        y = f.top + f.h - f.h * v / top
        label = fmt_seconds(v) if fmt == "s" else fmt_number(v)
        body.append(f'<line x1="{f.left}" y1="{y:.1f}" x2="{f.left + f.w}" y2="{y:.1f}" class="grid"/>'
                    f'<text x="{f.left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{esc(label)}</text>')
    body.append(f'<line x1="{f.left}" y1="{f.top + f.h}" x2="{f.left + f.w}" y2="{f.top + f.h}" class="ax"/>')


def legend(names: Sequence[str], colors: Sequence[str]) -> str:
    """An HTML legend: a swatch and a name each."""
    items = "".join(f'<span class="key"><i style="background:{c}"></i>{esc(n)}</span>'
                    for n, c in zip(names, colors, strict=True))
    return f'<div class="legend">{items}</div>'


def line_chart(series: Mapping[str, Sequence[float]], colors: Mapping[str, str], *, bucket_seconds: float,
               label: str, height: int = 240) -> str:
    """Lines over time, one per series, a point per bucket (x = the bucket's end, elapsed)."""
    f = _Frame(height)
    n = max((len(v) for v in series.values()), default=0)
    span = bucket_seconds * n
    top = max((max(v, default=0) for v in series.values()), default=0)
    ticks = nice_ticks(float(top))
    body: list[str] = []
    _value_axis(f, ticks, body)
    _time_axis(f, span, body)
    scale = ticks[-1] or 1
    for name, values in series.items():
        if not values:
            continue
        pts = " ".join(f"{f.left + f.w * (i + 1) / n:.1f},{f.top + f.h - f.h * v / scale:.1f}"
                       for i, v in enumerate(values))
        body.append(f'<polyline points="{pts}" fill="none" stroke="{colors.get(name, PALETTE[0])}" '
                    f'stroke-width="1.6"><title>{esc(name)}</title></polyline>')
    return _svg(height, body, label)


def bar_chart(labels: Sequence[str], values: Sequence[int], *, fill: str, label: str, height: int = 170) -> str:
    """Vertical bars with a label under each (a histogram's bins)."""
    f = _Frame(height, bottom=34)
    ticks = nice_ticks(float(max(values, default=0)))
    body: list[str] = []
    _value_axis(f, ticks, body)
    n = max(len(values), 1)
    slot = f.w / n
    every = max(1, math.ceil(n / 14))  # at most ~14 labels under the bars
    for i, (name, v) in enumerate(zip(labels, values, strict=True)):
        h = f.h * v / (ticks[-1] or 1)
        x = f.left + i * slot
        body.append(f'<rect x="{x + 1:.1f}" y="{f.top + f.h - h:.1f}" width="{max(slot - 2, 1):.1f}" '
                    f'height="{h:.1f}" fill="{fill}"><title>{esc(name)}: {esc(fmt_number(v))}</title></rect>')
        if i % every == 0:
            body.append(f'<text x="{x + slot / 2:.1f}" y="{f.top + f.h + 15}" class="tick" '
                        f'text-anchor="middle">{esc(name)}</text>')
    return _svg(height, body, label)


@dataclass(frozen=True)
class GanttBar:
    lane: int
    start: float
    """seconds since the chart's start"""
    end: float
    fill: str
    title: str


def gantt(lanes: Sequence[str], bars: Sequence[GanttBar], *, span: float, label: str, max_height: int = 900) -> str:
    """A timeline: one row per lane, a rectangle per bar (a tooltip each)."""
    lane_h = max(3.0, min(18.0, (max_height - 50) / max(len(lanes), 1)))
    height = int(lane_h * max(len(lanes), 1)) + 42
    f = _Frame(height, left=170)
    body: list[str] = []
    _time_axis(f, span, body)
    body.append(f'<line x1="{f.left}" y1="{f.top + f.h}" x2="{f.left + f.w}" y2="{f.top + f.h}" class="ax"/>')
    if lane_h >= 9:
        for i, name in enumerate(lanes):
            body.append(f'<text x="{f.left - 6}" y="{f.top + lane_h * i + lane_h * 0.75:.1f}" class="tick" '
                        f'text-anchor="end">{esc(name[:28])}<title>{esc(name)}</title></text>')
    scale = f.w / span if span > 0 else 0
    for b in bars:
        x = f.left + max(0.0, b.start) * scale
        w = max(0.6, (b.end - max(0.0, b.start)) * scale)
        y = f.top + lane_h * b.lane
        body.append(f'<rect x="{x:.1f}" y="{y + 0.5:.1f}" width="{w:.1f}" height="{max(lane_h - 1, 1):.1f}" '
                    f'fill="{b.fill}"><title>{esc(b.title)}</title></rect>')
    return _svg(height, body, label)
