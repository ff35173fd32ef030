"""Inline SVG plots drawn in Python: a labelled scatter, line curves, horizontal bars.

No JavaScript and no external references: each function returns an <svg> element as
text (no xmlns attribute: inline SVG in HTML5 does not need one) sized by viewBox so
it scales with the page. Axis ticks follow the 1-2-5 rule; a log axis is used when the
data spans more than `LOG_SPAN` (latencies of PyTorch vs optimised engines often do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from typing import Sequence

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")  # fmt: skip
LOG_SPAN = 20.0
CHAR_W = 6.6  # average glyph width at font-size 12, for label layout


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values covering [lo, hi] with a 1/2/5 x 10^k step."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, count - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks, t = [], start
    while t <= hi + step * 1e-6:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks on a log axis, from the last one <= lo to the first one >= hi (lo > 0)."""
    first, last = math.floor(math.log10(lo)) - 1, math.floor(math.log10(hi)) + 1
    cands = sorted(m * 10.0**k for k in range(first, last + 1) for m in (1, 2, 5))
    below = max(c for c in cands if c <= lo * 1.0001)
    above = min(c for c in cands if c >= hi / 1.0001)
    return [c for c in cands if below <= c <= above]


def tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:g}" if abs(v) >= 0.01 else f"{v:.0e}"


@dataclass
class Axis:
    lo: float
    hi: float
    px_lo: float
    px_hi: float
    log: bool = False
    ticks: list[float] = field(default_factory=list)

    @classmethod
    def fit(cls, values: Sequence[float], px_lo: float, px_hi: float, pad: float = 0.08,
            allow_log: bool = False, include_zero: bool = False, min_span: float = 0.0) -> "Axis":
        """An axis over `values`. `min_span`: the linear axis covers at least this much (centred
        on the data), so a difference far below what matters, e.g. 0.00005 NME points between
        two engines against a gate of 0.1, is drawn as the sliver it is and not as a cliff."""
        vals = [v for v in values if v is not None and math.isfinite(v)] or [0.0, 1.0]
        lo, hi = min(vals), max(vals)
        if allow_log and lo > 0 and hi / lo > LOG_SPAN:
            ticks = log_ticks(lo, hi)
            return cls(ticks[0], ticks[-1], px_lo, px_hi, True, ticks)
        if include_zero:
            lo = min(lo, 0.0)
        if hi - lo < min_span:
            widen = min_span - (hi - lo)
            lo, hi = (lo, hi + widen) if include_zero and lo == 0 else (lo - widen / 2, hi + widen / 2)
        span = (hi - lo) or (abs(hi) or 1.0)
        lo, hi = lo - span * pad if not (include_zero and lo == 0) else lo, hi + span * pad
        ticks = nice_ticks(lo, hi)
        return cls(ticks[0], ticks[-1], px_lo, px_hi, False, ticks)

    def __call__(self, v: float) -> float:
        if self.log:
            a, b, x = math.log10(self.lo), math.log10(self.hi), math.log10(max(v, self.lo))
        else:
            a, b, x = self.lo, self.hi, v
        return self.px_lo + (x - a) / ((b - a) or 1.0) * (self.px_hi - self.px_lo)


def _text(x: float, y: float, s: str, anchor: str = "start", size: int = 12, cls: str = "", extra: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{c}{extra}>'
            f"{escape(s)}</text>")


def _frame(width: int, height: int, title: str, body: list[str]) -> str:
    return (f'<svg class="plot" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'role="img" aria-label="{escape(title, quote=True)}" preserveAspectRatio="xMinYMin meet">'
            f"<title>{escape(title)}</title>" + "".join(body) + "</svg>")


def _axes(xa: Axis, ya: Axis, x_label: str, y_label: str, height: int) -> list[str]:
    out = []
    left, right, top, bottom = xa.px_lo, xa.px_hi, ya.px_hi, ya.px_lo
    for t in xa.ticks:
        x = xa(t)
        out.append(f'<line x1="{x:.1f}" y1="{top:.1f}" x2="{x:.1f}" y2="{bottom:.1f}" class="grid"/>')
        out.append(f'<line x1="{x:.1f}" y1="{bottom:.1f}" x2="{x:.1f}" y2="{bottom + 5:.1f}" class="axis"/>')
        out.append(_text(x, bottom + 18, tick_label(t), "middle", 11))
    for t in ya.ticks:
        y = ya(t)
        out.append(f'<line x1="{left:.1f}" y1="{y:.1f}" x2="{right:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<line x1="{left - 5:.1f}" y1="{y:.1f}" x2="{left:.1f}" y2="{y:.1f}" class="axis"/>')
        out.append(_text(left - 8, y + 4, tick_label(t), "end", 11))
    out.append(f'<rect x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" height="{bottom - top:.1f}" '
               'class="frame"/>')
    out.append(_text((left + right) / 2, height - 8, x_label + (" (log scale)" if xa.log else ""), "middle", 12,
                     "axis-label"))
    cy = (top + bottom) / 2
    out.append(_text(16, cy, y_label, "middle", 12, "axis-label", f' transform="rotate(-90 16 {cy:.1f})"'))
    return out


