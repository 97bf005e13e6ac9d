"""Duplicate removal: exact (normalized hash) and near-duplicate (MinHash LSH over word n-gram shingles).

Records are visited in priority order and the first of a pair is kept, so callers put the rows they
must keep (eval rows) first. Every removal is reported as a (kept id, removed id) pair.

Rows that say the same thing with opposite verdicts (a KTO completion labelled both desirable and undesirable, a
preference pair and its swap) are not duplicates: keeping the first would keep a verdict picked by file order. They
are conflicts, every such row is removed and each is reported. Near-dedup of KTO rows compares rows of one label
only: a desirable answer and an undesirable near-twin of it are the contrast KTO learns from.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tunelab.config import DedupConfig
from tunelab.data.records import Record

# Sentence punctuation (Unicode category P*) is not part of what a text says; operators are ("12 * 3" is not
# "12 - 3"), and symbols (S*: + = < > ^ $) are kept by not being listed.
_OPERATORS = set("*/%#&@-\\|~")
_PUNCT = re.compile("[" + "".join(re.escape(chr(c)) for c in range(0x10000)
                                  if unicodedata.category(chr(c)).startswith("P") and chr(c) not in _OPERATORS) + "]")
_FORMAT = re.compile("[" + "".join(re.escape(chr(c)) for c in range(0x10000) if unicodedata.category(chr(c)) == "Cf")
                     + "]")  # zero-width spaces, soft hyphens, direction marks: invisible, inside words


def normalize_for_match(text: str) -> str:
    """What counts as 'the same text': Unicode compatibility-composed (an accent typed as a separate mark, full-width
    letters), invisible format characters removed, case folded, sentence punctuation removed, whitespace collapsed."""
    text = _FORMAT.sub("", unicodedata.normalize("NFKC", text)).casefold()
    return " ".join(_PUNCT.sub(" ", text).split())


def text_of(record: Record, fields: str) -> str:
    if fields == "prompt":
        return record.prompt_text()
    if fields == "answer":
        return record.answer_text()
    return record.all_text()


def shingles(text: str, n: int) -> set[bytes]:
    """Word n-grams of the normalized text (the whole text when it is shorter than n words)."""
    words = normalize_for_match(text).split()
    if len(words) <= n:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)}


@dataclass
class DedupResult:
    kept: list[Record]
    exact_pairs: list[tuple[str, str]] = field(default_factory=list)
    near_pairs: list[tuple[str, str, float]] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (first row, a row with the opposite verdict)


def deduplicate(records: list[Record], cfg: DedupConfig,
                progress: Callable[[int], None] | None = None) -> DedupResult:
    result = DedupResult(kept=records)
    if cfg.exact:
        result.kept, result.exact_pairs, result.conflicts = _exact(result.kept, cfg.fields)
    if cfg.near:
        result.kept, result.near_pairs = _near(result.kept, cfg, progress)
    return result


def _exact_key(record: Record, fields: str) -> tuple[str, object]:
    """The text that makes two rows the same, and the row's verdict on it (None where a row has none)."""
    if fields == "all" and record.kind == "preference":
        # A pair and its swap are one text with opposite verdicts: key on the answers in a fixed order.
        chosen, rejected = normalize_for_match(record.chosen or ""), normalize_for_match(record.rejected or "")
        text = "\n".join([normalize_for_match(record.prompt_text()), *sorted([chosen, rejected])])
        return hashlib.sha1(text.encode()).hexdigest(), chosen <= rejected
    key = hashlib.sha1(normalize_for_match(text_of(record, fields)).encode()).hexdigest()
    return key, record.label if fields == "all" and record.kind == "kto" else None


def _exact(records: list[Record], fields: str) -> tuple[list[Record], list[tuple[str, str]], list[tuple[str, str]]]:
    first: dict[str, tuple[Record, object]] = {}  # key -> first row and its verdict, in the order seen
    pairs, conflicts = [], []
    conflicted: set[str] = set()
    for record in records:
        key, verdict = _exact_key(record, fields)
        if key not in first:
            first[key] = (record, verdict)
        elif first[key][1] == verdict:
            pairs.append((first[key][0].id, record.id))
        else:
            conflicts.append((first[key][0].id, record.id))
            conflicted.add(key)
    kept = [record for key, (record, _) in first.items() if key not in conflicted]
    return kept, pairs, conflicts


def _hash32(data: bytes) -> int:
    import xxhash

    return xxhash.xxh32_intdigest(data)


class NearIndex:
    """MinHash LSH over word n-gram shingles: add texts, then ask for a near-twin of another text."""

    def __init__(self, threshold: float, ngram: int, num_perm: int) -> None:
        from datasketch import MinHash, MinHashLSH

        self.threshold, self.ngram, self.num_perm = threshold, ngram, num_perm
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        # One shared permutation table: datasketch would otherwise draw it again for every MinHash.
        self._template = MinHash(num_perm=num_perm, hashfunc=_hash32, seed=1)
        self._signatures: dict[int, np.ndarray] = {}

    def signature(self, text: str) -> object:
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, hashfunc=_hash32, permutations=self._template.permutations,
                    scheme=self._template.scheme)
        m.update_batch(list(shingles(text, self.ngram)))
        return m

    def find(self, signature: object) -> tuple[int, float] | None:
        """The first indexed key whose estimated Jaccard similarity reaches the threshold."""
        for key in self._lsh.query(signature):
            similarity = float(np.mean(self._signatures[key] == signature.hashvalues))
            if similarity >= self.threshold:
                return key, similarity
        return None

    def add(self, key: int, signature: object) -> None:
        self._lsh.insert(key, signature, check_duplication=False)
        self._signatures[key] = signature.hashvalues


def _near(records: list[Record], cfg: DedupConfig,
          progress: Callable[[int], None] | None) -> tuple[list[Record], list[tuple[str, str, float]]]:
    indexes: dict[object, NearIndex] = {}  # one per KTO label (see the module's docstring), else one
    kept, pairs = [], []
    for i, record in enumerate(records):
        group = record.label if record.kind == "kto" else None
        if group not in indexes:
            indexes[group] = NearIndex(cfg.threshold, cfg.ngram, cfg.num_perm)
        index = indexes[group]
        signature = index.signature(text_of(record, cfg.fields))
        twin = index.find(signature)
        if twin is None:
            index.add(i, signature)
            kept.append(record)
        else:
            pairs.append((records[twin[0]].id, record.id, round(twin[1], 3)))
        if progress is not None and i % 1000 == 999:
            progress(1000)
    return kept, pairs
