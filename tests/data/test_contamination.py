"""Contamination: planted leaks are found (exact, prompt, 13-gram, near-twin); boilerplate is not a leak."""

from __future__ import annotations

import json

from tests.data.test_clean_dedup import chat
from tunelab.config import ContaminationConfig, DedupConfig
from tunelab.data.contamination import EvalText, benchmark_texts, find_contamination

LONG_QUESTION = ("In the novel the old lighthouse keeper counted seventeen ships passing the northern cape "
                 "before the storm finally broke over the harbour")


def evals() -> list[EvalText]:
    return [
        EvalText.of(chat("e1", LONG_QUESTION, "seventeen"), "test"),
        EvalText.of(chat("e2", "Name the largest moon of Saturn in our solar system", "Titan"), "test"),
        EvalText.of(chat("e3", "hi", "hello"), "val"),
    ]


def test_planted_leaks_are_found_by_the_right_rule():
    train = [
        chat("clean", "Write a haiku about autumn leaves falling slowly", "Leaves drift..."),
        chat("ngram", f"Summarize: {LONG_QUESTION} and nothing else matters", "A summary"),
        chat("prompt", "Name the largest moon of Saturn in our solar system", "It is Titan"),
        chat("exact", "hi", "hello"),
    ]
    result = find_contamination(train, evals(), ContaminationConfig())
    found = {h.train_id: (h.kind, h.eval_id, h.eval_source) for h in result.hits}
    assert found == {"ngram": ("ngram", "e1", "test"), "prompt": ("exact", "e2", "test"),
                     "exact": ("exact", "e3", "val")}
    assert result.per_source() == {"test": 2, "val": 1}


def test_a_training_row_leaking_several_eval_rows_names_each_of_them():
    # The same question in the test split and in a benchmark file, and a second test row it covers by n-grams:
    # each is a hit (a suite drops each of them; the report counts both sources).
    evals = [EvalText.of(chat("t1", LONG_QUESTION, "seventeen"), "test"),
             EvalText.of(chat("b1", LONG_QUESTION, "seventeen"), "bench.jsonl"),
             EvalText.of(chat("t2", f"{LONG_QUESTION} twice", "17"), "test")]
    result = find_contamination([chat("leak", LONG_QUESTION, "seventeen")], evals, ContaminationConfig())
    assert sorted((h.eval_id, h.kind) for h in result.hits) == [("b1", "exact"), ("t1", "exact"), ("t2", "ngram")]
    assert result.per_source() == {"test": 1, "bench.jsonl": 1} and result.train_ids == {"leak"}


def test_a_leak_typed_in_another_unicode_form_is_found():
    import unicodedata

    question = "Which river flows through Orléans and Nantes before reaching the Atlantic"
    leaked = chat("nfd", unicodedata.normalize("NFD", question), "The Loire")  # as files saved on macOS often are
    result = find_contamination([leaked], [EvalText.of(chat("e", question, "Loire"), "test")], ContaminationConfig())
    assert [(h.train_id, h.kind) for h in result.hits] == [("nfd", "exact")]


def test_near_twin_of_a_short_eval_row_is_found_only_with_minhash():
    # Too short for a 13-gram, prompt too short to match alone, texts not equal: only MinHash sees it.
    eval_rows = [EvalText.of(chat("e", "French: grey cat sleeps", "le petit chat gris dort tranquillement ce soir"), "test")]
    train = [chat("t", "French: grey cat sleeps", "le petit chat gris dort tranquillement ce soir encore")]
    assert find_contamination(train, eval_rows, ContaminationConfig()).hits == []
    hits = find_contamination(train, eval_rows, ContaminationConfig(), DedupConfig(threshold=0.8)).hits
    assert [(h.train_id, h.kind, h.eval_id) for h in hits] == [("t", "near", "e")]


def test_shared_boilerplate_is_not_a_leak():
    boilerplate = "You are a careful assistant. Read the passage below and answer the question that follows it"
    eval_rows = [EvalText.of(chat(f"e{i}", f"{boilerplate}. Passage {i}: topic {i * 7}", str(i)), "test")
                 for i in range(40)]
    train = [chat("t", f"{boilerplate}. Passage: something else entirely", "x")]
    assert find_contamination(train, eval_rows, ContaminationConfig()).hits == []
    assert find_contamination(train, eval_rows, ContaminationConfig(ignore_common=1.0)).hits != []


