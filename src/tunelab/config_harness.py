"""`eval.harness`: standard benchmarks (lm-evaluation-harness tasks) scored on base and tuned."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from tunelab.config_section import Section


class HarnessConfig(Section):
    tasks: list[str] = Field(
        ..., min_length=1,
        description="lm-evaluation-harness task or group names, e.g. [mmlu, hellaswag, arc_easy]: lm-eval's "
        "built-in tasks fetch their datasets from the Hugging Face Hub (network, or a filled datasets cache), "
        "tasks of your own come from YAML files in include_path. Each is scored on base and tuned; the gate reads "
        "harness.TASK.base, harness.TASK.tuned and harness.TASK.drop.",
    )
    include_path: list[Path] = Field(
        default_factory=list,
        description="Folders (or single files) of your own lm-eval task YAMLs, e.g. a multiple-choice task over a "
        "local JSONL (dataset_path: json, dataset_kwargs: {data_files: ...}; relative data paths resolve "
        "against the folder you run tunelab from).",
    )
    limit: int | float | None = Field(
        None, gt=0,
        description="Score only the first N documents of each task (of each subtask, for a group such as mmlu); "
        "a number below 1 is a share of them. For quick checks: published figures use every document.",
    )
    num_fewshot: int | None = Field(
        None, ge=0,
        description="Solved examples shown before each question; default: the task's own setting (0 for most; "
        "MMLU is usually reported 5-shot).",
    )
    batch_size: int | None = Field(None, gt=0, description="Requests scored together; default: eval.batch_size.")
    apply_chat_template: bool = Field(
        False,
        description="Render each request with the run's chat template (the one it was trained with), and "
        "data.system_prompt as its system message. Default false: the benchmark's plain-text prompts, as "
        "most published figures are measured.",
    )
    metric: dict[str, str] = Field(
        default_factory=dict,
        description="Which of a task's numbers to compare, per task, as lm-eval names them: "
        "{gsm8k: 'exact_match,flexible-extract', hellaswag: acc}. Default: acc_norm, else acc, else exact_match, "
        "else the task's first number; unfiltered ('none') where the task reports several filters.",
    )

    @field_validator("include_path", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, (str, Path)) else value

    @field_validator("tasks")
    @classmethod
    def _distinct(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) != len(tasks):
            raise ValueError("eval.harness.tasks: a task is named twice")
        return tasks

    @model_validator(mode="after")
    def _metric_names_a_task(self) -> HarnessConfig:
        stray = [name for name in self.metric if name not in self.tasks]
        if stray:
            raise ValueError(f"eval.harness.metric: {', '.join(stray)} is not among eval.harness.tasks")
        return self


def as_harness(value: object) -> object:
    """`harness: [mmlu, hellaswag]` (or one name) is short for `harness: {tasks: [...]}`."""
    if isinstance(value, str):
        return {"tasks": [value]}
    if isinstance(value, list):
        return {"tasks": value}
    return value
