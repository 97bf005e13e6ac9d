"""`tunelab export merge RUN`: fold the adapter into the base weights, verified, into a plain HF folder.

The merge always happens in float32 on a full-precision base (for QLoRA too: requantizing a merged model
garbles a lightly trained adapter), and the result must reproduce the adapter's logits on probe prompts
within `max_diff` before it is cast to the requested dtype and written. Peers' users report "merged model
worse than adapter" more than almost anything; here it cannot happen silently.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.artifacts import RunPaths, atomic_dir, manifest, write_json_atomic
from tunelab.chat import render_prompt, with_system_prompt
from tunelab.config import RunConfig
from tunelab.data.prepare import load_dataset
from tunelab.errors import ExportError
from tunelab.families import stop_token_ids
from tunelab.models import Precision, load_model, load_tokenizer, resolve_model

MERGEABLE = ("lora", "qlora", "ia3")


def check_out(out: Path, run: RunPaths, overwrite: bool, base: Path | None = None) -> None:
    """Refuse an export folder that would replace something: an existing, non-empty `out` without --overwrite,
    and, even with it, the run folder itself (or a parent of it), the base model's folder `base` (the next merge
    would fold the adapter in twice), the working folder or a parent, root, home; and one that cannot be made."""
    from tunelab.config import unsafe_output_dir

    target = out.expanduser().resolve()
    if target == run.root.resolve() or target in run.root.resolve().parents:
        raise ExportError(f"--out: {out} holds the run folder {run.root}; choose a new folder")
    for part in (run.adapter, run.model, run.data, run.eval, run.checkpoints):  # what the export reads, or the run
        own = part.expanduser().resolve()
        if target == own or own in target.parents:
            raise ExportError(f"--out: {out} is inside the run's own {part.name}/ folder, which --overwrite would "
                              f"replace; choose a new folder (default: {run.root / 'export'}/...)")
    where = unsafe_output_dir(out)
    if where:
        raise ExportError(f"--out: {out} is {where}; choose a new folder")
    if out.is_symlink():
        raise ExportError(f"--out: {out} is a link; choose a new folder (or the folder it points to)")
    if out.is_file():
        raise ExportError(f"--out: {out} is a file; choose a new folder")
    if base is not None and (target == base.resolve() or base.resolve() in target.parents):
        raise ExportError(f"--out: {out} holds the base model {base} the run was trained on; choose a new folder")
    above = next((p for p in target.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ExportError(f"--out: {out} is under {above}, which is a file; choose a new folder")
    if above is not None and not os.access(above, os.W_OK | os.X_OK):
        raise ExportError(f"--out: {out} cannot be created: {above} is not writable; choose a new folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out: {out} already exists and is not empty; choose a new folder or pass --overwrite "
                          "to replace it")


@dataclass
class MergeResult:
    folder: Path
    max_diff: float
    reload_diff: float
    dtype: str


def probe_prompts(cfg: RunConfig, run: RunPaths, tokenizer: Any, n: int = 8) -> list[tuple[str, str | None]]:
    """Prompts the model will really see, with their reference answers: test (or train) rows rendered with
    the run's template and system prompt."""
    dataset = load_dataset(run.data)
    rows = [r for r in (dataset.test or dataset.train) if r.kind != "text"][:n]
    probes = [(render_prompt(tokenizer, with_system_prompt(r.messages[:-1] if r.kind == "chat" else r.messages,
                                                           cfg.data.system_prompt)),
               r.messages[-1]["content"] if r.kind == "chat" else r.chosen) for r in rows]
    return probes or [("Hello, how are you?", None)]


def probe_batch(cfg: RunConfig, run: RunPaths, tokenizer: Any, n: int = 8) -> dict[str, Any]:
    """The probe prompts as one right-padded batch."""
    texts = [text for text, _ in probe_prompts(cfg, run, tokenizer, n)]
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side


def _max_diff(a: Any, b: Any, mask: Any) -> float:
    return float(((a.float() - b.float()).abs() * mask[..., None]).max())


