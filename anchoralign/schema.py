"""The one record format: a sentence as tokens, typed entity spans and typed relations.

Offsets are token offsets with ``end`` exclusive; ``head``/``tail`` index ``entities`` (the
SpERT convention). Datasets after loading, both augmented corpora and predictions all use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from anchoralign.errors import RecordError, first_error
from anchoralign.files import atomic_write_text


class Entity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    start: int = Field(ge=0)
    end: int = Field(ge=1)
    type: str = Field(min_length=1)

    @model_validator(mode="after")
    def _span_not_empty(self) -> Entity:
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be greater than start ({self.start})")
        return self


class Relation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    head: int = Field(ge=0)
    tail: int = Field(ge=0)
    type: str = Field(min_length=1)


class Sample(BaseModel):
    """One sentence. Corpus records also carry ``source_id`` and ``origin``."""

    model_config = ConfigDict(extra="forbid")

    id: str
    tokens: list[str] = Field(min_length=1)
    entities: list[Entity] = Field(default_factory=list)
    relations: list[Relation] = Field(default_factory=list)
    source_id: str | None = None
    origin: str | None = None  # "mention", "context" or "cross" for augmented records

    @model_validator(mode="after")
    def _consistent(self) -> Sample:
        n = len(self.tokens)
        seen: set[tuple[int, int, str]] = set()
        for i, e in enumerate(self.entities):
            if e.end > n:
                raise ValueError(f"entities[{i}]: span {e.start}..{e.end} is past the end of the {n} tokens")
            key = (e.start, e.end, e.type)
            if key in seen:
                raise ValueError(f"entities[{i}]: duplicate entity {e.start}..{e.end} {e.type!r}")
            seen.add(key)
        m = len(self.entities)
        for i, r in enumerate(self.relations):
            for side in ("head", "tail"):
                idx = getattr(r, side)
                if idx >= m:
                    raise ValueError(f"relations[{i}].{side}: points at entity {idx} of {m}")
        return self

    def mention(self, i: int) -> str:
        """Surface text of entity ``i`` (tokens joined by spaces)."""
        e = self.entities[i]
        return " ".join(self.tokens[e.start : e.end])

    @property
    def text(self) -> str:
        return " ".join(self.tokens)

    def to_record(self) -> dict[str, Any]:
        """The jsonl dict; ``source_id``/``origin`` only when set."""
        return self.model_dump(exclude_none=True)


@dataclass(frozen=True)
class DatasetMeta:
    """What a dataset is: its labels with readable descriptions and how it is scored.

    Built by ``anchoralign.datasets`` from the metadata files; saved in every checkpoint
    (``labels.json``)."""

    name: str
    language: str  # "en" or "zh" (zh: tokens are characters)
    entity_types: dict[str, str]  # label -> readable description (used to init label tokens)
    relation_types: dict[str, str]  # label -> readable description
    symmetric_relations: frozenset[str]
    boundary_only: bool  # NYT, WebNLG: no meaningful entity types, scored on relation boundary F1
    splits: tuple[str, ...]  # e.g. ("train", "dev", "test")
    folds: int = 0  # ADE: 10 (cross-validation), else 0
    notes: str = ""  # e.g. how NYT entity types are derived
    full_split: str = ""  # cross-validated datasets: the split holding the whole corpus ("full")
    self_relations: bool = False  # a relation may link a mention to itself (WebNLG); else forbidden


def _field_of(err: ValidationError) -> str:
    where, msg, _ = first_error(err)
    return f"field '{where}': {msg}" if where else msg


def parse_record(obj: Any, path: str | Path = "<record>", line: int | None = None) -> Sample:
    """Validate one decoded JSON object as a Sample; errors name file, line and field."""
    if not isinstance(obj, dict):
        raise RecordError(str(path), line, f"expected a JSON object, got {type(obj).__name__}")
    try:
        return Sample.model_validate(obj)
    except ValidationError as err:
        raise RecordError(str(path), line, _field_of(err)) from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, decoded JSON) for every non-blank line; bad JSON names file and line."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(str(path), None, "file not found")
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw)
            except json.JSONDecodeError as err:
                raise RecordError(
                    str(path), lineno, f"not valid JSON ({err.msg} at column {err.colno})"
                ) from None


def read_jsonl(path: str | Path) -> list[Sample]:
    """Read a record file. Lines without an ``id`` get ``<file stem>-<line>``."""
    path = Path(path)
    samples = []
    for lineno, obj in iter_jsonl(path):
        if isinstance(obj, dict) and "id" not in obj:
            obj = {"id": f"{path.stem}-{lineno}", **obj}
        samples.append(parse_record(obj, path, lineno))
    return samples


def write_jsonl(path: str | Path, samples: Iterable[Sample | dict[str, Any]]) -> int:
    """Write records one a line (atomically: a temp file renamed into place). Returns the count."""
    lines = [
        json.dumps(s.to_record() if isinstance(s, Sample) else s, ensure_ascii=False) + "\n" for s in samples
    ]
    atomic_write_text(path, "".join(lines))
    return len(lines)


# Hugging Face datasets: one column per field; nested lists of dicts are stored as Arrow structs.
def to_hf_dataset(samples: Iterable[Sample]):
    import datasets

    rows = [s.model_dump() for s in samples]
    return datasets.Dataset.from_list(rows, features=_hf_features())


def from_hf_dataset(ds) -> list[Sample]:
    out = []
    for i, row in enumerate(ds):
        row = {k: v for k, v in row.items() if v is not None}
        out.append(parse_record(row, "<datasets.Dataset>", i + 1))
    return out


def _hf_features():
    import datasets

    span = {
        "start": datasets.Value("int32"),
        "end": datasets.Value("int32"),
        "type": datasets.Value("string"),
    }
    rel = {"head": datasets.Value("int32"), "tail": datasets.Value("int32"), "type": datasets.Value("string")}
    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "tokens": datasets.Sequence(datasets.Value("string")),
            "entities": [span],
            "relations": [rel],
            "source_id": datasets.Value("string"),
            "origin": datasets.Value("string"),
        }
    )
