"""Rehearsal ("replay") rows: general-purpose examples mixed into the training split so a fine-tune keeps
what the base model could already do.

Two sources (`data.replay`):
- the base model's own answers (`from_self`): it answers tunelab's bundled pool of general instructions
  (replay_pool.jsonl, disjoint from the forgetting probes) greedily, once per model, pool version, template
  and system prompt; the answers are cached, so a second run costs nothing. Training on the model's own
  behaviour holds that behaviour in place. Answers that do not end within the length budget are not used.
- files: any chat dataset tunelab can load (a team's general chat logs, an instruction dataset).

Replay rows join the training split only (never val or test), marked `meta["replay"]`, so training can log
their loss apart from the task's.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path
from typing import Any

from tunelab.artifacts import sha256_text, write_jsonl_atomic
from tunelab.config import RunConfig
from tunelab.data.load import load_source
from tunelab.data.records import Record
from tunelab.errors import DataError
from tunelab.progress import console

POOL_VERSION = 1  # bump whenever replay_pool.jsonl changes: cached answers are keyed by it


def pool_prompts() -> list[dict[str, str]]:
    text = resources.files("tunelab.data").joinpath("replay_pool.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def replay_count(task_rows: int, ratio: float) -> int:
    """Replay rows that make up `ratio` of the training split beside `task_rows` task rows."""
    return round(task_rows * ratio / (1.0 - ratio)) if ratio > 0 else 0


def replay_rows(cfg: RunConfig, task_rows: int, generate: bool = True) -> tuple[list[Record], dict[str, Any]]:
    """The replay rows for a training split of `task_rows` task rows, and what the data report says of them.

    `generate=False`: self answers are used only when cached (a dry run loads no weights)."""
    replay = cfg.data.replay
    wanted = replay_count(task_rows, replay.ratio)
    if wanted == 0:
        return [], {"ratio": replay.ratio, "rows": 0}
    candidates: list[Record] = []
    if replay.from_self:
        answers = self_answers(cfg, generate)
        if answers is None:
            return [], {"ratio": replay.ratio, "rows": 0, "wanted": wanted, "self_answers": "not generated yet: "
                        "the base model answers the pool at the first run (then cached)"}
        candidates += answers
    for source in replay.files:
        loaded = load_source(source.path, source.format or "auto", source.columns, cfg.data.on_error,
                             split=source.split or "train", subset=source.subset)
        chats = [r for r in loaded.records if r.kind == "chat"]
        if len(chats) < len(loaded.records):
            raise DataError(f"data.replay.files: {source.path} holds {loaded.records[0].kind if not chats else 'mixed'} "
                            "rows; replay rows are chat rows (a conversation ending in an answer)")
        candidates += [_as_replay(r, f"file:{Path(str(source.path)).name}") for r in chats]
    if not candidates:
        raise DataError("data.replay: no replay rows could be made (every self answer ran past "
                        "data.replay.max_new_tokens?)")
    picked = random.Random(cfg.data.seed).sample(candidates, min(wanted, len(candidates)))
    if len(picked) < wanted:
        console.print(f"[yellow]warning:[/] data.replay: {wanted} replay rows wanted for ratio {replay.ratio}, "
                      f"{len(candidates)} available; using them all")
    by_source: dict[str, int] = {}
    for record in picked:
        by_source[record.meta["replay"]] = by_source.get(record.meta["replay"], 0) + 1
    return picked, {"ratio": replay.ratio, "rows": len(picked), "wanted": wanted, "available": len(candidates),
                    "sources": by_source}


def _as_replay(record: Record, source: str) -> Record:
    record.id = f"replay:{record.id}"
    record.meta = {**record.meta, "replay": source}
    return record


def self_answers(cfg: RunConfig, generate: bool = True) -> list[Record] | None:
    """The base model's greedy answers to the pool, from the cache or generated (batched) and cached; None when
    they are not cached and `generate` is off."""
    from tunelab.chat import with_system_prompt
    from tunelab.models import base_identity, cache_root, load_tokenizer, resolve_model

    folder = resolve_model(cfg.model)
    tokenizer = load_tokenizer(folder)
    if not tokenizer.chat_template:
        raise DataError("data.replay.from_self: the base model has no chat template of its own, so it has no chat "
                        "behaviour to keep; set from_self: false and give data.replay.files")
    pool = pool_prompts()
    conversations = [with_system_prompt([{"role": "user", "content": p["prompt"]}], cfg.data.system_prompt)
                     for p in pool]
    key = sha256_text(json.dumps({"model": base_identity(folder), "pool": POOL_VERSION,
                                  "template": tokenizer.chat_template, "system": cfg.data.system_prompt,
                                  "max_new_tokens": cfg.data.replay.max_new_tokens}, sort_keys=True))[:20]
    cache = cache_root(cfg.model) / "replay" / f"answers-{key}.jsonl"
    if not cache.is_file():
        if not generate:
            return None
        answers = _generate(cfg, folder, tokenizer, conversations)
        write_jsonl_atomic(cache, [{"id": p["id"], "answer": a} for p, a in zip(pool, answers)])
    cached = {row["id"]: row["answer"] for row in map(json.loads, cache.read_text(encoding="utf-8").splitlines())}
    records = []
    for prompt, conversation in zip(pool, conversations):
        answer = cached.get(prompt["id"])
        if answer:  # None: ran past the budget
            records.append(Record(f"replay:{prompt['id']}", "replay:self", "chat",
                                  [*conversation, {"role": "assistant", "content": answer}], meta={"replay": "self"}))
    return records


def _generate(cfg: RunConfig, folder: Path, tokenizer: Any, conversations: list[list[dict[str, str]]]) -> list[Any]:
    import torch

    from tunelab.chat import render_prompt
    from tunelab.eval.generate import generate_with_ends, short_prompt_batch
    from tunelab.models import Precision, load_model, pick_device

    console.print(f"data.replay: the base model answers {len(conversations)} general instructions (once; cached) ...")
    model = load_model(folder, Precision(pick_device(cfg.model.device), None, torch.float32))
    prompts = [render_prompt(tokenizer, c) for c in conversations]
    new_tokens = cfg.data.replay.max_new_tokens
    batch = short_prompt_batch(cfg.eval.batch_size, cfg.data.max_length, tokenizer, prompts, new_tokens)
    # The base's answers as it gives them, reasoning included: training on them keeps how it answers.
    answers = generate_with_ends(model, tokenizer, prompts, new_tokens, batch, label="replay: base answers",
                                 keep_reasoning=True)
    return [text if ended and text else None for text, ended in answers]
