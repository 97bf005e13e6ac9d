"""Bring your own model: every chat-template family through every stage, and base models without a template.

Tiny random models of the five architectures (tests/model_zoo.py), each with its family's real template and
special tokens, are trained a few steps, reloaded with plain PEFT, merged, exported to an f16 GGUF checked in
llama.cpp with a Modelfile whose Go template is checked against the Jinja one. Base models (no template, no
marker tokens) get a template from `data.chat_template`; its markers become trained special tokens.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.cli_process import run_tunelab
from tests import model_zoo as zoo
from tests.conftest import animal_rows, write_jsonl
from tests.test_chat import labelled_runs
from tunelab import pipeline
from tunelab.chat import chat_tokenizer, render_prompt, setup_chat_template, tokenize_conversation
from tunelab.config_file import validate_config
from tunelab.errors import ModelError
from tunelab.export.gotemplate import render_go
from tunelab.export.modelfile import modelfile_text, translate
from tunelab.families import FAMILIES, detect, end_of_turn, missing_markers, stop_token_ids
from tunelab.models import Precision, load_tokenizer
from tunelab.train.methods import load_trained

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed")
TURN = [{"role": "user", "content": "Name an animal."}, {"role": "assistant", "content": "answer: cat"}]
FP32 = Precision("cpu", None, torch.float32)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: zoo.build_family_model(family, root / family) for family in zoo.FAMILIES}


@pytest.fixture(scope="module")
def base_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {arch: zoo.build_base_model(root / arch, arch=arch) for arch in zoo.ARCHS}


def run_config(model: Path, tmp_path: Path, **data: object):
    train = write_jsonl(tmp_path / "train.jsonl", animal_rows(48))
    test = write_jsonl(tmp_path / "test.jsonl", animal_rows(8, seed=1, start=1000))
    return validate_config({
        "model": {"name": str(model), "dtype": "float32"},
        "data": {"train": str(train), "test": str(test), "val_fraction": 0.1, **data},
        "train": {"learning_rate": 1e-2, "max_steps": 16, "batch_size": 8, "warmup_ratio": 0.0},
        "eval": {"max_new_tokens": 12, "batch_size": 4, "few_shot_k": 1, "forgetting": False, "systems": ["tuned"]},
        "track": {"enabled": False},
        "output": {"dir": str(tmp_path / "run")},
    })


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_each_family_is_recognised_with_its_end_of_turn_and_stop_token(family, family_models):
    tokenizer = load_tokenizer(family_models[family])
    assert detect(tokenizer) is FAMILIES[family]
    assert end_of_turn(tokenizer) == zoo.END_OF_TURN[family]
    assert tokenizer.convert_tokens_to_ids(zoo.END_OF_TURN[family]) in stop_token_ids(tokenizer)
    assert missing_markers(tokenizer) == []  # a chat model's own template is never extended


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_mask_covers_exactly_the_answer_and_the_families_end_of_turn(family, family_models):
    tokenizer = load_tokenizer(family_models[family])
    conversation = [*TURN, {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "answer: owl"}]
    example = tokenize_conversation(tokenizer, conversation)
    eot = zoo.END_OF_TURN[family]
    assert [run.strip() for run in labelled_runs(tokenizer, example)] == [f"answer: cat{eot}", f"answer: owl{eot}"]
    # The last answer follows exactly the prompt that eval and serving render.
    prompt = tokenizer(render_prompt(tokenizer, conversation[:-1]), add_special_tokens=False)["input_ids"]
    assert example.input_ids[:len(prompt)] == prompt and example.labels[len(prompt)] != -100



@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_an_earlier_answer_quoted_in_the_user_turn_before_it_is_masked_where_the_assistant_says_it(family,
                                                                                                 family_models):
    tokenizer = load_tokenizer(family_models[family])
    conversation = [{"role": "user", "content": "Repeat after me: cat"}, {"role": "assistant", "content": "cat"},
                    {"role": "user", "content": "cat again?"}, {"role": "assistant", "content": "dog"}]
    example = tokenize_conversation(tokenizer, conversation)
    eot = zoo.END_OF_TURN[family]
    # Searching the text for "cat" would label the user's "cat" and the end of the user's turn instead.
    assert [run.strip() for run in labelled_runs(tokenizer, example)] == [f"cat{eot}", f"dog{eot}"]

@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_modelfile_go_template_renders_like_the_jinja_template(family, family_models):
    tokenizer = load_tokenizer(family_models[family])
    ollama = translate(tokenizer)
    assert ollama.family.name == family and zoo.END_OF_TURN[family] in ollama.stops
    conversation = [*TURN, {"role": "user", "content": "And a bird?"}]
    jinja = render_prompt(tokenizer, conversation)
    go = render_go(ollama.go_template, {"Messages": [
        {"Role": m["role"], "Content": m["content"]}
        for m in ([{"role": "system", "content": ollama.default_system}] if ollama.default_system else [])
        + conversation]})
    bos = tokenizer.bos_token or ""
    assert go == (jinja[len(bos):] if bos and jinja.startswith(bos) and go != jinja else jinja)
    text = modelfile_text("./m.gguf", ollama, None)
    assert f'PARAMETER stop "{zoo.END_OF_TURN[family]}"' in text


def test_a_modelfile_that_would_prompt_differently_is_refused_showing_where(family_models):
    """A tokenizer that does not add its bos (so Ollama would not either) while the template writes it: the
    Modelfile would drop the bos; the refusal shows both renderings where they part."""
    from tunelab.errors import TemplateError

    tokenizer = load_tokenizer(family_models["gemma"])
    tokenizer.add_bos_token = False
    with pytest.raises(TemplateError, match=r"first difference at character 1: the Jinja template writes "
                                            r"'<bos><start_of_turn>user\\n.*', the Ollama template "
                                            r"'<start_of_turn>user"):
        translate(tokenizer)


@pytest.fixture(scope="module")
def family_runs(family_models, tmp_path_factory: pytest.TempPathFactory):
    """Each family's run, trained on first use: {family: (config, run folder)}."""
    runs: dict[str, tuple] = {}

    def trained(family: str) -> tuple:
        if family not in runs:
            cfg = run_config(family_models[family], tmp_path_factory.mktemp(f"run-{family}"))
            runs[family] = (cfg, pipeline.run_all(cfg).run)
        return runs[family]

    return trained


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_family_trains_reloads_with_plain_peft_and_exports(family, family_models, family_runs):
    """Train, reload the adapter with plain PEFT to tunelab's logits, merge (verified), f16 GGUF in llama.cpp."""
    cfg, run = family_runs(family)
    saved_template = (run.adapter / "chat_template.jinja").read_text()
    assert saved_template == load_tokenizer(family_models[family]).chat_template == run.chat_template.read_text()
    _reload_with_plain_peft_matches(cfg, run, family_models[family])
    _merge_and_gguf(cfg, run, family)


