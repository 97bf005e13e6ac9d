"""report.md: the summary tables, forgetting, the gate, then every example side by side, regressions first."""

from __future__ import annotations

import math
from typing import Any

from tunelab.eval.probes import CATEGORIES

PERCENT_METRICS = {"exact_match", "contains", "regex", "token_f1", "rouge_l", "bleu", "json_valid", "json_schema"}


def row_passed(row: dict[str, Any], system: str) -> bool | None:
    """Whether `system` passes the row's first metric (score >= 0.5); None when the suite has no metric."""
    metric = row.get("primary_metric")
    if metric is None:
        return None
    return row["scores"][system][metric] >= 0.5


def order_rows(rows: list[dict[str, Any]], systems: list[str]) -> list[dict[str, Any]]:
    """Worst regressions first: base right and tuned wrong, then the tuned misses, then the rest."""
    if "tuned" not in systems or not rows or rows[0].get("primary_metric") is None:
        return rows
    metric = rows[0]["primary_metric"]
    base = "base" if "base" in systems else systems[0]

    def key(row: dict[str, Any]) -> tuple[float, float]:
        tuned, before = row["scores"]["tuned"][metric], row["scores"][base][metric]
        return (tuned - before, tuned)

    return sorted(rows, key=key)


def format_metric(value: float | None, metric: str) -> str:
    """A suite metric as every summary shows it: a rate in percent, anything else (loss, mean words) as a number."""
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.1%}" if metric in PERCENT_METRICS else f"{value:.4g}"


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def harness_markdown(harness: dict[str, Any] | None) -> list[str]:
    """The standard-benchmark table: each task's number on base and tuned, and the drop between them."""
    if not harness:
        return []
    lines = ["## Standard benchmarks (lm-evaluation-harness)", "", "| task | metric | base | tuned | drop | documents |",
             "|---|---|---:|---:|---:|---:|"]
    for task, s in harness["tasks"].items():
        if "drop" in s:
            lines.append(f"| {task} | {s['metric']} | {score_with_stderr(s, 'base')} | {score_with_stderr(s, 'tuned')} | "
                         f"{s['drop']:+.4f} | {s['n']} |")
    return [*lines, "", harness_note(harness), ""]


def harness_note(harness: dict[str, Any]) -> str:
    """How the benchmark numbers were measured, in one sentence under their table."""
    limit = f", the first {harness['limit']} documents per task" if harness.get("limit") else ", every document"
    shots = harness.get("num_fewshot")
    template = ", chat template applied" if harness.get("apply_chat_template") else ", plain-text prompts"
    return (f"lm-eval {harness.get('lm_eval_version', '')}{limit}{template}, few-shot examples: "
            f"{'as each task sets' if shots is None else shots}; ± is the standard error; drop > 0: tuned lost ground.")


def score_with_stderr(scores: dict[str, Any], system: str) -> str:
    stderr = scores.get(f"{system}_stderr")
    return f"{scores[system]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def where_generated(timing: dict[str, Any]) -> str:
    """ " on cuda: NVIDIA H100 (host, Ray worker (pid 7))", or nothing for an eval that did not record it."""
    if "device" not in timing:
        return ""
    placement = timing.get("placement")
    shown = f"{timing['host']}, {placement}" if placement and placement != "this process" else timing["host"]
    return f" on {timing['device']} ({shown})"


def render_markdown(metrics: dict[str, Any], rows: list[dict[str, Any]], title: str) -> str:
    systems = metrics["systems"]
    lines = [f"# Evaluation: {title}", "",
             f"{metrics['timing']['prompts_generated']} answers generated in {metrics['timing']['seconds']:.0f} s"
             f"{where_generated(metrics['timing'])}, greedy decoding. The HTML report (report.html) has the charts.",
             ""]
    if metrics.get("gate_source") == "default" and metrics.get("gate"):
        lines.append("Gate: the default rules (set `eval.gate` to replace them, `eval.gate: []` to switch off).")
    for g in metrics.get("gate", []):
        measured = f"{g['left']:.4f} vs {g['right']:.4f}" if g.get("left") is not None else g.get("error", "")
        lines.append(f"- {'PASS' if g['passed'] else 'FAIL'} `{g['rule']}` ({measured})")
    if metrics.get("gate"):
        lines.append("")
    for suite, result in metrics["suites"].items():
        names = list(next(iter(result["systems"].values())))
        lines += [f"## Suite: {suite} ({result['n_examples']} examples)", "",
                  "| system | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for system, values in result["systems"].items():
            lines.append(f"| {system} | " + " | ".join(format_metric(values.get(m), m) for m in names) + " |")
        lines.append("")
    forgetting = metrics.get("forgetting")
    if forgetting and "base" in forgetting and "tuned" in forgetting:
        lines += [f"## Forgetting probes ({forgetting['n_probes']})", "", "| category | base | tuned | drop |",
                  "|---|---:|---:|---:|"]
        for c in (*CATEGORIES, "overall"):
            drop = forgetting["drop"] if c == "overall" else forgetting[f"{c}_drop"]
            lines.append(f"| {c} | {forgetting['base'][c]:.0%} | {forgetting['tuned'][c]:.0%} | {drop:+.0%} |")
        lines.append("")
    lines += harness_markdown(metrics.get("harness"))
    if metrics.get("judge"):
        lines += ["## LLM judge (1-5)", "", "| system | mean | judged |", "|---|---:|---:|"]
        lines += [f"| {s} | {j['mean']:.2f} | {j['n']} |" for s, j in metrics["judge"].items()]
        lines.append("")
    for suite in dict.fromkeys(r["suite"] for r in rows):
        lines += [f"## Examples: {suite} (regressions first)", "",
                  "| id | prompt | reference | " + " | ".join(systems) + " |", "|---|---|---|" + "---|" * len(systems)]
        for row in order_rows([r for r in rows if r["suite"] == suite], systems):
            cells = []
            for s in systems:
                passed = row_passed(row, s)
                mark = "" if passed is None else ("✅ " if passed else "❌ ")
                cells.append(mark + _cell(row["outputs"][s]))
            lines.append(f"| {_cell(row['id'], 40)} | {_cell(row['prompt'])} | {_cell(row['reference'])} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
