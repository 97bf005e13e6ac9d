"""The forgetting probes score what their questions ask: letter case where they ask for it, and an arithmetic
result only when the answer states it, not when it restates the question's own numbers."""

from __future__ import annotations

from tunelab.eval.probes import CATEGORIES, PROBES

BY_ID = {p.id: p for p in PROBES}
BY_PROMPT = {p.prompt: p for p in PROBES}


def test_there_are_100_probes_in_four_categories_of_25():
    assert len(PROBES) == 100 and len(BY_ID) == 100
    assert [sum(p.category == c for p in PROBES) for c in CATEGORIES] == [25, 25, 25, 25]


def test_probes_about_letter_case_are_scored_case_sensitively():
    hello = BY_PROMPT["Write the word hello in capital letters."]
    assert hello.passed("HELLO") and not hello.passed("Hello in capital letters.")
    water = BY_PROMPT["Write the word water in uppercase."]
    assert water.passed("WATER") and not water.passed("Water is a word.")
    python = BY_PROMPT["Write the word python in lowercase letters only."]
    assert python.passed("python") and not python.passed("PYTHON")
    letter = BY_PROMPT["Answer with an uppercase letter only: what letter does apple start with?"]
    assert letter.passed("A") and not letter.passed("a")
    done = BY_PROMPT["Respond with the word done in lowercase."]
    assert done.passed("done.") and not done.passed("DONE")
    assert BY_PROMPT["What is the capital of France?"].passed("the capital is paris")  # others ignore case


def test_an_arithmetic_answer_must_state_the_result():
    nine = BY_PROMPT["What is 81 divided by 9? Answer with the number."]
    assert nine.passed("9") and nine.passed("81 ÷ 9 = 9") and nine.passed("The answer is 9.")
    assert not nine.passed("81 divided by 9 is 8")  # the 9 is the question's
    three = BY_PROMPT["What is 33 divided by 11? Answer with the number."]
    assert not three.passed("33 divided by 11 is 2.3333333333333333.") and three.passed("3")
    hundred = BY_PROMPT["What is 4 times 25? Answer with the number."]
    assert hundred.passed("4 times 25 is 100.") and not hundred.passed("4 times 25 is 1000.")


def test_probes_go_in_batches_sized_by_the_tokens_an_eval_batch_may_hold(tiny_tokenizer):
    from tunelab.eval.generate import short_prompt_batch

    prompts = [p.prompt for p in PROBES]

    def batch(batch_size=16, max_length=2048):
        return short_prompt_batch(batch_size, max_length, tiny_tokenizer, prompts, 48)

    assert batch() == 50  # 16 rows of up to 2,048 tokens hold 50 probes many times over
    longest = max(len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts) + 48
    assert batch(batch_size=4, max_length=2 * longest) == 8  # what 4 rows of the run's length hold
    assert batch(batch_size=4, max_length=longest // 2) == 4  # never fewer than eval.batch_size
    assert batch(batch_size=80) == 80  # nor more than asked for where the user asked for more
