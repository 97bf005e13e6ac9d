"""Continuous batching (`--batching continuous`, the default): the batch is rescheduled at every decode step.

Between two steps the worker retires the rows that finished (end-of-turn, stop string, max_tokens, timeout,
client gone) and admits waiting requests into the freed slots, fairly across clients (waiting.py). A newcomer is
prefilled alone into its own KV cache, its first token is sampled at once (time to first token: one prefill, not
the rest of someone else's answer), and from the next step on it decodes together with the others. Each row keeps
its cache, positions, sampling parameters, seed and adapter (rows.py explains why greedy answers then equal the
answers decoded alone).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunelab.errors import ServeError
from tunelab.serve.adapters import BASE_NAME
from tunelab.serve.rows import RowsCache, padded_groups

if TYPE_CHECKING:
    from tunelab.serve.engine import Engine, GenRequest

IDLE_POLL = 0.5  # seconds an idle worker waits for a request before it looks at the shutdown flag again


@dataclass
class Row:
    request: GenRequest
    cache: Any  # this row's own DynamicCache
    token: int  # the last sampled token: the input of the row's next step
    position: int  # that token's position (= tokens in the cache)
    generator: Any  # the row's seeded sampler, None when greedy


class ContinuousBatcher:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rows: list[Row] = []

    def run(self) -> None:
        from tunelab.serve.engine import _fail

        e = self.engine
        while e._running:
            holding = Counter(row.request.client for row in self.rows)
            newcomers = e.pending.take(e.max_batch - len(self.rows), holding, timeout=0.0 if self.rows else IDLE_POLL)
            if not e._running:
                return
            e.metrics.set_gauge("tunelab_queue_depth", e.pending.qsize())
            if not newcomers and not self.rows:
                continue
            if newcomers and self.rows:
                e.metrics.inc("tunelab_joined_running_total", len(newcomers))
            with e.lock:  # adapters load and unload between steps
                try:
                    for r in newcomers:
                        if e._admit(r):
                            self._prefill(r)
                    self._retire()
                    if self.rows:
                        self._step()
                except Exception as err:  # noqa: BLE001 - the worker must outlive anything a step does
                    for row in self.rows:
                        _fail(row.request, err)
                    self.rows = []
            e.metrics.set_gauge("tunelab_running_rows", len(self.rows))

    # -- one row in, one step for all --------------------------------------------------------------------------
    def _prefill(self, r: GenRequest) -> None:
        """Run `r`'s prompt alone into a fresh cache, sample its first token and, unless that already ends it,
        give it a slot."""
        import torch
        from transformers import DynamicCache

        from tunelab.serve.engine import _fail, _generator

        e = self.engine
        generator = e._guarded(r, _generator, r)
        if r.finish_reason is not None:
            return
        cache = DynamicCache(config=e.base.config)
        try:
            with torch.inference_mode():
                out = self._model()(input_ids=torch.tensor([r.prompt_ids], device=e.device),
                                    position_ids=torch.arange(len(r.prompt_ids), device=e.device)[None],
                                    past_key_values=cache, use_cache=True, logits_to_keep=1,
                                    **self._adapters([_adapter(r)]))
        except Exception as err:  # noqa: BLE001 - a prompt the model cannot take fails alone
            _fail(r, err)
            return
        row = Row(r, cache, e.pad_id, len(r.prompt_ids), generator)
        self._sample(row, out.logits[0, -1].float())
        if r.finish_reason is None:
            self.rows.append(row)

    def _step(self) -> None:
        """One new token for every row: one forward over all rows; if it fails, each row alone (after undoing
        the step's writes to its cache), so that only a row at fault fails."""
        from tunelab.serve.engine import _fail

        started = time.monotonic()
        self.engine.metrics.observe("tunelab_batch_size", len(self.rows))
        try:
            results = list(zip(self.rows, self._forward(self.rows)))
        except Exception:  # noqa: BLE001
            results = []
            for row in self.rows:
                try:
                    _undo_step(row)
                    results += zip([row], self._forward([row]))
                except Exception as err:  # noqa: BLE001
                    _fail(row.request, err)
        for row, logits in results:
            row.position += 1
            self._sample(row, logits)
        self._retire()
        self.engine.metrics.observe("tunelab_batch_seconds", time.monotonic() - started)

    def _forward(self, rows: list[Row]) -> list[Any]:
        """The next-token logits of `rows`, decoded as one batch of per-adapter groups padded to the quantum."""
        import torch

        e = self.engine
        groups: dict[str, list[Row]] = {}
        for row in rows:
            groups.setdefault(_adapter(row.request), []).append(row)
        order = padded_groups(groups, e.quantum)
        ids = torch.tensor([[e.pad_id if row is None else row.token] for _, row in order], device=e.device)
        positions = torch.tensor([[0 if row is None else row.position] for _, row in order], device=e.device)
        # A prepared 4-D mask makes transformers skip building one: each row attends to its whole own cache.
        mask = torch.ones((len(order), 1, 1, 1), dtype=torch.bool, device=e.device)
        with torch.inference_mode():
            out = self._model()(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                                past_key_values=RowsCache([None if row is None else row.cache for _, row in order]),
                                **self._adapters([adapter for adapter, _ in order]))
        logits = out.logits[:, -1, :].float()
        where = {id(row): i for i, (_, row) in enumerate(order) if row is not None}
        return [logits[where[id(row)]] for row in rows]

    def _sample(self, row: Row, logits: Any) -> None:
        e = self.engine
        r = row.request
        token = e._guarded(r, e._choose, logits, r, row.generator)
        if r.finish_reason is None:
            e._guarded(r, e._advance, r, token)
            row.token = token

    def _retire(self) -> None:
        """Drop the rows that are done, and end those whose client left, whose time ran out or whose adapter was
        unloaded before spending a step on them."""
        e = self.engine
        for row in self.rows:
            r = row.request
            if r.finish_reason is not None:
                continue
            if r.cancelled.is_set():
                r.finish_reason = "cancelled"
            elif time.monotonic() > r.deadline:
                r.finish_reason = "timeout"
                r.emit("error", ServeError("request timed out", 504, "timeout"))
            elif r.model != BASE_NAME and r.model not in e.adapters:
                r.finish_reason = "error"
                r.emit("error", ServeError(f"model '{r.model}' was unloaded", 404, "model_not_found"))
        self.rows = [row for row in self.rows if row.request.finish_reason is None]

    def _model(self) -> Any:
        return self.engine.peft if self.engine.peft is not None else self.engine.base

    def _adapters(self, names: list[str]) -> dict[str, Any]:
        return {"adapter_names": names} if self.engine.peft is not None else {}


def _undo_step(row: Row) -> None:
    """Drop what a failed step appended to the layers it reached before failing."""
    for layer in row.cache.layers:
        extra = layer.get_seq_length() - row.position
        if extra > 0:
            layer.crop(-extra)


def _adapter(r: GenRequest) -> str:
    return "__base__" if r.model == BASE_NAME else r.model