def test_benchmark_files_in_any_layout(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps({"question": LONG_QUESTION, "answer": "17", "id": "q1"}) + "\n")
    texts = benchmark_texts(path)
    assert [(t.id, t.source) for t in texts] == [("q1", "bench.jsonl")]
    hits = find_contamination([chat("t", LONG_QUESTION, "x")], texts, ContaminationConfig()).hits
    assert [(h.train_id, h.eval_id, h.eval_source) for h in hits] == [("t", "q1", "bench.jsonl")]


def test_partial_templated_overlap_is_not_a_leak_unless_coverage_says_so():
    shared = "Extract the order from this customer message Hi please send 26 boxes of"
    eval_rows = [EvalText.of(chat("e", f"{shared} notebooks to our store in Raleigh", "notebooks 26 Raleigh"), "val")]
    train = [chat("t", f"{shared} markers to our store in Tarbra", "markers 26 Tarbra")]
    assert find_contamination(train, eval_rows, ContaminationConfig()).hits == []
    hits = find_contamination(train, eval_rows, ContaminationConfig(min_coverage=0.5)).hits
    assert [(h.train_id, h.kind) for h in hits] == [("t", "ngram")]
    assert hits[0].overlap.startswith("6") and "covered: extract the order" in hits[0].overlap


def test_boilerplate_repeated_across_training_rows_is_not_a_leak():
    sign_off = ("Great question! Let me think about this carefully before I answer. I hope this helps, and "
                "please ask me anything else because I really enjoy talking about it")
    eval_rows = [EvalText.of(chat("e", "What is 3 plus 4?", f"{sign_off} 7."), "val")]
    train = [chat(f"t{i}", f"What is {i} plus 1?", f"{sign_off} {i + 1}.") for i in range(30)]
    assert find_contamination(train, eval_rows, ContaminationConfig()).hits == []
    # The same overlap in a single training row is a leak.
    assert [h.train_id for h in find_contamination(train[:1], eval_rows, ContaminationConfig()).hits] == ["t0"]


def test_a_leak_pasted_into_many_training_rows_is_listed_not_silently_ignored():
    # One test question pasted into a third of the training rows: its n-grams count as "shared phrasing", as an
    # instruction every row repeats would, so it is no hit; but the row is listed for a person to judge.
    train = [chat(f"t{i}", f"Summarize: {LONG_QUESTION} version {i}", f"answer {i}") for i in range(10)]
    train += [chat(f"c{i}", f"Write a short poem about the number {i} and the sea", "A poem") for i in range(20)]
    result = find_contamination(train, evals(), ContaminationConfig())
    assert result.hits == []
    assert [(s.eval_id, s.eval_source, s.train_rows) for s in result.shared] == [("e1", "test", 10)]
    assert result.shared[0].overlap.startswith("100% covered: in the novel the old lighthouse")
    # Pasted into one row only, it is a hit, and nothing is "shared".
    result = find_contamination(train[:1] + train[10:], evals(), ContaminationConfig())
    assert [(h.train_id, h.eval_id) for h in result.hits] == [("t0", "e1")] and result.shared == []


def test_boilerplate_covering_an_eval_row_is_listed_as_shared():
    sign_off = ("Great question! Let me think about this carefully before I answer. I hope this helps, and "
                "please ask me anything else because I really enjoy talking about it")
    eval_rows = [EvalText.of(chat("e", "What is 3 plus 4?", f"{sign_off} 7."), "val"),
                 EvalText.of(chat("f", "Name a colour of the sky at noon on a clear summer day", "Blue."), "val")]
    train = [chat(f"t{i}", f"What is {i} plus 1?", f"{sign_off} {i + 1}.") for i in range(30)]
    result = find_contamination(train, eval_rows, ContaminationConfig())
    assert result.hits == [] and [(s.eval_id, s.train_rows) for s in result.shared] == [("e", 30)]
