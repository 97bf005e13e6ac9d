"""Tokens a chat template adds to a base model's vocabulary: growing the embeddings, training the new rows,
and loading an adapter that carries them.

A base model given a template it has no markers for (`data.chat_template`) gets those markers as special
tokens. Their rows are new, so the embedding (and an untied output head) grows to the tokenizer, and the
adapter trains and saves exactly those rows (PEFT's `trainable_token_indices`): a plain
`base.resize_token_embeddings(len(tokenizer))` + `PeftModel.from_pretrained(base, adapter)` reproduces the
tuned model, and merging writes the rows into the merged weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def fit_embeddings(model: Any, vocab_size: int) -> bool:
    """Grow the model's embeddings (and output head) to hold `vocab_size` tokens; never shrink them (many
    models carry spare rows). Returns whether they grew."""
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab_size <= rows:
        return False
    # mean_resizing=False: the new rows are trained and saved with the adapter, so how they start does not
    # change what a reload reproduces, and the covariance-based default costs seconds on large vocabularies.
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return True


def trainable_tokens(model: Any, new_ids: list[int]) -> dict[str, Any]:
    """LoraConfig arguments that train (and save) exactly the rows of `new_ids`: in the input embedding, and
    in the output head too when it is not tied to it (PEFT follows a tied head by itself)."""
    if not new_ids:
        return {}
    ids = sorted(new_ids)
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is None or head.weight is embed.weight:
        return {"trainable_token_indices": ids}
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    return {"trainable_token_indices": {names[id(embed)]: ids, names[id(head)]: ids}}


def adapter_vocab_size(adapter_dir: Path) -> int | None:
    """Rows the adapter's trained tokens need (None when it trains no token rows)."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        return None
    indices = json.loads(config_path.read_text()).get("trainable_token_indices")
    if not indices:
        return None
    flat = indices if isinstance(indices, list) else [i for ids in indices.values() for i in ids]
    return max(flat) + 1 if flat else None


def token_layout(adapter_dir: Path) -> tuple[str, ...]:
    """Which modules the adapter trains token rows of (empty: none)."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    indices = json.loads(config_path.read_text()).get("trainable_token_indices") if config_path.is_file() else None
    if not indices:
        return ()
    return ("embedding",) if isinstance(indices, list) else tuple(sorted(indices))


def attach_adapter(base: Any, adapter_dir: Path, **kwargs: Any) -> Any:
    """`PeftModel.from_pretrained`, after growing the base's embeddings to the adapter's trained tokens."""
    from peft import PeftModel

    needed = adapter_vocab_size(adapter_dir)
    if needed is not None:
        fit_embeddings(base, needed)
    return PeftModel.from_pretrained(base, str(adapter_dir), **kwargs)
