"""Does an exported GGUF still do the run's task? Held-out exact match in llama.cpp, greedy, by hand:

    python bench/gguf_task.py runs/quickstart runs/quickstart/export/gguf-q4_k_m/model-q4_k_m.gguf [--lora X.gguf]

Prompts are the run's test split rendered with its chat template and system prompt (as eval renders them);
llama.cpp tokenizes the text itself, as Ollama or llama-server would. Compare with the tuned model's exact
match in RUN/eval/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tunelab.chat import render_prompt, with_system_prompt, without_default_bos
from tunelab.config_file import load_run_config
from tunelab.data.prepare import load_dataset
from tunelab.export import gguf_check
from tunelab.families import stop_token_ids
from tunelab.models import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--lora", type=Path)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    cfg, run = load_run_config(args.run)
    tokenizer = load_tokenizer(run.adapter)
    rows = [r for r in load_dataset(run.data).test if r.kind == "chat"]
    llm = gguf_check.open_llama(args.gguf, args.lora, n_ctx=1024, threads=args.threads)
    eos = set(stop_token_ids(tokenizer))  # the template's end of turn too, as eval stops
    hits, started = 0, time.perf_counter()
    for row in rows:
        text = render_prompt(tokenizer, with_system_prompt(row.messages[:-1], cfg.data.system_prompt))
        llm.reset()
        # llama.cpp adds the bos itself where the GGUF says so, as llama-server and Ollama do.
        llm.eval(llm.tokenize(without_default_bos(tokenizer, text).encode(), add_bos=True, special=True))
        out: list[int] = []
        while len(out) < args.max_new_tokens:
            token = int(llm.scores[llm.n_tokens - 1].argmax())
            if token in eos:
                break
            out.append(token)
            llm.eval([token])
        hits += tokenizer.decode(out, skip_special_tokens=True).strip() == row.messages[-1]["content"].strip()
    seconds = time.perf_counter() - started
    tuned = json.loads((run.eval / "metrics.json").read_text())["suites"]["test"]["systems"]["tuned"]["exact_match"]
    print(json.dumps({"gguf": str(args.gguf), "examples": len(rows), "exact_match": round(hits / len(rows), 4),
                      "transformers_tuned_exact_match": tuned, "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
