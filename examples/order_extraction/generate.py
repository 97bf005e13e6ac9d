"""Generate the quickstart dataset: extract an order from a customer message into a fixed one-line format.

The base model cannot do this by prompting: the answer format (keys, order, separators) is a house
convention it has never seen. Held-out examples use sentence templates, items and cities that never
appear in training, so a high tuned score means the model learned the task, not the examples.

Deterministic: the same seed writes byte-identical files.
    python examples/order_extraction/generate.py [--out examples/order_extraction] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = "Extract the order from this customer message."

TRAIN_TEMPLATES = [
    "Hi, please send {q} boxes of {item} to our store in {city}.",
    "We need {q} units of {item} delivered to {city} by Friday.",
    "Could you ship {q} packs of {item} to {city}? Thanks!",
    "Order for the {city} branch: {q} cases of {item}.",
    "Please deliver {q} crates of {item} to {city} as soon as possible.",
    "{city} office here. We would like {q} units of {item}.",
    "Requesting {q} boxes of {item}, destination {city}.",
    "Hello! Our team in {city} needs {q} packs of {item}.",
    "Send {q} cartons of {item} over to {city}, please.",
    "I'd like to order {q} units of {item} for delivery in {city}.",
    "Restock request: {item}, quantity {q}, ship to {city}.",
    "Can we get {q} bags of {item} sent to the {city} warehouse?",
]
TEST_TEMPLATES = [
    "Good morning. Kindly dispatch {q} pallets of {item} to {city}.",
    "Our {city} shop is running low; please forward {q} boxes of {item}.",
    "New purchase order: {q} x {item}, deliver to {city}.",
    "Ship to {city}: {item}, {q} units total.",
    "Would it be possible to have {q} sets of {item} brought to {city} next week?",
    "Hey there, {city} calling. Put us down for {q} crates of {item}.",
]
# Training items and towns are drawn from large pools (adjective x noun, invented town names), so no
# single entity repeats often: the model has to learn to copy from the message rather than memorize.
TRAIN_ADJECTIVES = [
    "blue", "large", "recycled", "organic", "heavy-duty", "mini", "black", "premium", "spare", "white",
    "plastic", "cotton", "waterproof", "cordless", "folding", "green", "scented", "steel", "glass", "paper",
]
TRAIN_NOUNS = [
    "printer paper", "ink cartridges", "coffee filters", "towels", "batteries", "gloves", "markers",
    "sticky notes", "hand soap", "trash bags", "packing tape", "desk lamps", "cables", "notebooks", "pens",
    "cups", "sponges", "light bulbs", "hard hats", "zip ties", "file folders", "rubber bands", "ear plugs",
    "wall clocks", "mouse pads", "envelopes", "labels", "napkins", "water bottles", "extension cords",
    "keyboards", "monitor stands", "chairs", "buckets", "aprons", "scissors",
]
TRAIN_CITIES = [
    "Denver", "Austin", "Boston", "Seattle", "Chicago", "Portland", "Dallas", "Miami", "Atlanta", "Phoenix",
    "Detroit", "Nashville", "Omaha", "Tucson", "Memphis", "Raleigh", "Tampa", "Toledo", "Fresno", "Spokane",
    "Madrid", "Lyon", "Munich", "Oslo", "Dublin", "Lisbon", "Vienna", "Prague", "Krakow", "Osaka",
]
SYLLABLES = ["ka", "lor", "ven", "mi", "tar", "bel", "dun", "sa", "ro", "quin", "fel", "ash", "or", "ton",
             "vil", "mar", "den", "es", "thal", "ri", "gon", "ul", "bra", "nes"]
TEST_ITEMS = [
    "oat milk", "steel screws", "yoga mats", "paint brushes", "red roses", "ceramic mugs", "solar panels",
    "wool blankets", "garden hoses", "tennis balls", "bike helmets", "ice packs", "lemon soap", "copper wire",
    "fire extinguishers",
]
TEST_CITIES = [
    "Calgary", "Winnipeg", "Halifax", "Adelaide", "Perth", "Auckland", "Bergen", "Porto", "Seville", "Bologna",
    "Graz", "Ghent", "Tallinn", "Cork", "Kyoto",
]


def invented_town(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def train_entity(rng: random.Random) -> tuple[str, str]:
    item = f"{rng.choice(TRAIN_ADJECTIVES)} {rng.choice(TRAIN_NOUNS)}" if rng.random() < 0.7 else rng.choice(TRAIN_NOUNS)
    city = rng.choice(TRAIN_CITIES) if rng.random() < 0.4 else invented_town(rng)
    return item, city


def test_entity(rng: random.Random) -> tuple[str, str]:
    return rng.choice(TEST_ITEMS), rng.choice(TEST_CITIES)


def make_examples(n: int, templates: list[str], entity, rng: random.Random, prefix: str) -> list[dict]:
    rows = []
    for i in range(n):
        (item, city), q = entity(rng), rng.randint(1, 60)
        message = rng.choice(templates).format(q=q, item=item, city=city)
        # "key: value" keeps a space before each value, so the value's tokens are the same as in the
        # message (" Halifax"); inside JSON quotes an unseen name must be re-spelled ('"Hal', 'ifax"').
        answer = f"item: {item} | quantity: {q} | city: {city}"
        rows.append({
            "id": f"{prefix}-{i:04d}",
            "messages": [
                {"role": "user", "content": f"{INSTRUCTION}\n\n{message}"},
                {"role": "assistant", "content": answer},
            ],
        })
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=320)
    parser.add_argument("--test", type=int, default=60)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out / "train.jsonl", make_examples(args.train, TRAIN_TEMPLATES, train_entity, rng, "train"))
    write(args.out / "test.jsonl", make_examples(args.test, TEST_TEMPLATES, test_entity, rng, "test"))


if __name__ == "__main__":
    main()
