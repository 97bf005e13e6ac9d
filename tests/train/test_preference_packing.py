"""Padding-free preference calls: the packed forward returns what TRL's padded forward returns, per token,
with gradients, and falls back to the padded call where packing does not apply."""

from __future__ import annotations

import pytest
import torch

from tunelab.chat import IGNORE_INDEX
from tunelab.train.preference_packing import pack, pack_fused_calls, pack_logits_calls


def _padded_batch(lengths: list[int], prompt: int, vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, vocab, (n,), generator=generator)
        mask[row, :n] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :prompt] = IGNORE_INDEX  # the prompt is never a target, as in TRL's completion mask
    return ids, mask, labels


def _fused_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


def _outputs_and_grads(model, ids, mask, labels):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    out.log_probs.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_packing_keeps_every_real_token_and_restarts_positions():
    ids, mask, labels = _padded_batch([5, 3, 7], prompt=2, vocab=50)
    row, row_labels, positions, keep = pack(ids, mask, labels)
    assert row.shape == (1, 15) and positions[0].tolist() == [*range(5), *range(3), *range(7)]
    assert row[0, 5:8].tolist() == ids[1, :3].tolist()
    # each sequence's first token is never a target (it would be predicted from the sequence before it)
    assert (row_labels[0, positions[0] == 0] == IGNORE_INDEX).all()
    assert keep.shape == (3, 6) and keep.sum().item() == 4 + 2 + 6


@pytest.mark.parametrize("own_head", [False, True])
def test_packed_call_equals_the_padded_call_per_token_and_in_gradients(tiny_model_dir, own_head):
    """own_head: the per-token outputs come from tunelab's chunked head (a frozen head), not TRL's."""
    padded, packed = _fused_model(tiny_model_dir), _fused_model(tiny_model_dir)
    if own_head:
        for model in (padded, packed):
            model.get_output_embeddings().weight.requires_grad_(False)
        head_calls = []
        packed.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    pack_fused_calls(packed, own_head=own_head)
    pack_fused_calls(packed)  # a second call must not wrap twice
    ids, mask, labels = _padded_batch([9, 4, 17, 6, 12, 17], prompt=3, vocab=padded.config.vocab_size)
    seen = []
    packed.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    want, want_grads = _outputs_and_grads(padded, ids, mask, labels)
    got, got_grads = _outputs_and_grads(packed, ids, mask, labels)
    assert seen == [(1, int(mask.sum()))]  # one row of the real tokens went in, not the padded batch
    for name in ("log_probs", "entropy", "mean_logits"):
        assert getattr(got, name).shape == getattr(want, name).shape == (6, 16)
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-5, rtol=1e-4)
    assert torch.equal(got.is_top1, want.is_top1)
    assert (got.log_probs[mask[:, 1:] == 0] == 0).all()  # padding reads as zero, as TRL's masked positions
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-4)
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-3)
    assert packed.config._attn_implementation == "sdpa"  # per-example attention only for the packed call
    if own_head:
        assert head_calls == [] and torch.equal(got.label_mask, want.label_mask)


@pytest.mark.parametrize("case", ["left padding", "one row", "not fused"])
def test_calls_packing_does_not_apply_to_go_through_unchanged(tiny_model_dir, case):
    padded, packed = _fused_model(tiny_model_dir), _fused_model(tiny_model_dir)
    pack_fused_calls(packed)
    ids, mask, labels = _padded_batch([9, 4, 12], prompt=2, vocab=padded.config.vocab_size)
    if case == "left padding":  # e.g. GRPO's prompts: positions are not the padded layout's
        ids, mask, labels = ids.flip(1), mask.flip(1), labels.flip(1)
    if case == "one row":
        ids, mask, labels = ids[:1], mask[:1], labels[:1]
    kwargs = {"fused_lm_head": case != "not fused"}
    with torch.no_grad():
        want = padded(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
        got = packed(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    field = "logits" if case == "not fused" else "log_probs"
    assert torch.equal(getattr(got, field), getattr(want, field))


def _plain_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")


def test_packed_logits_call_equals_the_padded_call_at_real_tokens_and_in_gradients(tiny_model_dir):
    """ORPO/SimPO's call: model(input_ids, attention_mask=mask, use_cache=False) -> full logits."""
    padded, packed = _plain_model(tiny_model_dir), _plain_model(tiny_model_dir)
    pack_logits_calls(packed)
    pack_logits_calls(packed)  # a second call must not wrap twice
    ids, mask, _ = _padded_batch([9, 4, 17, 6, 12, 17], prompt=3, vocab=padded.config.vocab_size)
    seen = []
    packed.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    upstream = torch.randn(*ids.shape, padded.config.vocab_size, generator=torch.Generator().manual_seed(1))
    upstream = upstream * mask[..., None]  # TRL's losses read real positions only (labels -100 elsewhere)
    results = []
    for model in (padded, packed):
        model.zero_grad()
        logits = model(ids, attention_mask=mask, use_cache=False).logits
        (logits * upstream).sum().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, got_grads) = results
    assert seen == [(1, int(mask.sum()))]  # one row of the real tokens went in
    assert got.shape == want.shape
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-4)
    assert (got[~real] == 0).all()
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():  # summed over 25k logits: compare as a whole, float32 sum order
        assert float((got_grads[name] - grad).norm() / grad.norm()) < 1e-5, name
    assert packed.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("case", ["left padding", "one row", "with labels"])
