"""Static batching (`--batching static`): the worker takes up to `max_batch` waiting requests, whatever adapters
they name, and decodes them as one left-padded batch until the last of them finishes. A request that arrives
meanwhile waits for the whole batch; a 20 ms gathering window only catches requests sent together. Kept to
compare against continuous batching (bench/serve_throughput.py) and as a fallback.

Padding changes the arithmetic of a row with its neighbours: a greedy answer decoded here can differ, by float
rounding on a near tie, from the same request decoded alone.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING

from tunelab.serve.adapters import BASE_NAME

if TYPE_CHECKING:
    from tunelab.serve.engine import Engine, GenRequest


def static_loop(engine: Engine) -> None:
    from tunelab.serve.engine import _fail

    while engine._running:
        holding: Counter[str] = Counter()  # round robin across clients within a batch
        batch = engine.pending.take(1, holding, timeout=0.5)
        if not engine._running:
            return
        if not batch:
            continue
        # A short gathering window: requests sent together (a playground comparison, a client's parallel calls)
        # land in one batch instead of the second waiting for the whole first answer.
        gather_until = time.monotonic() + engine.batch_window
        while len(batch) < engine.max_batch:
            more = engine.pending.take(engine.max_batch - len(batch), holding,
                                       timeout=max(0.0, gather_until - time.monotonic()))
            if not more:
                break
            batch += more
        engine.metrics.set_gauge("tunelab_queue_depth", engine.pending.qsize())
        with engine.lock:
            try:
                live = [r for r in batch if engine._admit(r)]
                if live:
                    _decode_isolated(engine, live)
            except Exception as err:  # noqa: BLE001 - the worker must outlive anything a batch does
                for r in batch:
                    _fail(r, err)


def _decode_isolated(engine: Engine, batch: list[GenRequest]) -> None:
    """Decode `batch`; if the batch as a whole fails (a row the forward pass cannot take), decode each
    unfinished row alone, so that only the row at fault fails. Greedy and seeded decoding repeat exactly,
    and a row re-decoded from the start only emits text beyond what it already sent."""
    from tunelab.serve.engine import _fail

    try:
        _decode(engine, batch)
        return
    except Exception as err:  # noqa: BLE001 - one bad row must not fail the others, nor kill the worker
        unfinished = [r for r in batch if r.finish_reason is None]
        if len(batch) == 1:
            _fail(batch[0], err)
            return
    for r in unfinished:
        r.tokens = []
        try:
            _decode(engine, [r])
        except Exception as err:  # noqa: BLE001
            _fail(r, err)


def _decode(engine: Engine, batch: list[GenRequest]) -> None:
    import torch
    from transformers import DynamicCache

    from tunelab.serve.engine import _generator

    started = time.monotonic()
    engine.metrics.observe("tunelab_batch_size", len(batch))
    pad = engine.tokenizer.pad_token_id
    width = max(len(r.prompt_ids) for r in batch)
    # Left padding: every row's next token lands in the same (last) column.
    ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch], device=engine.device)
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch],
                        device=engine.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model = engine.peft if engine.peft is not None else engine.base
    extra = ({"adapter_names": [r.model if r.model != BASE_NAME else "__base__" for r in batch]}
             if engine.peft else {})
    generators = [engine._guarded(r, _generator, r) for r in batch]
    cache = DynamicCache()
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1, **extra)
        for _ in range(max(r.max_tokens for r in batch)):
            logits = out.logits[:, -1, :].float()
            chosen = [engine._guarded(r, engine._choose, logits[i], r, generators[i]) for i, r in enumerate(batch)]
            chosen = [pad if t is None else t for t in chosen]
            for r, token in zip(batch, chosen):
                if r.finish_reason is None:
                    engine._guarded(r, engine._advance, r, token)
            if all(r.finish_reason is not None for r in batch):
                break
            step = torch.tensor([[t] for t in chosen], device=engine.device)
            mask = torch.cat([mask, mask.new_ones((len(batch), 1))], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=step, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True, **extra)
    engine.metrics.observe("tunelab_batch_seconds", time.monotonic() - started)
