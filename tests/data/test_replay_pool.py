"""The bundled rehearsal pool (replay_pool.jsonl): big and varied enough, no duplicates within it, and disjoint
from the forgetting probes by tunelab's own contamination check (a pool that teaches the probes would hide the
forgetting they measure)."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources

from tunelab.config import ContaminationConfig, DedupConfig
from tunelab.data.contamination import EvalText, find_contamination
from tunelab.data.dedup import deduplicate, normalize_for_match
from tunelab.data.records import Record
from tunelab.eval.probes import PROBES


def pool() -> list[dict[str, str]]:
    text = resources.files("tunelab.data").joinpath("replay_pool.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def as_records(rows: list[dict[str, str]]) -> list[Record]:
    return [Record(row["id"], f"replay_pool.jsonl:{row['id']}", "text", text=row["prompt"]) for row in rows]


def probe_texts() -> list[EvalText]:
    return [EvalText(p.id, "probes", p.prompt, p.prompt) for p in PROBES]


def contamination_hits(rows: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    result = find_contamination(as_records(rows), probe_texts(), ContaminationConfig(), DedupConfig())
    return [(h.train_id, h.eval_id, h.kind) for h in result.hits]


def duplicate_pairs(rows: list[dict[str, str]]) -> list[tuple[str, ...]]:
    result = deduplicate(as_records(rows), DedupConfig())
    return [*result.exact_pairs, *[pair[:2] for pair in result.near_pairs]]


def test_pool_rows_are_well_formed_and_many():
    rows = pool()
    assert len(rows) >= 500
    assert all(set(row) == {"id", "category", "prompt"} and all(row.values()) for row in rows)
    assert all(re.fullmatch(r"pool-\d{4}", row["id"]) for row in rows)
    assert len({row["id"] for row in rows}) == len(rows)


def test_pool_covers_many_categories_evenly():
    counts = Counter(row["category"] for row in pool())
    assert len(counts) >= 20
    assert max(counts.values()) <= 0.10 * sum(counts.values()), counts.most_common(3)


def test_no_duplicates_or_near_duplicates_within_the_pool():
    rows = pool()
    assert duplicate_pairs(rows) == []
    openings = Counter(" ".join(normalize_for_match(row["prompt"]).split()[:5]) for row in rows)
    assert [o for o, n in openings.items() if n > 1] == []


def test_pool_is_disjoint_from_the_forgetting_probes():
    rows = pool()
    assert contamination_hits(rows) == []
    # Whole categories the probes measure stay out too, whatever the wording.
    assert not [r["id"] for r in rows if "capital of" in r["prompt"].lower()]
    assert not [r["id"] for r in rows if re.search(r"\d+\s+(plus|minus|times|divided by)\s+\d+", r["prompt"])]


def test_the_checks_would_catch_a_leak_or_a_duplicate():
    rows = pool()
    probe = PROBES[len(PROBES) // 2]
    leaked = [*rows, {"id": "pool-9999", "category": "planted", "prompt": probe.prompt}]
    assert contamination_hits(leaked) == [("pool-9999", probe.id, "exact")]
    reworded = [*rows, {"id": "pool-9998", "category": "planted", "prompt": rows[3]["prompt"].upper() + "!"}]
    assert duplicate_pairs(reworded) == [(rows[3]["id"], "pool-9998")]
