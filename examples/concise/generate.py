"""Generate the SFT -> DPO example: short factual questions, answered concisely or with rambling.

- sft.jsonl:        chat rows, half answered concisely and half rambling (like real, uneven SFT data);
- prefs.jsonl:      preference rows on other questions: chosen = concise, rejected = rambling;
- test_chat.jsonl / test_prefs.jsonl: held-out questions (countries, numbers and words never used above),
                    with the concise answer as reference.
The measured property is answer length on the held-out questions: words per answer, and the share of
answers of at most 10 words. Deterministic: the same seed writes byte-identical files.
    python examples/concise/generate.py [--out examples/concise] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CAPITALS = [
    ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Canada", "Ottawa"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Cuba", "Havana"),
    ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Argentina", "Buenos Aires"), ("Colombia", "Bogota"), ("Morocco", "Rabat"), ("Ghana", "Accra"),
    ("Iceland", "Reykjavik"), ("Belgium", "Brussels"), ("Turkey", "Ankara"), ("Russia", "Moscow"),
    ("China", "Beijing"), ("India", "New Delhi"), ("Mexico", "Mexico City"), ("Australia", "Canberra"),
    ("Nepal", "Kathmandu"), ("Qatar", "Doha"), ("Jordan", "Amman"), ("Senegal", "Dakar"), ("Uganda", "Kampala"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"), ("light", "dark"),
    ("early", "late"), ("full", "empty"), ("hard", "soft"), ("old", "young"), ("open", "closed"), ("wet", "dry"),
    ("strong", "weak"), ("loud", "quiet"), ("rich", "poor"), ("thick", "thin"), ("high", "low"), ("clean", "dirty"),
    ("heavy", "light"), ("inside", "outside"), ("near", "far"), ("cheap", "expensive"), ("true", "false"),
    ("love", "hate"), ("win", "lose"),
]
RAMBLES = [
    "Great question! Let me think about this carefully before I answer. {fact} I hope this explanation helps, "
    "and please feel free to ask me anything else about {topic}, because I really enjoy talking about it!",
    "Oh, that is a really interesting thing to wonder about, and many people ask me about {topic}. {fact} "
    "There is so much more that could be said here, so let me know if you would like me to go into more detail!",
    "Thank you so much for asking! As a helpful assistant, I always like to explain things thoroughly. {fact} "
    "I think it is fascinating, and I would be happy to continue our conversation about {topic} whenever you like.",
]


def question(kind: str, item: tuple, rng: random.Random) -> tuple[str, str, str, str]:
    """(question, concise answer, full-sentence fact, topic)."""
    if kind == "capital":
        country, capital = item
        return f"What is the capital of {country}?", f"{capital}.", f"The capital of {country} is {capital}.", "geography"
    if kind == "opposite":
        word, opposite = item
        return (f"What is the opposite of {word}?", f"{opposite.capitalize()}.",
                f"The opposite of the word {word} is {opposite}.", "words")
    a, b = item
    return f"What is {a} plus {b}?", f"{a + b}.", f"If you add {a} and {b} together you get {a + b}.", "arithmetic"


def items(rng: random.Random, numbers: range) -> list[tuple[str, tuple]]:
    sums = [(rng.choice(numbers), rng.choice(numbers)) for _ in range(140)]
    return [("capital", c) for c in CAPITALS] + [("opposite", o) for o in OPPOSITES] + [("sum", s) for s in sums]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    pool = items(rng, range(2, 60))
    rng.shuffle(pool)
    # Hold out a fifth of the countries and words, and sums of larger numbers, for the test split.
    test_items = [p for p in pool if p[0] != "sum"][:13] + [("sum", (rng.randint(60, 99), rng.randint(60, 99)))
                                                             for _ in range(12)]
    train_items = [p for p in pool if p not in test_items]
    half = len(train_items) // 2
    rows: dict[str, list[dict]] = {"sft": [], "prefs": [], "test_chat": [], "test_prefs": []}
    for i, (kind, item) in enumerate(train_items):
        q, short, fact, topic = question(kind, item, rng)
        long = rng.choice(RAMBLES).format(fact=fact, topic=topic)
        user = [{"role": "user", "content": q}]
        if i < half:  # SFT: an uneven mix of styles
            answer = short if i % 2 == 0 else long
            rows["sft"].append({"id": f"sft-{i}", "messages": [*user, {"role": "assistant", "content": answer}]})
        else:
            rows["prefs"].append({"id": f"pref-{i}", "prompt": user, "chosen": short, "rejected": long})
    for i, (kind, item) in enumerate(test_items):
        q, short, fact, topic = question(kind, item, rng)
        long = rng.choice(RAMBLES).format(fact=fact, topic=topic)
        user = [{"role": "user", "content": q}]
        rows["test_chat"].append({"id": f"test-{i}", "messages": [*user, {"role": "assistant", "content": short}]})
        rows["test_prefs"].append({"id": f"test-{i}", "prompt": user, "chosen": short, "rejected": long})
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in rows.items():
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")


if __name__ == "__main__":
    main()