def _place_label(x: float, y: float, text: str, placed: list[tuple[float, float, float, float]],
                 right_edge: float) -> tuple[float, float, str]:
    w, h = len(text) * CHAR_W, 13.0
    for dy in (0, -14, 14, -28, 28, -42, 42, -56, 56):
        for side in ("right", "left"):
            lx = x + 8 if side == "right" else x - 8 - w
            if side == "right" and lx + w > right_edge:
                continue
            box = (lx, y + dy - 10, lx + w, y + dy - 10 + h)
            if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed):
                placed.append(box)
                return (lx if side == "right" else x - 8), y + dy, "start" if side == "right" else "end"
    placed.append((x + 8, y - 10, x + 8 + w, y + 3))
    return x + 8, y, "start"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower is better), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_y = [], math.inf
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def scatter_svg(points: Sequence[dict], x_label: str, y_label: str, title: str,
                width: int = 760, height: int = 440, y_higher_is_better: bool = False,
                y_min_span: float = 0.0) -> str:
    """points: dicts with x, y, label, colour. Marks and joins the Pareto front (lower x is
    better; lower y too unless `y_higher_is_better`, e.g. PCKh). The y axis spans at least
    `y_min_span` (Axis.fit)."""
    left, right, top, bottom = 72, width - 24, 20, height - 52
    xa = Axis.fit([p["x"] for p in points], left, right, allow_log=True)
    ya = Axis.fit([p["y"] for p in points], bottom, top, min_span=y_min_span)
    body = _axes(xa, ya, x_label, y_label, height)
    front = pareto_front([(p["x"], -p["y"] if y_higher_is_better else p["y"]) for p in points])
    if len(front) > 1:
        xy = []
        for a, b in zip(front, front[1:]):
            xy += [(xa(points[a]["x"]), ya(points[a]["y"])), (xa(points[b]["x"]), ya(points[a]["y"]))]
        xy.append((xa(points[front[-1]]["x"]), ya(points[front[-1]]["y"])))
        body.append('<polyline class="front" points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in xy) + '"/>')
    placed: list[tuple[float, float, float, float]] = []
    for i, p in enumerate(points):
        x, y = xa(p["x"]), ya(p["y"])
        r = 6 if i in front else 4.5
        body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{p["colour"]}" class="point">'
                    f"<title>{escape(p['label'])}: {p['x']:.3g} / {p['y']:.3g}</title></circle>")
        placed.append((x - r, y - r, x + r, y + r))
    for p in points:
        lx, ly, anchor = _place_label(xa(p["x"]), ya(p["y"]), p["label"], placed, right)
        body.append(_text(lx, ly, p["label"], anchor, 12, "point-label"))
    return _frame(width, height, title, body)


def lines_svg(series: Sequence[dict], x_label: str, y_label: str, title: str, x_max: float,
              y_max: float = 100.0, marker_x: float | None = None, marker_label: str = "",
              width: int = 760, height: int = 440) -> str:
    """series: dicts with label, colour, xs, ys. Legend on the right; optional dashed x marker."""
    legend_w = min(330, 40 + int(CHAR_W * max((len(s["label"]) for s in series), default=8)))
    left, right, top, bottom = 64, width - legend_w - 16, 20, height - 52
    xa = Axis(0.0, x_max, left, right, ticks=nice_ticks(0.0, x_max))
    xa.hi = xa.ticks[-1]
    ya = Axis(0.0, y_max, bottom, top, ticks=nice_ticks(0.0, y_max))
    ya.hi = ya.ticks[-1]
    body = _axes(xa, ya, x_label, y_label, height)
    if marker_x is not None:
        mx = xa(marker_x)
        body.append(f'<line x1="{mx:.1f}" y1="{top}" x2="{mx:.1f}" y2="{bottom}" class="marker"/>')
        body.append(_text(mx + 4, top + 14, marker_label or tick_label(marker_x), "start", 11, "muted"))
    for s in series:
        pts = " ".join(f"{xa(x):.1f},{ya(y):.1f}" for x, y in zip(s["xs"], s["ys"]))
        body.append(f'<polyline class="curve" stroke="{s["colour"]}" points="{pts}">'
                    f"<title>{escape(s['label'])}</title></polyline>")
    lx = right + 16
    for i, s in enumerate(series):
        y = top + 10 + i * 18
        body.append(f'<line x1="{lx}" y1="{y}" x2="{lx + 22}" y2="{y}" stroke="{s["colour"]}" class="legend-line"/>')
        body.append(_text(lx + 28, y + 4, s["label"], "start", 12))
    return _frame(width, height, title, body)


def hbars_svg(rows: Sequence[tuple[str, float, str]], x_label: str, title: str, colour_: str = PALETTE[0],
              width: int = 760) -> str:
    """rows: (label, value, value text), drawn top to bottom in the given order."""
    label_w = min(300, 16 + int(CHAR_W * max((len(r[0]) for r in rows), default=4)))
    value_w = 14 + int(CHAR_W * 0.95 * max((len(r[2]) for r in rows), default=4))  # value text at size 11
    bar_h, gap, top = 16, 6, 10
    height = top + len(rows) * (bar_h + gap) + 44
    left, right = label_w, width - value_w
    xa = Axis(0.0, 1.0, left, right, ticks=nice_ticks(0.0, max((r[1] for r in rows), default=1.0) or 1.0, 5))
    xa.hi = xa.ticks[-1]
    bottom = top + len(rows) * (bar_h + gap)
    body = []
    for t in xa.ticks:
        x = xa(t)
        body.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" class="grid"/>')
        body.append(_text(x, bottom + 16, tick_label(t), "middle", 11))
    for i, (label, value, text) in enumerate(rows):
        y = top + i * (bar_h + gap)
        w = max(0.5, xa(value) - left)
        body.append(_text(left - 6, y + bar_h - 4, label, "end", 12))
        body.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour_}" class="bar">'
                    f"<title>{escape(label)}: {escape(text)}</title></rect>")
        body.append(_text(left + w + 6, y + bar_h - 4, text, "start", 11, "muted"))
    body.append(_text((left + right) / 2, height - 8, x_label, "middle", 12, "axis-label"))
    return _frame(width, height, title, body)
