"""Where a served answer ends: at the template's end of turn, without the whitespace the template writes before
it (`{{ content }}\\n### end` teaches the model "\\n### end"); a request's own stop strings cut exactly."""

from __future__ import annotations

import copy

import pytest

from tunelab.families import (after_opening, answer_opening, answer_part, gap_before_end, reasoning_markers,
                              stop_texts, stop_token_ids)
from tunelab.serve.engine import Engine, GenRequest
from tunelab.serve.metrics import Metrics

PLAIN = ("{%- for m in messages %}### {{ m.role }}:\n{{ m.content }}\n### end\n{% endfor %}"
         "{% if add_generation_prompt %}### assistant:\n{% endif %}")


@pytest.fixture
def plain_tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = PLAIN
    return tokenizer


def generate(tokenizer, text: str, stop: list[str] | None = None, then_eos: bool = False, opening: str = "",
             reasoning: tuple[str, str] | None = None, thoughts: list[str] | None = None) -> tuple[list[str], str]:
    """Feed `text`'s tokens one at a time through the engine's decoding step, as a model generating it would:
    (the deltas emitted, the finish reason); the reasoning deltas go to `thoughts`."""
    engine = Engine.__new__(Engine)  # the decoding step needs no model
    engine.tokenizer, engine.metrics = tokenizer, Metrics()
    engine.stop_ids = set(stop_token_ids(tokenizer))
    deltas: list[str] = []
    done: list[str] = []

    def emit(kind, payload):
        if kind == "delta":
            deltas.append(payload)
        elif kind == "reasoning":
            thoughts.append(payload)
        elif kind == "done":
            done.append(payload["finish_reason"])

    request = GenRequest(model="base", prompt_ids=[1], max_tokens=100, emit=emit, stop=stop or [],
                         end_texts=stop_texts(tokenizer), end_gap=gap_before_end(tokenizer), tokenizer=tokenizer,
                         opening=opening, reasoning=reasoning)
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    for token in [*tokens, *([tokenizer.eos_token_id] if then_eos else [])]:
        engine._advance(request, token)
        if request.finish_reason:
            break
    return deltas, request.finish_reason or ""


def test_the_whitespace_before_a_plain_text_end_marker_is_not_part_of_the_answer(plain_tokenizer):
    assert stop_texts(plain_tokenizer) == ["### end"] and gap_before_end(plain_tokenizer) == "\n"
    deltas, finish = generate(plain_tokenizer, "the cat\nsat down\n### end\n### user:")
    assert "".join(deltas) == "the cat\nsat down" and finish == "stop"  # the newline inside the answer stays
    assert all(d for d in deltas)
    deltas, finish = generate(plain_tokenizer, "the cat\n\n", then_eos=True)  # ended by eos after the gap
    assert "".join(deltas) == "the cat" and finish == "stop"


def test_a_requests_own_stop_string_cuts_exactly_and_length_keeps_everything(plain_tokenizer):
    deltas, finish = generate(plain_tokenizer, "the cat\n### end", stop=["###"])
    assert "".join(deltas) == "the cat\n" and finish == "stop"  # OpenAI's stop: the text before it, as is
    deltas, finish = generate(plain_tokenizer, "the cat\n")
    assert "".join(deltas) == "the cat" and finish == ""  # not finished: the newline waits for what follows
    deltas, finish = generate(plain_tokenizer, "the cat\nsat on the mat")
    assert "".join(deltas).startswith("the cat\nsat") and finish == ""  # ... and goes out once the answer goes on


def test_templates_with_the_marker_right_after_the_answer_have_no_gap(tiny_tokenizer):
    assert gap_before_end(tiny_tokenizer) == ""
    deltas, finish = generate(tiny_tokenizer, "the cat\n", then_eos=True)
    assert "".join(deltas) == "the cat\n" and finish == "stop"  # nothing of the answer is taken away


# Qwen3's shape: the final answer opens with an empty think block that the generation prompt does not hold.
OPENS_WITH_THINK = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and loop.last %}"
                    "<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_what_the_template_writes_ahead_of_every_answer_is_not_sent(tiny_tokenizer):
    """A model trained on such a template writes the block before each answer (the loss covers what follows the
    generation prompt); served and scored with it, a right answer read '<think>...</think> cat' (0% exact match)."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = OPENS_WITH_THINK
    opening = answer_opening(tokenizer)
    assert opening == "<think>\n\n</think>" and answer_opening(tiny_tokenizer) == ""
    deltas, finish = generate(tokenizer, "<think>\n\n</think>\n\nthe cat", then_eos=True, opening=opening)
    assert "".join(deltas) == "the cat" and finish == "stop"
    assert not any("<" in d or ">" in d for d in deltas)  # no piece of the block went out while it was written
    deltas, _ = generate(tokenizer, "the cat", then_eos=True, opening=opening)  # an answer without it: as is
    assert "".join(deltas) == "the cat"
    deltas, _ = generate(tokenizer, "<thin cat", then_eos=True, opening=opening)  # started like it, then not
    assert "".join(deltas) == "<thin cat"
    assert after_opening("<think>\n\n</think>\n\nthe cat", opening) == "the cat"  # eval scores this
    assert after_opening("<think>\n", opening) is None and after_opening("  the cat", "") == "  the cat"


def test_a_reasoning_block_goes_out_apart_from_the_answer_as_it_is_written(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = OPENS_WITH_THINK
    markers = reasoning_markers(tokenizer)
    assert markers == ("<think>", "</think>") and reasoning_markers(tiny_tokenizer) is None

    def served(text: str) -> tuple[str, list[str], list[str], str]:
        thoughts: list[str] = []
        deltas, finish = generate(tokenizer, text, then_eos=True, opening=answer_opening(tokenizer),
                                  reasoning=markers, thoughts=thoughts)
        return "".join(thoughts), thoughts, deltas, finish

    reasoning, thoughts, deltas, finish = served("<think>\nThe sentence names a cat.\n</think>\n\nthe cat")
    assert (reasoning, "".join(deltas), finish) == ("The sentence names a cat.", "the cat", "stop")
    assert len(thoughts) > 3  # sent while it was written, not at its end
    assert not any("<" in piece or ">" in piece for piece in thoughts + deltas)  # no piece of a tag went out
    _, thoughts, deltas, _ = served("<think>\n\n</think>\n\nthe cat")  # an empty block: no reasoning at all
    assert (thoughts, "".join(deltas)) == ([], "the cat")
    reasoning, _, deltas, finish = served("<think>\nStill thinking about")  # ended inside the block: no answer
    assert (reasoning, deltas, finish) == ("Still thinking about", [], "stop")
    _, thoughts, deltas, _ = served("the cat")  # no block: all of it is the answer
    assert (thoughts, "".join(deltas)) == ([], "the cat")
    # What eval scores, of an output or a reference: the answer after the block.
    assert answer_part(tokenizer, "<think>\nIt is a cat.\n</think>\n\nthe cat") == "the cat"
    assert answer_part(tokenizer, "<think>\nIt is a") == "" and answer_part(tokenizer, "the cat") == "the cat"
    assert answer_part(tiny_tokenizer, "<think>\nx\n</think>\n\ncat") == "<think>\nx\n</think>\n\ncat"
    # Replay keeps a block with reasoning in it, and takes off only the empty one.
    assert answer_part(tokenizer, "<think>\nIt is a cat.\n</think>\n\nthe cat", keep_reasoning=True) == (
        "<think>\nIt is a cat.\n</think>\n\nthe cat")
    assert answer_part(tokenizer, "<think>\n\n</think>\n\nthe cat", keep_reasoning=True) == "the cat"
