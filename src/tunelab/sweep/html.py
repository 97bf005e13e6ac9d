"""sweep.html: one self-contained page (inline CSS and SVG, no scripts, no network) with the trial table, a
scatter of the objective against each constraint's metric (pass and fail in two colours, the threshold drawn),
and a parallel-coordinates plot with one axis per swept key and one for the objective."""

from __future__ import annotations

import math
import re
from html import escape
from typing import Any

from tunelab.eval.html import CSS
from tunelab.sweep.plan import SweepPlan
from tunelab.sweep.space import Distribution
from tunelab.sweep.summary import SweepSummary

PASS, FAIL, OTHER, BEST = "#3aa57a", "#d64545", "#9a9a9a", "#2f7ed8"
_RULE = re.compile(r"^\s*(\S+)\s*(>=|<=|>|<|==)\s*(.+?)\s*$")
EXTRA_CSS = """
.point{stroke:#fff;stroke-width:1}.best-ring{fill:none;stroke:#2f7ed8;stroke-width:2.5}
.axis{stroke:#888;stroke-width:1}.threshold{stroke:#555;stroke-dasharray:5 4}
.trial-line{fill:none;stroke-width:2;opacity:.8}.trial-line.best{stroke-width:4;opacity:1}
.trial-line.stopped,.trial-line.failed{stroke-dasharray:6 4}.axis-label{font-size:11px;fill:#333;font-weight:600}
.best-box{border:1px solid #cfe3d5;background:#f3faf5;padding:8px 12px}.none-box{border:1px solid #f0c7c3;
background:#fdf0ef;padding:8px 12px}
"""


def render_sweep_html(plan: SweepPlan, summary: SweepSummary) -> str:
    better = "higher" if summary.mode == "max" else "lower"
    counts = {s: sum(t.status == s for t in summary.ranked) for s in ("finished", "stopped", "failed", "pending")}
    body = [f"<h1>Sweep: {escape(plan.root.name)}</h1>",
            f"<p class='muted'>{len(summary.ranked)} trials ({plan.search} search): "
            + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
            + f". Objective <code>{escape(summary.objective)}</code>, {better} is better"
            + (f"; constraints: {', '.join(f'<code>{escape(c)}</code>' for c in summary.constraints)}"
               if summary.constraints else "; no constraints") + ".</p>"]
    best = summary.best
    if best is not None:
        values = ", ".join(f"<code>{escape(k)}={escape(str(v))}</code>" for k, v in best.params.items())
        body.append(f"<div class='best-box'><b>Best:</b> <a href='{escape(best.name)}/eval/report.html'>"
                    f"{escape(best.name)}</a>, {values}: {escape(summary.objective)} = {best.objective:.4g}. "
                    "Its config: <code>best.yaml</code>.</div>")
    else:
        body.append(f"<div class='none-box'><b>No best trial:</b> {escape(summary.problem() or '')}.</div>")
    body += _table(plan, summary)
    against = "the constraints" if summary.constraints else "the final val loss"
    body.append(f"<h2>Objective against {against}</h2><div class='charts'>")
    body += [_scatter(summary, rule) for rule in (summary.constraints or [None])]
    body.append("</div><h2>Parameters and objective</h2><div class='charts'>")
    body.append(_parallel(plan, summary))
    body.append("</div>")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>tunelab sweep: "
            f"{escape(plan.root.name)}</title><style>{CSS}{EXTRA_CSS}</style></head><body>{''.join(body)}"
            "</body></html>\n")


