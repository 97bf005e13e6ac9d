"""What every `tunelab` command module shares: the console, the config argument and the --set and
--tracking-uri options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

out = Console()

ConfigArg = Annotated[Path, typer.Argument(help="Path to the YAML run config.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set train.learning_rate=1e-4 (repeatable)."),
]
UriOpt = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking/registry URI "
                                           "(default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db).")]


def load(config: Path, overrides: list[str] | None) -> Any:
    from tunelab.config_file import load_config

    return load_config(config, overrides or [])
