"""The data stage: sources -> load -> clean -> dedup -> split -> contamination -> weights -> Dataset folder.

Eval rows are the ones that must stay trustworthy, so dedup runs within each pool and the contamination
check compares every training row with every val, test and benchmark row. The folder is written to a
temporary path and renamed into place: a bad row anywhere leaves no partial Dataset folder behind.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.artifacts import (
    atomic_dir,
    manifest,
    sha256_file,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from tunelab.chat import with_system_prompt
from tunelab.config import ROW_KIND, ContaminationConfig, DataConfig, DedupConfig, RunConfig, SourceConfig
from tunelab.data.clean import clean_records
from tunelab.data.contamination import ContaminationResult, EvalText, benchmark_texts, find_contamination
from tunelab.data.dedup import deduplicate
from tunelab.data.load import Skipped, load_source
from tunelab.data.records import Record
from tunelab.data.report import (
    EXAMPLES_SHOWN,
    length_histogram,
    render_summary,
    role_counts,
)
from tunelab.data.split import apply_weights, split_records
from tunelab.data.tokens import refused_by_template, token_counter
from tunelab.errors import ConfigError, DataError, NoTrainingRows
from tunelab.hub import dataset_record, is_hub_dataset
from tunelab.model_facts import model_context
from tunelab.progress import console
from tunelab.redaction import env_secrets, redact, redact_uris
from tunelab.template_checks import template_refusal

SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    train: list[Record]
    val: list[Record]
    test: list[Record]

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in SPLITS}

    @property
    def kind(self) -> str:
        return next((r.kind for split in (self.train, self.val, self.test) for r in split), "chat")


@dataclass
class Prepared:
    dataset: Dataset
    report: dict[str, Any]


def _load_all(sources: list[SourceConfig], role: str, cfg: RunConfig, skipped: list[Skipped],
              weights: dict[int, float]) -> list[Record]:
    records = []
    for source in sources:
        loaded = load_source(source.path, source.format or cfg.data.format, source.columns, cfg.data.on_error,
                             split=source.split or role, subset=source.subset)
        skipped += loaded.skipped
        for record in loaded.records:
            weights[id(record)] = source.weight
        records += loaded.records
    return records


def _check_kind_fits_objective(cfg: RunConfig, records: list[Record]) -> None:
    """Before anything is written (and in a dry run): rows of another kind than the objective trains on would
    only fail once training starts, after data prep had replaced a run's data."""
    needed, objective = ROW_KIND[cfg.objective.type], cfg.objective.type
    if records and records[0].kind != needed:
        where = re.sub(r"(:\d+| row \d+| item \d+)$", "", records[0].source)  # the file, not its first row
        raise DataError(f"objective.type: {objective} trains on {needed} rows, but {where} holds {records[0].kind} "
                        f"rows; choose the objective for this data (README, Data formats) or other data")


def _with_split_column(records: list[Record], data: Any, skipped: list[Skipped]) -> list[Record]:
    """The rows that carry data.stratify_by's (or group_by's) column: one that lacks it is a bad row like any
    other, skipped with on_error: skip, instead of stopping the whole split."""
    column = data.stratify_by or data.group_by
    if not column:
        return records
    option = "stratify_by" if data.stratify_by else "group_by"
    kept = []
    for record in records:
        if record.meta.get(column) is not None:
            kept.append(record)
        elif data.on_error == "skip":
            skipped.append(Skipped(record.source, f"data.{option} column '{column}' is missing or null"))
        else:
            raise DataError(f"{record.source}: data.{option} column '{column}' is missing or null in row {record.id} "
                            "(set data.on_error: skip to leave such rows out)")
    return kept


def _make_ids_unique(records: list[Record]) -> None:
    """Row ids name rows in reports and decide which rows contamination drops: two sources numbering their rows
    from 0, or two files named train.jsonl, must not make one leaked row take an innocent one with it. A
    repeated id gets where its row was read appended (the first row keeps its id as it was)."""
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            record.id = f"{record.id}@{record.source}"
            while record.id in seen:
                record.id += "'"
        seen.add(record.id)


