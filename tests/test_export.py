"""Export merge: fp32 merge verified against the adapter; refused where merging cannot work."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from tests.cli_process import run_tunelab
from tunelab import pipeline
from tunelab.errors import ExportError
from tunelab.export.merge import merge_run, probe_batch


@pytest.mark.parametrize("method", ["lora", "qlora", "ia3"])
def test_merged_model_loads_with_plain_transformers_and_matches_the_adapter(tiny_config, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.models import load_tokenizer, resolve_model

    tiny_config.method.type = method
    if method == "ia3":
        tiny_config.train.learning_rate = 0.1
    run = pipeline.open_run(tiny_config, starting_training=True)
    pipeline.stage_train(tiny_config, run)
    out = run.root / "export" / "merged"
    result = merge_run(tiny_config, run, out)
    assert result.max_diff <= 1e-3 and result.reload_diff <= 1e-3

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(resolve_model(tiny_config.model), dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, run.adapter).eval()
    batch = probe_batch(tiny_config, run, load_tokenizer(out))
    with torch.no_grad():
        a, b = adapter(**batch).logits, merged(**batch).logits
    assert (a - b).abs().max() < 1e-3
    assert json.loads((out / "tunelab_export.json").read_text())["dtype"] == "float32"
    assert (out / "chat_template.jinja").is_file()
    # Plain generate stops at the template's end of turn, as eval and `tunelab serve` do.
    from tunelab.families import end_of_turn

    tokenizer = load_tokenizer(out)
    turn_end = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))
    assert turn_end in json.loads((out / "generation_config.json").read_text())["eos_token_id"]


def test_bf16_export_and_methods_that_cannot_merge(tiny_config, monkeypatch):
    run = pipeline.open_run(tiny_config, starting_training=True)
    pipeline.stage_train(tiny_config, run)
    result = run_tunelab("export", "merge", str(run.root), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "was never evaluated" in " ".join(result.stderr.split())
    config = json.loads((run.root / "export" / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    # A run whose gate failed still exports (the user's call), with the failed rule said plainly.
    failing = tiny_config.model_copy(deep=True)
    failing.eval.gate, failing.eval.systems, failing.eval.forgetting = ["tuned.exact_match >= 2"], ["tuned"], False
    pipeline.stage_eval(failing, run)
    again = run_tunelab("export", "merge", str(run.root), "--overwrite", "--out", str(run.root / "export" / "merged"),
                        env={**os.environ, "COLUMNS": "250"})
    assert again.returncode == 0, again.stderr[-2000:]
    assert re.search(r"failed its eval gate: tuned.exact_match >= 2 \(measured \d\.\d{4}, needed >= 2\.0000\); "
                     r"exported anyway", " ".join(again.stderr.split())), again.stderr
    from tunelab.export import merge

    with monkeypatch.context() as patched:  # NaN logits are not "within" any tolerance
        patched.setattr(merge, "_max_diff", lambda *args: float("nan"))
        with pytest.raises(ExportError, match="merged logits differ from the adapter's by nan"):
            merge_run(tiny_config, run, run.root / "nan")
    tiny_config.method.type = "prompt_tuning"
    with pytest.raises(ExportError, match="cannot be folded into the weights"):
        merge_run(tiny_config, run, run.root / "x")


def test_merged_template_adds_the_system_prompt_the_run_trained_with(tiny_config):
    from tunelab.chat import render_prompt, with_system_prompt
    from tunelab.models import load_tokenizer

    # Quotes, backslashes, template delimiters and non-ASCII: a prompt is data, never template code.
    system = 'Answer in one word. "Quote" \\ {{ not_a_variable }} {% raw %} 100% é 😀\nSecond line.'
    tiny_config.data.system_prompt = system
    run = pipeline.open_run(tiny_config, starting_training=True)
    pipeline.stage_train(tiny_config, run)
    out = run.root / "export" / "merged"
    merge_run(tiny_config, run, out)
    trained, merged = load_tokenizer(run.adapter), load_tokenizer(out)
    user = [{"role": "user", "content": "Which animal: the cat sat."}]
    # What `tunelab serve` renders for the adapter, plain apply_chat_template renders for the merged folder.
    assert merged.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == \
        render_prompt(trained, with_system_prompt(user, system))
    assert system in merged.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    own = [{"role": "system", "content": "Be terse."}, *user]  # a caller's own system message wins, as in serve
    assert merged.apply_chat_template(own, tokenize=False, add_generation_prompt=True) == render_prompt(trained, own)
    assert (out / "chat_template.jinja").read_text() == merged.chat_template
