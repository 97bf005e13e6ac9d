"""The chunked loss and padding-free batches change speed and memory, never the loss or its gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunelab.chat import IGNORE_INDEX
from tunelab.losses import chunked_causal_lm_loss, linear_cross_entropy_sum, supports_chunked_loss
from tunelab.train.collate import PaddingCollator, PaddingFreeCollator


def _leaves(n: int = 50, d: int = 16, vocab: int = 97, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(vocab, d, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, targets


def _grads(loss_fn):
    hidden, weight, targets = _leaves()
    loss = loss_fn(hidden, weight, targets)
    (loss * 0.37).backward()  # a non-unit upstream gradient must be honoured
    return loss.detach(), hidden.grad, weight.grad


def test_chunked_linear_cross_entropy_equals_the_plain_loss_and_gradients():
    plain = _grads(lambda h, w, y: F.cross_entropy(F.linear(h, w), y, reduction="sum"))
    for chunk in (7, 50, 1000):  # uneven last chunk, exactly one chunk, more room than rows
        chunked = _grads(lambda h, w, y, c=chunk: linear_cross_entropy_sum(h, w, y, chunk=c))
        for a, b in zip(plain, chunked):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_loss_under_bf16_autocast_rounds_like_the_model_head():
    def plain(h, w, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = F.linear(h, w)
        return F.cross_entropy(logits.float(), y, reduction="sum")

    def chunked(h, w, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_cross_entropy_sum(h, w, y, chunk=16)

    for a, b in zip(_grads(plain), _grads(chunked)):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    # ...and it really computed in bf16: the fp32 loss differs from both.
    fp32 = _grads(lambda h, w, y: F.cross_entropy(F.linear(h, w), y, reduction="sum"))[0]
    assert not torch.equal(fp32, _grads(chunked)[0])


def test_frozen_head_under_autocast_keeps_one_low_precision_copy_until_it_changes():
    """The bf16 copy of a frozen head is made once, gives the loss the per-call cast gives, and is remade when
    the weight changes in place (an optimizer step, a reload)."""
    from tunelab.kept_casts import kept_copy

    hidden, weight, targets = _leaves()
    weight = weight.detach()

    def loss_and_grad():
        h = hidden.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy_sum(h, weight, targets, chunk=16)
        loss.backward()
        return loss.detach(), h.grad

    first = loss_and_grad()
    kept = kept_copy(weight)
    assert kept.dtype == torch.bfloat16 and torch.equal(kept, weight.to(torch.bfloat16))
    second = loss_and_grad()
    assert kept_copy(weight) is kept
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with torch.no_grad():
        weight.mul_(2)
    changed = loss_and_grad()
    assert torch.equal(kept_copy(weight), weight.to(torch.bfloat16))
    assert not torch.equal(changed[0], first[0])


def test_chunk_rows_keep_cpu_buffers_small_for_a_frozen_head():
    from tunelab.losses import CHUNK_TOKENS, chunk_rows

    assert chunk_rows(49152, "cpu", head_trains=False) == 128  # 24 MiB of float32 logits
    assert chunk_rows(49152, "cuda", head_trains=False) == CHUNK_TOKENS
    assert chunk_rows(49152, "cpu", head_trains=True) == CHUNK_TOKENS  # one weight-gradient pass per chunk
    assert chunk_rows(97, "cpu", head_trains=False) == CHUNK_TOKENS
    assert chunk_rows(1_000_000, "cpu", head_trains=False) == 16


def _examples(tokenizer, n: int = 5) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = tokenizer(f"Extract the animal: on day {i} I saw a " + "very " * (3 * i) + "big cat.")["input_ids"]
        answer = tokenizer(" answer: cat")["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return rows


@pytest.fixture
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.config.use_cache = False  # as in training: with a cache, transformers skips the packed-sequence mask
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, config).train()


def _loss_and_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_padding_free_chunked_loss_equals_the_padded_model_loss(lora_model, tiny_tokenizer):
    """Four ways to the same loss and LoRA gradients: padded or padding-free batches, model loss or chunked.
    Padding-free equal to padded proves attention never crosses from one example into the next."""
    assert supports_chunked_loss(lora_model)
    examples = _examples(tiny_tokenizer)
    padded = PaddingCollator(tiny_tokenizer.pad_token_id)(examples)
    flat = PaddingFreeCollator(tiny_tokenizer.pad_token_id)(examples)
    assert flat["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    assert int((flat["labels"] != IGNORE_INDEX).sum()) == int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())

    reference = _loss_and_grads(lora_model, lora_model(**padded).loss)
    for batch in (padded, flat):
        for loss in (lora_model(**batch).loss, chunked_causal_lm_loss(lora_model, batch)):
            got = _loss_and_grads(lora_model, loss)
            torch.testing.assert_close(got[0], reference[0], rtol=1e-5, atol=1e-5)
            for a, b in zip(got[1], reference[1]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_padding_free_without_restarting_positions_would_leak(lora_model, tiny_tokenizer):
    """The control: the same row with positions 0..L-1 lets later examples see earlier ones, so the loss moves."""
    examples = _examples(tiny_tokenizer)
    flat = PaddingFreeCollator(tiny_tokenizer.pad_token_id)(examples)
    leaking = {**flat, "position_ids": torch.arange(flat["input_ids"].shape[1])[None]}
    with torch.no_grad():
        assert abs(float(lora_model(**flat).loss) - float(lora_model(**leaking).loss)) > 1e-3


def test_chunked_loss_divides_by_the_accumulated_target_count(lora_model, tiny_tokenizer):
    batch = PaddingFreeCollator(tiny_tokenizer.pad_token_id)(_examples(tiny_tokenizer))
    targets = int((batch["labels"] != IGNORE_INDEX).sum())
    with torch.no_grad():
        mean = chunked_causal_lm_loss(lora_model, batch)
        over_more = chunked_causal_lm_loss(lora_model, batch, num_items_in_batch=torch.tensor(3 * targets))
    torch.testing.assert_close(over_more * 3, mean)


def test_no_grad_computes_the_same_loss_without_gradients():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=generator)
    with_grad = linear_cross_entropy_sum(hidden, weight, targets, chunk=8)
    with torch.no_grad():
        without = linear_cross_entropy_sum(hidden, weight, targets, chunk=8)
    assert not without.requires_grad and with_grad.requires_grad
    assert torch.allclose(with_grad, without)
    assert torch.allclose(with_grad, torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum"))


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), ("float32", None)])
def test_training_runs_the_chunked_loss_under_the_configured_autocast(tiny_config, monkeypatch, dtype, expected):
    """The chunked loss calls the decoder directly, past the forward the accelerator wrapped in autocast:
    bf16 training must still compute in bf16 (it once silently ran in float32)."""
    from tunelab import losses as loss_module
    from tunelab import pipeline

    seen = []
    original = loss_module.linear_cross_entropy_sum

    def spy(hidden, weight, targets, *args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return original(hidden, weight, targets, *args, **kwargs)

    monkeypatch.setattr(loss_module, "linear_cross_entropy_sum", spy)
    cfg = tiny_config.model_copy(update={
        "model": tiny_config.model.model_copy(update={"dtype": dtype}),
        "train": tiny_config.train.model_copy(update={"max_steps": 2}),
    })
    run = pipeline.open_run(cfg, starting_training=True)
    pipeline.stage_train(cfg, run)
    assert seen[:2] == [expected, expected]  # the two training steps (the val pass after runs in float32)
