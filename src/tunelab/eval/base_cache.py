"""Answers of the base model (zero- and few-shot, probes) cached across runs of the same base.

Every run of one base model asks the base the same questions: re-generating those answers is most of the eval
time of a sweep or an ablation. Greedy decoding on one device is deterministic for a given batch layout, so
the answers are a function of the weights, the rendered prompts (template, system prompt, shots) and the
generation settings; the key holds all of them. A run that grew the vocabulary (new marker tokens) has base
rows of its own: the embedding fingerprint, taken from the live model, keys those apart.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.artifacts import sha256_text, write_json_atomic

CACHE_VERSION = 1


def embedding_fingerprint(model: Any) -> str | None:
    """Shape and last rows of the input and output embeddings: where grown vocabularies differ.

    None where an embedding is wrapped in a way this does not know (then nothing is cached)."""
    h = hashlib.sha256()
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is None:
            continue
        weight = getattr(layer, "weight", None)
        if weight is None or getattr(weight, "ndim", 0) != 2:
            return None
        h.update(repr(tuple(weight.shape)).encode())
        h.update(weight.detach()[-64:].float().cpu().numpy().tobytes())
    return h.hexdigest()


def cached_answers(folder: Path | None, key_parts: dict[str, Any], generate: Callable[[], list[str]]) -> list[str]:
    """`generate()`'s answers, read from `folder` when this exact key was answered before; `folder` None: no cache."""
    if folder is None:
        return generate()
    import torch
    import transformers

    key = sha256_text(json.dumps({**key_parts, "version": CACHE_VERSION, "torch": torch.__version__,
                                  "transformers": transformers.__version__}, sort_keys=True))[:24]
    path = folder / f"answers-{key}.json"
    if path.is_file():
        try:
            answers = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(answers, list) and all(isinstance(a, str) for a in answers):
                return answers
        except (OSError, ValueError):
            pass  # a damaged entry is regenerated and replaced
    answers = generate()
    write_json_atomic(path, answers)
    return answers
