"""`tunelab export gguf RUN`: a verified GGUF (f16, q8_0, q4_k_m) and an Ollama Modelfile, with llama.cpp's tools.

Merged model: fp32 merge (`export merge`, verified against the adapter) -> llama.cpp's converter to an f16
GGUF -> llama.cpp's quantizer when asked -> the GGUF, loaded in llama.cpp, must continue the run's own
prompts as transformers continues them with the fp32 merged model (see gguf_check for the criteria).

`--adapter-only`: the LoRA adapter alone as a GGUF LoRA (llama.cpp's convert_lora_to_gguf.py), checked as
llama.cpp base GGUF + LoRA against PEFT's base + adapter. The f16 base GGUF it needs is converted once into the
cache and named by the Modelfile's FROM.

Everything is written into a temporary folder renamed into place; a failed check writes only
`OUT.verification-failed.json` beside where the export would have gone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.artifacts import (
    RunPaths,
    atomic_dir,
    manifest,
    partial_path,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from tunelab.config import RunConfig
from tunelab.data.prepare import load_dataset
from tunelab.errors import ExportError
from tunelab.export import gguf_check, llamacpp
from tunelab.export.merge import merge_run, probe_prompts
from tunelab.export.modelfile import modelfile_text, reasoned_in_training, translate
from tunelab.models import cache_root, load_tokenizer, resolve_model
from tunelab.progress import console

QUANTS = ("f16", "q8_0", "q4_k_m")
ADAPTER_QUANTS = ("f16", "q8_0")  # what llama.cpp's LoRA converter writes


@dataclass
class GgufResult:
    folder: Path
    gguf: Path
    verification: dict[str, Any]
    seconds: float


def check_request(cfg: RunConfig, run: RunPaths, quant: str, adapter_only: bool) -> None:
    """Refuse impossible requests before any weights load."""
    if quant not in QUANTS:
        raise ExportError(f"--quant: expected one of {', '.join(QUANTS)}, got {quant!r}")
    if adapter_only:
        if cfg.method.type not in ("lora", "qlora"):
            raise ExportError(f"export gguf --adapter-only: {run.root} was trained with method '{cfg.method.type}'; "
                              "only LoRA adapters convert to a GGUF LoRA (export without --adapter-only instead)")
        if cfg.method.use_dora:
            raise ExportError(f"export gguf --adapter-only: {run.root} is a DoRA adapter, which llama.cpp cannot "
                              "apply; export without --adapter-only")
        if quant not in ADAPTER_QUANTS:
            raise ExportError(f"--quant {quant}: llama.cpp LoRA GGUFs are {' or '.join(ADAPTER_QUANTS)}")
        if not run.has_adapter:
            raise ExportError(f"export gguf: {run.root} has no trained adapter")
        from tunelab.vocab import token_layout

        if token_layout(run.adapter):
            raise ExportError(f"export gguf --adapter-only: {run.root}'s adapter adds chat-marker tokens to the "
                              "vocabulary, which a GGUF LoRA cannot carry; export without --adapter-only (the merged "
                              "model holds them)")
    elif cfg.method.type == "full":
        if not run.has_full_model:
            raise ExportError(f"export gguf: {run.root} has no trained model")
    llamacpp.installed_version()


def _as_llama_cpp_scales_it(adapter: Path, work: Path) -> Path:
    """The adapter folder to convert. llama.cpp scales a LoRA by alpha / r and its converter copies lora_alpha
    as it is, but rsLoRA scales by alpha / sqrt(r): converted as it is, the adapter would act sqrt(r) times too
    weakly. A copy with alpha * sqrt(r) (and rsLoRA off) gives llama.cpp the very scale PEFT uses."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    if not config.get("use_rslora"):
        return adapter
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ExportError("export gguf --adapter-only: an rsLoRA adapter with per-module ranks or alphas cannot be "
                          "given llama.cpp's single scale; export without --adapter-only")
    copy = work / "adapter-for-llama-cpp"
    shutil.copytree(adapter, copy)
    config.update(lora_alpha=config["lora_alpha"] * math.sqrt(config["r"]), use_rslora=False)
    write_json_atomic(copy / "adapter_config.json", config)
    return copy


def _trained_answers(run: RunPaths) -> Any:
    """The answers the run trained on (a preference row's chosen one, a KTO row's completion)."""
    for record in load_dataset(run.data).train:
        if record.kind == "chat":
            yield from (m["content"] for m in record.messages if m["role"] == "assistant")
        else:
            yield record.chosen or record.completion or ""


