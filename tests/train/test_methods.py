"""Every method on the tiny model: trains (loss falls), saves, reloads to identical logits, evaluates; and the
LoRA variants' flags have their effect (DoRA's magnitudes, rsLoRA's scale, LoRA+'s faster B matrices)."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab import pipeline
from tunelab.models import resolve_model

METHODS = {
    "lora": {"type": "lora"},
    "dora": {"type": "lora", "use_dora": True},
    "rslora": {"type": "lora", "use_rslora": True},
    "loraplus": {"type": "lora", "loraplus_lr_ratio": 8.0},
    "qlora": {"type": "qlora"},
    "ia3": {"type": "ia3"},
    "prompt_tuning": {"type": "prompt_tuning", "num_virtual_tokens": 8},
    "prefix_tuning": {"type": "prefix_tuning", "num_virtual_tokens": 8},
    "full": {"type": "full"},
}
# Methods with few parameters need a larger step to move the loss within a dozen steps.
LEARNING_RATES = {"ia3": 0.1, "prompt_tuning": 0.1, "prefix_tuning": 0.05, "full": 3e-3}


def lora_layers(model) -> list:
    return [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def expected_layer_output(layer, x: torch.Tensor, method) -> torch.Tensor:
    """What one adapted linear layer must compute, from its weights and the paper's formula (not from PEFT's
    own scaling attribute): W x + s B A x with s = alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA); DoRA rescales
    each output row of W' = W + s B A to its learned magnitude m: m * (W' x) / ||W'||_row."""
    weight, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = method.alpha / (math.sqrt(method.r) if method.use_rslora else method.r)
    if not method.use_dora:
        return x @ weight.T + scale * (x @ a.T @ b.T)
    merged = weight + scale * (b @ a)
    magnitude = layer.lora_magnitude_vector["default"].weight
    return (x @ merged.T) * (magnitude / merged.norm(dim=1))


def check_lora_variant(name: str, cfg, model) -> None:
    """The flag's effect on the trained model, against an independent expectation."""
    from transformers import AutoModelForCausalLM

    layers = lora_layers(model)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name, dtype=torch.float32)
    adaptable = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(layers) == len(adaptable) == 14  # q, k, v, o, gate, up, down in each of 2 layers
    magnitudes = [m.lora_magnitude_vector["default"].weight for m in layers if "default" in m.lora_magnitude_vector]
    if name == "dora":
        # DoRA starts each magnitude at its base row norms ||W||; training must have moved every one of them.
        assert len(magnitudes) == 14 and all(m.requires_grad for m in magnitudes)
        for layer, magnitude in zip(layers, magnitudes):
            assert not torch.allclose(magnitude, layer.base_layer.weight.norm(dim=1), atol=1e-6)
    else:
        assert magnitudes == []
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in layers:
            x = torch.randn(3, layer.in_features)
            gap = (layer.eval()(x) - expected_layer_output(layer, x, cfg.method)).abs().max().item()
            assert gap < 1e-5, f"{name}: a LoRA layer's output is {gap:.3g} away from the formula"


def reload(cfg, run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if cfg.method.type == "full":
        return AutoModelForCausalLM.from_pretrained(run.root / "model", dtype=torch.float32)
    from tunelab.models import Precision
    from tunelab.train.methods import load_base

    base = load_base(resolve_model(cfg.model), cfg.method, Precision("cpu", None, torch.float32))
    return PeftModel.from_pretrained(base, run.adapter)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_saves_reloads_and_evaluates(name, tiny_config):
    for key, value in METHODS[name].items():
        setattr(tiny_config.method, key, value)
    tiny_config.train.learning_rate = LEARNING_RATES.get(name, tiny_config.train.learning_rate)
    run = pipeline.open_run(tiny_config, starting_training=True)
    result = pipeline.stage_train(tiny_config, run)
    assert result.last_loss < result.first_loss, (result.first_loss, result.last_loss)
    expected_share = {"full": 1.0}.get(name)
    if expected_share:
        assert result.trainable_params == result.total_params
    else:
        assert 0 < result.trainable_params < result.total_params
    if name in ("lora", "dora", "rslora"):
        check_lora_variant(name, tiny_config, result.model)

    ids = torch.tensor([[5, 17, 33, 2, 40, 41, 7, 9]])
    reloaded = reload(tiny_config, run).eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
        if name == "qlora":
            # bitsandbytes' CPU 4-bit kernels repack weights between calls and their bf16 results drift by
            # a few hundredths, so compare what was saved: every trained tensor, exactly; and that two
            # fresh reloads agree exactly.
            trained_tensors = {k: v for k, v in result.model.state_dict().items() if "lora_" in k}
            reloaded_tensors = reloaded.state_dict()
            assert trained_tensors and all(torch.equal(v, reloaded_tensors[k]) for k, v in trained_tensors.items())
            assert torch.equal(again, reload(tiny_config, run).eval()(input_ids=ids).logits)
        else:
            assert torch.equal(result.model.eval()(input_ids=ids).logits, again)

    tiny_config.eval.systems, tiny_config.eval.forgetting = ["base", "tuned"], False
    metrics = pipeline.stage_eval(tiny_config, run).metrics["suites"]["test"]["systems"]
    assert metrics["tuned"]["eval_loss"] < metrics["base"]["eval_loss"]


@pytest.mark.parametrize("ratio", [None, 8.0], ids=["lora", "loraplus"])
def test_loraplus_steps_the_b_matrices_ratio_times_further(ratio, tiny_config):
    """One AdamW step from LoRA's B = 0 moves each entry of B by lr_B * g / (|g| + eps), i.e. by lr_B wherever it
    has a gradient: so after one step the largest |B| entry is lr (plain LoRA) or lr x ratio (LoRA+)."""
    tiny_config.method.loraplus_lr_ratio = ratio
    tiny_config.train.max_steps = 1
    tiny_config.train.lr_scheduler = "constant"
    lr = tiny_config.train.learning_rate
    result = pipeline.stage_train(tiny_config, pipeline.open_run(tiny_config, starting_training=True))
    layers = lora_layers(result.model)
    largest_b = max(layer.lora_B["default"].weight.abs().max().item() for layer in layers)
    assert largest_b == pytest.approx(lr * (ratio or 1.0), rel=1e-3)


def test_adapter_input_cast_is_skipped_under_autocast_and_changes_nothing(tiny_config, tiny_model_dir):
    """build_trainable switches off PEFT's cast of each adapter input to float32 when bf16 autocast runs over
    float32 weights (the adapter's matmul casts it back); the loss and every gradient stay bit-identical."""
    from tunelab.models import Precision
    from tunelab.train.methods import build_trainable

    tiny_config.train.integer_dropout_masks = False
    tiny_config.method.dropout = 0.0  # no random masks: the two passes must agree bit for bit
    autocast = Precision("cpu", torch.bfloat16, torch.float32)
    model = build_trainable(tiny_config, tiny_model_dir, autocast).train()
    lora_layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert lora_layers and not any(m.cast_input_dtype_enabled for m in lora_layers)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    skipped_loss, skipped_grads = loss_and_grads()
    for m in lora_layers:
        m.cast_input_dtype_enabled = True
    cast_loss, cast_grads = loss_and_grads()
    assert torch.equal(skipped_loss, cast_loss)
    assert all(torch.equal(skipped_grads[n], g) for n, g in cast_grads.items())

    float32 = build_trainable(tiny_config, tiny_model_dir, Precision("cpu", None, torch.float32))
    assert all(m.cast_input_dtype_enabled for m in float32.modules() if hasattr(m, "cast_input_dtype_enabled"))
