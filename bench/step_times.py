"""Per-step wall time of tunelab's SFT on the throughput benchmark's data: a quick A/B harness for levers that
are not config options (environment variables such as OMP_WAIT_POLICY, torch.compile of the decoder layers).

    python bench/step_times.py [--target-tokens 4000] [--epochs 1] [--compile-layers] [--set train.x=y ...]
    python bench/step_times.py --profile 4 6   # torch.profiler table of steps 4..6 (the ops a step spends on)
    python bench/step_times.py --profile 4 6 --profile-by shape   # ... one row per op and input shapes
    python bench/step_times.py --bf16-base     # frozen base Linear weights stored in bf16 (an experiment)
    OMP_WAIT_POLICY=PASSIVE python bench/step_times.py

Prints each step's seconds and minor page faults, then the sum over steps 2.. (step 1 holds warm-up) and the
run's tokens/s and peak memory. Runs of 10 steps vary by ~10% on the 2-core machine: interleave and repeat.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import HYPER, LORA, _value, write_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-tokens", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--compile-layers", action="store_true", help="torch.compile each decoder layer (dynamic)")
    parser.add_argument("--bf16-base", action="store_true", help="store frozen base Linear weights in bf16")
    parser.add_argument("--profile", type=int, nargs=2, metavar=("FIRST", "LAST"),
                        help="print torch.profiler's op table over steps FIRST..LAST")
    parser.add_argument("--profile-by", choices=("op", "shape", "stack"), default="op",
                        help="with --profile: one row per op, per op and input shapes, or per op and Python stack")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="section.key=value")
    args = args_ = parser.parse_args()

    from transformers import TrainerCallback

    import tunelab.train.sft as sft
    from tunelab.artifacts import RunPaths
    from tunelab.config_file import validate_config
    from tunelab.data.load import load_records
    from tunelab.data.prepare import Dataset

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    class StepTimes(TrainerCallback):
        seconds: list[float] = []

        profiler: Any = None

        def on_step_begin(self, args: Any, state: Any, *_: Any, **__: Any) -> None:
            if args_.profile and state.global_step + 1 == args_.profile[0]:
                import torch.profiler

                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                       record_shapes=args_.profile_by == "shape",
                                                       with_stack=args_.profile_by == "stack")
                self.profiler.__enter__()
            self.started, self.faults = time.perf_counter(), faults()

        def on_step_end(self, args: Any, state: Any, *_: Any, **__: Any) -> None:
            self.seconds.append(time.perf_counter() - self.started)
            print(f"step {state.global_step}: {self.seconds[-1]:.2f} s, {faults() - self.faults} page faults", flush=True)
            if self.profiler is not None and state.global_step == args_.profile[1]:
                self.profiler.__exit__(None, None, None)
                averages = self.profiler.key_averages(group_by_input_shape=args_.profile_by == "shape",
                                                      group_by_stack_n=8 if args_.profile_by == "stack" else 0)
                print(averages.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60,
                                     max_src_column_width=120), flush=True)
                self.profiler = None

    trainer_class, build = sft.TunelabTrainer, sft.build_trainable

    class Timed(trainer_class):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, callbacks: list[Any] | None = None, **k: Any) -> None:
            super().__init__(*a, callbacks=[*(callbacks or []), StepTimes()], **k)

    def build_compiled(*a: Any, **k: Any) -> Any:
        model = build(*a, **k)
        for layer in model.get_base_model().model.layers:
            layer.compile(dynamic=True)
        return model

    def build_bf16_base(*a: Any, **k: Any) -> Any:
        import torch
        model = build(*a, **k)
        for name, module in model.named_modules():
            if name.endswith("base_layer") and isinstance(module, torch.nn.Linear):
                module.weight.data = module.weight.data.to(torch.bfloat16)
        return model

    sft.TunelabTrainer = Timed
    if args.bf16_base:
        sft.build_trainable = build_bf16_base
    if args.compile_layers:
        sft.build_trainable = build_compiled

    work = Path(tempfile.mkdtemp(prefix="tunelab-steps-"))
    try:
        print(json.dumps(write_data(work, args.target_tokens))[:200])
        config = {"data": {"train": str(work / "train.jsonl")}, "method": LORA,
                  "train": {**HYPER, "epochs": args.epochs, "save_steps": None},
                  "track": {"enabled": False}, "output": {"dir": str(work / "run")}}
        for item in args.overrides:
            key, value = item.split("=", 1)
            section, name = key.split(".", 1)
            config.setdefault(section, {})[name] = _value(value)
        cfg = validate_config(config)
        result = sft.train_sft(cfg, RunPaths(cfg.output.dir), Dataset(load_records(work / "train.jsonl"), [], []))
        print(f"steps 2..{len(StepTimes.seconds)}: {sum(StepTimes.seconds[1:]):.2f} s; {result.tokens_per_second:.0f} "
              f"tokens/s, peak {result.peak_memory_mb:,.0f} MiB, mean train loss {result.train_loss:.6f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
