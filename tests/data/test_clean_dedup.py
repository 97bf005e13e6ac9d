"""Cleaning filters and both kinds of dedup, each counted."""

from __future__ import annotations

import random
import subprocess
import sys

from tunelab.config import CleanConfig, DedupConfig
from tunelab.data.clean import clean_records, normalize_whitespace, scrub_pii
from tunelab.data.dedup import deduplicate
from tunelab.data.records import Record


def chat(i: int | str, prompt: str, answer: str = "ok") -> Record:
    return Record(str(i), f"t.jsonl:{i}", "chat", [{"role": "user", "content": prompt},
                                                    {"role": "assistant", "content": answer}])


def word_count(records: list[Record]) -> list[int]:
    return [len(r.all_text().split()) for r in records]


def test_whitespace_normalization_keeps_line_breaks():
    assert normalize_whitespace("  a \t b  \r\n\n\n\n  c  ") == "a b\n\nc"


def test_pii_scrub_replaces_emails_and_phone_numbers_only():
    text = "Mail jane.doe@example.com or call +1 415-555-0199, or (020) 7946 0958. Order 42 on 2024-05-01."
    assert scrub_pii(text) == "Mail <EMAIL> or call <PHONE>, or <PHONE>. Order 42 on 2024-05-01."


def test_each_filter_counts_what_it_removed():
    records = [
        chat(1, "fine example here"),
        chat(2, "this one mentions FORBIDDEN words"),
        chat(3, "ticket #12345 should be removed by regex"),
        chat(4, "hi"),
        chat(5, " ".join(["long"] * 50)),
        chat(6, "  spaced   out  text  "),
    ]
    cfg = CleanConfig(min_tokens=4, exclude_regex=[r"#\d{5}"], exclude_keywords=["forbidden"])
    result = clean_records(records, cfg, max_tokens=20, count_tokens=word_count)
    assert [r.id for r in result.kept] == ["1", "6"]
    assert result.removed == {"empty": [], "same_answers": [], "regex": ["3"], "keyword": ["2"], "too_short": ["4"],
                              "too_long": ["5"]}
    assert result.changed["whitespace"] == 1
    assert result.kept[1].messages[0]["content"] == "spaced out text"


def test_a_preference_pair_made_identical_by_cleaning_is_removed():
    pair = Record("p", "t.jsonl:1", "preference", [{"role": "user", "content": "Capital of France?"}],
                  chosen="Paris is the capital.", rejected="Paris  is the capital.")  # differs by a space only
    result = clean_records([pair], CleanConfig(), max_tokens=100, count_tokens=word_count)
    assert result.kept == [] and result.removed["same_answers"] == ["p"]


def test_pii_scrub_is_counted_when_on():
    records = [chat(1, "write to a@b.io please"), chat(2, "nothing personal")]
    result = clean_records(records, CleanConfig(scrub_pii=True), 100, word_count)
    assert result.changed["pii"] == 1 and result.kept[0].messages[0]["content"] == "write to <EMAIL> please"


def test_exact_dedup_ignores_case_space_and_punctuation():
    records = [chat(1, "What is the capital of France?", "Paris."), chat(2, "what is the capital of france", "paris"),
               chat(3, "What is the capital of Spain?", "Madrid")]
    result = deduplicate(records, DedupConfig(near=False))
    assert [r.id for r in result.kept] == ["1", "3"] and result.exact_pairs == [("1", "2")]


def test_exact_dedup_sees_through_unicode_forms_but_not_operators():
    import unicodedata

    records = [chat(1, "Ship to Orléans: ＴＷＯ mugs"), chat(2, unicodedata.normalize("NFD", "Ship to Orléans: two mugs")),
               chat(3, "Ship to Orl\u200béans: two mugs"),  # a zero-width space inside the word
               chat(4, "Evaluate the expression: 12 + 3"), chat(5, "Evaluate the expression: 12 * 3"),
               chat(6, "Evaluate the expression: 12 - 3"), chat(7, "Evaluate: 2^2"), chat(8, "Evaluate: 2*2")]
    result = deduplicate(records, DedupConfig(near=False))
    # Composed and decomposed accents, full-width letters and invisible characters are the same text; arithmetic
    # that differs by its operator is not (it was, with every non-word character dropped).
    assert [r.id for r in result.kept] == ["1", "4", "5", "6", "7", "8"]
    assert result.exact_pairs == [("1", "2"), ("1", "3")]