def _table(plan: SweepPlan, summary: SweepSummary) -> list[str]:
    head = ["rank", "trial", *plan.space, "status", "steps", "val loss", summary.objective, *summary.constraints]
    out = ["<h2>Trials</h2><table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for position, t in enumerate(summary.ranked, 1):
        link = (f"<a href='{escape(t.name)}/eval/report.html'>{escape(t.name)}</a>" if t.status == "finished"
                else escape(t.name))
        rules = {r["rule"]: r for r in t.constraints}
        cells = [f"{position}{' (best)' if t is summary.best else ''}", link,
                 *(escape(_fmt(t.params.get(k))) for k in plan.space),
                 escape(t.status + (f": {t.error}" if t.error else "")),
                 "" if t.step is None else str(t.step), _num(t.val_loss), _num(t.objective)]
        for rule in summary.constraints:
            r = rules.get(rule.strip())
            cells.append("" if r is None else f"<span class='{'pass' if r['passed'] else 'fail'}'>"
                         f"{'PASS' if r['passed'] else 'FAIL'}</span> {r['left']:.4g}")
        numeric = {0, *range(len(head) - len(summary.constraints) - 3, len(head))}  # rank, steps .. constraints
        out.append(f"<tr class='trial-row' data-trial='{escape(t.name)}'>" + "".join(
            f"<td class='num'>{c}</td>" if i in numeric else f"<td>{c}</td>" for i, c in enumerate(cells)) + "</tr>")
    out.append("</table>")
    return out


def _num(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _scatter(summary: SweepSummary, rule: str | None, width: int = 460, height: int = 340) -> str:
    """y: the objective; x: the constraint's left-hand metric (or its margin over a metric on the right), or the
    final val loss when there are no constraints."""
    points = []  # (x, y, trial, passed)
    x_label, threshold = "final val loss", None
    for t in summary.ranked:
        if t.status != "finished" or t.objective is None:
            continue
        if rule is None:
            if t.val_loss is not None and math.isfinite(t.val_loss):
                points.append((t.val_loss, t.objective, t, True))
            continue
        r = next((r for r in t.constraints if r["rule"] == rule.strip()), None)
        if r is None:
            continue
        left, right_text = _sides(rule)
        if _is_number(right_text):
            x_label, threshold = left, r["right"]
            points.append((r["left"], t.objective, t, r["passed"]))
        else:
            x_label, threshold = f"{left} - ({right_text})", 0.0
            points.append((r["left"] - r["right"], t.objective, t, r["passed"]))
    title = f"{summary.objective} vs {x_label}"
    left_pad, right_pad, top_pad, bottom = 56, 16, 30, 70
    plot_w, plot_h = width - left_pad - right_pad, height - top_pad - bottom
    xs = [p[0] for p in points] + ([threshold] if threshold is not None else [])
    ys = [p[1] for p in points]
    x_lo, x_hi = _span(xs)
    y_lo, y_hi = _span(ys)

    def xy(x: float, y: float) -> tuple[float, float]:
        return (left_pad + plot_w * (x - x_lo) / (x_hi - x_lo), top_pad + plot_h - plot_h * (y - y_lo) / (y_hi - y_lo))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="scatter" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<text x="{width / 2}" y="16" text-anchor="middle" class="chart-title">{escape(title)}</text>']
    for k in range(5):
        y = top_pad + plot_h - plot_h * k / 4
        x = left_pad + plot_w * k / 4
        parts.append(f'<line x1="{left_pad}" x2="{width - right_pad}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left_pad - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
                     f'{y_lo + (y_hi - y_lo) * k / 4:.3g}</text>'
                     f'<text x="{x:.1f}" y="{height - bottom + 16}" text-anchor="middle" class="tick">'
                     f'{x_lo + (x_hi - x_lo) * k / 4:.3g}</text>')
    parts.append(f'<text x="{left_pad + plot_w / 2}" y="{height - bottom + 36}" text-anchor="middle" '
                 f'class="axis-label">{escape(x_label)}</text>')
    if threshold is not None:
        tx = xy(threshold, y_lo)[0]
        parts.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{top_pad}" y2="{top_pad + plot_h}" class="threshold">'
                     f'<title>{escape(rule or "")}</title></line>')
    for x, y, t, passed in points:
        cx, cy = xy(x, y)
        kind = "pass" if passed else "fail"
        parts.append(f'<circle class="point {kind}" data-trial="{escape(t.name)}" cx="{cx:.1f}" cy="{cy:.1f}" r="6" '
                     f'fill="{PASS if passed else FAIL}"><title>{escape(t.name)}: {escape(summary.objective)} = '
                     f'{y:.4g}, {escape(x_label)} = {x:.4g} ({"meets" if passed else "breaks"} the constraint)'
                     f'</title></circle>')
        if t is summary.best:
            parts.append(f'<circle class="best-ring" cx="{cx:.1f}" cy="{cy:.1f}" r="10"/>')
    legend = [("meets the constraint", PASS), ("breaks it", FAIL)] if rule else [("finished trial", PASS)]
    parts.append(_legend([*legend, ("best", BEST)], left_pad, height - 10))
    parts.append("</svg>")
    return "".join(parts)


def _sides(rule: str) -> tuple[str, str]:
    match = _RULE.match(rule)
    return (match.group(1), match.group(3)) if match else (rule, "")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _span(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    pad = (hi - lo) * 0.08 or max(abs(hi) * 0.1, 0.05)
    return lo - pad, hi + pad


def _parallel(plan: SweepPlan, summary: SweepSummary, height: int = 340) -> str:
    """One vertical axis per swept key (log scale for log-uniform ranges and lists spanning 100x), then the
    objective; one line per trial that ran, coloured by whether it met the constraints."""
    trials = [t for t in summary.ranked if t.status in ("finished", "stopped", "failed")]
    keys = list(plan.space)
    axes = [_axis(k, plan.space[k], [t.params.get(k) for t in trials]) for k in keys]
    axes.append(_axis(summary.objective, None, [t.objective for t in trials if t.objective is not None]))
    width = max(600, 150 * len(axes))
    left_pad, right_pad, top_pad, bottom = 60, 60, 44, 40
    plot_h = height - top_pad - bottom
    step = (width - left_pad - right_pad) / max(len(axes) - 1, 1)
    better = "higher" if summary.mode == "max" else "lower"
    title = f"{len(trials)} trials: swept values and {summary.objective} ({better} is better)"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="parallel" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<text x="{width / 2}" y="16" text-anchor="middle" class="chart-title">{escape(title)}</text>']
    for i, axis in enumerate(axes):
        x = left_pad + i * step
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top_pad}" y2="{top_pad + plot_h}" class="axis"/>'
                     f'<text x="{x:.1f}" y="{top_pad - 10}" text-anchor="middle" class="axis-label">'
                     f'{escape(axis["name"].rsplit(".", 1)[-1] if i < len(keys) else axis["name"])}</text>')
        for label, pos in axis["ticks"]:
            y = top_pad + plot_h * (1 - pos)
            parts.append(f'<text x="{x + 5:.1f}" y="{y + 4:.1f}" class="tick">{escape(label)}</text>')
    for t in trials:
        values = [*(t.params.get(k) for k in keys), t.objective]
        points = []
        for i, (axis, value) in enumerate(zip(axes, values)):
            pos = axis["place"](value)
            if pos is None:
                break
            points.append(f"{left_pad + i * step:.1f},{top_pad + plot_h * (1 - pos):.1f}")
        color = OTHER if t.status != "finished" or t.objective is None else (PASS if t.feasible else FAIL)
        best = " best" if t is summary.best else ""
        shown = ", ".join(f"{k}={_fmt(t.params.get(k))}" for k in keys)
        label = (f"<title>{escape(t.name)} ({t.status}): {escape(shown)}; {escape(summary.objective)} = "
                 f"{_num(t.objective) or '-'}</title>")
        parts.append(f'<polyline class="trial-line {t.status}{best}" data-trial="{escape(t.name)}" '
                     f'points="{" ".join(points)}" stroke="{BEST if best else color}">{label}</polyline>')
        if points and t.objective is None:  # stopped or failed: the line ends where its values end, marked
            x, y = points[-1].split(",")
            parts.append(f'<circle class="line-end" cx="{x}" cy="{y}" r="4" fill="{color}">{label}</circle>')
    legend = [("meets the constraints" if summary.constraints else "finished", PASS)]
    legend += [("breaks a constraint", FAIL)] if summary.constraints else []
    parts.append(_legend([*legend, ("stopped or failed", OTHER), ("best", BEST)], left_pad, height - 10))
    parts.append("</svg>")
    return "".join(parts)


