"""The Markdown eval report: a summary table, then every example with base and tuned side by side."""

from __future__ import annotations

from typing import Any


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_markdown(metrics: dict[str, Any], rows: list[dict[str, Any]], title: str) -> str:
    systems = metrics["systems"]
    lines = [
        f"# Evaluation: {title}",
        "",
        f"{metrics['n_examples']} held-out examples, greedy decoding.",
        "",
        "| system | exact match | eval loss | perplexity | words per answer |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in systems.items():
        lines.append(f"| {name} | {m['exact_match']:.1%} | {m['eval_loss']:.4f} | {m['perplexity']:.2f} "
                     f"| {m['mean_words']:.1f} |")
    # Regressions first (base right, tuned wrong), then the remaining misses, then the wins.
    def order(row: dict[str, Any]) -> int:
        return 0 if row["base_correct"] and not row["tuned_correct"] else 1 if not row["tuned_correct"] else 2

    lines += ["", "## Examples", "", "| id | prompt | reference | base | tuned |", "|---|---|---|---|---|"]
    for row in sorted(rows, key=order):
        marks = {s: ("✅ " if row[f"{s}_correct"] else "❌ ") + _cell(row[s]) for s in ("base", "tuned")}
        lines.append(
            f"| {_cell(row['id'], 40)} | {_cell(row['prompt'])} | {_cell(row['reference'])} "
            f"| {marks['base']} | {marks['tuned']} |"
        )
    return "\n".join(lines) + "\n"
