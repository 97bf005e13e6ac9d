"""LLM-as-judge: score each system's answers 1-5 with a rubric, through any OpenAI-compatible endpoint."""

from __future__ import annotations

import os
import re
from typing import Any

from tunelab.config import JudgeConfig
from tunelab.errors import TunelabError
from tunelab.redaction import redact

PROMPT = """{rubric}

Question:
{question}

Reference answer:
{reference}

Answer to score:
{answer}

Reply with a single number from 1 to 5."""


def judge_rows(cfg: JudgeConfig, rows: list[dict[str, Any]], systems: list[str]) -> dict[str, dict[str, float]]:
    from openai import OpenAI, OpenAIError

    key = os.environ.get(cfg.api_key_env, "none")
    client = OpenAI(base_url=cfg.base_url, api_key=key, timeout=60, max_retries=1)
    results: dict[str, dict[str, float]] = {}
    for system in systems:
        scores = []
        for row in rows[: cfg.max_examples]:
            content = PROMPT.format(rubric=cfg.rubric, question=row["prompt"], reference=row["reference"],
                                    answer=row["outputs"][system])
            try:
                reply = client.chat.completions.create(model=cfg.model, temperature=0, max_tokens=8,
                                                       messages=[{"role": "user", "content": content}])
            except OpenAIError as err:  # an endpoint may echo the key it was sent ("Incorrect API key: sk-...")
                raise TunelabError(redact(f"eval.judge: the judge at {cfg.base_url} failed: {err}", [key])) from None
            text = reply.choices[0].message.content or ""
            match = re.search(r"[1-5]", text)
            if match:
                scores.append(int(match.group()))
            row.setdefault("judge", {})[system] = int(match.group()) if match else None
        results[system] = {"mean": sum(scores) / len(scores) if scores else float("nan"), "n": len(scores)}
    return results