def test_logits_calls_packing_does_not_apply_to_go_through_unchanged(tiny_model_dir, case):
    padded, packed = _plain_model(tiny_model_dir), _plain_model(tiny_model_dir)
    pack_logits_calls(packed)
    ids, mask, labels = _padded_batch([9, 4, 12], prompt=2, vocab=padded.config.vocab_size)
    if case == "left padding":
        ids, mask = ids.flip(1), mask.flip(1)
    if case == "one row":
        ids, mask = ids[:1], mask[:1]
    kwargs = {"labels": labels} if case == "with labels" else {}
    with torch.no_grad():
        want = padded(ids, attention_mask=mask, **kwargs).logits
        got = packed(ids, attention_mask=mask, **kwargs).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("objective,chunked_loss", [
    ("dpo", True), ("kto", True), ("orpo", True), ("simpo", True), ("dpo", False), ("orpo", False), ("simpo", False),
])
def test_preference_training_steps_go_in_padding_free(tmp_path, tiny_model_dir, objective, chunked_loss,
                                                      monkeypatch):
    """DPO/KTO pack their fused-head calls (scored by tunelab's chunked head, or with train.chunked_loss off by
    TRL's); ORPO/SimPO take the logits-free forward (train/preference_head.py), or with train.chunked_loss off
    pack TRL's full-logits call."""
    from tests.train.test_preference import kto_rows, make_config, preference_rows
    from tunelab import pipeline
    from tunelab.train import preference_head, preference_packing

    packed_calls = []
    real_pack, real_attention = preference_packing.pack, preference_packing.padding_free_attention
    real_readout, real_head = preference_head.preference_readout, preference_packing.chunked_head_outputs

    def counting_pack(*args):
        packed_calls.append(("fused", args[0].shape))
        return real_pack(*args)

    def counting_attention(model):  # ORPO/SimPO's logits calls pack without `pack`: count the row instead
        if objective in ("orpo", "simpo"):  # (DPO's and KTO's packed calls go through here too)
            packed_calls.append(("logits", (2,)))
        return real_attention(model)

    def counting_readout(model, input_ids, *args):
        packed_calls.append(("logits-free", input_ids.shape))
        return real_readout(model, input_ids, *args)

    def counting_head(model, row, *args):
        packed_calls.append(("own head", row.shape))
        return real_head(model, row, *args)

    monkeypatch.setattr(preference_packing, "chunked_head_outputs", counting_head)
    monkeypatch.setattr(preference_packing, "pack", counting_pack)
    monkeypatch.setattr(preference_packing, "padding_free_attention", counting_attention)
    monkeypatch.setattr(preference_head, "preference_readout", counting_readout)
    rows = kto_rows(16) if objective == "kto" else preference_rows(16)
    cfg = make_config(tmp_path, tiny_model_dir, objective, rows)
    cfg.train.max_steps, cfg.train.chunked_loss = 2, chunked_loss
    result = pipeline.stage_train(cfg, pipeline.open_run(cfg, starting_training=True))
    assert result.steps == 2
    # a padded batch of several sequences was packed at least once a step (a fallback would not pack at all)
    # (the chunked head sees the packed row, one row of the batch's real tokens)
    assert len(packed_calls) >= 2 and all(shape[0] == 1 if kind == "own head" else shape[0] > 1
                                          for kind, shape in packed_calls)
    if objective in ("dpo", "kto"):
        paths = {"fused", "own head"} if chunked_loss else {"fused"}
    else:
        paths = {"logits-free" if chunked_loss else "logits"}
    assert {kind for kind, _ in packed_calls} == paths