@pytest.mark.parametrize("arch", zoo.ARCHS)
def test_base_model_gets_the_chosen_template_and_trained_marker_tokens(arch, base_models, tmp_path):
    family = zoo.FAMILIES[zoo.ARCHS.index(arch)]
    cfg = run_config(base_models[arch], tmp_path, chat_template=family)
    lines = "\n".join(pipeline.preflight(cfg))
    assert f"chat template: {family} (data.chat_template; adds special tokens" in lines and "base model" in lines
    summary = pipeline.run_all(cfg)
    run = summary.run
    tokenizer = load_tokenizer(run.adapter)
    marker_ids = tokenizer.convert_tokens_to_ids(list(FAMILIES[family].markers))
    config = json.loads((run.adapter / "adapter_config.json").read_text())
    rows = config["trainable_token_indices"]
    trained = rows if isinstance(rows, list) else sorted(set(sum(rows.values(), [])))
    assert set(trained) <= set(marker_ids) and len(tokenizer) > json.loads(
        (base_models[arch] / "config.json").read_text())["vocab_size"]
    # Only the new rows are saved, not the whole resized embedding.
    from safetensors.torch import load_file

    weights = load_file(str(run.adapter / "adapter_model.safetensors"))
    assert all("lora_" in k or "trainable_tokens_delta" in k for k in weights), list(weights)
    assert any("trainable_tokens_delta" in k for k in weights)
    _reload_with_plain_peft_matches(cfg, run, base_models[arch])
    # Generation stops at the new end-of-turn token: no answer carries marker text.
    predictions = [json.loads(line) for line in (run.root / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert all(m not in p["outputs"]["tuned"] for p in predictions for m in FAMILIES[family].markers)
    _merge_and_gguf(cfg, run, family)


def test_base_model_without_a_choice_gets_chatml_and_says_so(base_models):
    tokenizer = load_tokenizer(base_models["llama"])
    assert not tokenizer.chat_template
    setup = setup_chat_template(tokenizer, None)
    assert setup.family == "chatml" and setup.source == "default"
    assert set(setup.added_tokens) == {"<|im_start|>", "<|im_end|>"}
    assert "set data.chat_template to choose" in setup.describe()
    # Each added marker is one token, and the model's own bos opens the prompt (it was pretrained with it).
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "hi"}])
    assert prompt.startswith(tokenizer.bos_token + "<|im_start|>user")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer)


