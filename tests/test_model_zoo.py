"""The model zoo (tests/model_zoo.py): each family builds, renders its official template with the quirks the zoo
documents, writes its markers as single tokens, and converts to a GGUF that llama.cpp tokenizes and runs like
transformers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests import model_zoo as zoo

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed")

USER = {"role": "user", "content": "What is two plus two?"}
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
ANSWER = {"role": "assistant", "content": "Four."}
USER2 = {"role": "user", "content": "Name the animal: I saw a cat near the river today."}
CONVERSATIONS = {"user": [USER], "system_user": [SYSTEM, USER], "user_assistant_user": [USER, ANSWER, USER2]}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family's model, built once, in a folder named after the family (llama.cpp reads Phi-3's token
    attributes off the GGUF's name, which the converter takes from the folder name)."""
    root = tmp_path_factory.mktemp("zoo")
    return {family: zoo.build_family_model(family, root / family) for family in zoo.FAMILIES}


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _vendored(family: str) -> str | None:
    """The same template as installed trl / llama-cpp-python carry it, if they do."""
    if family == "mistral":
        if importlib.util.find_spec("llama_cpp") is None:
            return None
        from llama_cpp.llama_chat_format import MIXTRAL_INSTRUCT_CHAT_TEMPLATE

        return MIXTRAL_INSTRUCT_CHAT_TEMPLATE
    spec = importlib.util.find_spec("trl")
    name = {"chatml": "qwen2_5", "llama3": "llama3_1", "gemma": "gemma3", "phi3": "phi3"}[family]
    path = Path(spec.origin).parent / "chat_templates" / f"{name}.jinja" if spec and spec.origin else None
    return path.read_text(encoding="utf-8") if path and path.is_file() else None


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_templates_are_the_official_ones_byte_for_byte(family):
    vendored = _vendored(family)
    if vendored is None:
        pytest.skip("no vendored copy installed to compare with")
    assert zoo.chat_template(family) == vendored


