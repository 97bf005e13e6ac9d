"""report.html: one self-contained page (inline CSS and SVG, no scripts, no network) with the summary,
a bar chart per metric, the loss curves, forgetting per category, the gate, and every example side by side
with its differences from the reference highlighted, worst regressions first."""

from __future__ import annotations

import difflib
from html import escape
from typing import Any

from tunelab.eval.charts import bar_chart, color_for, line_chart
from tunelab.eval.probes import CATEGORIES
from tunelab.eval.report import (PERCENT_METRICS, format_metric, harness_note, order_rows, row_passed,
                                 score_with_stderr, where_generated)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:12px}.charts svg{border:1px solid #eee;background:#fff}
.chart-title{font-size:13px;font-weight:600}.tick,.legend{font-size:11px;fill:#555}.value{font-size:10px;fill:#333}
.grid{stroke:#eee}.pass{color:#1b7d3a;font-weight:600}.fail{color:#b3261e;font-weight:600}
.ex td{max-width:260px;white-space:pre-wrap;word-break:break-word;font-size:13px}
.ok{background:#eef8f0}.bad{background:#fdf0ef}mark{background:#ffd9d6;padding:0 1px}
.muted{color:#777}
"""


def _highlight(output: str, reference: str) -> str:
    """Words of the output that are not in the reference, marked."""
    out_words, ref_words = output.split(), reference.split()
    matcher = difflib.SequenceMatcher(a=[w.lower() for w in ref_words], b=[w.lower() for w in out_words], autojunk=False)
    parts = []
    for tag, _, _, j1, j2 in matcher.get_opcodes():
        chunk = escape(" ".join(out_words[j1:j2]))
        if chunk:
            parts.append(chunk if tag == "equal" else f"<mark>{chunk}</mark>")
    return " ".join(parts)


def render_html(metrics: dict[str, Any], rows: list[dict[str, Any]], history: list[dict[str, Any]], title: str) -> str:
    systems = metrics["systems"]
    body = [f"<h1>Evaluation: {escape(title)}</h1>",
            f'<p class="muted">{metrics["timing"]["prompts_generated"]} answers generated in '
            f'{metrics["timing"]["seconds"]:.0f} s{escape(where_generated(metrics["timing"]))}, greedy decoding. '
            f'Systems: {escape(", ".join(systems))}.</p>']
    body += _gate(metrics.get("gate", []), metrics.get("gate_source") == "default")
    for suite, result in metrics["suites"].items():
        body.append(f"<h2>Suite: {escape(suite)} ({result['n_examples']} examples)</h2>")
        names = [m for m in next(iter(result["systems"].values()))]
        body.append("<table><tr><th>system</th>" + "".join(f"<th>{escape(m)}</th>" for m in names) + "</tr>")
        for system, values in result["systems"].items():
            body.append(f"<tr><td>{escape(system)}</td>" +
                        "".join(f'<td class="num">{format_metric(values.get(m), m)}</td>' for m in names) + "</tr>")
        body.append("</table><div class='charts'>")
        for metric in names:
            if metric == "perplexity":
                continue
            groups = {metric: {s: v.get(metric) for s, v in result["systems"].items()}}
            body.append(bar_chart(f"{suite}: {metric}", groups, systems, width=max(220, 90 * len(systems)),
                                  y_max=1.0 if metric in PERCENT_METRICS else None,
                                  percent=metric in PERCENT_METRICS))
        body.append("</div>")
    body += _curves(history)
    body += _forgetting(metrics.get("forgetting"))
    body += _harness(metrics.get("harness"))
    if metrics.get("judge"):
        body.append("<h2>LLM judge (1-5)</h2><table><tr><th>system</th><th>mean score</th><th>judged</th></tr>")
        for system, j in metrics["judge"].items():
            body.append(f'<tr><td>{escape(system)}</td><td class="num">{j["mean"]:.2f}</td>'
                        f'<td class="num">{j["n"]}</td></tr>')
        body.append("</table>")
    body += _examples(rows, systems)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>tunelab eval: {escape(title)}"
            f"</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


def _gate(gate: list[dict[str, Any]], default: bool) -> list[str]:
    if not gate:
        return []
    out = ["<h2>Gate</h2>"]
    if default:
        out.append("<p>The default rules: set <code>eval.gate</code> to replace them, <code>eval.gate: []</code> "
                   "to switch the gate off.</p>")
    out.append("<table><tr><th>rule</th><th>result</th><th>measured</th><th>needed</th></tr>")
    for g in gate:
        verdict = '<span class="pass">PASS</span>' if g["passed"] else '<span class="fail">FAIL</span>'
        if g.get("left") is None:  # a rule naming a number this eval did not measure
            out.append(f"<tr><td><code>{escape(g['rule'])}</code></td><td>{verdict}</td>"
                       f'<td colspan="2">{escape(g.get("error", "not measured"))}</td></tr>')
            continue
        out.append(f"<tr><td><code>{escape(g['rule'])}</code></td><td>{verdict}</td>"
                   f'<td class="num">{g["left"]:.4f}</td><td class="num">{g["right"]:.4f}</td></tr>')
    out.append("</table>")
    return out


def _curves(history: list[dict[str, Any]]) -> list[str]:
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    val += [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if not train:
        return []
    # Training with rehearsal rows (data.replay): the task's and the replay rows' losses, apart.
    parts = {f"{name} loss": [(r["step"], r[f"{name}_loss"]) for r in history if f"{name}_loss" in r]
             for name in ("task", "replay")}
    lines = {"train loss": train, **{k: v for k, v in parts.items() if v}, **({"val loss": val} if val else {})}
    chart = line_chart("training and validation loss", lines, width=640)
    return ["<h2>Loss curves</h2>", f"<div class='charts'>{chart}</div>"]


def _forgetting(forgetting: dict[str, Any] | None) -> list[str]:
    if not forgetting or "base" not in forgetting:
        return []
    systems = [s for s in ("base", "tuned") if s in forgetting]
    groups = {c: {s: forgetting[s][c] for s in systems} for c in (*CATEGORIES, "overall")}
    out = [f"<h2>Forgetting probes ({forgetting['n_probes']} general-capability questions)</h2>",
           "<table><tr><th>category</th>" + "".join(f"<th>{s}</th>" for s in systems) + "<th>drop</th></tr>"]
    for c in (*CATEGORIES, "overall"):
        drop = forgetting.get("drop" if c == "overall" else f"{c}_drop")
        cls = "fail" if drop is not None and drop > 0 else "pass"
        out.append(f"<tr><td>{c}</td>" + "".join(f'<td class="num">{forgetting[s][c]:.0%}</td>' for s in systems)
                   + f'<td class="num {cls}">{"" if drop is None else f"{drop:+.0%}"}</td></tr>')
    out.append("</table>")
    out.append(f"<div class='charts'>{bar_chart('pass rate per category', groups, systems, width=620, y_max=1.0)}</div>")
    return out


def _harness(harness: dict[str, Any] | None) -> list[str]:
    scored = {t: s for t, s in (harness or {}).get("tasks", {}).items() if "drop" in s}
    if not scored:
        return []
    out = ["<h2>Standard benchmarks (lm-evaluation-harness)</h2>",
           "<table><tr><th>task</th><th>metric</th><th>base</th><th>tuned</th><th>drop</th><th>documents</th></tr>"]
    for task, s in scored.items():
        cls = "fail" if s["drop"] > 0 else "pass"
        out.append(f"<tr><td>{escape(task)}</td><td>{escape(s['metric'])}</td>"
                   + "".join(f'<td class="num">{score_with_stderr(s, system)}</td>' for system in ("base", "tuned"))
                   + f'<td class="num {cls}">{s["drop"]:+.4f}</td><td class="num">{s["n"]}</td></tr>')
    out.append(f"</table><p class='muted'>{escape(harness_note(harness))}</p>")
    # Bars on a 0-1 scale where every number is a rate (accuracies, exact match); a free scale otherwise.
    rates = all(0.0 <= s[k] <= 1.0 for s in scored.values() for k in ("base", "tuned"))
    groups = {task: {"base": s["base"], "tuned": s["tuned"]} for task, s in scored.items()}
    chart = bar_chart("benchmark scores", groups, ["base", "tuned"], width=max(300, 140 * len(groups)),
                      y_max=1.0 if rates else None, percent=rates)
    out.append(f"<div class='charts'>{chart}</div>")
    return out


def _examples(rows: list[dict[str, Any]], systems: list[str]) -> list[str]:
    out = ["<h2>Examples (regressions first)</h2>",
           "<p class='muted'>Green: the answer passes the suite's first metric. Marked words differ from the "
           "reference.</p>"]
    for suite in dict.fromkeys(r["suite"] for r in rows):
        suite_rows = order_rows([r for r in rows if r["suite"] == suite], systems)
        out.append(f"<h3>{escape(suite)}</h3><table class='ex'><tr><th>id</th><th>prompt</th><th>reference</th>"
                   + "".join(f"<th style='border-top:3px solid {color_for(i)}'>{escape(s)}</th>"
                             for i, s in enumerate(systems)) + "</tr>")
        for row in suite_rows:
            cells = []
            for s in systems:
                passed = row_passed(row, s)
                cls = "" if passed is None else ("ok" if passed else "bad")
                cells.append(f"<td class='{cls}'>{_highlight(row['outputs'][s], row['reference'])}</td>")
            out.append(f"<tr><td>{escape(str(row['id']))}</td><td>{escape(row['prompt'])}</td>"
                       f"<td>{escape(row['reference'])}</td>{''.join(cells)}</tr>")
        out.append("</table>")
    return out
