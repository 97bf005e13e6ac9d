"""sweep.json: the sweep's own record of its trials, written atomically by the driver after every change.

Why our own file rather than Ray Tune's `Tuner.restore`: Tune checkpoints its experiment state on a timer, so a
sweep killed between a trial's end and the next checkpoint would run that finished trial again; its state also
names trials by Tune's generated ids, not by what they try. Here every trial is keyed by its index and its
parameter values, written down before it starts, and a trial counts as finished when its run folder holds
eval/metrics.json (written atomically as a trial's last act). That folder is the truth `--resume` reads.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunelab.artifacts import manifest, write_json_atomic
from tunelab.errors import RunFolderError

STATE_FILE = "sweep.json"
# pending: not started; running: started, not ended (a killed sweep leaves these); finished: trained and evaluated;
# stopped: ended early by ASHA (no eval); failed: raised an error.
STATUSES = ("pending", "running", "finished", "stopped", "failed")
DONE = ("finished", "stopped", "failed")


@dataclass
class TrialRecord:
    index: int
    name: str
    params: dict[str, Any]
    status: str = "pending"
    step: int | None = None  # last training step reported
    val_loss: float | None = None  # last val loss reported
    objective: float | None = None
    constraints: list[dict[str, Any]] = field(default_factory=list)
    feasible: bool | None = None
    error: str | None = None
    started_unix: float | None = None
    ended_unix: float | None = None
    attempts: int = 0

    @property
    def seconds(self) -> float | None:
        if self.started_unix is None or self.ended_unix is None:
            return None
        return round(self.ended_unix - self.started_unix, 1)


@dataclass
class SweepState:
    path: Path
    spec: dict[str, Any]  # search space, objective, mode, constraints: what --resume must agree with
    config: dict[str, Any]  # the base config (sweep section included), as JSON
    trials: list[TrialRecord]
    parent_run_id: str | None = None
    created_unix: float = field(default_factory=time.time)
    replacing: list[str] = field(default_factory=list)  # an old sweep's files, removed once the new data is valid

    @classmethod
    def load(cls, folder: Path) -> SweepState:
        path = folder / STATE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            trials = [TrialRecord(**t) for t in data["trials"]]
            return cls(path, data["spec"], data["config"], trials, data.get("parent_run_id"),
                       data.get("created_unix", time.time()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RunFolderError(f"{path}: not a readable sweep record ({type(err).__name__}); start the sweep again "
                                 "in another output.dir") from None

    def save(self) -> None:
        write_json_atomic(self.path, manifest(
            "sweep", created_unix=self.created_unix, spec=self.spec, config=self.config,
            parent_run_id=self.parent_run_id, trials=[asdict(t) for t in self.trials]))

    def trial(self, index: int) -> TrialRecord:
        return self.trials[index]

    def counts(self) -> dict[str, int]:
        return {s: sum(t.status == s for t in self.trials) for s in STATUSES}