def build_dataset(cfg: RunConfig, tokenizer: Any = None, generate_replay: bool = True) -> Prepared:
    """Everything but the writing: returns the splits and the report.

    `generate_replay=False` (dry runs, estimates: no weights load) uses the base model's self answers only if
    they are cached; otherwise the report says they are still to be generated."""
    from tunelab.chat import run_tokenizer

    data = cfg.data
    skipped: list[Skipped] = []
    weights: dict[int, float] = {}
    pool = _load_all(data.train, "train", cfg, skipped, weights)
    train_rows = len(pool) + len(skipped)  # rows in the training sources, good or bad
    given_test = _load_all(data.test, "test", cfg, skipped, weights)
    loaded = len(pool) + len(given_test)
    _make_ids_unique([*pool, *given_test])
    kinds = Counter(r.kind for r in [*pool, *given_test])
    if len(kinds) > 1:
        raise DataError(f"data: the sources mix row kinds ({', '.join(f'{k}: {n}' for k, n in kinds.items())}); "
                        "one dataset holds one kind (chat, preference, kto or text)")
    _check_kind_fits_objective(cfg, [*pool, *given_test])

    tokenizer = tokenizer or run_tokenizer(cfg)
    _check_system_prompt(tokenizer, data.system_prompt)
    pool, given_test = (_renderable(records, tokenizer, data, skipped) for records in (pool, given_test))
    bad_train_rows = train_rows - len(pool)  # skipped when read, or refused by the chat template
    counter = token_counter(tokenizer, data.system_prompt)
    # No row longer than the model's context: it would train at positions the model never saw, and no server
    # could take it (`--dry-run` warns when data.max_length is longer).
    context = model_context(cfg)
    max_tokens = min(data.clean.max_tokens or data.max_length, context or data.max_length)
    filter_counter = token_counter(tokenizer, data.system_prompt, longest=max_tokens)
    cleaned = [clean_records(records, data.clean, max_tokens, filter_counter) for records in (pool, given_test)]
    deduped = [deduplicate(c.kept, data.dedup) for c in cleaned]
    pool, given_test = deduped[0].kept, deduped[1].kept

    with_column = _with_split_column(pool, data, skipped)
    bad_train_rows += len(pool) - len(with_column)
    pool = with_column
    test_fraction = 0.0 if data.test else data.test_fraction
    train, val, test = split_records(pool, data.val_fraction, test_fraction, data.seed, data.stratify_by, data.group_by)
    test = given_test if data.test else test

    held_out = [EvalText.of(r, "test") for r in test]
    for path in data.contamination.benchmarks:
        held_out += benchmark_texts(path)
    val, val_leaks = _val_without_leaks(val, held_out, data.contamination, data.dedup)
    evals = [EvalText.of(r, "val") for r in val] + held_out
    contamination = find_contamination(train, evals, data.contamination, data.dedup)
    leaked = contamination.train_ids
    train = _apply_action(train, contamination, data.contamination.action, "training rows overlap eval data",
                          "remove them")
    if contamination.shared:
        first = contamination.shared[0]
        console.print(f"[yellow]warning:[/] data.contamination: {len(contamination.shared)} eval rows are mostly "
                      f"phrasing that many training rows repeat (e.g. {first.eval_source} {first.eval_id}, in "
                      f"{first.train_rows} training rows); ignored as shared phrasing (ignore_common), listed in "
                      "the data report: check that none is a leak")
    train = apply_weights(train, lambda r: weights.get(id(r), 1.0), data.seed)
    replay, replay_report = mix_replay(cfg, train, evals, generate_replay)
    train = train + replay

    dataset = Dataset(train=train, val=val, test=test)
    report = {
        "kind": dataset.kind,
        "loaded": loaded,
        "counts": dataset.counts(),
        "skipped": {"count": len(skipped), "examples": [s.__dict__ for s in skipped[:EXAMPLES_SHOWN]]},
        "rewritten": {k: sum(c.changed.get(k, 0) for c in cleaned) for k in ("whitespace", "pii")},
        "filters": {name: sum(len(c.removed[name]) for c in cleaned) for name in cleaned[0].removed},
        "removed_ids": {name: [i for c in cleaned for i in c.removed[name]][:EXAMPLES_SHOWN] for name in cleaned[0].removed},
        "dedup": {
            "exact": sum(len(d.exact_pairs) for d in deduped),
            "near": sum(len(d.near_pairs) for d in deduped),
            "conflicts": len({i for d in deduped for pair in d.conflicts for i in pair}),
            "pairs": [{"kept": k, "removed": r, "how": "exact"} for d in deduped for k, r in d.exact_pairs]
            + [{"kept": k, "removed": r, "how": f"near, similarity {s}"} for d in deduped for k, r, s in d.near_pairs]
            + [{"kept": "(none)", "removed": f"{a} and {b}", "how": "same text, opposite verdicts"}
               for d in deduped for a, b in d.conflicts],
        },
        "contamination": {
            "action": data.contamination.action, "ngram": data.contamination.ngram,
            "rows": len(leaked), "dropped": len(leaked) if data.contamination.action == "drop" else 0,
            "per_source": contamination.per_source(), "hits": [h.to_json() for h in contamination.hits],
            "ignore_common": data.contamination.ignore_common,
            "shared": [s.to_json() for s in contamination.shared],
            "val_rows": len(val_leaks.train_ids), "val_hits": [h.to_json() for h in val_leaks.hits],
        },
        "replay": replay_report,
        "token_lengths": length_histogram({name: counter(getattr(dataset, name)) for name in SPLITS}),
        "roles": role_counts([*train, *val, *test]),
    }
    if not train:
        removed = [f"{name.replace('_', ' ')}: {n}" for name, n in report["filters"].items() if n]
        removed += [f"bad rows skipped: {bad_train_rows}"] if bad_train_rows else []
        sources = ", ".join(str(s.path) for s in data.train)
        shown = f" (removed {', '.join(removed)})" if removed else ""
        raise NoTrainingRows(f"{sources}: no training examples left of {train_rows} rows{shown}", report)
    return Prepared(dataset, report)


