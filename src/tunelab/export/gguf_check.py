"""Does a GGUF in real llama.cpp continue the run's prompts as transformers does? Greedy, token by token.

For every probe prompt (test rows rendered with the run's chat template) transformers greedily generates
`PROBE_TOKENS` tokens with the float32 reference model, keeping the logits of each step. llama.cpp then

- tokenizes the prompt text itself (as Ollama or llama-server would) and must get the same token ids;
- continues the prompt greedily on its own (free running): the common prefix with transformers is reported;
- scores transformers' continuation (teacher forced): at each step, is its top-1 transformers' token, and is
  it within transformers' top 5?

A float16 GGUF must reproduce the free-running continuation exactly. The one divergence accepted is at a
near tie: if transformers' two best logits at the diverging step are closer than `TIE_MARGIN`, float16
rounding may legitimately pick the other token, and everything after it is a different (equally valid)
continuation. Quantized GGUFs change the weights, so they must instead keep the teacher-forced top-1
agreement and the top-5 rate above per-quantization floors.

16 tokens cover the whole answer of short-answer tasks (the quickstart's answers are 12-16 tokens) and, for
longer answers, the part where a wrong template or a broken tensor shows first; beyond that a single
legitimate tie makes the two continuations unrelated, so longer comparisons measure chance, not the export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.chat import without_default_bos

PROBE_TOKENS = 16
TIE_MARGIN = 0.05
TOP_K = 5
# Floors for quantized files, teacher forced over all probe steps. On the quickstart run (SmolLM2-135M,
# 122 steps) q8_0 and q4_k_m both agreed at every step; the floors leave room for models with flatter
# distributions without letting a broken file (a wrong tensor layout scores near 0) through.
FLOORS = {"q8_0": (0.90, 0.98), "q4_k_m": (0.75, 0.95)}  # (top-1 agreement, within transformers' top 5)


@dataclass
class ProbeResult:
    prompt: str
    prompt_tokens: int
    tokenizer_match: bool
    reference_tokens: list[int]
    llama_tokens: list[int]
    common_prefix: int
    tie_at: int | None
    top1_hits: int
    top5_hits: int
    reference_text: str = ""
    llama_text: str = ""
    expected: str | None = None


@dataclass
class Verification:
    quant: str
    probes: list[ProbeResult] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(len(p.reference_tokens) for p in self.probes)

    @property
    def top1_agreement(self) -> float:
        return sum(p.top1_hits for p in self.probes) / max(self.steps, 1)

    @property
    def top5_rate(self) -> float:
        return sum(p.top5_hits for p in self.probes) / max(self.steps, 1)

    def failures(self) -> list[str]:
        bad_tokens = [i for i, p in enumerate(self.probes) if not p.tokenizer_match]
        if bad_tokens:
            return [f"llama.cpp tokenizes probe prompt(s) {bad_tokens} differently from transformers"]
        if self.quant == "f16":
            return [f"probe {i}: llama.cpp's greedy continuation leaves transformers' at token {p.common_prefix} "
                    f"of {len(p.reference_tokens)} (not a near tie)"
                    for i, p in enumerate(self.probes)
                    if p.common_prefix < len(p.reference_tokens) and p.tie_at is None]
        top1, top5 = FLOORS[self.quant]
        problems = []
        if self.top1_agreement < top1:
            problems.append(f"top-1 agreement with transformers {self.top1_agreement:.1%} < {top1:.0%}")
        if self.top5_rate < top5:
            problems.append(f"llama.cpp's top-1 within transformers' top {TOP_K} {self.top5_rate:.1%} < {top5:.0%}")
        return problems

    def _answered(self, side: str) -> int:
        return sum(p.expected is not None and getattr(p, side).strip() == p.expected.strip() for p in self.probes)

    def to_json(self) -> dict[str, Any]:
        return {
            "quant": self.quant, "probe_tokens": PROBE_TOKENS, "tie_margin": TIE_MARGIN,
            "criterion": ("identical greedy continuation (up to a near tie)" if self.quant == "f16" else
                          f"top-1 agreement >= {FLOORS[self.quant][0]}, top-1 within transformers' top {TOP_K} "
                          f">= {FLOORS[self.quant][1]}"),
            "passed": not self.failures(), "failures": self.failures(),
            "prompts": len(self.probes), "steps": self.steps,
            "tokenizer_match": all(p.tokenizer_match for p in self.probes),
            "exact_continuations": sum(p.common_prefix == len(p.reference_tokens) for p in self.probes),
            "near_ties": sum(p.tie_at is not None for p in self.probes),
            "top1_agreement": round(self.top1_agreement, 4), f"top{TOP_K}_rate": round(self.top5_rate, 4),
            # Informative only (answers longer than PROBE_TOKENS are cut): probes whose continuation is the
            # test row's reference answer, for transformers and for llama.cpp.
            "reference_answers": {"transformers": self._answered("reference_text"),
                                  "llama_cpp": self._answered("llama_text"),
                                  "of": sum(p.expected is not None for p in self.probes)},
            "probes": [vars(p) for p in self.probes],
        }


@dataclass
class Reference:
    """transformers' greedy continuation of one prompt, with the logits of each step."""
    prompt_ids: list[int]
    tokens: list[int]
    logits: Any  # [steps, vocab] float32


