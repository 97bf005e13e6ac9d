"""Batched greedy generation with left padding, shortest-first for less padding."""

from __future__ import annotations

from typing import Any

import torch

from tunelab.families import answer_part, stop_texts, stop_token_ids
from tunelab.progress import progress_bar


def generate_greedy(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int, label: str = "generate",
    show_progress: bool = True,
) -> list[str]:
    """Greedy answers to already-rendered `prompts`, in the same order."""
    return [text for text, _ in generate_with_ends(model, tokenizer, prompts, max_new_tokens, batch_size, label,
                                                   show_progress)]


SHORT_PROMPT_BATCH_MAX = 50


def short_prompt_batch(batch_size: int, max_length: int, tokenizer: Any, prompts: list[str], new_tokens: int) -> int:
    """A batch size for short prompts (forgetting probes, the replay pool): eval.batch_size rows of up to
    data.max_length tokens is what the user's memory was sized for, so batches of up to that many tokens, at most
    50 prompts and never fewer than `batch_size`. Greedy decoding pays per step more than per row: on a 2-core CPU
    100 probes took 59 s in batches of 16 and 34 s in batches of 50, with the same pass rates."""
    longest = max(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]) + new_tokens
    return max(batch_size, min(SHORT_PROMPT_BATCH_MAX, batch_size * max_length // longest))


@torch.no_grad()
def generate_with_ends(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int, label: str = "generate",
    show_progress: bool = True, keep_reasoning: bool = False,
) -> list[tuple[str, bool]]:
    """(greedy answer, whether it ended at an end-of-turn within the budget) for each rendered prompt; the answer
    after any reasoning block, unless `keep_reasoning` (families.answer_part)."""
    from transformers import GenerationConfig

    model.eval()
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer, model)
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
    )
    cut_at = stop_texts(tokenizer)  # an end-of-turn marker that is not one token cannot stop generation
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[tuple[str, bool]] = [("", False)] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens must follow each prompt directly
    try:
        with progress_bar(disable=not show_progress) as bar:
            task = bar.add_task(label, total=len(prompts), info="")
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
                out = model.generate(**enc, generation_config=gen_config)
                new_tokens = out[:, enc["input_ids"].shape[1]:]
                texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for i, row, text in zip(idx, new_tokens.tolist(), texts):
                    ended = any(t in stops for t in row)
                    for marker in cut_at:
                        ended = ended or marker in text
                        text = text.split(marker, 1)[0]
                    answers[i] = (answer_part(tokenizer, text, keep_reasoning).strip(), ended)
                bar.advance(task, len(idx))
    finally:
        tokenizer.padding_side = side
    return answers
