"""Answer-level metrics."""

from __future__ import annotations

import re
import unicodedata


def normalize_answer(text: str) -> str:
    """Unicode NFKC, lower case, collapsed whitespace, no surrounding spaces or trailing full stop.

    Deliberately keeps inner punctuation: for structured answers the punctuation is the format.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip(".").strip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def exact_match_rate(predictions: list[str], references: list[str]) -> float:
    if not references:
        return float("nan")
    return sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True)) / len(references)
