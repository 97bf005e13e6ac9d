"""export gguf: llama.cpp's converter and quantizer, the GGUF loaded in real llama.cpp and compared with
transformers; the Ollama Modelfile's template translation; one-line refusals."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from tests.cli_process import run_tunelab
from tunelab import pipeline
from tunelab.errors import ExportError, TemplateError
from tunelab.export import gguf_check
from tunelab.export.gotemplate import render_go
from tunelab.export.modelfile import modelfile_text, reasoned_in_training, translate

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed")


def _train(cfg):
    run = pipeline.open_run(cfg, starting_training=True)
    pipeline.stage_train(cfg, run)
    return run


@needs_llama_cpp
def test_f16_and_q8_0_ggufs_continue_the_runs_prompts_like_transformers(tiny_config, monkeypatch, tmp_path):
    from tunelab.export.gguf import _hf_model, base_model_gguf, export_gguf
    from tunelab.export.merge import merge_run, probe_prompts
    from tunelab.models import cache_root, load_tokenizer, resolve_model

    tiny_config.data.system_prompt = "Name the animal."
    run = _train(tiny_config)
    f16 = export_gguf(tiny_config, run, "f16", run.root / "export" / "gguf-f16")
    q8 = export_gguf(tiny_config, run, "q8_0", run.root / "export" / "gguf-q8_0")
    for result in (f16, q8):
        saved = json.loads((result.folder / "verification.json").read_text())
        assert saved["passed"] and saved["tokenizer_match"] and saved["steps"] > 0
        assert sorted(p.name for p in result.folder.iterdir()) == ["Modelfile", result.gguf.name, "verification.json"]
    assert f16.verification["exact_continuations"] + f16.verification["near_ties"] == f16.verification["prompts"]
    assert q8.verification["top1_agreement"] >= 0.9
    assert q8.gguf.stat().st_size < f16.gguf.stat().st_size

    modelfile = (f16.folder / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-f16.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'SYSTEM """Name the animal."""' in modelfile

    # The check is able to fail: the untrained base model's GGUF does not continue the tuned model's prompts.
    tokenizer = load_tokenizer(run.adapter)
    prompts = [text for text, _ in probe_prompts(tiny_config, run, tokenizer)]
    reference = _hf_model(merge_run(tiny_config, run, tmp_path / "merged").folder)
    refs = gguf_check.reference_continuations(reference, tokenizer, prompts)
    llm = gguf_check.open_llama(base_model_gguf(cache_root(tiny_config.model), resolve_model(tiny_config.model)))
    try:
        against_base = gguf_check.compare(llm, "f16", prompts, refs, gguf_check._eos_ids(reference, tokenizer),
                                          tokenizer, [None] * len(prompts))
    finally:
        llm.close()
    assert against_base.failures()

    # A quantized file below its floors is refused and nothing is written but the failed check's report.
    monkeypatch.setitem(gguf_check.FLOORS, "q8_0", (1.01, 1.01))
    target = run.root / "export" / "strict"
    with pytest.raises(ExportError, match="failed its check in llama.cpp"):
        export_gguf(tiny_config, run, "q8_0", target)
    assert not target.exists()
    assert json.loads((run.root / "export" / "strict.verification-failed.json").read_text())["passed"] is False


@needs_llama_cpp
def test_adapter_only_gguf_lora_on_the_base_gguf_matches_peft(tiny_config):
    from tunelab.export.gguf import export_gguf

    run = _train(tiny_config)
    result = export_gguf(tiny_config, run, "f16", run.root / "export" / "lora", adapter_only=True)
    v = result.verification
    assert v["passed"] and v["adapter_only"] and result.gguf.name == "adapter-f16.gguf"
    assert v["exact_continuations"] + v["near_ties"] == v["prompts"]
    modelfile = (result.folder / "Modelfile").read_text()
    assert f"FROM {v['base_gguf']}\nADAPTER ./adapter-f16.gguf\n" in modelfile
    # llama.cpp really applies the adapter: base + LoRA continues some probe differently from the base alone.
    base = gguf_check.open_llama(Path(v["base_gguf"]))
    try:
        alone = [_greedy(base, _prompt_ids(base, p)) for p in v["probes"]]
    finally:
        base.close()
    assert alone != [p["llama_tokens"][:len(a)] for p, a in zip(v["probes"], alone)]


@needs_llama_cpp
def test_an_rslora_adapter_converts_with_the_scale_peft_uses(tiny_config):
    """rsLoRA scales by alpha / sqrt(r), llama.cpp by alpha / r: converted as it was, the adapter acted 4x too
    weakly at r=16 and the check failed. The converted copy carries alpha * sqrt(r)."""
    from tunelab.export.gguf import export_gguf

    tiny_config.method.use_rslora = True
    run = _train(tiny_config)
    v = export_gguf(tiny_config, run, "f16", run.root / "export" / "lora", adapter_only=True).verification
    assert v["passed"] and v["exact_continuations"] + v["near_ties"] == v["prompts"]


def _prompt_ids(llm, probe):
    return llm.tokenize(probe["prompt"].encode(), add_bos=True, special=True)


def _greedy(llm, ids, n=gguf_check.PROBE_TOKENS):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval(out[-1:])
    return out


def _cli(*args):
    return run_tunelab("export", "gguf", *args)


def test_bad_requests_are_one_line_errors(tiny_config):
    run = pipeline.open_run(tiny_config, starting_training=False)
    result = _cli(str(run.root), "--quant", "q3_x")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --quant: expected one of f16, q8_0, q4_k_m, got 'q3_x'"

    tiny_config.method.type = "ia3"
    tiny_config.output.dir = run.root.parent / "ia3-run"
    ia3 = pipeline.open_run(tiny_config, starting_training=False)
    result = _cli(str(ia3.root), "--adapter-only", "--quant", "f16")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "was trained with method 'ia3'; only LoRA adapters convert to a GGUF LoRA" in result.stderr
    assert not (ia3.root / "export").exists()


SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2 = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + "
          "' [/INST]' }}{% else %}{{ ' ' + message['content'] + '</s>' }}{% endif %}{% endfor %}")


def test_modelfile_translates_chatml_and_refuses_other_templates(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    plain = translate(tokenizer)
    assert plain.family.name == "chatml" and plain.default_system is None

    tokenizer.chat_template = SMOLLM2
    smol = translate(tokenizer)
    assert smol.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    text = modelfile_text("./m.gguf", smol, None)
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert "{{ .Content }}<|im_end|>" in text
    trained_with = modelfile_text("./m.gguf", smol, "Be terse.")
    assert trained_with.count("SYSTEM") == 1 and 'SYSTEM """Be terse."""' in trained_with

    tokenizer.chat_template = LLAMA2
    with pytest.raises(TemplateError, match="refusing to write a Modelfile"):
        translate(tokenizer)
    # ChatML with a space after the role is not ChatML: near misses are refused too.
    tokenizer.chat_template = SMOLLM2.replace("message['role'] + '\n'", "message['role'] + ' \n'")
    assert tokenizer.chat_template != SMOLLM2
    with pytest.raises(TemplateError):
        translate(tokenizer)


QWEN3 = (Path(__file__).parent / "templates" / "qwen3.jinja").read_text(encoding="utf-8")


def test_a_modelfile_prompt_ends_with_what_the_template_writes_ahead_of_every_answer(tiny_tokenizer):
    """Qwen3's template (byte for byte) writes an empty think block ahead of every final answer, which its
    generation prompt does not hold: a model trained on it writes the block first, and Ollama would show it. The
    Modelfile's prompt holds it instead, so the prompt is exactly the training text up to the answer."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = QWEN3
    ollama = translate(tokenizer)
    assert ollama.family.name == "chatml"
    for conversation in ([{"role": "user", "content": "Which animal? The cat sat."}],
                         [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Animal?"},
                          {"role": "assistant", "content": "dog"}, {"role": "user", "content": "And now?"}]):
        go = render_go(ollama.go_template, {"Messages": [{"Role": m["role"], "Content": m["content"]}
                                                         for m in conversation]})
        prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        trained = tokenizer.apply_chat_template([*conversation, {"role": "assistant", "content": "cat"}],
                                                tokenize=False)
        assert go == prompt + "<think>\n\n</think>\n\n" and trained.startswith(go + "cat")
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n{{ end }}" in modelfile_text("./m.gguf", ollama, None)
    plain = translate(tiny_tokenizer)  # a template without such text: the prompt is the generation prompt
    assert "<|im_start|>assistant\n{{ end }}" in plain.go_template
    # A run whose answers reasoned inside the block: the prompt leaves the block to the model.
    assert reasoned_in_training(tokenizer, ["cat", "<think>\nIt is a cat.\n</think>\n\ncat"])
    assert not reasoned_in_training(tokenizer, ["cat", "<think>\n\n</think>\n\ncat"])
    assert not reasoned_in_training(tiny_tokenizer, ["<think>\nIt is a cat.\n</think>\n\ncat"])
    unfilled = translate(tokenizer, prefill_opening=False)
    conversation = [{"role": "user", "content": "Animal?"}]
    assert render_go(unfilled.go_template, {"Messages": [{"Role": "user", "Content": "Animal?"}]}) == (
        tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