def export_gguf(cfg: RunConfig, run: RunPaths, quant: str, out: Path, adapter_only: bool = False,
                write_modelfile: bool = True) -> GgufResult:
    started = time.perf_counter()
    check_request(cfg, run, quant, adapter_only)
    trained = run.trained_for(cfg.method.type)
    tokenizer = load_tokenizer(trained)
    reasoned = write_modelfile and reasoned_in_training(tokenizer, _trained_answers(run))
    # An untranslatable template is refused up front.
    template = translate(tokenizer, prefill_opening=not reasoned) if write_modelfile else None
    cache = cache_root(cfg.model)
    probes = probe_prompts(cfg, run, tokenizer)
    prompts = [text for text, _ in probes]
    with atomic_dir(out) as tmp:
        work = tmp / ".work"
        if adapter_only:
            base_hf = resolve_model(cfg.model)
            base_gguf = base_model_gguf(cache, base_hf)
            gguf = tmp / f"adapter-{quant}.gguf"
            console.print(f"Converting the LoRA adapter to {gguf.name} ...")
            adapter = _as_llama_cpp_scales_it(run.adapter, work)
            llamacpp.run_converter(cache, "convert_lora_to_gguf.py",
                                   ["--base", str(base_hf), "--outtype", quant, "--outfile", str(gguf), str(adapter)])
            reference = _peft_model(base_hf, run.adapter)
            lora, model_file = gguf, base_gguf
        else:
            hf = _merged_folder(cfg, run, work)
            gguf = tmp / f"model-{quant}.gguf"
            _convert_merged(cache, hf, gguf, quant, work)
            reference = _hf_model(hf)
            lora, model_file = None, gguf
        console.print(f"Checking {gguf.name} in llama.cpp against transformers on {len(prompts)} probe prompts ...")
        refs = gguf_check.reference_continuations(reference, tokenizer, prompts)
        n_ctx = max(len(r.prompt_ids) for r in refs) + gguf_check.PROBE_TOKENS + 8
        llm = gguf_check.open_llama(model_file, lora, n_ctx=n_ctx)
        try:
            check = gguf_check.compare(llm, quant, prompts, refs, gguf_check._eos_ids(reference, tokenizer),
                                       tokenizer, [want for _, want in probes])
        finally:
            llm.close()
        del reference
        report = manifest("gguf", run=str(run.root.resolve()), base_model=cfg.model.name,
                          adapter_only=adapter_only, file=gguf.name, bytes=gguf.stat().st_size,
                          base_gguf=str(base_gguf) if adapter_only else None,
                          llama_cpp_python=llamacpp.installed_version(), **check.to_json())
        if check.failures():
            failed = out.with_name(f"{out.name}.verification-failed.json")
            write_json_atomic(failed, report)
            raise ExportError(f"export gguf: {gguf.name} failed its check in llama.cpp: {'; '.join(check.failures())} "
                              f"(details: {failed}); nothing was written")
        if template is not None:
            source = str(base_gguf) if adapter_only else f"./{gguf.name}"
            write_text_atomic(tmp / "Modelfile", modelfile_text(source, template, cfg.data.system_prompt,
                                                                gguf.name if adapter_only else None))
        shutil.rmtree(work, ignore_errors=True)
        report["seconds"] = round(time.perf_counter() - started, 1)
        write_json_atomic(tmp / "verification.json", report)
    return GgufResult(out, out / gguf.name, report, report["seconds"])


def _merged_folder(cfg: RunConfig, run: RunPaths, work: Path) -> Path:
    if cfg.method.type == "full":
        return run.model
    console.print("Merging the adapter in float32 (verified against the adapter) ...")
    return merge_run(cfg, run, work / "merged").folder


def _convert_merged(cache: Path, hf: Path, gguf: Path, quant: str, work: Path) -> None:
    f16 = gguf if quant == "f16" else work / "model-f16.gguf"
    console.print(f"Converting to {f16.name} with llama.cpp's converter ...")
    work.mkdir(parents=True, exist_ok=True)
    llamacpp.run_converter(cache, "convert_hf_to_gguf.py", [str(hf), "--outtype", "f16", "--outfile", str(f16),
                                                            "--model-name", gguf_model_name(hf)],
                           llamacpp.pre_tokenizer_fallback(hf))
    if quant != "f16":
        console.print(f"Quantizing to {quant} with llama.cpp's quantizer ...")
        llamacpp.quantize(f16, gguf, quant)
        f16.unlink()


def gguf_model_name(hf: Path) -> str:
    """The GGUF's general.name: the folder's name and its model type. llama.cpp reads family behaviour from it
    (Phi-3's special tokens swallow the whitespace after them only when the name says phi3), and the folder
    an export converts from is a work folder named `merged`."""
    model_type = json.loads((hf / "config.json").read_text()).get("model_type", "")
    return f"{hf.name}-{model_type}" if model_type else hf.name


def base_model_gguf(cache: Path, base_hf: Path) -> Path:
    """The base model as an f16 GGUF, converted once per base weights (keyed by their hash) into the cache."""
    weights = sorted(base_hf.glob("*.safetensors"))
    key = sha256_file(weights[0])[:16] if weights else base_hf.name
    target = cache / "gguf" / f"{base_hf.name}-{key}-f16.gguf"
    if not target.is_file():
        console.print("Converting the base model to an f16 GGUF (once) ...")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(target)
        try:
            llamacpp.run_converter(cache, "convert_hf_to_gguf.py",
                                   [str(base_hf), "--outtype", "f16", "--outfile", str(partial),
                                    "--model-name", gguf_model_name(base_hf)],
                                   llamacpp.pre_tokenizer_fallback(base_hf))
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def _hf_model(folder: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _peft_model(base: Path, adapter: Path) -> Any:
    from tunelab.vocab import attach_adapter

    return attach_adapter(_hf_model(base), adapter).eval()