def test_custom_jinja_template_and_bad_choices(base_models, tmp_path):
    custom = tmp_path / "mine.jinja"
    custom.write_text("{% for m in messages %}<|turn|>{{ m['role'] }}: {{ m['content'] }}<|stop|>{% endfor %}"
                      "{% if add_generation_prompt %}<|turn|>assistant:{% endif %}")  # no trailing space: see below
    tokenizer = load_tokenizer(base_models["llama"])
    setup = setup_chat_template(tokenizer, str(custom))
    assert setup.family == "custom" and setup.added_tokens == ("<|turn|>", "<|stop|>")
    assert end_of_turn(tokenizer) == "<|stop|>"
    for bad in ("chatml2", str(tmp_path / "missing.jinja")):
        with pytest.raises(ModelError, match="data.chat_template: .* neither a known family"):
            setup_chat_template(load_tokenizer(base_models["llama"]), bad)


def test_a_tokenizer_without_eos_or_pad_still_trains_and_evaluates(family_models, tmp_path):
    """Padding needs some token (its positions are masked): with neither pad nor eos, unk or bos stands in."""
    model = tmp_path / "no-eos"
    shutil.copytree(family_models["llama3"], model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    for key in ("eos_token", "pad_token"):
        config.pop(key, None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(model)
    assert tokenizer.eos_token is None and tokenizer.pad_token == tokenizer.bos_token
    cfg = run_config(model, tmp_path)
    cfg.train.max_steps, cfg.eval.max_examples = 2, 2
    run = pipeline.open_run(cfg, starting_training=True)
    assert pipeline.stage_train(cfg, run).steps == 2
    assert pipeline.stage_eval(cfg, run).metrics["suites"]["test"]["n_examples"] == 2


def test_cpt_on_a_base_model_needs_no_template(base_models, tmp_path):
    rows = [{"text": f"Day {i}: the {animal} crossed the river."} for i, animal in enumerate(["cat", "owl"] * 20)]
    train = write_jsonl(tmp_path / "text.jsonl", rows)
    cfg = validate_config({
        "model": {"name": str(base_models["mistral"]), "dtype": "float32"}, "objective": "cpt",
        "data": {"train": str(train), "val_fraction": 0.1, "test_fraction": 0.1},
        "train": {"max_steps": 2, "batch_size": 4}, "track": {"enabled": False},
        "output": {"dir": str(tmp_path / "run")},
    })
    run = pipeline.open_run(cfg, starting_training=True)
    pipeline.stage_train(cfg, run)
    tokenizer = load_tokenizer(run.adapter)
    assert not tokenizer.chat_template and len(tokenizer) == json.loads(
        (base_models["mistral"] / "config.json").read_text())["vocab_size"]
    assert not json.loads((run.adapter / "adapter_config.json").read_text()).get("trainable_token_indices")
    # Eval chats with the default template written as text (no tokens are added to a trained vocabulary).
    assert chat_tokenizer(run.adapter, None).chat_template and len(chat_tokenizer(run.adapter, None)) == len(tokenizer)
    # The held-out text is the evidence: base and tuned loss and perplexity on it, and the default gate asks
    # that the loss went down (few-shot has no meaning for raw text; nothing is generated for it).
    cfg.eval.forgetting, cfg.eval.max_new_tokens = False, 4
    metrics = pipeline.stage_eval(cfg, run).metrics
    suite = metrics["suites"]["test"]
    assert suite["n_examples"] == 4 and set(suite["systems"]) == {"base", "tuned"}
    assert all(v["perplexity"] > 1 for v in suite["systems"].values())
    assert [g["rule"] for g in metrics["gate"]] == ["tuned.eval_loss < base.eval_loss"]
    assert "| tuned |" in (run.eval / "report.md").read_text()
    # Served, the run and its base chat in that same template (a tokenizer without one was a 500 on every chat).
    prompt = chat_tokenizer(run.adapter, None)(render_prompt(chat_tokenizer(run.adapter, None), TURN[:1]),
                                               add_special_tokens=False)["input_ids"]
    with _served(run) as client:
        for model in ("tuned", "base"):
            reply = client.chat.completions.create(model=model, messages=TURN[:1], max_tokens=2, temperature=0)
            assert reply.usage.prompt_tokens == len(prompt)


def _reload_with_plain_peft_matches(cfg, run, base_folder: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.adapter)
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))
    plain = PeftModel.from_pretrained(base, run.adapter).eval()
    ours, _ = load_trained(cfg, run.root, base_folder, FP32)
    prompt = render_prompt(tokenizer, TURN[:1])
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(plain(**ids).logits, ours(**ids).logits)