def _val_without_leaks(val: list[Record], held_out: list[EvalText], cfg: ContaminationConfig,
                       near: DedupConfig) -> tuple[list[Record], ContaminationResult]:
    """Val rows that overlap a test or benchmark row, handled by data.contamination.action like training rows:
    val picks the best checkpoint and stops training early, so a test row in val steers the model toward the
    test. (Dedup runs within each pool, so an explicit test file's twin in the training sources reaches here.)"""
    leaks = find_contamination(val, held_out, cfg, near) if val and held_out else ContaminationResult()
    return _apply_action(val, leaks, cfg.action, "val rows overlap test or benchmark data",
                         "remove them from the training sources"), leaks


def _apply_action(rows: list[Record], leaks: ContaminationResult, action: str, what: str,
                  remedy: str) -> list[Record]:
    """data.contamination.action on the rows that leak: stop naming them, drop them, or warn and keep them."""
    leaked = leaks.train_ids
    if leaked and action == "fail":
        shown = "; ".join(f"{h.train_id} ~ {h.eval_source} {h.eval_id} ({h.kind})" for h in leaks.hits[:5])
        raise DataError(f"data.contamination: {len(leaked)} {what}: {shown}{' ...' if len(leaked) > 5 else ''}; "
                        f"{remedy}, or set data.contamination.action to drop or warn")
    if leaked and action == "warn":
        console.print(f"[yellow]warning:[/] {len(leaked)} {what} (kept: action is warn)")
    return [r for r in rows if r.id not in leaked] if leaked and action == "drop" else rows


def _check_system_prompt(tokenizer: Any, system_prompt: str | None) -> None:
    if not system_prompt:
        return
    probe = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]
    refusal = template_refusal(tokenizer, [with_system_prompt(probe, system_prompt)])
    if refusal is not None:
        # (a template that refuses even the plain question and answer was refused when it was set up)
        why = ("leaves the system message out of a conversation that ends in an answer" if "leaves" in refusal
               else "takes no system message")
        raise ConfigError(f"data.system_prompt: the model's chat template {why}; leave data.system_prompt unset, or "
                          "put the text into the first user turn of your rows")


def _renderable(records: list[Record], tokenizer: Any, data: DataConfig, skipped: list[Skipped]) -> list[Record]:
    """The rows the chat template renders; a row it refuses is a row error (or skipped, with on_error: skip)."""
    kept = []
    for record in records:
        refused = refused_by_template(record, tokenizer, data.system_prompt)
        if refused is None:
            kept.append(record)
        elif data.on_error == "skip":
            skipped.append(Skipped(record.source, refused))
        else:
            raise DataError(f"{record.source}: {refused}")
    return kept


