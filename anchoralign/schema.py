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

from anchoralign.errors import RecordError, UserError, first_error
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


# The masked corpus writes entity i of a sentence as the single token <mask{i}>; a model's tokenizer
# holds N_MASK_TOKENS of them (anchoralign.model), so augment skips a sentence with more entities
# (augment.prompts.eligibility) rather than write a placeholder no model can read as one token.
N_MASK_TOKENS = 64


def mask_token(i: int) -> str:
    """The placeholder of entity ``i`` in context prompts and in the masked corpus (also how an LLM's
    placeholder of any number is spelt back, so no range check here: eligibility bounds the corpus)."""
    return f"<mask{i}>"


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


def iter_jsonl(path: str | Path, skip: int = 0) -> Iterator[tuple[int, Any]]:
    """Yield (line number, decoded JSON) for every non-blank line; bad JSON names file, line and
    column. The first ``skip`` non-blank lines are passed over without being decoded."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(str(path), None, "file not found")
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if skip:
                skip -= 1
                continue
            # Without its line break: a fault at the end of the line (a record cut short) is then
            # reported at its column, not as column 1 of a next line.
            line = raw.rstrip("\r\n")
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise RecordError(
                    str(path), lineno, f"not valid JSON ({err.msg} at column {err.colno})"
                ) from None


def sample_of_line(obj: Any, path: str | Path, lineno: int) -> Sample:
    """The sample of one decoded jsonl line; a record without an ``id`` gets ``<file stem>-<line>``."""
    if isinstance(obj, dict) and "id" not in obj:
        obj = {"id": f"{Path(path).stem}-{lineno}", **obj}
    return parse_record(obj, path, lineno)


def read_jsonl(path: str | Path) -> list[Sample]:
    """Read a record file. Lines without an ``id`` get ``<file stem>-<line>``."""
    return [sample_of_line(obj, path, lineno) for lineno, obj in iter_jsonl(path)]


def is_datasets_folder(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` (a ``DatasetDict`` folder holds several)."""
    return path.is_dir() and (path / "state.json").is_file()


def is_records_source(path: Path) -> bool:
    """A records file (jsonl) or a saved ``datasets`` folder: what :func:`read_records` reads."""
    return path.is_file() or is_datasets_folder(path)


def read_records(path: str | Path) -> list[Sample]:
    """All samples of a jsonl file or of a saved ``datasets`` folder of records.

    A bad record names the file and line, or the folder and row (``row [i]``, as in ``dataset[i]``).
    """
    path = Path(path)
    if path.is_dir():
        return from_hf_dataset(load_datasets_folder(path), str(path))
    return read_jsonl(path)


def load_datasets_folder(path: Path):
    """The memory-mapped ``datasets.Dataset`` saved in ``path``."""
    import datasets

    if (path / "dataset_dict.json").is_file():
        raise UserError(f"{path}: a DatasetDict folder; give the folder of one split (e.g. {path / 'train'})")
    if not is_datasets_folder(path):
        raise RecordError(str(path), None, "not a records file nor a folder saved by `datasets`")
    return datasets.load_from_disk(str(path))


def write_jsonl(path: str | Path, samples: Iterable[Sample | dict[str, Any]]) -> int:
    """Write records one a line (atomically: a temp file renamed into place). Returns the count."""
    lines = [
        json.dumps(s.to_record() if isinstance(s, Sample) else s, ensure_ascii=False) + "\n" for s in samples
    ]
    atomic_write_text(path, "".join(lines))
    return len(lines)


# Hugging Face datasets: one column per field (anchoralign.record_tables.RECORD_SCHEMA).
def to_hf_dataset(samples: Iterable[Sample]):
    import datasets

    from anchoralign.record_tables import RECORD_SCHEMA

    features = datasets.Features.from_arrow_schema(RECORD_SCHEMA)
    return datasets.Dataset.from_list([s.model_dump() for s in samples], features=features)


def from_hf_dataset(ds, name: str = "<datasets.Dataset>") -> list[Sample]:
    """The samples of a ``datasets.Dataset`` of records."""
    return [sample_of_row(row, name, i) for i, row in enumerate(ds)]


def sample_of_row(row: dict[str, Any], name: str | Path, index: int) -> Sample:
    """The sample of row ``index`` of a table of records; a bad one is named ``<name>: row [i]``.

    Arrow cannot tell a missing field from a null one, so nulls are left out (their defaults apply).
    """
    return parse_record({k: v for k, v in row.items() if v is not None}, f"{name}: row [{index}]")