def _merge_and_gguf(cfg, run, family: str) -> None:
    from tunelab.export.merge import merge_run

    merged = merge_run(cfg, run, run.root / "export" / "merged")
    assert merged.max_diff <= 1e-3
    if importlib.util.find_spec("llama_cpp") is None:
        return
    from tunelab.export.gguf import export_gguf

    result = export_gguf(cfg, run, "f16", run.root / "export" / "gguf-f16")
    assert result.verification["passed"] and result.verification["tokenizer_match"]
    modelfile = (result.folder / "Modelfile").read_text()
    end = end_of_turn(load_tokenizer(run.adapter))
    assert f'PARAMETER stop "{end}"' in modelfile


def test_go_template_interpreter_follows_go_semantics():
    template = ('{{- $n := len .Messages }}{{ range $i, $m := .Messages }}{{ if eq $i 0 }}first{{ else if '
                'and (ne $m.Role "x") (not false) }},{{ $m.Role }}{{ else }}?{{ end }}{{ end }} n={{ $n }}\n'
                '  {{- " trimmed" }}')
    data = {"Messages": [{"Role": "a"}, {"Role": "b"}, {"Role": "x"}]}
    assert render_go(template, data) == "first,b? n=3 trimmed"
    with pytest.raises(ValueError):
        render_go("{{ if .A }}unclosed", {})
    assert copy.deepcopy(data) == data


@pytest.fixture(scope="module")
def base_run(base_models, tmp_path_factory: pytest.TempPathFactory):
    """A base Llama given ChatML: its markers are new tokens the adapter trains."""
    cfg = run_config(base_models["llama"], tmp_path_factory.mktemp("base-run"), chat_template="chatml")
    return pipeline.run_all(cfg).run


def test_serving_a_base_model_run_stops_at_its_new_end_of_turn_token(base_run):
    # <|im_end|> is a token only the adapter's vocabulary has.
    _served_answers_are_evals(base_run, FAMILIES["chatml"].markers)


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_each_family_is_served_with_its_template_and_stop_token(family, family_runs):
    _served_answers_are_evals(family_runs(family)[1], FAMILIES[family].markers)