def _axis(name: str, spec: list[Any] | Distribution | None, values: list[Any]) -> dict[str, Any]:
    """How to place a value on a vertical axis (0 bottom .. 1 top), and its tick labels."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if spec is not None and isinstance(spec, list):
        candidates = spec
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec)
    else:
        candidates, numeric = numbers, True
    if not numeric:  # categories, evenly spaced in the order the sweep lists them
        labels = [str(v) for v in candidates]
        n = len(labels)

        def place_category(value: Any) -> float | None:
            return (labels.index(str(value)) + 0.5) / n if str(value) in labels else None

        return {"name": name, "place": place_category, "ticks": [(label, (i + 0.5) / n) for i, label in enumerate(labels)]}
    known = [float(v) for v in [*candidates, *numbers]
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if isinstance(spec, Distribution):
        known += [spec.low, spec.high]
    lo, hi = (min(known), max(known)) if known else (0.0, 1.0)
    log = lo > 0 and ((isinstance(spec, Distribution) and spec.kind == "loguniform") or hi / lo >= 100)
    f = math.log10 if log else (lambda v: v)
    a, b = f(lo), f(hi)

    def place(value: Any) -> float | None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return None
        if log and value <= 0:
            return None
        return 0.5 if b == a else 0.05 + 0.9 * (f(float(value)) - a) / (b - a)

    ticks = sorted({float(v) for v in known}) if len(set(known)) <= 6 else [lo, (lo + hi) / 2, hi]
    return {"name": name, "place": place, "ticks": [(f"{v:.3g}", place(v)) for v in ticks if place(v) is not None]}


def _legend(items: list[tuple[str, str]], x: float, y: float) -> str:
    parts, cursor = [], x
    for name, color in items:
        parts.append(f'<rect x="{cursor:.1f}" y="{y - 9}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{cursor + 14:.1f}" y="{y}" class="legend">{escape(name)}</text>')
        cursor += 24 + 6.5 * len(name)
    return "".join(parts)