def save_chat_tokenizer(cfg: RunConfig, tokenizer: Any, folder: Path) -> None:
    """An exported folder's tokenizer and chat template. A run trained with `data.system_prompt` gets a template
    that adds it to a conversation that brings no system message, as `tunelab serve` does for the adapter:
    whatever serves the folder (vLLM, TGI, transformers' apply_chat_template, llama.cpp) prompts the model as it
    was trained, not with a prompt it never saw."""
    trained_with = tokenizer.chat_template
    if cfg.data.system_prompt:
        tokenizer.chat_template = with_default_system(trained_with, cfg.data.system_prompt)
    try:
        tokenizer.save_pretrained(folder)
        (folder / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    finally:
        tokenizer.chat_template = trained_with


def with_default_system(template: str, system_prompt: str) -> str:
    """`template`, preceded by a step that puts `system_prompt` first when the conversation has no system message.
    The prompt is a JSON string, which is also a valid Jinja string literal (Jinja's lexer reads a literal whole,
    so template delimiters inside it are plain text)."""
    literal = json.dumps(system_prompt, ensure_ascii=False)
    return ("{%- if not messages or messages[0]['role'] != 'system' -%}\n"
            f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages -%}}\n"
            "{%- endif -%}\n" + template)


def keep_base_tokenizer_files(base: Path, out: Path, vocab_size: int) -> None:
    """Give a merged folder the tokenizer files its base shipped that transformers does not write back: the
    SentencePiece `tokenizer.model` (when training added no tokens) and the declared `tokenizer_class`, which
    llama.cpp's converter reads to pick a vocabulary reader (Phi-3's insists on one of the two)."""
    sentencepiece = base / "tokenizer.model"
    base_config = base / "tokenizer_config.json"
    if sentencepiece.is_file() and not (out / "tokenizer.model").exists():
        from transformers import AutoConfig

        if vocab_size <= AutoConfig.from_pretrained(base).get_text_config().vocab_size:
            shutil.copy(sentencepiece, out / "tokenizer.model")
    if base_config.is_file() and (out / "tokenizer_config.json").is_file():
        declared = json.loads(base_config.read_text(encoding="utf-8")).get("tokenizer_class")
        written = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
        if declared and written.get("tokenizer_class") != declared:
            written["tokenizer_class"] = declared
            write_json_atomic(out / "tokenizer_config.json", written)


def merge_run(cfg: RunConfig, run: RunPaths, out: Path, dtype: str = "float32", max_diff: float = 1e-3) -> MergeResult:
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.vocab import attach_adapter

    if cfg.method.type == "full":
        raise ExportError(f"export merge: {run.root} is a full fine-tune; {run.model} is already a merged model")
    if cfg.method.type not in MERGEABLE:
        raise ExportError(f"export merge: {cfg.method.type} adds virtual tokens and cannot be folded into the weights; "
                          "serve the adapter instead")
    if not run.has_adapter:
        raise ExportError(f"export merge: {run.root} has no trained adapter")
    fp32 = Precision("cpu", None, torch.float32)
    tokenizer = load_tokenizer(run.adapter)
    base_folder = resolve_model(cfg.model)
    model = attach_adapter(load_model(base_folder, fp32), run.adapter).eval()
    batch = probe_batch(cfg, run, tokenizer)
    mask = batch["attention_mask"]
    with torch.no_grad():
        adapter_logits = model(**batch).logits
        merged = model.merge_and_unload().eval()
        merged_logits = merged(**batch).logits
    diff = _max_diff(adapter_logits, merged_logits, mask)
    if not diff <= max_diff:  # NaN too: a merge that produces NaN logits is not "within" anything
        raise ExportError(f"export merge: merged logits differ from the adapter's by {diff:.2e} (> {max_diff:.0e}) "
                          "on probe prompts; nothing was written")
    target = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    # Whatever loads the folder (transformers' generate, vLLM, TGI) stops where eval and `tunelab serve` stop: at
    # the template's end of turn too, not only at the base's eos (a base model given a template lacks it).
    merged.generation_config.eos_token_id = stop_token_ids(tokenizer, merged)
    with atomic_dir(out) as tmp:
        merged.to(target).save_pretrained(tmp)
        save_chat_tokenizer(cfg, tokenizer, tmp)
        keep_base_tokenizer_files(base_folder, tmp, len(tokenizer))
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        with torch.no_grad():
            reload_diff = _max_diff(adapter_logits, reloaded(**batch).logits, mask)
        # Casting to 16 bits moves logits by more than the merge itself; the float32 export must be exact.
        if dtype == "float32" and not reload_diff <= max_diff:
            raise ExportError(f"export merge: the saved model reloads with logits {reload_diff:.2e} away from "
                              "the adapter's; nothing was written")
        write_json_atomic(tmp / "tunelab_export.json", manifest(
            "merged", run=str(run.root.resolve()), base_model=cfg.model.name, dtype=dtype,
            probe_prompts=int(mask.shape[0]), merge_max_logit_diff=diff, reload_max_logit_diff=reload_diff))
    return MergeResult(out, diff, reload_diff, dtype)