def _served_answers_are_evals(run, markers: tuple[str, ...]) -> None:
    """A real `tunelab serve` process answers eval's test prompts, through the openai client, exactly as eval did,
    stopping at the template's end of turn with no marker text in the answer."""
    with _served(run) as client:
        predictions = [json.loads(line) for line in (run.eval / "predictions.jsonl").read_text().splitlines()]
        for row in predictions[:3]:
            reply = client.chat.completions.create(
                model="tuned", messages=[{"role": "user", "content": row["prompt"]}], max_tokens=40, temperature=0)
            choice = reply.choices[0]
            assert choice.message.content == row["outputs"]["tuned"]
            assert choice.finish_reason == "stop" and not any(m in choice.message.content for m in markers)
        # A conversation the template refuses (Mistral's [INST] template takes no system message; Gemma's
        # wants turns to alternate) is that request's 400, and the next request is answered as before.
        import openai

        refused = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        if "[INST]" in markers or "<start_of_turn>" in markers:
            with pytest.raises(openai.BadRequestError, match="cannot render this conversation"):
                client.chat.completions.create(model="tuned", messages=refused, max_tokens=4)
            row = predictions[0]
            again = client.chat.completions.create(
                model="tuned", messages=[{"role": "user", "content": row["prompt"]}], max_tokens=40, temperature=0)
            assert again.choices[0].message.content == row["outputs"]["tuned"]


@contextlib.contextmanager
def _served(run) -> Iterator[Any]:
    """An openai client of a real `tunelab serve` process serving `run` as `tuned` beside its base."""
    import os
    import subprocess
    import sys

    from openai import OpenAI

    from tests.serve.conftest import free_port, wait_until_healthy

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", f"tuned={run.root}", "--port",
                                str(port)], env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, process)
        yield OpenAI(base_url=f"{url}/v1", api_key="unused")
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_vllm_and_gguf_lora_refuse_adapters_that_add_tokens(base_run):
    import subprocess
    import sys

    result = run_tunelab("serve", str(base_run.root), "--engine", "vllm")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "add chat-marker tokens" in result.stderr and "merged model" in result.stderr
    result = run_tunelab("export", "gguf", str(base_run.root), "--adapter-only")
    assert result.returncode == 2 and "a GGUF LoRA cannot carry" in result.stderr
    assert not (base_run.root / "export" / "gguf-lora-f16").exists()


