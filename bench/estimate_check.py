"""Check `tunelab estimate` against measured peak memory: LoRA, QLoRA and full fine-tuning of the default
model at the quickstart settings, each trained for a few real steps with `tunelab train`.

    .venv/bin/python bench/estimate_check.py [--steps 3] [--methods lora qlora full]
    .venv/bin/python bench/estimate_check.py --steps 0   # the whole run: its largest batch, which the estimate is for

Measured = the peak memory tunelab's training records in the run manifest (peak RSS of the training process
on CPU, max allocated on CUDA). Estimated = `tunelab estimate --no-probe --json` for the same config.
Writes bench/results/estimate.json. Each training needs 3-4 GB; the script waits for that much free memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "quickstart.yaml"
NEEDED_GIB = 5.0
TARGET = 0.15  # within +-15%


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def wait_for_memory(console: Console) -> None:
    while (free := available_gib()) < NEEDED_GIB:
        console.print(f"waiting: {free:.1f} GiB available, {NEEDED_GIB} GiB needed")
        time.sleep(30)


def tunelab(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, cwd=ROOT, env=env)


def check(method: str, steps: int, folder: Path, console: Console) -> dict:
    overrides = ["--set", f"method.type={method}"]
    estimated = tunelab("estimate", str(CONFIG), *overrides, "--no-probe", "--json")
    if estimated.returncode != 0:
        raise SystemExit(f"tunelab estimate failed for {method}:\n{estimated.stderr[-2000:]}")
    estimate = json.loads(estimated.stdout)
    wait_for_memory(console)
    run_dir = folder / method
    limit = ["--set", f"train.max_steps={steps}"] if steps > 0 else []
    command = ["train", str(CONFIG), *overrides, *limit, "--set", f"output.dir={run_dir}"]
    started = time.perf_counter()
    trained = tunelab(*command)
    if trained.returncode != 0:
        raise SystemExit(f"tunelab train failed for {method}:\n{trained.stderr[-2000:]}")
    train = json.loads((run_dir / "manifest.json").read_text())["train"]
    measured = train["peak_memory_mb"]
    predicted = estimate["peak_memory_mib"]
    return {
        "method": method, "estimated_mib": predicted, "measured_mib": measured,
        "error": round((predicted - measured) / measured, 4),
        "estimated_terms_mib": {k: round(v / 2**20, 1) for k, v in estimate["memory_bytes"].items()},
        "largest_batch_tokens": estimate["data"]["peak_tokens"], "trained_steps": train["steps"],
        "trained_tokens": train["tokens_seen"], "precision": train["precision"],
        "train_wall_s": round(time.perf_counter() - started, 1),
        "command": "tunelab " + " ".join(command).replace(str(ROOT) + "/", ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per training (default 3; 0: all)")
    parser.add_argument("--methods", nargs="+", default=["lora", "qlora", "full"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "estimate.json")
    args = parser.parse_args()
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tunelab-estimate-check-") as tmp:
        for method in args.methods:
            console.print(f"{method}: estimating, then training {args.steps} steps ...")
            rows.append(check(method, args.steps, Path(tmp), console))
            console.print(f"  estimated {rows[-1]['estimated_mib']:.0f} MiB, measured {rows[-1]['measured_mib']:.0f} MiB")
    table = Table(title=f"tunelab estimate vs measured peak memory ({CONFIG.name}, {args.steps} steps)")
    for column in ("method", "estimated", "measured", "error", "within 15%"):
        table.add_column(column, justify="right")
    for r in rows:
        ok = abs(r["error"]) <= TARGET
        table.add_row(r["method"], f"{r['estimated_mib']:,.0f} MiB", f"{r['measured_mib']:,.0f} MiB",
                      f"{r['error']:+.1%}", "[green]yes[/]" if ok else "[red]no[/]")
    console.print(table)
    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
        "cpus": os.cpu_count(), "config": str(CONFIG.relative_to(ROOT)), "steps": args.steps, "target": TARGET,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
