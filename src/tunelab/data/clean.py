"""Cleaning: whitespace normalization, PII scrub, and filters, each counted for the report."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from tunelab.config import CleanConfig
from tunelab.data.records import Record

# Bounded parts (RFC 5321: 64 for the local part, 255 for the domain): unbounded ones made a row of ".a.a.a..."
# cost time quadratic in its length (hours for a megabyte).
EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,255}\.[A-Za-z]{2,63}\b")
# International or North-American style numbers with at least 7 digits; dates and small counts don't match.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,4}){1,3}(?!\w)")


@dataclass
class CleanResult:
    kept: list[Record]
    changed: dict[str, int] = field(default_factory=dict)  # rewrites: whitespace, pii
    removed: dict[str, list[str]] = field(default_factory=dict)  # filter name -> removed ids


def normalize_whitespace(text: str) -> str:
    """Trim each line, collapse runs of spaces/tabs, and allow at most one empty line in a row."""
    lines = [re.sub(r"[ \t\f\v\u00a0]+", " ", line).strip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


DATE = re.compile(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{4}")


def _phone_or_keep(match: re.Match[str]) -> str:
    text = match.group()
    if sum(c.isdigit() for c in text) < 7 or DATE.fullmatch(text.strip()):
        return text
    return "<PHONE>"


def scrub_pii(text: str) -> str:
    """E-mail addresses -> <EMAIL>, phone numbers -> <PHONE>; dates and short numbers stay."""
    return PHONE.sub(_phone_or_keep, EMAIL.sub("<EMAIL>", text) if "@" in text else text)


def map_text(record: Record, fn: Callable[[str], str]) -> bool:
    """Apply `fn` to every piece of text in `record` in place; True if anything changed."""
    before = record.to_json()
    record.messages = [{**m, "content": fn(m["content"])} for m in record.messages]
    for name in ("chosen", "rejected", "completion", "text"):
        value = getattr(record, name)
        if value is not None:
            setattr(record, name, fn(value))
    return record.to_json() != before


def _is_empty(record: Record) -> bool:
    if record.kind == "text":
        return not (record.text or "").strip()
    parts = [m["content"] for m in record.messages]
    parts += [p for p in (record.chosen, record.rejected, record.completion) if p is not None]
    return any(not p.strip() for p in parts)


def clean_records(records: list[Record], cfg: CleanConfig, max_tokens: int,
                  count_tokens: Callable[[list[Record]], list[int]]) -> CleanResult:
    """Rewrite then filter `records`; filters run in a fixed order and each removal is counted once."""
    result = CleanResult(kept=[])
    changed = {"whitespace": 0, "pii": 0}
    for record in records:
        if cfg.normalize_whitespace and map_text(record, normalize_whitespace):
            changed["whitespace"] += 1
        if cfg.scrub_pii and map_text(record, scrub_pii):
            changed["pii"] += 1
    result.changed = changed

    patterns = [re.compile(p) for p in cfg.exclude_regex]
    keywords = [k.lower() for k in cfg.exclude_keywords]
    removed: dict[str, list[str]] = {"empty": [], "same_answers": [], "regex": [], "keyword": [], "too_short": [],
                                     "too_long": []}
    survivors = []
    for record in records:
        text = record.all_text()
        if _is_empty(record):
            removed["empty"].append(record.id)
        elif record.kind == "preference" and record.chosen == record.rejected:
            # The loader refuses identical answers; these became identical in the rewrites above ("a  b" / "a b").
            removed["same_answers"].append(record.id)
        elif any(p.search(text) for p in patterns):
            removed["regex"].append(record.id)
        elif any(k in text.lower() for k in keywords):
            removed["keyword"].append(record.id)
        else:
            survivors.append(record)
    lengths = count_tokens(survivors) if survivors else []
    for record, n in zip(survivors, lengths):
        if n < cfg.min_tokens:
            removed["too_short"].append(record.id)
        elif n > max_tokens:
            removed["too_long"].append(record.id)
        else:
            result.kept.append(record)
    result.removed = removed
    return result