def test_checkpoints_of_a_base_model_run_keep_only_the_new_token_rows_and_resume(base_models, tmp_path):
    """A chat template added tokens: each checkpoint saves their rows (not the whole resized embedding and head,
    GBs for a large vocabulary), and a run resumed from a checkpoint ends with the uninterrupted run's adapter."""
    from safetensors.torch import load_file

    from tunelab.train.trainer import complete_checkpoints

    cfg = run_config(base_models["llama"], tmp_path, chat_template="chatml")
    cfg.train.max_steps, cfg.train.save_steps, cfg.train.keep_checkpoints = 8, 4, 5
    reference = pipeline.open_run(cfg, starting_training=True)
    pipeline.stage_train(cfg, reference)
    checkpoints = complete_checkpoints(reference.root / "checkpoints")
    assert [p.name for p in checkpoints] == ["checkpoint-4", "checkpoint-8"]
    saved = load_file(str(checkpoints[0] / "adapter_model.safetensors"))
    assert any("trainable_tokens_delta" in k for k in saved)
    whole = [k for k in saved if "lora_" not in k and "trainable_tokens_delta" not in k]
    assert not whole, whole  # e.g. embed_tokens.token_adapter.base_layer.weight: every row of the embedding

    shutil.copytree(reference.root, tmp_path / "cut")  # as if killed after checkpoint-4
    shutil.rmtree(tmp_path / "cut" / "adapter")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "checkpoint-8")
    cfg.output.dir = tmp_path / "cut"
    resumed = pipeline.open_run(cfg, starting_training=True, resume=True)
    pipeline.stage_train(cfg, resumed, resume=True)
    a = load_file(str(reference.adapter / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_the_vllm_command_says_when_vllm_would_not_stop_at_the_templates_end_of_turn(family_models, tmp_path):
    """vLLM stops at the tokenizer's eos and the base folder's generation-config eos ids. A Llama 3 base model
    given the llama3 template (its vocabulary holds <|eot_id|>, its generation config names only <|end_of_text|>)
    would answer past the turn: the command's notes say so and how to stop it."""
    from tunelab.serve.server import _end_of_turn_vllm_misses

    tokenizer = load_tokenizer(family_models["llama3"])
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert _end_of_turn_vllm_misses(tokenizer, family_models["llama3"]) is None  # the instruct model lists it
    tokenizer.eos_token = "<|end_of_text|>"  # as the base model's own tokenizer has it
    base = tmp_path / "llama3-base"
    shutil.copytree(family_models["llama3"], base)
    generation = json.loads((base / "generation_config.json").read_text())
    generation["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    (base / "generation_config.json").write_text(json.dumps(generation))
    assert tokenizer.eos_token_id != eot and _end_of_turn_vllm_misses(tokenizer, base) == ("<|eot_id|>", eot)


def test_a_reasoning_run_is_scored_on_its_answers_and_served_with_its_reasoning_apart(tmp_path):
    """Qwen3's template (byte for byte) and rows whose answers reason first, in its <think> block: eval scores the
    answer after the block against the reference's answer after its block (before, the reasoning was scored with
    it: a right answer reasoned in other words was no exact match), and the server returns the block as
    `reasoning_content`, apart from `content`, streamed or not (before, all of it was the content)."""
    from tests.conftest import build_tiny_llama

    model = build_tiny_llama(tmp_path / "model")
    tokenizer = load_tokenizer(model)
    tokenizer.chat_template = (Path(__file__).parent / "templates" / "qwen3.jinja").read_text(encoding="utf-8")
    tokenizer.save_pretrained(model)
    rows = [{"messages": [{"role": "user", "content": f"Extract the animal: on day {i} I saw a cat."},
                          {"role": "assistant", "content": "<think>\nIt says cat.\n</think>\n\nanswer: cat"}]}
            for i in range(56)]
    cfg = run_config(model, tmp_path, train=str(write_jsonl(tmp_path / "reasoning.jsonl", rows[:48])),
                     test=str(write_jsonl(tmp_path / "reasoning-test.jsonl", rows[48:])))
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_new_tokens": 30})})
    run = pipeline.run_all(cfg).run
    predictions = [json.loads(line) for line in (run.eval / "predictions.jsonl").read_text().splitlines()]
    assert {(p["reference"], p["outputs"]["tuned"]) for p in predictions} == {("answer: cat", "answer: cat")}
    with _served(run) as client:
        question = [{"role": "user", "content": "Extract the animal: on day 99 I saw a cat."}]
        reply = client.chat.completions.create(model="tuned", messages=question, max_tokens=30, temperature=0)
        message = reply.choices[0].message
        assert (message.content, message.model_extra.get("reasoning_content")) == ("answer: cat", "It says cat.")
        chunks = [c.choices[0].delta for c in client.chat.completions.create(
            model="tuned", messages=question, max_tokens=30, temperature=0, stream=True) if c.choices]
        assert "".join(d.content or "" for d in chunks) == "answer: cat"
        assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in chunks) == "It says cat."
    # As a base model, its replay answers (data.replay: self) keep the reasoning: training on them keeps how it
    # answers, where eval's answer part would teach it to stop reasoning.
    from tunelab.data.replay import _generate
    from tunelab.export.merge import merge_run

    merged = merge_run(cfg, run, run.root / "export" / "merged").folder
    replayed = _generate(cfg, merged, load_tokenizer(merged), [question])
    assert replayed == ["<think>\nIt says cat.\n</think>\n\nanswer: cat"]
    if importlib.util.find_spec("llama_cpp") is not None:
        from tunelab.export.gguf import export_gguf

        # Its Modelfile leaves the block to the model: an empty one in the prompt would keep it from reasoning.
        result = export_gguf(cfg, run, "f16", run.root / "export" / "gguf-f16")
        assert result.verification["passed"]
        assert "<|im_start|>assistant\n{{ end }}" in (result.folder / "Modelfile").read_text()
