"""The data report: what went in, what each step removed and why, and what came out.

report.json is for programs (and the HTML eval report's charts); report.md is for people.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from tunelab.data.records import Record

EXAMPLES_SHOWN = 20


def length_histogram(lengths_by_split: dict[str, list[int]], bins: int = 20) -> dict[str, Any]:
    everything = [n for lengths in lengths_by_split.values() for n in lengths]
    if not everything:
        return {"edges": [], "counts": {}}
    edges = np.histogram_bin_edges(everything, bins=bins)
    return {
        "edges": [round(float(e), 1) for e in edges],
        "counts": {name: np.histogram(lengths, bins=edges)[0].tolist() for name, lengths in lengths_by_split.items()},
        "stats": {
            name: {"min": min(ls), "median": float(np.median(ls)), "p95": float(np.percentile(ls, 95)), "max": max(ls)}
            for name, ls in lengths_by_split.items() if ls
        },
    }


def role_counts(records: list[Record]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for record in records:
        counts.update(m["role"] for m in record.messages)
        if record.kind in ("preference", "kto"):
            counts["assistant"] += 2 if record.kind == "preference" else 1
    return dict(counts)


def render_summary(report: dict[str, Any]) -> str:
    """report.json as a page a person reads in a minute."""
    lines = ["# Data preparation report", ""]
    counts = report["counts"]
    lines += ["| split | examples |", "|---|---:|"]
    lines += [f"| {name} | {counts[name]} |" for name in ("train", "val", "test")]
    lines += ["", f"Loaded {report['loaded']} rows ({report['kind']}); skipped {report['skipped']['count']} bad rows.", ""]
    replay = report.get("replay") or {}
    if replay.get("rows"):
        sources = ", ".join(f"{n} {name}" for name, n in replay.get("sources", {}).items())
        lines += [f"The training split includes {replay['rows']} replay rows (data.replay.ratio {replay['ratio']}: "
                  f"{sources}; {replay.get('dropped_overlapping_eval', 0)} dropped for overlapping eval data).", ""]
    lines += ["## Removed", "", "| step | rows |", "|---|---:|"]
    for name, n in report["filters"].items():
        lines.append(f"| filter: {name} | {n} |")
    lines.append(f"| exact duplicates | {report['dedup']['exact']} |")
    lines.append(f"| near duplicates | {report['dedup']['near']} |")
    if report["dedup"].get("conflicts"):
        lines.append(f"| same text with opposite verdicts (label, or chosen/rejected swapped) | "
                     f"{report['dedup']['conflicts']} |")
    contamination = report["contamination"]
    lines.append(f"| contamination ({contamination['action']}) | {contamination['dropped']} |")
    lines += ["", f"Rewritten: {report['rewritten']}", ""]
    if contamination["hits"]:
        lines += ["## Contamination hits", "", "| train row | eval row | eval source | kind | overlap |",
                  "|---|---|---|---|---|"]
        for hit in contamination["hits"][:EXAMPLES_SHOWN]:
            overlap = hit["overlap"].replace("|", "\\|")[:120]
            lines.append(f"| {hit['train_id']} | {hit['eval_id']} | {hit['eval_source']} | {hit['kind']} | {overlap} |")
        lines.append("")
    if contamination.get("val_hits"):
        lines += [f"## Val rows that overlap test or benchmark data ({contamination['action']})", "",
                  "| val row | eval row | eval source | kind | overlap |", "|---|---|---|---|---|"]
        for hit in contamination["val_hits"][:EXAMPLES_SHOWN]:
            overlap = hit["overlap"].replace("|", "\\|")[:120]
            lines.append(f"| {hit['train_id']} | {hit['eval_id']} | {hit['eval_source']} | {hit['kind']} | {overlap} |")
        lines.append("")
    if contamination.get("shared"):
        lines += ["## Eval rows made of shared phrasing (not counted as leaks)", "",
                  f"Most of each row is n-grams that more than {contamination['ignore_common']:.0%} of training rows "
                  "repeat: an instruction or sign-off the dataset shares, or a leak pasted into many rows. Check them.",
                  "", "| eval row | eval source | training rows | overlap |", "|---|---|---:|---|"]
        for row in contamination["shared"][:EXAMPLES_SHOWN]:
            overlap = row["overlap"].replace("|", "\\|")[:120]
            lines.append(f"| {row['eval_id']} | {row['eval_source']} | {row['train_rows']} | {overlap} |")
        lines.append("")
    pairs = report["dedup"]["pairs"]
    if pairs:
        lines += ["## Removed duplicates (kept <- removed)", ""]
        lines += [f"- {p['kept']} <- {p['removed']} ({p['how']})" for p in pairs[:EXAMPLES_SHOWN]]
        lines.append("")
    if report["skipped"]["examples"]:
        lines += ["## Skipped rows", ""]
        lines += [f"- {s['where']}: {s['problem']}" for s in report["skipped"]["examples"]]
        lines.append("")
    stats = report["token_lengths"].get("stats", {})
    if stats:
        lines += ["## Token lengths", "", "| split | min | median | p95 | max |", "|---|---:|---:|---:|---:|"]
        for name, s in stats.items():
            lines.append(f"| {name} | {s['min']} | {s['median']:.0f} | {s['p95']:.0f} | {s['max']} |")
    return "\n".join(lines) + "\n"
