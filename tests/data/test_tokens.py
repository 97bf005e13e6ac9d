"""Token counting for the length filters: exact where it matters, and a hostile huge row never tokenized."""

from __future__ import annotations

import random

from tests.conftest import write_jsonl
from tunelab.config_file import validate_config
from tunelab.data.prepare import prepare_data
from tunelab.data.records import Record
from tunelab.data.tokens import most_chars_per_token, token_counter


def chat(i: str, prompt: str, answer: str = "ok") -> Record:
    return Record(i, f"t.jsonl:{i}", "chat", [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}])


class SeenTexts:
    """The tokenizer, recording every text it is asked to split."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.seen = tokenizer, []

    def __call__(self, texts, **kwargs):
        self.seen += list(texts)
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_characters_bound_the_tokens_of_hostile_texts(tiny_tokenizer):
    rng = random.Random(0)
    per_token = most_chars_per_token(tiny_tokenizer)
    texts = [" " * 5000, "-" * 5000, "a" * 5000, "\n" * 5000, "ab" * 2500, "<|im_start|>" * 400,
             "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(5000)), "the cat sat on the mat " * 200]
    for text in texts:
        tokens = len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
        assert tokens * per_token >= len(text), text[:20]


def test_a_row_too_long_by_its_characters_alone_is_not_tokenized(tiny_tokenizer):
    spy = SeenTexts(tiny_tokenizer)
    huge = "word " * 400_000  # 2 MB
    records = [chat("a", "What is 2 + 2?", "4"), chat("huge", huge), chat("b", "Name a colour.", "Blue")]
    lengths = token_counter(spy, None, longest=64)(records)
    assert [lengths[0], lengths[2]] == token_counter(tiny_tokenizer, None)([records[0], records[2]])
    assert lengths[1] > 64
    assert len(spy.seen) == 2 and not any(huge in text for text in spy.seen)


def test_a_row_near_the_limit_is_counted_exactly(tiny_tokenizer):
    # Short by its characters, long in tokens: the bound never decides for it.
    records = [chat("mixed", "x9 " * 60)]
    lengths = token_counter(tiny_tokenizer, None, longest=64)(records)
    assert lengths == token_counter(tiny_tokenizer, None)(records) and lengths[0] > 64


def test_data_prep_drops_a_multi_megabyte_row_as_too_long(tmp_path, tiny_model_dir):
    rows = [{"id": f"q{i}", "instruction": f"Question number {i}: what is {i} plus {i}?", "output": str(2 * i)}
            for i in range(30)]
    rows.insert(7, {"id": "huge", "instruction": "Summarize: " + "lorem ipsum dolor sit amet " * 200_000,
                    "output": "short"})  # 5 MB in one row
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = validate_config({"model": {"name": str(tiny_model_dir)}, "data": {"train": str(train)},
                           "output": {"dir": str(tmp_path / "run")}})
    prepared = prepare_data(cfg, tmp_path / "run" / "data")
    assert prepared.report["removed_ids"]["too_long"] == ["huge"]
    assert sum(prepared.dataset.counts().values()) == 30