def test_near_dedup_finds_planted_twins_and_keeps_distinct_rows():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(400)]
    originals = [chat(f"o{i}", " ".join(rng.choice(vocab) for _ in range(60))) for i in range(200)]
    twins = []
    for i, original in enumerate(originals[:50]):
        words = original.messages[0]["content"].split()
        words[-1] = "changed"  # one word at the end: Jaccard of 5-gram shingles stays ~0.97
        twins.append(chat(f"t{i}", " ".join(words)))
    result = deduplicate(originals + twins, DedupConfig(exact=False))
    removed = {removed for _, removed, _ in result.near_pairs}
    # MinHash estimates similarity, so recall is high but not certain; no original may ever be removed.
    assert removed <= {f"t{i}" for i in range(50)}
    assert len(removed) >= 47
    assert all(kept == f"o{r[1:]}" and similarity >= 0.85 for kept, r, similarity in result.near_pairs)


def test_near_dedup_threshold_and_fields_are_honoured():
    a = chat(1, "alpha beta gamma delta epsilon zeta eta theta iota kappa", "first answer entirely")
    b = chat(2, "alpha beta gamma delta epsilon zeta eta theta iota kappa", "another reply wholly different")
    assert len(deduplicate([a, b], DedupConfig(exact=False, fields="prompt")).kept) == 1
    assert len(deduplicate([a, b], DedupConfig(exact=False, fields="answer")).kept) == 2


def test_pii_scrub_of_a_hostile_megabyte_row_ends(tmp_path):
    """Rows built to make the e-mail pattern backtrack: before its parts were bounded, the first took hours
    (quadratic in the row's length). Run apart, so a regression fails on the timeout instead of hanging CI."""
    script = ("from tunelab.data.clean import scrub_pii\n"
              "for text in ('.a' * 500_000, '.a' * 500_000 + '@x', ('a.' * 60 + '@') * 8_000, '1-' * 500_000):\n"
              "    assert len(scrub_pii(text)) > 0\n"
              "print(scrub_pii('write to bob.smith@example.com or +1 415 555 0100'))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "write to <EMAIL> or <PHONE>"


def kto(i: str, prompt: str, completion: str, label: bool) -> Record:
    return Record(i, f"k.jsonl:{i}", "kto", [{"role": "user", "content": prompt}], completion=completion, label=label)


def pair(i: str, prompt: str, chosen: str, rejected: str) -> Record:
    return Record(i, f"p.jsonl:{i}", "preference", [{"role": "user", "content": prompt}], chosen=chosen,
                  rejected=rejected)


def test_exact_dedup_removes_every_row_of_a_text_given_opposite_kto_labels():
    records = [kto("a", "Is 7 prime?", "Yes, 7 is prime.", True), kto("b", "is 7 prime", "yes 7 is prime", False),
               kto("c", "Is 7 prime?", "Yes, 7 is prime.", True), kto("d", "Is 9 prime?", "No.", True),
               kto("e", "Is 9 prime?", "No.", True)]
    result = deduplicate(records, DedupConfig(near=False))
    # Keeping "a" would keep a verdict chosen by file order; the text's rows disagree, so none is kept.
    assert [r.id for r in result.kept] == ["d"]
    assert result.conflicts == [("a", "b")] and result.exact_pairs == [("a", "c"), ("d", "e")]


def test_exact_dedup_removes_a_preference_pair_and_its_swap_but_keeps_a_repeat_as_a_duplicate():
    records = [pair("p1", "Capital of France?", "Paris.", "Lyon."), pair("p2", "capital of france", "lyon", "paris"),
               pair("p3", "Capital of Spain?", "Madrid.", "Seville."),
               pair("p4", "Capital of Spain?", "Madrid", "Seville")]
    result = deduplicate(records, DedupConfig(near=False))
    assert [r.id for r in result.kept] == ["p3"]
    assert result.conflicts == [("p1", "p2")] and result.exact_pairs == [("p3", "p4")]


def test_near_dedup_compares_kto_rows_of_one_label_only():
    prompt = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
    good = kto("g", prompt, "nu xi omicron pi rho sigma tau upsilon phi chi psi", True)
    bad = kto("b", prompt, "nu xi omicron pi rho sigma tau upsilon phi chi omega", False)  # one word differs
    bad_twin = kto("b2", prompt, "nu xi omicron pi rho sigma tau upsilon phi chi omega!", False)
    result = deduplicate([good, bad, bad_twin], DedupConfig(exact=False))
    # The desirable answer and its undesirable near-twin are the contrast KTO learns from: both stay.
    assert [r.id for r in result.kept] == ["g", "b"] and [p[:2] for p in result.near_pairs] == [("b", "b2")]


def test_with_fields_prompt_kto_labels_do_not_make_conflicts():
    records = [kto("a", "Is 7 prime?", "Yes.", True), kto("b", "Is 7 prime?", "No.", False)]
    result = deduplicate(records, DedupConfig(near=False, fields="prompt"))
    assert [r.id for r in result.kept] == ["a"] and result.exact_pairs == [("a", "b")] and not result.conflicts
