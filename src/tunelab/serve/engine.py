"""The generation engine: one base model in memory, LoRA adapters chosen per row, requests batched together.

One worker thread owns the model. Requests wait in a bounded room (waiting.py); the worker decodes up to
`max_batch` of them together, whatever adapters they name: PEFT's mixed-adapter forward applies each row's own
adapter (`adapter_names`), so no request ever runs under another's adapter and nothing is switched globally.
How rows join and leave the batch is the batching mode: continuous (continuous.py, rescheduled at every decode
step) or static (static_batch.py, one batch decoded to its end). Loading and unloading adapters takes the same
lock as a decode step, so it happens between steps.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import ServeError, cut
from tunelab.families import after_opening, split_reasoning
from tunelab.serve.adapters import BASE_NAME, AdapterSpec
from tunelab.serve.metrics import Metrics

_ids = itertools.count(1)
BATCHING = ("continuous", "static")


@dataclass
class GenRequest:
    """One completion to produce. `emit(kind, payload)` is called from the worker thread: kind is "delta"
    (new text of the answer), "reasoning" (new text of its reasoning block), "done" (finish reason) or "error" (a
    ServeError)."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[str, Any], None]
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)  # the request's own stop strings: the answer ends before them
    stop_ids: frozenset[int] = frozenset()  # end-of-turn ids of the request's own template (besides the base's)
    end_texts: list[str] = field(default_factory=list)  # its template's end-of-turn text, where not a single token
    end_gap: str = ""  # whitespace its template writes before the end of a turn: dropped from a finished answer
    opening: str = ""  # what its template writes ahead of every answer (families.answer_opening): not sent
    reasoning: tuple[str, str] | None = None  # where that is an empty reasoning block: its tags (reasoning_markers)
    tokenizer: Any = None  # the request's own tokenizer (an adapter may have added tokens), else the base's
    seed: int | None = None
    deadline: float = float("inf")
    cancelled: threading.Event = field(default_factory=threading.Event)
    client: Any = ""  # who sent it, (peer address, user): fair admission across clients (waiting.py)
    id: int = field(default_factory=lambda: next(_ids))
    # Filled in while decoding.
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the answer already emitted
    reasoning_sent: int = 0  # ... and of its reasoning
    finish_reason: str | None = None