def test_the_qwen3_template_is_the_official_one_byte_for_byte():
    spec = importlib.util.find_spec("trl")
    vendored = Path(spec.origin).parent / "chat_templates" / "qwen3.jinja" if spec and spec.origin else None
    if vendored is None or not vendored.is_file():
        pytest.skip("no vendored copy installed to compare with")
    assert (zoo.TEMPLATES / "qwen3.jinja").read_bytes() == vendored.read_bytes()


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_family_model_folder(family, family_dirs):
    from transformers import AutoConfig, GenerationConfig

    folder = family_dirs[family]
    spec = zoo.family_spec(family)
    tokenizer = _tokenizer(folder)
    config = AutoConfig.from_pretrained(folder)
    generation = GenerationConfig.from_pretrained(folder)
    ids = tokenizer.convert_tokens_to_ids

    assert sorted(p.name for p in folder.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert config.architectures == [zoo.MODEL_CLASSES[spec.arch]]
    assert config.vocab_size == len(tokenizer) and 300 < len(tokenizer) <= 400
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.initializer_range) == (64, 2, 4, 2, 0.2)
    assert config.tie_word_embeddings is spec.tie
    assert tokenizer.chat_template == zoo.chat_template(family)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (spec.bos, spec.eos, spec.pad)
    stop = [ids(t) for t in spec.stop]
    assert generation.eos_token_id == (stop if len(stop) > 1 else stop[0])
    assert config.eos_token_id == (stop if spec.config_stop else ids(spec.eos))
    assert config.pad_token_id == generation.pad_token_id == tokenizer.pad_token_id
    assert config.bos_token_id == generation.bos_token_id == ids(spec.bos or spec.specials[0])
    assert ids(zoo.END_OF_TURN[family]) in stop
    # The tokenizer adds bos on encode exactly where the real one does.
    assert (tokenizer("Hello there").input_ids[0] == tokenizer.bos_token_id) is spec.add_bos


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_renders_with_markers_as_single_tokens(family, family_dirs):
    from jinja2.exceptions import TemplateError

    tokenizer = _tokenizer(family_dirs[family])
    markers = zoo.family_spec(family).markers
    for marker in markers:
        assert tokenizer(marker, add_special_tokens=False).input_ids == [tokenizer.convert_tokens_to_ids(marker)]
    for name, messages in CONVERSATIONS.items():
        if family == "mistral" and messages[0]["role"] == "system":
            with pytest.raises(TemplateError, match="Conversation roles must alternate"):
                zoo.render(tokenizer, messages, True)
            continue
        text = zoo.render(tokenizer, messages, True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        for marker in markers:
            assert text.count(marker) == ids.count(tokenizer.convert_tokens_to_ids(marker)), (name, marker)
        assert sum(text.count(marker) for marker in markers) >= 3
        assert tokenizer.decode(ids) == text or family == "phi3"  # phi3's markers swallow the "\n" after them
        for message in messages:
            assert message["content"] in text


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_template_quirks(family, family_dirs):
    tokenizer = _tokenizer(family_dirs[family])
    prompt = zoo.render(tokenizer, [USER], True)
    closed = zoo.render(tokenizer, [USER, ANSWER], False)
    # Every answer is closed by the family's end-of-turn marker.
    assert closed[closed.index(ANSWER["content"]) + len(ANSWER["content"]):].startswith(zoo.END_OF_TURN[family])
    ids = tokenizer(prompt).input_ids
    if family in ("llama3", "gemma", "mistral"):  # the rendering starts with bos and encoding adds one more
        assert prompt.startswith(tokenizer.bos_token) and ids[:2] == [tokenizer.bos_token_id] * 2
    else:  # no bos at all: none in the template, none added (Qwen has no bos token)
        assert tokenizer.bos_token is None or tokenizer.bos_token_id not in ids
    if family == "chatml":
        assert prompt.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    if family == "llama3":
        assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>" in prompt
        assert "<|eot_id|><|start_header_id|>" in closed + zoo.render(tokenizer, [USER], False)
    if family == "gemma":
        assert zoo.render(tokenizer, [SYSTEM, USER], True).startswith(
            f"<bos><start_of_turn>user\n{SYSTEM['content']}\n\n{USER['content']}<end_of_turn>\n")
    if family == "mistral":
        assert prompt == zoo.render(tokenizer, [USER], False) == f"<s>[INST] {USER['content']} [/INST]"
        assert zoo.render(tokenizer, [USER, ANSWER, USER2], True).count("</s>[INST]") == 1
    if family == "phi3":
        assert closed.endswith("<|end|>\n<|endoftext|>")
        assert zoo.render(tokenizer, [SYSTEM, USER], True).startswith(f"<|system|>\n{SYSTEM['content']}<|end|>\n")
        assert "\n" not in tokenizer.decode(tokenizer(prompt, add_special_tokens=False).input_ids)


PREFIX_STABLE = {"chatml": (True, True), "llama3": (True, True), "gemma": (True, True), "mistral": (True, True),
                 "phi3": (True, False)}


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_prefix_stability(family, family_dirs):
    tokenizer = _tokenizer(family_dirs[family])
    conversation = [USER, ANSWER, USER2, {"role": "assistant", "content": "answer: cat"}]
    assert zoo.prefix_stable(tokenizer, conversation) == PREFIX_STABLE[family]
    if family != "mistral":
        assert zoo.prefix_stable(tokenizer, [SYSTEM, *conversation]) == PREFIX_STABLE[family]


@pytest.mark.parametrize("arch", zoo.ARCHS)
def test_base_models_have_no_template_and_no_chat_markers(arch, tmp_path):
    from transformers import AutoConfig

    folder = zoo.build_base_model(tmp_path / f"base-{arch}", arch)
    tokenizer = _tokenizer(folder)
    config = AutoConfig.from_pretrained(folder)
    assert not tokenizer.chat_template and not (folder / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    assert not set(zoo.CHAT_MARKERS) & set(tokenizer.get_vocab())
    assert config.architectures == [zoo.MODEL_CLASSES[arch]] and config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token_id is not None and config.eos_token_id == tokenizer.eos_token_id


def test_unknown_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture"):
        zoo.build_base_model(tmp_path / "x", "gpt2")
    with pytest.raises(ValueError, match="unknown family"):
        zoo.build_family_model("vicuna", tmp_path / "y")
    assert zoo.build_base_model(tmp_path / "z", "chatml").joinpath("config.json").is_file()  # family -> its arch


@needs_llama_cpp
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_f16_gguf_tokenizes_and_runs_like_transformers(family, family_dirs, tmp_path):
    import numpy as np
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    from tunelab.config import ModelConfig
    from tunelab.export import llamacpp
    from tunelab.models import cache_root

    folder = family_dirs[family]
    gguf = tmp_path / f"{family}-f16.gguf"
    # tunelab's fallback knows GPT-2's split; Qwen's (chatml) must be named (see model_zoo's docstring).
    pre = llamacpp.pre_tokenizer_fallback(folder) or ("qwen2" if family == "chatml" else None)
    llamacpp.run_converter(cache_root(ModelConfig(name=str(folder))), "convert_hf_to_gguf.py",
                           [str(folder), "--outtype", "f16", "--outfile", str(gguf)], pre)

    tokenizer = _tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = zoo.render(tokenizer, [USER, ANSWER, USER2], True)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    llm = Llama(model_path=str(gguf), n_ctx=256, logits_all=True, verbose=False, n_threads=1, seed=0)
    try:
        assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        body = prompt.removeprefix(tokenizer.bos_token or "")
        assert llm.tokenize(body.encode(), add_bos=True, special=True) == tokenizer(body).input_ids
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() < 0.1  # measured 0.006-0.033 (f16 weights); logits have std ~1.6
    assert (got.argmax(-1) == want.argmax(-1)).all()
