"""Small SVG charts drawn from the data, so the HTML report is one self-contained file that opens offline."""

from __future__ import annotations

import math
from html import escape

PALETTE = ["#8c8c8c", "#e39b3b", "#2f7ed8", "#3aa57a", "#b84fc9", "#d64545", "#5a6acf"]


def color_for(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _nice_max(value: float) -> float:
    if value <= 0 or not math.isfinite(value):
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def bar_chart(title: str, groups: dict[str, dict[str, float]], series: list[str], width: int = 520,
              height: int = 240, y_max: float | None = None, percent: bool = True) -> str:
    """Grouped bars: one group per key of `groups` (a suite, a category), one bar per series (a system)."""
    values = [v for g in groups.values() for v in g.values() if v is not None and math.isfinite(v)]
    top = y_max if y_max is not None else _nice_max(max(values, default=1.0))
    left, right, top_pad, bottom = 44, 12, 28, 48
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<text x="{width / 2}" y="16" text-anchor="middle" class="chart-title">{escape(title)}</text>']
    for k in range(5):  # gridlines and y labels
        y = top_pad + plot_h - plot_h * k / 4
        label = f"{top * k / 4:.0%}" if percent else f"{top * k / 4:.3g}"
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{label}</text>')
    group_w = plot_w / max(len(groups), 1)
    bar_w = min(36.0, group_w * 0.8 / max(len(series), 1))
    for g, (group, by_series) in enumerate(groups.items()):
        start = left + g * group_w + (group_w - bar_w * len(series)) / 2
        for s, name in enumerate(series):
            value = by_series.get(name)
            if value is None or not math.isfinite(value):
                continue
            h = plot_h * min(max(value, 0.0), top) / top
            x, y = start + s * bar_w, top_pad + plot_h - h
            shown = f"{value:.0%}" if percent else f"{value:.3g}"
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 3:.1f}" height="{h:.1f}" '
                         f'fill="{color_for(s)}"><title>{escape(name)}: {shown}</title></rect>'
                         f'<text x="{x + (bar_w - 3) / 2:.1f}" y="{y - 3:.1f}" text-anchor="middle" '
                         f'class="value">{shown}</text>')
        parts.append(f'<text x="{left + g * group_w + group_w / 2:.1f}" y="{height - bottom + 16}" '
                     f'text-anchor="middle" class="tick">{escape(group)}</text>')
    parts.append(_legend(series, left, height - 14))
    parts.append("</svg>")
    return "".join(parts)


def line_chart(title: str, lines: dict[str, list[tuple[float, float]]], width: int = 520, height: int = 240,
               x_label: str = "step") -> str:
    """Lines (with dots for short series) sharing one x and one y axis."""
    points = [p for line in lines.values() for p in line if math.isfinite(p[1])]
    if not points:
        return ""
    x_max = max(p[0] for p in points) or 1.0
    y_max = _nice_max(max(p[1] for p in points))
    left, right, top_pad, bottom = 44, 12, 28, 48
    plot_w, plot_h = width - left - right, height - top_pad - bottom

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + plot_w * x / x_max, top_pad + plot_h - plot_h * min(y, y_max) / y_max

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<text x="{width / 2}" y="16" text-anchor="middle" class="chart-title">{escape(title)}</text>']
    for k in range(5):
        y = top_pad + plot_h - plot_h * k / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{y_max * k / 4:.3g}</text>')
    parts.append(f'<text x="{width - right}" y="{height - bottom + 16}" text-anchor="end" class="tick">'
                 f'{escape(x_label)} {x_max:g}</text>')
    for i, (name, line) in enumerate(lines.items()):
        pts = [xy(x, y) for x, y in line if math.isfinite(y)]
        if len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color_for(i + 2)}" stroke-width="2"/>')
        if len(pts) <= 12:
            parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color_for(i + 2)}"/>' for x, y in pts]
    parts.append(_legend(list(lines), left, height - 14, offset=2))
    parts.append("</svg>")
    return "".join(parts)


def _legend(names: list[str], x: float, y: float, offset: int = 0) -> str:
    parts, cursor = [], x
    for i, name in enumerate(names):
        parts.append(f'<rect x="{cursor:.1f}" y="{y - 9}" width="10" height="10" fill="{color_for(i + offset)}"/>'
                     f'<text x="{cursor + 14:.1f}" y="{y}" class="legend">{escape(name)}</text>')
        cursor += 24 + 7 * len(name)
    return "".join(parts)
