"""`tunelab export int4 RUN`: the merged model in bitsandbytes 4-bit NF4, for transformers and vLLM.

bitsandbytes is the 4-bit format both load without extra tools: `save_pretrained` writes the packed NF4
weights with a `quantization_config` in config.json, and a plain `AutoModelForCausalLM.from_pretrained(folder)`
(or vLLM's bitsandbytes loader) quantizes nothing again. The export merges in float32 first (export merge,
verified against the adapter), quantizes, saves, reloads the saved folder the way a consumer would, and
compares that reloaded model with the float32 merged model on the run's own prompts: greedy continuations and
teacher-forced top-1 agreement, with the floors used for llama.cpp's q4_k_m.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.artifacts import RunPaths, atomic_dir, manifest, write_json_atomic
from tunelab.config import RunConfig
from tunelab.errors import ExportError
from tunelab.export import gguf_check
from tunelab.export.merge import merge_run, probe_prompts, save_chat_tokenizer
from tunelab.models import load_tokenizer
from tunelab.progress import console

FLOORS = gguf_check.FLOORS["q4_k_m"]  # (top-1 agreement, within the float32 model's top 5)


@dataclass
class Int4Result:
    folder: Path
    report: dict[str, Any]


def export_int4(cfg: RunConfig, run: RunPaths, out: Path) -> Int4Result:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    started = time.perf_counter()
    try:
        import bitsandbytes  # noqa: F401 - only to fail early with a clear message
    except ImportError:
        raise ExportError("export int4 needs bitsandbytes (pip install bitsandbytes==0.50.2)") from None
    trained = run.trained_for(cfg.method.type)
    tokenizer = load_tokenizer(trained)
    prompts = [text for text, _ in probe_prompts(cfg, run, tokenizer)]
    with atomic_dir(out) as tmp:
        work = tmp / ".work"
        if cfg.method.type == "full":
            merged_dir = trained
        else:
            console.print("Merging the adapter in float32 (verified against the adapter) ...")
            merged_dir = merge_run(cfg, run, work / "merged").folder
        console.print("Quantizing to bitsandbytes NF4 (double quantization) ...")
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        # bf16 for what stays unquantized (embeddings, norms): in fp32 the tied embeddings alone would outweigh
        # every 4-bit layer of a small model.
        model = AutoModelForCausalLM.from_pretrained(merged_dir, quantization_config=quant, device_map="cpu",
                                                     dtype=torch.bfloat16)
        model.save_pretrained(tmp)
        save_chat_tokenizer(cfg, tokenizer, tmp)
        del model
        console.print("Reloading the saved folder with plain from_pretrained and comparing with float32 ...")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, device_map="cpu").eval()
        packed = sum(type(m).__name__ == "Linear4bit" for m in reloaded.modules())
        if not packed:
            raise ExportError("export int4: the saved folder reloads without 4-bit layers; nothing was written")
        reference = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        refs = gguf_check.reference_continuations(reference, tokenizer, prompts)
        agreement = compare_hf(reloaded, refs, tokenizer)
        del reference, reloaded
        shutil.rmtree(work, ignore_errors=True)
        bytes_on_disk = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        report = manifest("int4", run=str(run.root.resolve()), base_model=cfg.model.name,
                          format="bitsandbytes nf4, double quantization, bf16 compute and unquantized weights",
                          linear4bit_layers=packed,
                          weights_bytes=bytes_on_disk, **agreement)
        failures = []
        if agreement["top1_agreement"] < FLOORS[0]:
            failures.append(f"top-1 agreement with float32 {agreement['top1_agreement']:.1%} < {FLOORS[0]:.0%}")
        if agreement["top5_rate"] < FLOORS[1]:
            failures.append(f"top-1 within float32's top 5 {agreement['top5_rate']:.1%} < {FLOORS[1]:.0%}")
        report.update(passed=not failures, failures=failures, seconds=round(time.perf_counter() - started, 1))
        if failures:
            failed = out.with_name(f"{out.name}.verification-failed.json")
            write_json_atomic(failed, report)
            raise ExportError(f"export int4: the 4-bit model drifts too far from float32: {'; '.join(failures)} "
                              f"(details: {failed}); nothing was written")
        write_json_atomic(tmp / "tunelab_export.json", report)
    return Int4Result(out, report)


def compare_hf(model: Any, refs: list[gguf_check.Reference], tokenizer: Any) -> dict[str, Any]:
    """The 4-bit model against float32 continuations: free-running greedy prefix and teacher-forced top-1."""
    import torch

    steps = top1 = top5 = exact = 0
    for ref in refs:
        ids = torch.tensor([ref.prompt_ids + ref.tokens[:-1]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(ref.prompt_ids) - 1:].float()
            own = model.generate(torch.tensor([ref.prompt_ids]), max_new_tokens=len(ref.tokens), do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(ref.prompt_ids):].tolist()
        choices = logits.argmax(-1).tolist()
        steps += len(ref.tokens)
        top1 += sum(c == t for c, t in zip(choices, ref.tokens))
        top5 += sum(c in set(ref.logits[i].topk(gguf_check.TOP_K).indices.tolist()) for i, c in enumerate(choices))
        exact += own[:len(ref.tokens)] == ref.tokens
    return {"prompts": len(refs), "steps": steps, "exact_continuations": exact,
            "top1_agreement": round(top1 / max(steps, 1), 4), "top5_rate": round(top5 / max(steps, 1), 4)}
