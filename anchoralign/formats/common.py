"""What every format loader shares: reading items with their location, the load report, ids.

Source files are either one JSON array (SpERT, CasRel, JointER, Text2DT) or one JSON value a line
(DyGIE, records). Each item keeps a ``Where`` so that a bad record is reported as ``file:line`` or
``file: item [i]`` with the field that is wrong.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from anchoralign.errors import RecordError, first_error
from anchoralign.schema import Sample, iter_jsonl

# How many unplaced triples a report keeps verbatim, to show in the warning and in data-stats.
MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Where:
    """The position of one item in its source file: a line (jsonl) or an index (JSON array)."""

    path: Path
    line: int | None = None
    index: int | None = None

    def error(self, message: str, field: str | None = None) -> RecordError:
        if self.index is None:
            return RecordError(str(self.path), self.line, message, field)
        what = f"field '{field}': {message}" if field else message
        return RecordError(str(self.path), None, f"item [{self.index}]: {what}")


COUNTS = ("unplaced_relations", "merged_duplicates", "type_conflicts", "normalised_matches")


@dataclass
class LoadReport:
    """What loading a split did besides producing samples; nothing is dropped without a count here.

    Counts are kept per sample id, so that the report of a subset (a dev set held out of a train
    file) is exact. Per sample, the source lists ``len(sample.relations) + unplaced + merged``
    relations, which is what ``source_relations`` sums.

    - ``unplaced_relations``: an argument could not be anchored to a token span (left out);
    - ``merged_duplicates``: identical triples merged (a Text2DT tree repeats facts across nodes);
    - ``type_conflicts``: spans that relations gave different entity types (the first one is kept);
    - ``normalised_matches``: mentions found only after ignoring accents and width variants.
    """

    files: list[str] = field(default_factory=list)
    source_relations: int = 0
    per_sample: dict[str, Counter[str]] = field(default_factory=dict)
    unplaced_examples: list[tuple[str, str]] = field(default_factory=list)  # (sample id, triple)
    notes: list[str] = field(default_factory=list)

    def count(self, sample_id: str, what: str, n: int = 1) -> None:
        if what not in COUNTS:
            raise ValueError(f"unknown count {what!r}; one of {COUNTS}")
        if n:
            self.per_sample.setdefault(sample_id, Counter())[what] += n

    def add_unplaced(self, sample_id: str, description: str) -> None:
        self.count(sample_id, "unplaced_relations")
        if len(self.unplaced_examples) < MAX_EXAMPLES:
            self.unplaced_examples.append((sample_id, description))

    def total(self, what: str) -> int:
        return sum(c[what] for c in self.per_sample.values())

    @property
    def unplaced_relations(self) -> int:
        return self.total("unplaced_relations")

    @property
    def merged_duplicates(self) -> int:
        return self.total("merged_duplicates")

    @property
    def type_conflicts(self) -> int:
        return self.total("type_conflicts")

    @property
    def normalised_matches(self) -> int:
        return self.total("normalised_matches")

    def merge(self, other: LoadReport) -> None:
        """Add ``other``'s counts into this report (a split read from several files)."""
        self.files.extend(other.files)
        self.source_relations += other.source_relations
        for sample_id, counts in other.per_sample.items():
            self.per_sample.setdefault(sample_id, Counter()).update(counts)
        room = max(MAX_EXAMPLES - len(self.unplaced_examples), 0)
        self.unplaced_examples.extend(other.unplaced_examples[:room])
        self.notes.extend(n for n in other.notes if n not in self.notes)

    def subset(self, samples: Sequence[Sample]) -> LoadReport:
        """The report restricted to ``samples`` (which must come from this report's load)."""
        ids = {s.id for s in samples}
        per_sample = {i: Counter(c) for i, c in self.per_sample.items() if i in ids}
        dropped = sum(c["unplaced_relations"] + c["merged_duplicates"] for c in per_sample.values())
        return LoadReport(
            files=list(self.files),
            source_relations=sum(len(s.relations) for s in samples) + dropped,
            per_sample=per_sample,
            unplaced_examples=[e for e in self.unplaced_examples if e[0] in ids],
            notes=list(self.notes),
        )


@dataclass(frozen=True)
class FormatOptions:
    """What a loader needs from the dataset's metadata; loaders never look at the dataset name."""

    id_prefix: str  # "<dataset>-<split>"
    argument_types: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # relation -> (subj, obj)


def read_items(path: Path) -> list[tuple[Where, Any]]:
    """Decoded items of a JSON-array file or a jsonl file (told apart by the first character)."""
    if _first_character(path) != "[":
        return [(Where(path, line=lineno), obj) for lineno, obj in iter_jsonl(path)]
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RecordError(
            str(path), err.lineno, f"not valid JSON ({err.msg} at column {err.colno})"
        ) from None
    return [(Where(path, index=i), obj) for i, obj in enumerate(items)]


def _first_character(path: Path) -> str:
    with path.open(encoding="utf-8") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]
    return ""


def iter_objects(items: Iterable[tuple[Where, Any]]) -> Iterator[tuple[Where, dict[str, Any]]]:
    """The items, each checked to be a JSON object."""
    for where, obj in items:
        if not isinstance(obj, dict):
            raise where.error(f"expected a JSON object, got {type(obj).__name__}")
        yield where, obj


def require(obj: Mapping[str, Any], key: str, kind: type, where: Where) -> Any:
    """``obj[key]``, which must exist and be of ``kind``."""
    if key not in obj:
        raise where.error("missing", key)
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise where.error(f"expected {kind.__name__}, got {type(value).__name__}", key)
    return value


def validate_sample(obj: Mapping[str, Any], where: Where) -> Sample:
    """A Sample from a record-shaped dict; a schema violation names the item and field."""
    try:
        return Sample.model_validate(obj)
    except ValidationError as err:
        loc, msg, _ = first_error(err)
        raise where.error(msg, loc or None) from None


def sample_ids(prefix: str, source_ids: Sequence[Any]) -> list[str]:
    """``<prefix>-<source id>`` when every item has a distinct source id, else ``<prefix>-<position>``.

    Source ids trace a sample back to the original corpus and survive re-ordering of the file; the
    position is the fallback so that ids are always unique within a split.
    """
    usable = all(i is not None and str(i) != "" for i in source_ids)
    if usable and len({str(i) for i in source_ids}) == len(source_ids):
        return [f"{prefix}-{i}" for i in source_ids]
    return [f"{prefix}-{k}" for k in range(len(source_ids))]
