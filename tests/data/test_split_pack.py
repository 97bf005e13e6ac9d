"""Deterministic, leak-free splits; source weights; packing that changes nothing but speed."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import animal_rows
from tests.data.test_clean_dedup import chat
from tunelab.chat import tokenize_conversation
from tunelab.data.pack import PackedCollator, pack_examples
from tunelab.data.split import apply_weights, split_records
from tunelab.errors import DataError
from tunelab.train.collate import PaddingCollator


def rows(n: int) -> list:
    out = []
    for i in range(n):
        r = chat(i, f"question {i}")
        r.meta = {"topic": "ab"[i % 2] if i % 10 else "c", "user": f"u{i // 4}"}
        out.append(r)
    return out


def ids(records) -> list[str]:
    return [r.id for r in records]


def test_split_is_deterministic_disjoint_and_seed_dependent():
    a = split_records(rows(100), 0.1, 0.2, seed=3)
    b = split_records(rows(100), 0.1, 0.2, seed=3)
    assert [ids(s) for s in a] == [ids(s) for s in b]
    assert [len(s) for s in a] == [70, 10, 20]
    assert len(set(ids(a[0]) + ids(a[1]) + ids(a[2]))) == 100
    assert ids(split_records(rows(100), 0.1, 0.2, seed=4)[2]) != ids(a[2])


def test_stratified_split_keeps_shares():
    train, val, test = split_records(rows(200), 0.1, 0.2, seed=0, stratify_by="topic")
    share = lambda split, t: sum(r.meta["topic"] == t for r in split) / len(split)  # noqa: E731
    for topic in "abc":
        assert share(test, topic) == pytest.approx(share(train, topic), abs=0.02)


def test_many_small_strata_still_give_the_whole_split_its_share():
    # 20 topics of 5 rows at 10%: each topic's 0.5 row rounded to nothing gave no val or test at all.
    records = [chat(i, f"question {i}") for i in range(100)]
    for i, r in enumerate(records):
        r.meta = {"topic": f"t{i % 20}"}
    train, val, test = split_records(records, 0.1, 0.1, seed=0, stratify_by="topic")
    assert (len(train), len(val), len(test)) == (80, 10, 10)
    # 10 topics of 15 rows at 10%: 15 rows, not each topic's 1.5 rounded up to 2 (20 rows, 13% of the data).
    more = [chat(i, f"question {i}") for i in range(150)]
    for i, r in enumerate(more):
        r.meta = {"topic": f"t{i % 10}"}
    assert [len(s) for s in split_records(more, 0.1, 0.1, seed=0, stratify_by="topic")] == [120, 15, 15]


def test_one_large_group_does_not_fill_the_test_split():
    records = [chat(i, f"question {i}") for i in range(100)]
    for i, r in enumerate(records):
        r.meta = {"user": "big" if i < 60 else f"u{i}"}  # one user wrote 60 of the 100 rows
    for seed in range(5):
        train, val, test = split_records(records, 0.1, 0.1, seed=seed, group_by="user")
        assert len(test) == 10 and len(val) == 10  # it was 60 in test for some seeds
        assert "big" in {r.meta["user"] for r in train}


def test_grouped_split_never_straddles():
    train, val, test = split_records(rows(200), 0.1, 0.2, seed=0, group_by="user")
    users = [{r.meta["user"] for r in split} for split in (train, val, test)]
    assert not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
    assert len(test) == pytest.approx(40, abs=4) and len(val) == pytest.approx(20, abs=4)


def test_missing_split_column_is_named():
    records = rows(3)
    del records[1].meta["topic"]
    with pytest.raises(DataError, match=r"t.jsonl:1: data.stratify_by column 'topic' is missing from row 1"):
        split_records(records, 0.1, 0.1, 0, stratify_by="topic")


def test_weights_repeat_and_subsample_deterministically():
    a, b = rows(10), rows(10)
    for r in b:
        r.id = f"b{r.id}"
    weight = {**{id(r): 2.0 for r in a}, **{id(r): 0.5 for r in b}}
    mixed = apply_weights(a + b, lambda r: weight[id(r)], seed=1)
    assert sum(r.id.startswith("b") for r in mixed) == 5
    assert sum(not r.id.startswith("b") for r in mixed) == 20
    assert len(set(ids(mixed))) == 25  # repeated rows get distinct ids ("3#2")
    assert ids(mixed) == ids(apply_weights(a + b, lambda r: weight[id(r)], seed=1))


def test_packing_fits_rows_and_restarts_positions():
    examples = [{"id": str(i), "input_ids": list(range(n)), "labels": list(range(n))} for i, n in
                enumerate([7, 3, 5, 5, 6, 4])]
    packed = pack_examples(examples, max_length=10)
    assert sorted(len(p["input_ids"]) for p in packed) == [10, 10, 10]
    assert sorted(i for p in packed for i in p["ids"]) == ["0", "1", "2", "3", "4", "5"]
    for p in packed:
        starts = [k for k, pos in enumerate(p["position_ids"]) if pos == 0]
        assert all(p["labels"][k] == -100 for k in starts)  # no example predicts another's first token


def test_packed_loss_equals_unpacked_loss(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.config.use_cache = False
    examples = []
    for i, row in enumerate(animal_rows(6, seed=5)):
        row["messages"][0]["content"] += " and more" * i  # varied lengths, so padding really happens
        ex = tokenize_conversation(tiny_tokenizer, row["messages"])
        examples.append({"id": str(i), "input_ids": ex.input_ids, "labels": ex.labels})
    with torch.no_grad():
        unpacked = model(**PaddingCollator(tiny_tokenizer.pad_token_id)(examples)).loss
        packed_rows = pack_examples(examples, max_length=200)
        assert len(packed_rows) < len(examples)
        packed = model(**PackedCollator(tiny_tokenizer.pad_token_id)(packed_rows)).loss
        # Without restarting positions, attention leaks across examples and the loss changes.
        batch = PackedCollator(tiny_tokenizer.pad_token_id)(packed_rows)
        leaky = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert packed.item() == pytest.approx(unpacked.item(), abs=1e-4)
    assert abs(leaky.item() - unpacked.item()) > 1e-3
