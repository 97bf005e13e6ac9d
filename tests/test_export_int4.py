"""export int4: bitsandbytes NF4 of the merged model, reloaded with plain from_pretrained and compared with fp32."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab import pipeline

pytest.importorskip("bitsandbytes")


def test_int4_folder_reloads_with_plain_transformers_and_stays_close_to_float32(tiny_config):
    from transformers import AutoModelForCausalLM

    from tunelab.export.int4 import export_int4

    run = pipeline.open_run(tiny_config, starting_training=True)
    pipeline.stage_train(tiny_config, run)
    out = run.root / "export" / "int4"
    result = export_int4(tiny_config, run, out)
    report = json.loads((out / "tunelab_export.json").read_text())
    assert report["passed"] and report["linear4bit_layers"] == 14  # 7 projections x 2 layers
    assert report["top1_agreement"] >= 0.75 and result.report["steps"] > 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert not (out / ".work").exists() and (out / "chat_template.jinja").is_file()

    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # packed 4-bit, not dequantized
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9]])).logits).all()
