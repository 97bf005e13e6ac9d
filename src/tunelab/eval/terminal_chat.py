"""`tunelab chat RUN_DIR`: talk to the tuned model in the terminal, optionally beside the base model.

Prompts are rendered with the run's own chat template and system prompt, exactly as in training and eval.
Type /reset to start a new conversation, /exit (or end of input) to leave.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tunelab.chat import chat_tokenizer, render_prompt, with_system_prompt
from tunelab.config_file import load_run_config
from tunelab.eval.generate import generate_greedy
from tunelab.eval.systems import Models, System
from tunelab.models import Precision, pick_device, resolve_model
from tunelab.train.methods import load_trained


def chat_loop(run_dir: Any, side_by_side: bool, max_new_tokens: int, stdin: TextIO = sys.stdin,
              stdout: TextIO = sys.stdout) -> None:
    import torch

    cfg, run = load_run_config(run_dir)
    precision = Precision(pick_device(cfg.model.device), None, torch.float32)
    tuned, separate_base = load_trained(cfg, run.root, resolve_model(cfg.model), precision)
    models = Models(tuned, separate_base)
    tokenizer = chat_tokenizer(run.trained, cfg.data.chat_template)
    systems = [System("base"), System("tuned", adapter="default")] if side_by_side else [System("tuned", adapter="default")]
    history: dict[str, list[dict[str, str]]] = {s.name: [] for s in systems}
    interactive = stdin.isatty()
    stdout.write(f"tunelab chat: {run.root} ({', '.join(s.name for s in systems)}). /reset, /exit\n")
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = {name: [] for name in history}
            stdout.write("(new conversation)\n")
            continue
        for system in systems:
            turns = [*history[system.name], {"role": "user", "content": text}]
            prompt = render_prompt(tokenizer, with_system_prompt(turns, cfg.data.system_prompt))
            with models.use(system) as net:
                (answer,) = generate_greedy(net, tokenizer, [prompt], max_new_tokens, 1, show_progress=False)
            history[system.name] = [*turns, {"role": "assistant", "content": answer}]
            stdout.write(f"{system.name}> {answer}\n")
        stdout.flush()
