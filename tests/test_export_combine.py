"""tunelab combine (and its old spelling, export combine): PEFT's weighted adapter blends as a run folder that eval
accepts; one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch

from tests.cli_process import run_tunelab
from tunelab import pipeline
from tunelab.errors import ExportError
from tunelab.export.combine import combine_runs, load_source
from tunelab.export.merge import probe_batch


def _trained(cfg, folder, lr):
    cfg = cfg.model_copy(deep=True)
    cfg.output.dir = folder
    cfg.train.learning_rate = lr
    run = pipeline.open_run(cfg, starting_training=True)
    pipeline.stage_train(cfg, run)
    return load_source(cfg, run)


def _logits(cfg, adapter, batch):
    from peft import PeftModel

    from tunelab.models import Precision, load_model, resolve_model

    base = load_model(resolve_model(cfg.model), Precision("cpu", None, torch.float32))
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter).eval()(**batch).logits


def test_combined_adapter_is_a_run_folder_eval_accepts(tiny_config, tmp_path):
    a = _trained(tiny_config, tmp_path / "run_a", 1e-2)
    b = _trained(tiny_config, tmp_path / "run_b", 3e-2)

    # Weights 1, 0 keep exactly adapter A (linear folds A's scaling into its weights): the blend is real math.
    only_a = combine_runs([a, b], "linear", [1.0, 0.0], tmp_path / "only_a")
    from tunelab.models import load_tokenizer

    batch = probe_batch(a.cfg, a.run, load_tokenizer(a.run.adapter))
    assert (_logits(a.cfg, only_a.adapter, batch) - _logits(a.cfg, a.run.adapter, batch)).abs().max() < 1e-4
    half = combine_runs([a, b], "linear", [0.5, 0.5], tmp_path / "half")
    assert (_logits(a.cfg, half.adapter, batch) - _logits(a.cfg, a.run.adapter, batch)).abs().max() > 1e-3

    result = run_tunelab("combine", str(a.run.root), str(b.run.root), "--how", "ties", "--density", "0.7", "--out",
                         str(tmp_path / "ties"))
    assert result.returncode == 0, result.stderr[-3000:]
    combined = json.loads((tmp_path / "ties" / "manifest.json").read_text())
    assert combined["combined"]["how"] == "ties" and len(combined["combined"]["sources"]) == 2
    metrics = json.loads((tmp_path / "ties" / "eval" / "metrics.json").read_text())
    assert set(metrics["suites"]) == {"run_a_test", "run_b_test"}
    systems = metrics["suites"]["run_a_test"]["systems"]
    assert {"base", "tuned"} <= set(systems) and len(systems) >= 4  # the two source runs evaluated beside it


@pytest.fixture(scope="module")
def ranks_16_and_4(tmp_path_factory, tiny_model_dir):
    """Two real LoRA runs of different ranks (the second is 2 steps long: only its shapes matter)."""
    from tests.conftest import tiny_run_config

    folder = tmp_path_factory.mktemp("ranks")
    cfg = tiny_run_config(folder, tiny_model_dir)
    low_rank = cfg.model_copy(deep=True)
    low_rank.method.r, low_rank.train.max_steps = 4, 2
    return _trained(cfg, folder / "r16", 1e-2), _trained(low_rank, folder / "r4", 1e-2)


def test_refusals_are_one_line(ranks_16_and_4, tiny_config, tmp_path):
    from tests.conftest import build_tiny_llama

    a, b = ranks_16_and_4
    assert (a.rank, b.rank) == (16, 4)
    result = run_tunelab("export", "combine", str(a.run.root), str(b.run.root), "--how", "linear", "--out",
                         str(tmp_path / "x"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr[-2000:]
    assert "--how linear needs adapters of one rank, got ranks 16, 4; use --how cat for mixed ranks" in result.stderr
    other_base = tiny_config.model_copy(deep=True)
    other_base.model.name = str(build_tiny_llama(tmp_path / "other-base", seed=1))
    other_base.method.type = "ia3"
    other_base.output.dir = tmp_path / "ia3"
    ia3 = pipeline.open_run(other_base, starting_training=False)
    result = run_tunelab("export", "combine", str(a.run.root), str(ia3.root), "--out", str(tmp_path / "y"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "was trained with method 'ia3'; only LoRA adapters can be combined" in result.stderr
    other_base.method.type = "lora"
    c = load_source(other_base, a.run)  # LoRA config, but another base
    with pytest.raises(ExportError, match="adapters combine only on the same base model"):
        combine_runs([a, c], "cat", [0.5, 0.5], tmp_path / "z")
    prompted = load_source(a.cfg.model_copy(deep=True), b.run)
    prompted.cfg.data.system_prompt = "Answer in one word."
    with pytest.raises(ExportError, match="another data.system_prompt than"):
        combine_runs([a, prompted], "cat", [0.5, 0.5], tmp_path / "z")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file; choose a new folder"):
        combine_runs([a, b], "cat", [0.5, 0.5], tmp_path / "file")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def _updates(adapter_dir) -> dict[str, torch.Tensor]:
    """Each adapted module's weight update scale x B @ A, from the saved files alone."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    return {key[: -len(".lora_A.weight")]: scale * tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
            for key in tensors if key.endswith(".lora_A.weight")}


def test_cat_combines_adapters_of_different_ranks_exactly(ranks_16_and_4, tmp_path):
    a, b = ranks_16_and_4
    combined = combine_runs([a, b], "cat", [0.7, 0.3], tmp_path / "cat")
    assert json.loads((combined.adapter / "adapter_config.json").read_text())["r"] == 16 + 4
    ua, ub, uc = _updates(a.run.adapter), _updates(b.run.adapter), _updates(combined.adapter)
    assert set(uc) == set(ua) == set(ub) and len(uc) == 14
    for module, update in uc.items():
        assert torch.allclose(update, 0.7 * ua[module] + 0.3 * ub[module], atol=1e-6), module
