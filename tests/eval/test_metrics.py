"""Metric values on hand-checked cases."""

from __future__ import annotations

import json
import math

import pytest

from tunelab.errors import ConfigError
from tunelab.eval.metrics import (
    contains,
    corpus_bleu,
    exact_match,
    resolve_metric,
    rouge_l,
    token_f1,
)


def test_exact_match_and_contains_normalize_case_space_and_final_stop():
    assert exact_match("  Paris. ", "paris")
    assert not exact_match("Paris, France", "Paris")
    assert contains("It is Paris, France.", "Paris") == 1.0
    assert contains("London", "Paris") == 0.0
    # Whole words only: a substring inside another number or word is not the answer.
    assert contains("The answer is 14", "4") == 0.0 and contains("The answer is 4.", "4") == 1.0
    assert contains("Parisian food", "Paris") == 0.0 and contains("item: yoga mats | qty: 3", "yoga mats") == 1.0


def test_token_f1_and_rouge_l():
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("cat", "the cat sat") == pytest.approx(0.5)  # precision 1, recall 1/3
    assert token_f1("dog", "cat") == 0.0
    # LCS of "a b c d" and "a c d e" is "a c d": precision 3/4, recall 3/4.
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)


def test_corpus_bleu():
    assert corpus_bleu(["the quick brown fox jumps"], ["the quick brown fox jumps"]) == pytest.approx(1.0)
    assert corpus_bleu(["nothing in common"], ["the quick brown fox"]) == 0.0
    # Counted by hand. "the quick brown dog jumps" against "the quick brown fox jumps": unigrams 4/5, bigrams
    # 2/4, trigrams 1/3, 4-grams 0/2; add-one smoothing above unigrams gives 3/5, 2/4, 1/3; equal lengths: no
    # brevity penalty. BLEU = geometric mean of the four.
    partial = corpus_bleu(["the quick brown dog jumps"], ["the quick brown fox jumps"])
    assert partial == pytest.approx((4 / 5 * 3 / 5 * 2 / 4 * 1 / 3) ** (1 / 4))
    # A prefix of the reference: every n-gram matches (4/4, then (3+1)/(3+1), ...), but 4 words for 5 costs
    # the brevity penalty exp(1 - 5/4).
    assert corpus_bleu(["the quick brown fox"], ["the quick brown fox jumps"]) == pytest.approx(math.exp(-0.25))
    # Corpus-level: counts are summed over the sentences before the precisions are taken (not averaged).
    # Unigrams 2/2 + 4/5 = 6/7; bigrams (1+2)/(1+4) -> (3+1)/(5+1); trigrams (0+1)/(0+3) -> 2/4; 4-grams
    # (0+0)/(0+2) -> 1/3; lengths 7 against 7.
    corpus = corpus_bleu(["a cat", "the quick brown dog jumps"], ["a cat", "the quick brown fox jumps"])
    assert corpus == pytest.approx((6 / 7 * 4 / 6 * 2 / 4 * 1 / 3) ** (1 / 4))


def test_json_metrics_and_regex(tmp_path):
    schema = tmp_path / "schema.json"
    (tmp_path / "open.json").write_text("{}")  # any JSON conforms
    schema.write_text(json.dumps({"type": "object", "required": ["item", "qty"],
                                  "properties": {"qty": {"type": "integer"}}}))
    valid, conforming = resolve_metric("json_valid"), resolve_metric("json_schema", schema=schema)
    assert valid('{"a": 1}', "") == 1.0 and valid("not json", "") == 0.0
    assert valid('```json\n{"a": 1}\n```', "") == 1.0  # fenced JSON counts
    assert valid("NaN", "") == 0.0 and valid('{"a": Infinity}', "") == 0.0  # Python reads them; JSON has neither
    assert conforming('{"item": "x", "qty": 2}', "") == 1.0
    assert conforming('{"item": "x", "qty": "two"}', "") == 0.0
    assert resolve_metric("json_schema", schema=tmp_path / "open.json")('{"a": NaN}', "") == 0.0
    assert resolve_metric("regex", regex=r"qty: \d+")("qty: 12", "") == 1.0


def test_custom_metric_by_import_path_and_clear_errors():
    length_ok = resolve_metric("tunelab.eval.metrics:contains")
    assert length_ok("a Paris b", "paris") == 1.0
    with pytest.raises(ConfigError, match="the 'regex' metric needs"):
        resolve_metric("regex")
    with pytest.raises(ConfigError, match="unknown metric 'bleurt'"):
        resolve_metric("bleurt")
    with pytest.raises(ConfigError, match="cannot import metric 'nope.nope:f'"):
        resolve_metric("nope.nope:f")
