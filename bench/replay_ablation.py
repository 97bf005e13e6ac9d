"""Replay ablation: tuned exact match and forgetting drop per (replay ratio, learning rate, epochs), by hand:

    python bench/replay_ablation.py examples/quickstart.yaml --ratios 0 0.1 0.2 0.4 --lrs 1e-3 2e-4 --epochs 1 2

Each cell is an ordinary `tunelab run` of the config with those three settings (one after another, same machine,
one invocation), in runs/ablation/<config>-r<ratio>-lr<lr>-e<epochs>; cells already finished are read back, so a
cut-short ablation continues. Writes bench/results/replay_ablation-<config>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tunelab.config_file import load_run_config
from tunelab.eval.gate import default_rules, evaluate_gate
from tunelab.eval.result import failed_rules, rule_rows


def cell(config: Path, ratio: float, lr: float, epochs: float, root: Path) -> dict:
    out = root / f"{config.stem}-r{ratio}-lr{lr}-e{epochs}"
    metrics_path = out / "eval" / "metrics.json"
    seconds = None
    if not metrics_path.is_file():
        started = time.perf_counter()
        command = [sys.executable, "-m", "tunelab", "run", str(config), "--set", f"data.replay.ratio={ratio}",
                   "--set", f"train.learning_rate={lr}", "--set", f"train.epochs={epochs}",
                   "--set", f"output.dir={out}", "--set", "output.overwrite=true", "--set", "track.enabled=false"]
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = round(time.perf_counter() - started, 1)
        if not metrics_path.is_file():
            return {"ratio": ratio, "lr": lr, "epochs": epochs, "error": done.stderr.strip().splitlines()[-1:]}
    metrics = json.loads(metrics_path.read_text())
    suite = next(iter(metrics["suites"].values()))
    metric, systems = suite["metrics"][0], suite["systems"]
    forgetting = metrics.get("forgetting") or {}
    run_cfg, _ = load_run_config(out)
    rules = default_rules(run_cfg.eval)  # judged here too: an older cell may have run with the gate off
    return {
        "ratio": ratio, "lr": lr, "epochs": epochs, "seconds": seconds, "metric": metric,
        "base": systems["base"][metric], "few_shot": systems.get("few_shot", {}).get(metric),
        "tuned": systems["tuned"][metric], "tuned_mean_words": systems["tuned"].get("mean_words"),
        "probes_base": forgetting.get("base", {}).get("overall"), "probes_tuned": forgetting.get("tuned", {}).get("overall"),
        "forgetting_drop": forgetting.get("drop"),
        "default_gate": not failed_rules(rule_rows(evaluate_gate(rules, metrics))), "default_rules": rules,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.4])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-4])
    parser.add_argument("--epochs", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--root", type=Path, default=Path("runs/ablation"))
    args = parser.parse_args()
    results = []
    for epochs in args.epochs:
        for lr in args.lrs:
            for ratio in args.ratios:
                results.append(cell(args.config, ratio, lr, epochs, args.root))
                print(json.dumps(results[-1]), flush=True)
    target = Path("bench/results") / f"replay_ablation-{args.config.stem}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2) + "\n")
    metric = next((r["metric"] for r in results if "metric" in r), "metric")
    print(f"\n| replay ratio | lr | epochs | tuned {metric} | probes base -> tuned | drop | default gate |")
    print("|---:|---:|---:|---:|---:|---:|:---|")
    for r in results:
        if "error" in r:
            print(f"| {r['ratio']} | {r['lr']} | {r['epochs']} | error: {r['error']} | | | |")
        else:
            print(f"| {r['ratio']} | {r['lr']} | {r['epochs']} | {r['tuned']:.3g} | "
                  f"{r['probes_base']:.0%} -> {r['probes_tuned']:.0%} | {r['forgetting_drop'] * 100:.0f} pts | "
                  f"{'pass' if r['default_gate'] else 'FAIL'} |")

if __name__ == "__main__":
    main()
