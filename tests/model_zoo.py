"""Tiny random models of five architectures, each with its family's real chat template and special tokens.

Built in code, nothing downloaded: a 2-layer model (hidden 64, 4 heads / 2 kv heads, init std 0.2) and a
byte-level BPE tokenizer (400 ids) trained on a small corpus, saved as a normal Hugging Face folder:
model.safetensors, config.json, generation_config.json, tokenizer.json, tokenizer_config.json and
chat_template.jinja (transformers 5 saves the template there, not inside tokenizer_config.json).

    FAMILIES, ARCHS                the five chat families and the architecture each uses, in the same order
    build_family_model(family, folder, seed=0) -> folder    instruct model: real template + marker tokens
    build_base_model(folder, arch="llama", seed=0) -> folder  base model: no template, no chat markers
    END_OF_TURN[family]            the text an assistant answer ends with in that family's template
    CHAT_MARKERS                   every family's chat marker texts (none is in a base model's vocabulary)
    render(tokenizer, messages, generation_prompt)            the template, as tunelab applies it
    prefix_stable(tokenizer, messages) -> (generation, append)  see "Prefix stability" below

The templates in tests/templates/ are byte-exact copies of the official ones (tests/templates/SOURCES.md).

family   architecture        template of                         bos / eos / pad; bos added on encode; tied
chatml   Qwen2ForCausalLM    Qwen2.5-*-Instruct                  - / <|im_end|> / <|endoftext|>; no; tied
llama3   LlamaForCausalLM    Llama-3.1-8B-Instruct               <|begin_of_text|> / <|eot_id|> /
                                                                 <|finetune_right_pad_id|>; yes; untied
gemma    Gemma3ForCausalLM   gemma-3-*-it                        <bos> / <eos> / <pad>; yes; tied
mistral  MistralForCausalLM  Mistral-7B-Instruct-v0.2, Mixtral   <s> / </s> / <unk>; yes; untied
phi3     Phi3ForCausalLM     Phi-3-mini-4k-instruct              <s> / <|endoftext|> / <|endoftext|>; no; untied
generation_config.eos_token_id (stop ids) as the real models: chatml [<|im_end|>, <|endoftext|>]; llama3
[<|end_of_text|>, <|eom_id|>, <|eot_id|>] (also config.json's); gemma [<eos>, <end_of_turn>] (also config's);
mistral </s>; phi3 [<|endoftext|>, <|assistant|>, <|end|>].

Template quirks (checked by tests/test_model_zoo.py; code that applies templates must cope with them):
- chatml: with no system message the template writes Qwen's default one ("You are Qwen, created by Alibaba
  Cloud. ..."). The "\n" after <|im_end|> is template text, never generated.
- llama3: the rendering starts with the bos text <|begin_of_text|> AND the tokenizer adds bos on encode:
  tokenizing a rendering with add_special_tokens=True gives two bos tokens. A system header is always
  written ("Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" + system text, empty
  without one); the date is the template's default, so renderings are deterministic. Contents are trimmed
  (`| trim`). <|eot_id|> is directly followed by the next <|start_header_id|> (no whitespace between).
- gemma: starts with <bos> (double bos on encode, as llama3). No system turn: the system text + "\n\n"
  opens the first user turn. The assistant role is written "model". Roles must alternate after the optional
  system message (raise_exception otherwise). Contents are trimmed.
- mistral: the v0.1/v0.2 [INST] template (Mixtral-8x7B-Instruct-v0.1 ships the same): a system message
  RAISES ("Conversation roles must alternate ..."), roles must alternate, and add_generation_prompt changes
  nothing (the prompt ends with " [/INST]"). The answer follows [/INST] directly and ends with eos_token
  </s>, directly followed by the next "[INST]". Starts with <s> (double bos on encode). [INST]/[/INST] are
  single special tokens here, as in v0.3's vocabulary (v0.1/v0.2 spelled them with ordinary pieces).
- phi3: the current Phi-3-mini-4k-instruct template: system turns are written (<|system|>); without a
  generation prompt the rendering ENDS with eos_token <|endoftext|> after the last "<|end|>\n". As in the
  real Phi-3 tokenizer, </s> and the four chat markers are rstrip tokens: the "\n" the template writes
  after each of them is swallowed when tokenizing (it is in the text, not in the ids).

Prefix stability, `prefix_stable` (for assistant-only loss masks built from renderings):
- "generation": render(messages[:i], generation prompt) is a prefix of render(messages[:i+1]) for every
  assistant message i: true for all five.
- "append": render(messages[:i+1]) is a prefix of render(messages) for every i: true for chatml, llama3,
  gemma, mistral; FALSE for phi3 (a closed conversation's trailing <|endoftext|> is gone once a turn follows).

Tokenizers and llama.cpp's converter (tests/test_model_zoo.py converts each to an f16 GGUF and compares):
- chatml uses Qwen's own pre-tokenizer (NFC, Qwen's split regex, byte-level): transformers 5 loads every
  qwen2 folder's tokenizer as Qwen2Tokenizer, which rebuilds that pipeline whatever tokenizer.json says.
  llama.cpp's converter does not know this tiny vocabulary's hash and tunelab's pre_tokenizer_fallback only
  answers "gpt-2", so it needs pre-tokenizer "qwen2" given explicitly (then tokens and logits match).
- the others use GPT-2's split and no normalizer, which tunelab's fallback maps to "gpt-2". Gemma, Mistral
  and Phi-3 ship SentencePiece; without a tokenizer.model the converter takes this BPE as a gpt2 vocab (for
  Llama/Mistral by the path it uses for Llama 3). Phi3's converter insists on tokenizer.model unless
  tokenizer_class is GPT2Tokenizer (as Phi-4, also Phi3ForCausalLM, ships), so phi3's tokenizer_config.json
  says GPT2Tokenizer (transformers 5 still loads it from tokenizer.json as TokenizersBackend).
- llama.cpp gives Phi-3's special tokens their rstrip only when the GGUF's general.name contains "phi3" or
  "phi-3", which the converter takes from config _name_or_path or else the FOLDER NAME: a phi3 model
  converted from a folder named e.g. "merged" keeps the "\n" after each marker as a token, unlike
  transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).parent / "templates"
FAMILIES = ("chatml", "llama3", "gemma", "mistral", "phi3")
ARCHS = ("qwen2", "llama", "gemma3", "mistral", "phi3")  # the architecture each family above uses, in order

END_OF_TURN: dict[str, str] = {
    "chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": "</s>", "phi3": "<|end|>",
}

CHAT_MARKERS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<start_of_turn>", "<end_of_turn>", "[INST]", "[/INST]", "<|system|>", "<|user|>", "<|assistant|>",
                "<|end|>")

# Byte-level BPE training text: enough words that prompts are not all single bytes.
CORPUS = [
    "Extract the animal from the sentence.", "The quick brown fox jumps over the lazy dog.",
    "answer: cat", "answer: dog", "answer: fox", "answer: owl", "I saw a cat near the river today.",
    "What is two plus two? Four.", "Hello there, how are you?", "system user assistant model",
    "You are a helpful assistant. Answer briefly.", "Name the animal in the sentence.",
    "Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?'\"-()[]{}",
]


@dataclass(frozen=True)
class Spec:
    """What a tiny model copies from the real family: special tokens (the first ids, in this order), which of
    them are bos/eos/pad/unk, the end ids generation stops at, embedding tying, and whether the tokenizer
    puts bos in front of every encoded text."""

    arch: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None
    stop: tuple[str, ...]  # generation_config.eos_token_id
    add_bos: bool
    tie: bool
    markers: tuple[str, ...] = ()  # chat marker texts the template writes
    config_stop: bool = False  # config.json's eos_token_id is the whole stop list (else the tokenizer's eos)
    rstrip: tuple[str, ...] = ()  # special tokens that swallow the whitespace after them (Phi-3's markers)


_FAMILY_SPECS: dict[str, Spec] = {
    # Qwen2.5-Instruct: bos_token null (config.bos_token_id is <|endoftext|>), eos <|im_end|>, pad <|endoftext|>.
    "chatml": Spec("qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>",
                   "<|endoftext|>", None, ("<|im_end|>", "<|endoftext|>"), False, True,
                   ("<|im_start|>", "<|im_end|>")),
    # Llama 3.1 Instruct: eos <|eot_id|>; generation stops at end_of_text, eom_id, eot_id; no pad of its own,
    # <|finetune_right_pad_id|> is the reserved one Meta's recipes pad with.
    "llama3": Spec("llama", ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                             "<|python_tag|>"),
                   "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", None,
                   ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), True, False,
                   ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), True),
    # Gemma 3 it: ids 0-3 are pad, eos, bos, unk; generation stops at <eos> and <end_of_turn>.
    "gemma": Spec("gemma3", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
                  "<bos>", "<eos>", "<pad>", "<unk>", ("<eos>", "<end_of_turn>"), True, True,
                  ("<bos>", "<start_of_turn>", "<end_of_turn>"), True),
    # Mistral 7B Instruct: <unk> <s> </s> are ids 0-2 ([INST]/[/INST] are 3-4 in v0.3); no pad token, <unk>
    # is the usual choice.
    "mistral": Spec("mistral", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>", "<unk>", "<unk>",
                    ("</s>",), True, False, ("<s>", "[INST]", "[/INST]", "</s>")),
    # Phi-3 mini: bos <s> is not added on encode; eos and pad <|endoftext|>; generation stops at
    # <|endoftext|>, <|assistant|> and <|end|>.
    "phi3": Spec("phi3", ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>",
                          "<|user|>"),
                 "<s>", "<|endoftext|>", "<|endoftext|>", "<unk>", ("<|endoftext|>", "<|assistant|>", "<|end|>"),
                 False, False, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
                 rstrip=("</s>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")),
}

# Base models: the family's non-chat specials only (what the real base checkpoints call bos/eos/pad).
_BASE_SPECS: dict[str, Spec] = {
    "qwen2": Spec("qwen2", ("<|endoftext|>",), None, "<|endoftext|>", "<|endoftext|>", None,
                  ("<|endoftext|>",), False, True),
    "llama": Spec("llama", ("<|begin_of_text|>", "<|end_of_text|>"), "<|begin_of_text|>", "<|end_of_text|>",
                  None, None, ("<|end_of_text|>",), True, False),
    "gemma3": Spec("gemma3", ("<pad>", "<eos>", "<bos>", "<unk>"), "<bos>", "<eos>", "<pad>", "<unk>",
                   ("<eos>",), True, True),
    "mistral": Spec("mistral", ("<unk>", "<s>", "</s>"), "<s>", "</s>", None, "<unk>", ("</s>",), True, False),
    "phi3": Spec("phi3", ("<unk>", "<s>", "</s>", "<|endoftext|>"), "<s>", "<|endoftext|>", "<|endoftext|>",
                 "<unk>", ("<|endoftext|>",), False, False, rstrip=("</s>",)),
}
_ARCH_ALIASES = {"chatml": "qwen2", "qwen": "qwen2", "llama3": "llama", "gemma": "gemma3"}


def family_spec(family: str) -> Spec:
    if family not in _FAMILY_SPECS:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    return _FAMILY_SPECS[family]


def chat_template(family: str) -> str:
    return (TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")


def build_tokenizer(spec: Spec, folder: Path, template: str | None):
    """A byte-level BPE trained on CORPUS whose first ids are the spec's special tokens, saved to `folder`.

    Qwen2 folders get Qwen's own pipeline (NFC, Qwen's split regex, byte-level): transformers 5 loads any
    qwen2 model's tokenizer as Qwen2Tokenizer, which rebuilds that pipeline whatever tokenizer.json says, so
    anything else would tokenize differently after a reload. The others get GPT-2's split and no normalizer
    (llama.cpp's "gpt-2" pre-tokenizer, which tunelab's export recognises), loaded as TokenizersBackend."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    if spec.arch == "qwen2":
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        core.normalizer = normalizers.NFC()
        core.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(spec.specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS, trainer=trainer)
    if spec.rstrip:
        trained = json.loads(core.to_str())
        for added in trained["added_tokens"]:
            added["rstrip"] = added["content"] in spec.rstrip
        core = Tokenizer.from_str(json.dumps(trained))
    named = {spec.bos, spec.eos, spec.pad, spec.unk}
    kwargs = dict(bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad, unk_token=spec.unk,
                  additional_special_tokens=[t for t in spec.specials if t not in named])
    if spec.arch == "qwen2":
        from transformers import Qwen2Tokenizer

        trained = json.loads(core.to_str())["model"]
        tokenizer = Qwen2Tokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]], **kwargs)
    else:
        if spec.add_bos:
            core.post_processor = processors.TemplateProcessing(
                single=f"{spec.bos}:0 $A:0", pair=f"{spec.bos}:0 $A:0 {spec.bos}:1 $B:1",
                special_tokens=[(spec.bos, core.token_to_id(spec.bos))])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **kwargs)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    _fix_tokenizer_config(folder, spec)
    return tokenizer