class Engine:
    def __init__(self, base: Any, tokenizer: Any, *, max_batch: int = 16, max_queue: int = 64,
                 batch_window: float = 0.02, metrics: Metrics | None = None, max_adapters: int = 16,
                 batching: str = "continuous") -> None:
        from tunelab.serve.rows import linear_shapes, row_quantum, use_row_attention
        from tunelab.serve.waiting import WaitingRoom

        if batching not in BATCHING:
            raise ServeError(f"--batching {batching}: choose {' or '.join(BATCHING)}")
        self.base = base.eval()
        self.peft: Any = None  # a PeftModel around `base` once the first adapter is loaded
        self.tokenizer = tokenizer
        self.adapters: dict[str, AdapterSpec] = {}
        self.max_batch = max_batch
        self.max_adapters = max_adapters
        self.batch_window = batch_window
        self.metrics = metrics or Metrics()
        self.batching = batching
        self.pending = WaitingRoom(max_queue)
        self.lock = threading.Lock()
        self.device = next(base.parameters()).device
        self.stop_ids = _stop_ids(tokenizer, base)
        self.max_positions = int(getattr(base.config, "max_position_embeddings", 2048))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.quantum: int = 1  # continuous batching pads each adapter's rows to a multiple of this
        self.exact = batching == "continuous"  # whether greedy answers equal the answers decoded alone
        if batching == "continuous":
            use_row_attention(base)
            self._shapes = linear_shapes(base)
            self._set_quantum(row_quantum(self._shapes, max_batch, next(base.parameters()).dtype, self.device))
        self._worker = threading.Thread(target=self._loop, name="tunelab-engine", daemon=True)
        self._running = True
        self._worker.start()

    # -- adapters -------------------------------------------------------------------------------------
    def load_adapter(self, spec: AdapterSpec) -> None:
        from tunelab.vocab import adapter_vocab_size, attach_adapter, token_layout

        with self.lock:
            if spec.name in self.adapters:
                raise ServeError(f"adapter '{spec.name}' is already loaded; unload it first", 409, "adapter_exists")
            if len(self.adapters) >= self.max_adapters:
                raise ServeError(f"{len(self.adapters)} adapters are loaded, this server's --max-adapters; unload one "
                                 "first", 409, "too_many_adapters")
            if self.peft is None:
                self.peft = attach_adapter(self.base, spec.adapter_dir, adapter_name=spec.name).eval()
            else:
                needed = adapter_vocab_size(spec.adapter_dir) or 0
                if needed > self.peft.get_input_embeddings().weight.shape[0]:
                    raise ServeError(f"adapter '{spec.name}' adds tokens to the vocabulary beyond the loaded model's; "
                                     "start the server with it (the base grows once, at start)", 409, "vocab_mismatch")
                # PEFT batches adapters together only when all train token rows of the same modules, or none.
                loaded = next(iter(self.adapters.values()), None)
                if loaded is not None and token_layout(spec.adapter_dir) != token_layout(loaded.adapter_dir):
                    raise ServeError(f"adapter '{spec.name}' trains new token rows differently from the adapters "
                                     "already loaded (one adds chat-marker tokens, the other does not); serve it "
                                     "from its own server", 409, "vocab_mismatch")
                self.peft.load_adapter(spec.adapter_dir, adapter_name=spec.name)
                self.peft.eval()
            self.adapters[spec.name] = spec
            self.metrics.set_gauge("tunelab_adapters_loaded", len(self.adapters))
            if self.batching == "continuous":
                self._probe_new_shapes()

    def _probe_new_shapes(self) -> None:
        """An adapter brings LoRA matmuls of new shapes: find the padding that keeps them row-invariant too."""
        from tunelab.serve.rows import linear_shapes, row_quantum

        shapes = linear_shapes(self.peft)
        if shapes <= self._shapes:
            return
        self._shapes = shapes
        self._set_quantum(row_quantum(shapes, self.max_batch, next(self.base.parameters()).dtype, self.device))

    def _set_quantum(self, quantum: int | None) -> None:
        self.exact = quantum is not None
        self.quantum = quantum or 1

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise ServeError(f"no adapter named '{cut(name)}' is loaded", 404, "model_not_found")
            del self.adapters[name]
            if self.adapters:
                self.peft.delete_adapter(name)
                # PEFT may leave the deleted name active; every forward looks up the active adapter's config.
                self.peft.set_adapter(next(iter(self.adapters)))
            else:
                # PEFT leaves a PeftModel without adapters pointing at the deleted one, which fails every forward
                # (base requests too): take the LoRA layers out, and serve the plain base until the next load.
                self.base = self.peft.unload()
                self.peft = None
            self.metrics.set_gauge("tunelab_adapters_loaded", len(self.adapters))

    def alive(self) -> bool:
        """Whether the worker thread that decodes every request is still running."""
        return self._running and self._worker.is_alive()

    def model_names(self) -> list[str]:
        return [BASE_NAME, *self.adapters]

    # -- requests -------------------------------------------------------------------------------------
    def submit(self, request: GenRequest) -> None:
        if request.model != BASE_NAME and request.model not in self.adapters:
            raise ServeError(f"model '{cut(request.model)}' does not exist; loaded: {', '.join(self.model_names())}",
                             404, "model_not_found")
        if not self.alive():
            raise ServeError("the generation worker has stopped; restart the server", 503, "engine_dead")
        if len(request.prompt_ids) + request.max_tokens > self.max_positions:
            raise ServeError(f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) exceeds "
                             f"the model's context of {self.max_positions} tokens", 400, "context_length_exceeded")
        try:
            pushed_out = self.pending.put_nowait(request)
        except queue.Full:
            self.metrics.inc("tunelab_rejected_total", reason="queue_full")
            raise ServeError(f"server busy: {self.pending.maxsize} requests already waiting; retry later",
                             429, "queue_full") from None
        if pushed_out is not None:  # its client held more of the waiting room than its share
            self.metrics.inc("tunelab_rejected_total", reason="fair_share")
            pushed_out.finish_reason = "error"
            pushed_out.emit("error", ServeError(f"server busy: {self.pending.maxsize} requests waiting, most of them "
                                                "yours; retry later", 429, "queue_full"))
        self.metrics.set_gauge("tunelab_queue_depth", self.pending.qsize())

    def shutdown(self) -> None:
        self._running = False
        self.pending.wake()

    def _loop(self) -> None:
        from tunelab.serve.continuous import ContinuousBatcher
        from tunelab.serve.static_batch import static_loop

        if self.batching == "continuous":
            ContinuousBatcher(self).run()
        else:
            static_loop(self)

    def _admit(self, r: GenRequest) -> bool:
        """Whether a dequeued request still wants an answer (the adapter may have been unloaded meanwhile)."""
        if r.cancelled.is_set():
            return False
        if time.monotonic() > r.deadline:
            r.emit("error", ServeError("request timed out while queued", 504, "timeout"))
            self.metrics.inc("tunelab_rejected_total", reason="timeout")
            return False
        if r.model != BASE_NAME and r.model not in self.adapters:
            r.emit("error", ServeError(f"model '{r.model}' was unloaded", 404, "model_not_found"))
            return False
        return True

    # -- per-row steps shared by both batching modes -----------------------------------------------------
    def _guarded(self, r: GenRequest, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) for one row; if it fails, that row alone fails (None) and the batch goes on."""
        if r.finish_reason is not None:
            return None
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001
            _fail(r, err)
            return None

    def _choose(self, logits: Any, r: GenRequest, generator: Any) -> int:
        import torch

        if r.finish_reason is not None:
            return self.tokenizer.pad_token_id
        if r.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.cpu() / r.temperature, dim=-1)  # the seeded generator lives on the CPU
        if r.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < r.top_p
            keep[0] = True  # the most likely token, also where top_p rounds to 0 in float32 (1e-60)
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=generator))

    def _advance(self, r: GenRequest, token: int) -> None:
        """Append one token to `r`, emit the new text that is certain, and finish it if it is done."""
        if r.cancelled.is_set():
            r.finish_reason = "cancelled"
            return
        if time.monotonic() > r.deadline:
            r.finish_reason = "timeout"
            r.emit("error", ServeError("request timed out", 504, "timeout"))
            return
        finish = None
        turn_ended = token in self.stop_ids or token in r.stop_ids
        if turn_ended:
            finish = "stop"
        else:
            r.tokens.append(token)
            self.metrics.inc("tunelab_generated_tokens_total", model=r.model)
            if len(r.tokens) >= r.max_tokens:
                finish = "length"
        text = (r.tokenizer or self.tokenizer).decode(r.tokens, skip_special_tokens=True)
        cut, end = _first_stop(text, r.stop), _first_stop(text, r.end_texts)
        if end is not None and (cut is None or end < cut):
            cut, turn_ended = end, True
        if cut is not None:
            text, finish = text[:cut], "stop"
        if turn_ended and r.end_gap:
            text = text.rstrip(r.end_gap)
        if r.reasoning:
            answer = _past_reasoning(r, text, finish)
            if answer is None:
                return  # it may still be the opening tag: nothing sent yet
            text = answer
        elif r.opening:
            shown = after_opening(text, r.opening)
            if shown is None and finish is None:
                return  # it may still be the opening: nothing of the answer yet
            text = text if shown is None else shown
        if finish is None:
            safe = _certain_length(text, [*r.stop, *r.end_texts], r.end_gap)
            if safe > r.sent:
                r.emit("delta", text[r.sent:safe])
                r.sent = safe
            return
        if len(text) > r.sent:
            r.emit("delta", text[r.sent:])
            r.sent = len(text)
        r.finish_reason = finish
        r.emit("done", {"finish_reason": finish, "completion_tokens": len(r.tokens)})


def _fail(r: GenRequest, err: Exception) -> None:
    if r.finish_reason is None:
        r.finish_reason = "error"
        try:
            r.emit("error", ServeError(f"generation failed for this request: {err}", 500, "internal_error"))
        except RuntimeError:  # its event loop is gone
            pass


def _past_reasoning(r: GenRequest, text: str, finish: str | None) -> str | None:
    """The answer part of `text`, after emitting what is certain of the reasoning block before it; None while the
    text may still become the block's opening tag."""
    split = split_reasoning(text, r.reasoning)
    if split is None:
        return None if finish is None else text  # finished inside the opening tag: kept as written
    thought, answer, closed = split
    if thought is not None:
        # While the block is open, hold back what may be the start of its closing tag and trailing whitespace (a
        # closed block's reasoning is stripped).
        ready = thought if closed or finish else thought[:_certain_length(thought, [r.reasoning[1]], "")].rstrip()
        if len(ready) > r.reasoning_sent:
            r.emit("reasoning", ready[r.reasoning_sent:])
            r.reasoning_sent = len(ready)
    return answer


def _certain_length(text: str, stops: list[str], gap: str) -> int:
    """How much of an unfinished answer can be sent: not an incomplete UTF-8 character at its end, nor an end
    that may be the start of a stop string (it would be cut), nor whitespace before that which the template writes
    before its end of turn (dropped if the turn ends there)."""
    text = text.rstrip("\ufffd")
    held = max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)
    text = text[: len(text) - held]
    return len(text.rstrip(gap)) if gap else len(text)


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _generator(r: GenRequest) -> Any:
    import torch

    if r.temperature <= 0:
        return None
    g = torch.Generator()
    g.manual_seed(r.seed if r.seed is not None else int(time.time_ns() % (2**63)))
    return g


def _stop_ids(tokenizer: Any, model: Any) -> set[int]:
    from tunelab.families import stop_token_ids

    return set(stop_token_ids(tokenizer, model))
