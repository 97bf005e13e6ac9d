"""Benchmark: exact + MinHash near-dedup of N short examples (default 100k) with the default settings.

    python bench/dedup_speed.py [--n 100000] [--dup-rate 0.1]

Plants near-duplicates (last word changed, case and punctuation changed) at --dup-rate and
reports wall time and recall on them.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from tunelab.config import DedupConfig
from tunelab.data.dedup import deduplicate
from tunelab.data.records import Record

WORDS = ("the a of to and in is for on with as by at from order ship send box pack city item price review "
         "great bad quick slow red blue green customer support refund delivery late early happy sad product "
         "quality size color fit return store online phone email help please thanks today week month year").split()


def make_rows(n: int, dup_rate: float, seed: int = 0) -> tuple[list[Record], set[str]]:
    rng = random.Random(seed)
    rows, planted = [], set()
    for i in range(n):
        if rows and rng.random() < dup_rate:
            source = rng.choice(rows[-1000:])
            # A typical near-twin: the answer's last word changed, plus different case and punctuation.
            words = source.messages[1]["content"].split()
            words[-1] = rng.choice(WORDS)
            prompt, answer = source.messages[0]["content"].capitalize() + "!", " ".join(words)
            planted.add(f"r{i}")
        else:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(25, 45)))
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 25)))
        rows.append(Record(f"r{i}", "bench", "chat", [{"role": "user", "content": prompt},
                                                       {"role": "assistant", "content": answer}]))
    return rows, planted


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dup-rate", type=float, default=0.1)
    args = parser.parse_args()
    rows, planted = make_rows(args.n, args.dup_rate)
    started = time.perf_counter()
    result = deduplicate(rows, DedupConfig())
    seconds = time.perf_counter() - started
    removed = {r for _, r in result.exact_pairs} | {r for _, r, _ in result.near_pairs}
    found = len(planted & removed)
    print(json.dumps({
        "examples": args.n, "seconds": round(seconds, 1), "examples_per_second": round(args.n / seconds),
        "planted_near_duplicates": len(planted), "recall": round(found / max(len(planted), 1), 4),
        "removed": len(removed), "false_positives": len(removed - planted),
    }))


if __name__ == "__main__":
    main()
