"""Answer-level metrics. Each scores one prediction against one reference in [0, 1]; a suite's score is the
mean over its examples (BLEU, a corpus metric, is computed over the whole suite).

Custom metrics: any `package.module:function(prediction, reference) -> float` named in a suite.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError

BUILTIN = ("exact_match", "contains", "regex", "token_f1", "rouge_l", "bleu", "json_valid", "json_schema")


def normalize_answer(text: str) -> str:
    """Unicode NFKC, lower case, collapsed whitespace, no surrounding spaces or trailing full stop.

    Deliberately keeps inner punctuation: for structured answers the punctuation is the format.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip(".").strip()


def _words(text: str) -> list[str]:
    """Word tokens for overlap metrics: lower case, punctuation removed (SQuAD-style)."""
    return re.sub(r"[^\w\s]", " ", unicodedata.normalize("NFKC", text).lower()).split()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def contains(prediction: str, reference: str) -> float:
    """The reference appears in the prediction as whole words: "4" is not in "The answer is 14"."""
    ref = normalize_answer(reference)
    pattern = rf"(?<!\w){re.escape(ref)}(?!\w)" if ref else ""
    return float(re.search(pattern, normalize_answer(prediction)) is not None)


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = _words(prediction), _words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of words."""
    pred, ref = _words(prediction), _words(reference)
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for p in pred:
        current = [0]
        for j, r in enumerate(ref, start=1):
            current.append(previous[j - 1] + 1 if p == r else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def corpus_bleu(predictions: list[str], references: list[str], max_n: int = 4) -> float:
    """Corpus BLEU-4 (Papineni et al.) with add-one smoothing of higher-order precisions, in [0, 1]."""
    matches, totals = [0] * max_n, [0] * max_n
    pred_len = ref_len = 0
    for prediction, reference in zip(predictions, references):
        pred, ref = _words(prediction), _words(reference)
        pred_len, ref_len = pred_len + len(pred), ref_len + len(ref)
        for n in range(1, max_n + 1):
            pred_grams = Counter(tuple(pred[i : i + n]) for i in range(len(pred) - n + 1))
            ref_grams = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
            matches[n - 1] += sum((pred_grams & ref_grams).values())
            totals[n - 1] += max(len(pred) - n + 1, 0)
    if pred_len == 0 or matches[0] == 0:
        return 0.0
    log_precision = sum(
        math.log((matches[i] + (i > 0)) / (totals[i] + (i > 0))) for i in range(max_n) if totals[i] + (i > 0) > 0
    ) / max_n
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return brevity * math.exp(log_precision)


def json_valid(prediction: str, reference: str = "") -> float:
    try:
        _strict_json(prediction)
        return 1.0
    except ValueError:
        return 0.0


def _strict_json(text: str) -> Any:
    """JSON as the standard has it: Python's json also reads NaN and Infinity, which no other parser accepts."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(_strip_fences(text), parse_constant=refuse)


def _strip_fences(text: str) -> str:
    """Models often wrap JSON in ``` fences; the content is what counts."""
    match = re.fullmatch(r"\s*```(?:json)?\s*(.*?)\s*```\s*", text, flags=re.S)
    return match.group(1) if match else text


def json_schema_metric(schema_path: Path) -> Callable[[str, str], float]:
    import jsonschema

    try:
        schema = json.loads(schema_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"eval.suites.json_schema: cannot read {schema_path}: {err}") from None
    validator = jsonschema.Draft202012Validator(schema)

    def json_schema(prediction: str, reference: str = "") -> float:
        try:
            return float(validator.is_valid(_strict_json(prediction)))
        except ValueError:
            return 0.0

    return json_schema


def regex_metric(pattern: str) -> Callable[[str, str], float]:
    compiled = re.compile(pattern)
    return lambda prediction, reference="": float(bool(compiled.search(prediction)))


def resolve_metric(name: str, regex: str | None = None, schema: Path | None = None) -> Callable[[str, str], float]:
    """A per-example scorer for a metric name (BLEU is handled at suite level)."""
    table: dict[str, Callable[[str, str], Any]] = {
        "exact_match": lambda p, r: float(exact_match(p, r)), "contains": contains, "token_f1": token_f1,
        "rouge_l": rouge_l, "json_valid": json_valid,
    }
    if name in table:
        return table[name]
    if name == "regex":
        if not regex:
            raise ConfigError("eval.suites: the 'regex' metric needs the suite's `regex:` pattern")
        return regex_metric(regex)
    if name == "json_schema":
        if schema is None:
            raise ConfigError("eval.suites: the 'json_schema' metric needs the suite's `json_schema:` file")
        return json_schema_metric(schema)
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"eval.suites: cannot import metric '{name}': {err}") from None
        return lambda p, r: float(fn(p, r))
    raise ConfigError(f"eval.suites: unknown metric '{name}'; use {', '.join(BUILTIN)}, eval_loss, "
                      "or package.module:function")
