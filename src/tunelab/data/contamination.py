"""Contamination check: does any training row overlap an eval row (val, test, or a benchmark file)?

Overlap is an exact match of the normalized text or prompt; shared word n-grams (13 by default, as in
GPT-3's decontamination) that cover most of an eval row (80% by default: Llama 2's "dirty" line); or a
near-twin (MinHash, as in dedup). N-grams found in many eval rows or many training rows are a dataset's
shared phrasing (an instruction or sign-off every row repeats), not leaks, and are ignored above
`ignore_common` of either. An eval row that such phrasing covers is listed as `shared` (a leak pasted into many
training rows looks the same), so that a person sees it rather than nothing.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config import ContaminationConfig, DedupConfig
from tunelab.data.dedup import NearIndex, normalize_for_match
from tunelab.data.formats import parse_row
from tunelab.data.readers import BadRow, read_rows
from tunelab.data.records import Record
from tunelab.errors import DataError, RowError

# A repeated eval prompt this short ("hello") is a coincidence, not a leak; longer ones count.
MIN_EXACT_WORDS = 5


@dataclass
class EvalText:
    id: str
    source: str  # "val", "test", or a benchmark file name
    text: str
    prompt: str = ""  # the question alone: a training row that repeats it leaks it, whatever its answer

    @classmethod
    def of(cls, record: Record, source: str) -> EvalText:
        return cls(record.id, source, record.all_text(), record.prompt_text())


@dataclass
class Hit:
    train_id: str
    eval_id: str
    eval_source: str
    kind: str  # "exact" or "ngram"
    overlap: str  # the matching text (or n-gram), for people to judge

    def to_json(self) -> dict[str, str]:
        return self.__dict__.copy()


@dataclass
class Shared:
    """An eval row mostly made of n-grams that many training rows repeat: ignored as shared phrasing."""

    eval_id: str
    eval_source: str
    train_rows: int  # how many training rows hold its most repeated n-gram
    overlap: str

    def to_json(self) -> dict[str, str | int]:
        return self.__dict__.copy()


@dataclass
class ContaminationResult:
    hits: list[Hit] = field(default_factory=list)
    shared: list[Shared] = field(default_factory=list)

    @property
    def train_ids(self) -> set[str]:
        return {h.train_id for h in self.hits}

    def per_source(self) -> dict[str, int]:
        """Distinct contaminated training rows per eval source."""
        return dict(Counter(source for source, _ in {(h.eval_source, h.train_id) for h in self.hits}))


def _gram_keys(words: list[str], n: int) -> list[str]:
    """A short hash of the word n-gram starting at each position (hashes keep the index small)."""
    return [hashlib.blake2b(" ".join(words[i : i + n]).encode(), digest_size=8).hexdigest()
            for i in range(len(words) - n + 1)]


def _covered(starts: set[int], words: list[str], prompt_len: int, cfg: ContaminationConfig) -> str | None:
    """When n-grams starting at `starts` cover at least min_coverage of an eval row's words (or of its prompt's):
    the overlap as people read it, "95% covered: <its first n-gram>"; else None."""
    cover = max(_coverage(starts, cfg.ngram, 0, len(words)), _coverage(starts, cfg.ngram, 0, prompt_len))
    if cover < cfg.min_coverage:
        return None
    first = min(starts)
    return f"{cover:.0%} covered: " + " ".join(words[first : first + cfg.ngram])


def _coverage(starts: set[int], n: int, lo: int, hi: int) -> float:
    """Share of word positions [lo, hi) covered by n-grams starting at `starts`."""
    if hi <= lo:
        return 0.0
    covered = {p for s in starts for p in range(s, s + n) if lo <= p < hi}
    return len(covered) / (hi - lo)


def benchmark_texts(path: Path) -> list[EvalText]:
    """Rows of a benchmark file in any supported format; unknown layouts use all their string fields."""
    out = []
    for where, row in read_rows(path):
        if isinstance(row, BadRow):
            raise DataError(f"{where}: {row}")
        try:
            out.append(EvalText.of(parse_row(row, "auto", str(row.get("id", where)), where), path.name))
        except RowError:
            text = "\n".join(str(v) for v in row.values() if isinstance(v, str))
            out.append(EvalText(str(row.get("id", where)), path.name, text))
    return out


def find_contamination(train: list[Record], evals: list[EvalText], cfg: ContaminationConfig,
                       near: DedupConfig | None = None) -> ContaminationResult:
    """Training rows that overlap an eval row: the same text or prompt, long n-grams shared with it that
    cover at least `cfg.min_coverage` of its words (or of its prompt's), or (when `near` is given) a
    near-twin by MinHash, the same test dedup applies within a split."""
    exact: dict[str, list[EvalText]] = defaultdict(list)
    index: dict[str, list[tuple[int, int]]] = defaultdict(list)  # n-gram -> (eval row, position)
    words_of: list[list[str]] = []
    prompt_len: list[int] = []
    for e, item in enumerate(evals):
        normalized = normalize_for_match(item.text)
        prompt = normalize_for_match(item.prompt)
        for whole in (normalized, prompt):
            if (len(whole.split()) >= MIN_EXACT_WORDS or whole == normalized and whole) and item not in exact[whole]:
                exact[whole].append(item)
        words = normalized.split()
        words_of.append(words)
        prompt_len.append(len(prompt.split()) if normalized.startswith(prompt) else 0)
        for position, key in enumerate(_gram_keys(words, cfg.ngram)):
            index[key].append((e, position))
    # Shared phrasing is not a leak: drop n-grams that many eval rows, or many training rows, contain
    # (an instruction or sign-off every row repeats); a leaked passage appears in one or two rows.
    train_words = [normalize_for_match(r.all_text()).split() for r in train]
    train_keys = [set(_gram_keys(words, cfg.ngram)) for words in train_words]
    in_train: Counter[str] = Counter(k for keys in train_keys for k in keys if k in index)
    eval_limit = max(3, cfg.ignore_common * len(evals))
    train_limit = max(3, cfg.ignore_common * len(train))
    rare_in_eval = {k: v for k, v in index.items() if len({e for e, _ in v}) <= eval_limit}
    index = {k: v for k, v in rare_in_eval.items() if in_train[k] <= train_limit}
    shared = _covered_by_common(evals, words_of, prompt_len, rare_in_eval.keys() - index.keys(), rare_in_eval,
                                in_train, cfg)
    twins = None
    if near is not None and near.near:
        twins = NearIndex(near.threshold, near.ngram, near.num_perm)
        for e, item in enumerate(evals):
            twins.add(e, twins.signature(item.text))

    result = ContaminationResult(shared=shared)
    for record, words, keys in zip(train, train_words, train_keys):
        # Every eval row a training row leaks, not only the first: a suite drops each of them, and the report
        # counts each source (a row that is both a test row and a benchmark question counts for both).
        hits: dict[int, Hit] = {}
        for whole in dict.fromkeys((" ".join(words), normalize_for_match(record.prompt_text()))):
            for item in exact.get(whole, ()):
                hits.setdefault(id(item), Hit(record.id, item.id, item.source, "exact", whole[:200]))
        matched: dict[int, set[int]] = defaultdict(set)
        for key in keys:
            for e, position in index.get(key, ()):
                matched[e].add(position)
        for e, starts in matched.items():
            if id(evals[e]) not in hits and (overlap := _covered(starts, words_of[e], prompt_len[e], cfg)):
                hits[id(evals[e])] = Hit(record.id, evals[e].id, evals[e].source, "ngram", overlap)
        if hits:
            result.hits += hits.values()
            continue
        twin = twins.find(twins.signature(record.all_text())) if twins is not None else None
        if twin is not None:
            item = evals[twin[0]]
            result.hits.append(Hit(record.id, item.id, item.source, "near", f"similarity {twin[1]:.2f}"))
    return result


def _covered_by_common(evals: list[EvalText], words_of: list[list[str]], prompt_len: list[int], common: set[str],
                       index: dict[str, list[tuple[int, int]]], in_train: Counter[str],
                       cfg: ContaminationConfig) -> list[Shared]:
    """Eval rows that n-grams repeated by many training rows (but few eval rows) cover as fully as a leak would."""
    starts: dict[int, set[int]] = defaultdict(set)
    most: dict[int, str] = {}
    for key in common:
        for e, position in index[key]:
            starts[e].add(position)
            if e not in most or in_train[key] > in_train[most[e]]:
                most[e] = key
    shared = []
    for e, found in sorted(starts.items()):
        overlap = _covered(found, words_of[e], prompt_len[e], cfg)
        if overlap is not None:
            shared.append(Shared(evals[e].id, evals[e].source, in_train[most[e]], overlap))
    return shared