def _fix_tokenizer_config(folder: Path, spec: Spec) -> None:
    """Record add_bos_token/add_eos_token as the real tokenizer_config.json does (llama.cpp's converter reads
    them into the GGUF's add_bos flag), and the class name llama.cpp's converter expects."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["add_bos_token"] = spec.add_bos
    config["add_eos_token"] = False
    if spec.arch == "phi3":
        # llama.cpp's Phi3 converter reads tokenizer.model (SentencePiece, as Phi-3 ships) unless the class is
        # GPT2Tokenizer (as Phi-4, also Phi3ForCausalLM, ships). transformers 5 loads a phi3 folder as
        # TokenizersBackend from tokenizer.json either way.
        config["tokenizer_class"] = "GPT2Tokenizer"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _config(spec: Spec, tokenizer: Any):
    """The architecture's config at tiny size, with the family's special ids."""
    import transformers

    ids = {name: tokenizer.convert_tokens_to_ids(tok) if tok else None
           for name, tok in (("bos", spec.bos), ("pad", spec.pad))}
    stop = [tokenizer.convert_tokens_to_ids(t) for t in spec.stop]
    eos = stop if spec.config_stop and len(stop) > 1 else tokenizer.convert_tokens_to_ids(spec.eos)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=512,
        bos_token_id=ids["bos"] if ids["bos"] is not None else tokenizer.convert_tokens_to_ids(spec.specials[0]),
        eos_token_id=eos, pad_token_id=ids["pad"],
        tie_word_embeddings=spec.tie,
    )
    if spec.arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if spec.arch == "llama":
        # Llama 3.1's rope: theta 500000 and "llama3" frequency scaling (with a small original context, so
        # the scaling changes frequencies at this head size and the converter's rope_freqs path is exercised).
        return transformers.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if spec.arch == "gemma3":
        return transformers.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=512)
    if spec.arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if spec.arch == "phi3":
        return transformers.Phi3Config(**common)
    raise ValueError(f"unknown architecture {spec.arch!r}; expected one of {', '.join(ARCHS)}")


MODEL_CLASSES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM",
                  "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM"}


def _build(spec: Spec, folder: Path, template: str | None, seed: int) -> Path:
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec, folder, template)
    config = _config(spec, tokenizer)
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[spec.arch])(config)
    stop = [tokenizer.convert_tokens_to_ids(t) for t in spec.stop]
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=stop[0] if len(stop) == 1 else stop,
        pad_token_id=config.pad_token_id)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def build_family_model(family: str, folder: Path, seed: int = 0) -> Path:
    """A tiny instruct model of `family`: its architecture, special tokens and official chat template."""
    return _build(family_spec(family), folder, chat_template(family), seed)


def build_base_model(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny base model: no chat template and no chat marker token in its vocabulary. `arch` is one of ARCHS
    (a family name is accepted for its architecture)."""
    arch = _ARCH_ALIASES.get(arch, arch)
    if arch not in _BASE_SPECS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    return _build(_BASE_SPECS[arch], folder, None, seed)


def render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def prefix_stable(tokenizer: Any, messages: list[dict]) -> tuple[bool, bool]:
    """(generation, append): is the prompt with a generation prompt a prefix of the rendering with each
    assistant answer; is the rendering of each leading part of the conversation a prefix of the whole."""
    generation = all(
        render(tokenizer, messages[: i + 1], False).startswith(render(tokenizer, messages[:i], True))
        for i, m in enumerate(messages) if m["role"] == "assistant")
    whole = render(tokenizer, messages, False)
    append = all(whole.startswith(render(tokenizer, messages[: i + 1], False))
                 for i, m in enumerate(messages) if m["role"] != "system")
    return generation, append
