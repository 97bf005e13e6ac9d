"""ORPO and SimPO without full-vocabulary logits: tunelab's concatenated_forward gives TRL's losses, metrics and
LoRA gradients the same numbers as TRL's own forward, and never calls the output head."""

from __future__ import annotations

import types

import pytest
import torch

from tests.train.test_preference import make_config
from tunelab import pipeline
from tunelab.losses import linear_cross_entropy_rows, linear_cross_entropy_sum
from tunelab.models import load_tokenizer, pick_precision, resolve_model
from tunelab.train.methods import build_trainable
from tunelab.train.preference import make_trainer, to_trl_rows
from tunelab.train.preference_head import LogitsFreeCPO, LogitsFreeORPO
from tunelab.train.preference_packing import pack_logits_calls


def uneven_rows(n: int) -> list[dict]:
    """Answers of 1 to 6 words: the sequences of a batch differ in length, so the padded batch has padding."""
    return [{"id": f"p{i}", "prompt": f"Name {'an animal ' * (i % 3 + 1)}for day {i}.",
             "chosen": "cat " * (i % 6 + 1), "rejected": f"dog {i} " * (i % 4 + 1)} for i in range(n)]


def _trainer(tmp_path, tiny_model_dir, objective, dtype="float32"):
    cfg = make_config(tmp_path, tiny_model_dir, objective, uneven_rows(16))
    cfg.model.dtype = dtype
    base = resolve_model(cfg.model)
    model = build_trainable(cfg, base, pick_precision(cfg.model))
    rows = to_trl_rows(cfg, pipeline.stage_data(cfg, pipeline.open_run(cfg, starting_training=True)).dataset.train)
    trainer = make_trainer(cfg, pipeline.RunPaths(cfg.output.dir), model, load_tokenizer(base), rows, [])
    torch.manual_seed(3)
    for name, p in model.named_parameters():  # an untrained adapter's B is zero: A's gradients would be too
        if "lora_B.default" in name:
            p.data.normal_(0, 0.2)
    return trainer, model


def _loss_metrics_grads(trainer, model, batch):
    model.zero_grad()
    loss, metrics = trainer.get_batch_loss_metrics(model, batch)
    loss.backward()
    return loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective,cpo_options", [
    ("orpo", {}), ("simpo", {}),
    ("simpo", {"cpo_alpha": 1.0, "loss_type": "sigmoid"}),  # CPO proper: an NLL on the chosen answers, summed logps
])
def test_logits_free_forward_equals_trls_forward_in_loss_metrics_and_gradients(tmp_path, tiny_model_dir, objective,
                                                                                cpo_options):
    trainer, model = _trainer(tmp_path, tiny_model_dir, objective)
    assert isinstance(trainer, LogitsFreeORPO if objective == "orpo" else LogitsFreeCPO)
    for name, value in cpo_options.items():
        setattr(trainer, name, value)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["chosen_attention_mask"] == 0).any()  # padding present: the packed row must drop it
    # The reference: TRL's own forward on the packed row (equal to the padded call at real tokens, zero logits
    # at padding: tests/train/test_preference_packing.py), which computes the full logits.
    base = model.get_base_model()
    pack_logits_calls(base)
    head_calls, rows_in = [], []
    base.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    base.get_input_embeddings().register_forward_hook(lambda module, args, out: rows_in.append(args[0].shape[0]))
    stock_class = next(c for c in type(trainer).__mro__ if c.__module__.startswith("trl."))
    trainer.concatenated_forward = types.MethodType(stock_class.concatenated_forward, trainer)
    want_loss, want_metrics, want_grads = _loss_metrics_grads(trainer, model, batch)
    assert head_calls == [1]
    del trainer.concatenated_forward
    got_loss, got_metrics, got_grads = _loss_metrics_grads(trainer, model, batch)
    assert head_calls == [1]  # the logits-free forward never called the head
    assert rows_in == [1, 1]  # both went in as one padding-free row

    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    assert got_metrics.keys() == want_metrics.keys()
    for name, value in want_metrics.items():
        assert got_metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    if cpo_options:
        assert want_metrics["nll_loss"] > 0  # the NLL term was computed, not left at zero
    assert want_grads.keys() == got_grads.keys() and any("lora_A" in n for n in got_grads)
    for name, grad in want_grads.items():
        assert float((got_grads[name] - grad).norm() / grad.norm()) < 1e-5, name


def test_logits_free_forward_runs_under_the_trainers_mixed_precision(tmp_path, tiny_model_dir):
    """Accelerate applies bf16 autocast around the wrapped model's forward; the decoder call here must too."""
    trainer, model = _trainer(tmp_path, tiny_model_dir, "orpo", dtype="bfloat16")
    seen = []
    model.get_base_model().get_input_embeddings().register_forward_hook(
        lambda *args: seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
    chosen, *_ = trainer.concatenated_forward(model, next(iter(trainer.get_train_dataloader())))
    assert seen == [torch.bfloat16] and chosen.dtype == torch.float32 and torch.isfinite(chosen).all()


def test_per_row_cross_entropy_equals_the_plain_loss_and_its_gradient():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator)
    targets = torch.randint(0, 50, (37,), generator=generator)
    upstream = torch.randn(37, generator=generator)
    plain = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="none")
    (want,) = torch.autograd.grad((plain * upstream).sum(), hidden)
    rows = linear_cross_entropy_rows(hidden, weight, targets, chunk=8)
    (got,) = torch.autograd.grad((rows * upstream).sum(), hidden)
    torch.testing.assert_close(rows, plain.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows.sum(), linear_cross_entropy_sum(hidden, weight, targets, chunk=8))
    with pytest.raises(ValueError, match="frozen output head"):
        linear_cross_entropy_rows(hidden, weight.requires_grad_(), targets)


def test_only_a_frozen_plain_head_gives_per_row_log_probs(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunelab.losses import frozen_plain_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert not frozen_plain_head(model)  # full fine-tuning: the head trains, TRL's forward is kept
    model.get_output_embeddings().weight.requires_grad_(False)
    assert frozen_plain_head(model)
    model.config.final_logit_softcapping = 30.0  # a soft-capped head (Gemma 2) is not the plain projection
    assert not frozen_plain_head(model)