def reference_continuations(model: Any, tokenizer: Any, prompts: list[str]) -> list[Reference]:
    import torch

    eos = _eos_ids(model, tokenizer)
    refs = []
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=PROBE_TOKENS,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 eos_token_id=sorted(eos), pad_token_id=tokenizer.pad_token_id)
        tokens = out.sequences[0, ids.shape[1]:].tolist()
        logits = torch.stack(out.logits, dim=1)[0, :len(tokens)].float()
        refs.append(Reference(ids[0].tolist(), tokens, logits))
    return refs


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    from tunelab.families import stop_token_ids

    return set(stop_token_ids(tokenizer, model))


def open_llama(gguf: Path, lora: Path | None = None, n_ctx: int = 512, threads: int = 1) -> Any:
    """llama.cpp on one thread by default: its worker threads spin-wait, and on a busy 2-core machine two
    threads decoded SmolLM2 ~10x slower than one (0.62 s vs 0.066 s per token); the check is small anyway."""
    from llama_cpp import Llama

    return Llama(model_path=str(gguf), lora_path=str(lora) if lora else None, n_ctx=n_ctx, logits_all=True,
                 verbose=False, n_threads=threads, n_threads_batch=threads, seed=0)


def compare(llm: Any, quant: str, prompts: list[str], refs: list[Reference], eos: set[int], tokenizer: Any,
            expected: list[str | None]) -> Verification:
    import numpy as np

    result = Verification(quant)
    for text, ref, want in zip(prompts, refs, expected):
        # As llama-server and Ollama would: the runtime adds the bos itself where the GGUF says so.
        own_ids = llm.tokenize(without_default_bos(tokenizer, text).encode("utf-8"), add_bos=True, special=True)
        # Free running: llama.cpp continues the prompt greedily on its own.
        llm.reset()
        llm.eval(ref.prompt_ids)
        generated: list[int] = []
        for _ in range(PROBE_TOKENS):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            generated.append(token)
            if token in eos:
                break
            llm.eval([token])
        prefix = next((i for i, (a, b) in enumerate(zip(generated, ref.tokens)) if a != b),
                      min(len(generated), len(ref.tokens)))
        tie_at = None
        if prefix < len(ref.tokens):
            top2 = ref.logits[prefix].topk(2).values
            if float(top2[0] - top2[1]) < TIE_MARGIN:
                tie_at = prefix
        # Teacher forced: llama.cpp scores transformers' continuation step by step.
        llm.reset()
        llm.eval(ref.prompt_ids + ref.tokens[:-1])
        start = len(ref.prompt_ids) - 1
        top1 = top5 = 0
        for step, token in enumerate(ref.tokens):
            choice = int(np.argmax(llm.scores[start + step]))
            top1 += choice == token
            top5 += choice in set(ref.logits[step].topk(TOP_K).indices.tolist())
        result.probes.append(ProbeResult(
            prompt=text, prompt_tokens=len(ref.prompt_ids), tokenizer_match=list(own_ids) == ref.prompt_ids,
            reference_tokens=ref.tokens, llama_tokens=generated, common_prefix=prefix, tie_at=tie_at,
            top1_hits=top1, top5_hits=top5, expected=want,
            reference_text=tokenizer.decode(ref.tokens, skip_special_tokens=True),
            llama_text=tokenizer.decode(generated, skip_special_tokens=True)))
    return result
