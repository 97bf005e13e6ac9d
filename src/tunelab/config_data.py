"""The data section of the config: sources, cleaning, dedup, contamination, replay (re-exported by
tunelab.config)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunelab.config_section import Section

Format = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "preference", "kto", "text"]


class SourceConfig(Section):
    path: Path | str = Field(
        ...,
        description="A .jsonl, .json, .csv or .parquet file, a datasets save_to_disk folder, or hf://ORG/NAME (a "
        "Hugging Face Hub dataset, read with datasets.load_dataset through its cache).",
    )
    split: str | None = Field(None, description="hf:// sources: the split to read; default train (test in data.test).")
    subset: str | None = Field(None, description="hf:// sources: the subset (configuration name), if it has several.")
    format: Format | None = Field(None, description="Row format of this source; default: data.format.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map our field names to this file's columns, e.g. {instruction: question, output: answer}.",
    )
    weight: float = Field(
        1.0, gt=0, le=100,
        description="Mixing weight for training: 2 repeats the source twice, 0.5 keeps half (by seed); at most 100."
    )

    @field_validator("path", mode="before")
    @classmethod
    def _hub_path_stays_a_string(cls, value: object) -> object:
        # Path("hf://org/name") collapses the // to hf:/org/name, so a Hub dataset stays a string, repaired if it
        # arrives as such a Path; everything else is a local Path.
        text = str(value)
        if text.startswith("hf:/"):
            path = "hf://" + text[len("hf:/"):].lstrip("/")
            if re.fullmatch(r"hf://[^/\s]+/[^/\s]+", path) is None:
                raise ValueError(f"data source '{text}': a Hub dataset is written hf://ORG/NAME")
            return path
        return Path(text) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _hub_options(self) -> SourceConfig:
        if not isinstance(self.path, str) and (self.split or self.subset):
            raise ValueError(f"data source {self.path}: split and subset apply to hf:// Hub datasets only")
        return self


def as_sources(value: object) -> object:
    """One source or a list; each a path or a {path, ...} mapping."""
    items = value if isinstance(value, list) else [value]
    return [{"path": item} if isinstance(item, (str, Path)) else item for item in items]


class CleanConfig(Section):
    normalize_whitespace: bool = Field(True, description="Trim and collapse runs of spaces; keep line breaks.")
    min_tokens: int = Field(1, ge=0, description="Drop examples with fewer tokens (chat template included).")
    max_tokens: int | None = Field(None, gt=0, description="Drop longer examples; default: data.max_length.")
    exclude_regex: list[str] = Field(default_factory=list, description="Drop examples matching any pattern.")

    @field_validator("exclude_regex")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"data.clean.exclude_regex: {pattern[:80]!r} is not a valid regular expression: "
                                 f"{err}") from None
        return value
    exclude_keywords: list[str] = Field(
        default_factory=list, description="Drop examples containing any keyword (case-insensitive)."
    )
    scrub_pii: bool = Field(False, description="Replace e-mail addresses and phone numbers with placeholders.")


class DedupConfig(Section):
    exact: bool = Field(True, description="Drop exact duplicates (after case/space/punctuation normalization).")
    near: bool = Field(True, description="Drop near-duplicates found with MinHash LSH.")
    threshold: float = Field(0.85, gt=0, le=1, description="Jaccard similarity at which two examples are twins.")
    ngram: int = Field(5, gt=0, le=64, description="Word n-gram shingle size for MinHash.")
    num_perm: int = Field(128, ge=16, le=1024,
                          description="MinHash permutations (more: finer estimates, slower; at most 1024).")
    fields: Literal["all", "prompt", "answer"] = Field("all", description="Which text is compared.")


class ContaminationConfig(Section):
    action: Literal["fail", "drop", "warn"] = Field(
        "fail", description="On a training row that overlaps val/test/benchmarks: stop, drop it, or warn."
    )
    ngram: int = Field(13, gt=0, description="Word n-gram length that counts as overlap (13, as in GPT-3).")
    min_coverage: float = Field(
        0.8, gt=0, le=1,
        description="A training row leaks an eval row when shared n-grams cover this share of the eval row's "
        "words (or of its prompt's).",
    )
    benchmarks: list[Path] = Field(
        default_factory=list, description="Eval benchmark files to check training rows against (any loader format)."
    )
    ignore_common: float = Field(
        0.05, ge=0, le=1,
        description="Ignore n-grams found in more than this share of eval rows or of training rows (shared "
        "boilerplate such as a repeated instruction, not leaks).",
    )

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, (str, Path)) else value


class ReplayConfig(Section):
    ratio: float = Field(
        0.0, ge=0.0, le=0.5,
        description="Share of the training split made of general-purpose rehearsal rows (0: off). 0.2 with 300 "
        "task rows adds 75 replay rows. They never enter val or test, and their loss is logged apart.",
    )
    from_self: bool = Field(
        True,
        description="Rehearse the base model's own greedy answers to tunelab's bundled pool of 500+ general "
        "instructions (generated once per model and pool version, then cached): training on them holds its "
        "general behaviour in place. Needs a chat model (one with its own template).",
    )
    files: list[SourceConfig] = Field(
        default_factory=list, description="General-purpose chat datasets to rehearse too (any format tunelab loads)."
    )
    max_new_tokens: int = Field(
        160, gt=0, le=2048, description="Length budget of a self answer; answers that do not end within it are unused."
    )

    @field_validator("files", mode="before")
    @classmethod
    def _sources(cls, value: object) -> object:
        return as_sources(value)

    @model_validator(mode="after")
    def _has_a_source(self) -> ReplayConfig:
        if self.ratio > 0 and not self.from_self and not self.files:
            raise ValueError("data.replay: ratio > 0 needs a source: from_self: true or some files")
        return self


class DataConfig(Section):
    train: list[SourceConfig] = Field(
        ..., min_length=1, description="Training sources: paths, or {path, format, columns, weight} mappings."
    )
    test: list[SourceConfig] = Field(
        default_factory=list,
        description="Held-out test sources. When empty, test_fraction of train is held out.",
    )
    format: Format = Field("auto", description="Default row format of every source; auto detects it per row.")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="A bad row stops preparation (fail) or is counted and reported (skip)."
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of train held out for eval loss.")
    test_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of train held out as test when no test files are given."
    )
    seed: int = Field(42, description="Seed of the deterministic split and of source weighting.")
    stratify_by: str | None = Field(None, description="A column whose value shares are kept equal across splits.")
    group_by: str | None = Field(None, description="A column whose groups never straddle splits (e.g. user id).")
    max_length: int = Field(
        2048, gt=8, description="Max tokens per example; longer examples are dropped and counted."
    )
    system_prompt: str | None = Field(
        None, description="System message added to examples that have none (train, eval and serving alike)."
    )
    chat_template: str | None = Field(
        None,
        description="Chat template for a model without one (a base model): chatml, llama3, gemma, mistral, phi3, or "
        "a .jinja file. Markers missing from the vocabulary are added as special tokens and trained. Default: the "
        "model's own template, else chatml. Setting it on a chat model replaces the model's template.",
    )
    packing: bool = Field(
        False, description="Pack several examples into each max_length row (position ids restart per example)."
    )
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    contamination: ContaminationConfig = Field(default_factory=ContaminationConfig)

    @field_validator("train", "test", mode="before")
    @classmethod
    def _sources(cls, value: object) -> object:
        return as_sources(value)

    @model_validator(mode="after")
    def _split_options(self) -> DataConfig:
        if self.stratify_by and self.group_by:
            raise ValueError("use either data.stratify_by or data.group_by, not both")
        return self