def mix_replay(cfg: RunConfig, train: list[Record], evals: list[EvalText],
               generate: bool = True) -> tuple[list[Record], dict[str, Any]]:
    """Replay rows for this training split (data.replay), minus any that overlap eval data (dropped whatever
    contamination.action says: replay rows are optional, eval rows must stay clean)."""
    from tunelab.data.replay import replay_rows

    if cfg.data.replay.ratio == 0 or not train:
        return [], {"ratio": cfg.data.replay.ratio, "rows": 0}
    if train[0].kind != "chat" or cfg.objective.type != "sft":
        raise DataError(f"data.replay: rehearsal rows are chat conversations for objective sft; this run trains "
                        f"{cfg.objective.type} on {train[0].kind} rows (set data.replay.ratio: 0)")
    replay, report = replay_rows(cfg, len(train), generate)
    leaked = find_contamination(replay, evals, cfg.data.contamination, cfg.data.dedup).train_ids
    report["dropped_overlapping_eval"] = len(leaked)
    replay = [r for r in replay if r.id not in leaked]
    report["rows"] = len(replay)
    return replay, report


def prepare_data(cfg: RunConfig, folder: Path, tokenizer: Any = None) -> Prepared:
    """Write the Dataset folder for `cfg` at `folder`, or reuse it when inputs and config are unchanged."""
    sources = _source_records(cfg)
    fingerprint = data_fingerprint(cfg, sources)
    stamp = folder / "manifest.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        return Prepared(load_dataset(folder), json.loads((folder / "report.json").read_text()))
    try:
        prepared = build_dataset(cfg, tokenizer)
    except NoTrainingRows as err:
        # No Dataset, but the report is what tells the user why: where the Dataset goes, unless one is there
        # already (a trained run's): that one stays, and the report goes beside it.
        target = folder.with_name(f"{folder.name}-rejected") if stamp.is_file() else folder
        with atomic_dir(target) as tmp:
            write_json_atomic(tmp / "report.json", err.report)
            write_text_atomic(tmp / "report.md", render_summary(err.report))
        raise DataError(f"{err.problems[0]}; see {target / 'report.md'}") from None
    with atomic_dir(folder) as tmp:
        for name in SPLITS:
            write_jsonl_atomic(tmp / f"{name}.jsonl", [r.to_json() for r in getattr(prepared.dataset, name)])
        write_json_atomic(tmp / "report.json", prepared.report)
        write_text_atomic(tmp / "report.md", render_summary(prepared.report))
        write_json_atomic(tmp / "manifest.json", manifest(
            "dataset", fingerprint=fingerprint, sources=sources, counts=prepared.dataset.counts(),
            model=redact_uris(cfg.model.name),
            config=redact(cfg.data.model_dump(mode="json"), env_secrets(cfg.model_dump(mode="json"))),
        ))
    return prepared


def _source_records(cfg: RunConfig) -> list[dict[str, Any]]:
    """Every source with what identifies its content: a file's sha256, or a Hub dataset's commit and the sha256
    of its cached rows (the split defaults as in _load_all)."""
    records = []
    for role, sources in (("train", cfg.data.train), ("test", cfg.data.test)):
        for s in sources:
            if is_hub_dataset(s.path):
                records.append(dataset_record(str(s.path), s.split or role, s.subset))
            else:
                records.append({"path": redact_uris(str(s.path)), "sha256": _hash_source(Path(s.path))})
    return records + [{"path": str(p), "sha256": _hash_source(p)} for p in cfg.data.contamination.benchmarks]


def _hash_source(path: Path) -> str:
    if path.is_dir():  # a datasets folder: hash its files in a stable order
        from tunelab.artifacts import sha256_folder

        return sha256_folder(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    return sha256_file(path)


def data_fingerprint(cfg: RunConfig, sources: list[dict[str, Any]] | None = None) -> str:
    """Changes whenever a source, the data config, or the tokenizer's model changes. `sources`: the
    _source_records of `cfg`, when already made."""
    from tunelab import __version__
    from tunelab.artifacts import sha256_text

    parts = {"config": cfg.data.model_dump(mode="json"), "model": cfg.model.name, "revision": cfg.model.revision,
             "version": __version__, "sources": [r["sha256"] for r in sources or _source_records(cfg)]}
    return sha256_text(json.dumps(parts, sort_keys=True, default=str))


def load_dataset(folder: Path) -> Dataset:
    """Read a Dataset folder written by `prepare_data`."""
    splits = {}
    for name in SPLITS:
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(f"{folder}: not a prepared Dataset folder ({path.name} is missing)")
        with open(path, encoding="utf-8") as f:
            splits[name] = [Record.from_json(json.loads(line)) for line in f if line.strip()]
    return Dataset(**splits)
