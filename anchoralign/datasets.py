"""Datasets: metadata (label sets and descriptions) and loading any split as ``Sample`` records.

A dataset is either built in (``known_datasets()``: one JSON file each in ``anchoralign/metadata/``)
or a user's own data given by path:

- ``path/to/file.jsonl``: records in our format; every split reads that one file. A folder written by
  ``datasets.Dataset.save_to_disk`` is accepted wherever a records file is.
- ``path/to/dir``: ``train.jsonl``, ``dev.jsonl`` and/or ``test.jsonl`` (or saved ``datasets``
  folders ``train/``, ``dev/``, ``test/``, as a saved ``DatasetDict`` with those splits has), and
  optionally ``meta.json`` with the same fields as the built-in metadata (labels and descriptions,
  ``symmetric_relations``, ``language``...; ``format`` and ``files`` too, to read another supported
  format). Without ``meta.json`` the labels are those found in the data, described by their own text.

A built-in name always means the built-in dataset; write ``./scierc`` for a folder of that name.

Built-in data is read from ``DATA_DIR/<directory>/`` (``--data-dir``, else ``$ANCHORALIGN_DATA``, else
``./data``) with the original file names. The metadata says which files hold which split (``files``,
with ``{fold}`` for cross-validation folds) and which loader reads them (``format``, one of
``anchoralign.formats.LOADERS``), so no code here knows a dataset by name.

Datasets without a dev split (ADE) declare ``dev_from_train``: the dev set is a deterministic share of
the (fold's) train file, the samples with the smallest ``sha256("<seed>:<sample id>")``, and the train
split is the rest, so the two never overlap. The choice does not depend on the order of the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from anchoralign.errors import UserError, first_error
from anchoralign.formats import LOADERS, FormatOptions, LoadReport
from anchoralign.schema import DatasetMeta, Entity, Sample, is_datasets_folder

__all__ = [
    "DataNotFoundError",
    "DatasetMeta",
    "LoadReport",
    "get_meta",
    "known_datasets",
    "load_split",
    "load_split_with_report",
    "resolve_data_dir",
    "split_off_dev",
]

log = logging.getLogger(__name__)

DATA_ENV = "ANCHORALIGN_DATA"
USER_SPLITS = ("train", "dev", "test")


class DataNotFoundError(UserError):
    """A split's file is missing (the message says where it looked and how to get the data)."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


class _DevFromTrain(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(gt=0, lt=1)
    seed: int = 0


class _MetadataFile(BaseModel):
    """The JSON of a built-in dataset or a user's ``meta.json`` (where every field is optional)."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    language: Literal["en", "zh"] = "en"
    format: str = "records"
    directory: str = ""  # folder under the data directory; default: the name
    files: dict[str, str] = Field(default_factory=dict)  # split -> file name under the folder
    splits: list[str] | None = None  # default: the keys of ``files`` (plus dev when held out)
    folds: int = Field(default=0, ge=0)
    full_split: str = ""
    dev_from_train: _DevFromTrain | None = None
    entity_types: dict[str, str] = Field(default_factory=dict)
    relation_types: dict[str, str] = Field(default_factory=dict)
    symmetric_relations: list[str] = Field(default_factory=list)
    boundary_only: bool = False
    self_relations: bool = False  # relations whose head and tail are the same mention occur
    argument_types: dict[str, tuple[str, str]] = Field(default_factory=dict)  # relation -> (subj, obj) type
    entity_type_aliases: dict[str, str] = Field(default_factory=dict)  # type in the files -> our label
    obtain: str = ""  # how to get the files, shown when they are missing
    notes: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> _MetadataFile:
        if self.format not in LOADERS:
            raise ValueError(f"format {self.format!r} is not one of {', '.join(sorted(LOADERS))}")
        undescribed = [k for k, v in {**self.entity_types, **self.relation_types}.items() if not v.strip()]
        if undescribed:
            raise ValueError(f"empty description for {', '.join(undescribed)}")
        _check_subset("symmetric_relations", self.symmetric_relations, self.relation_types)
        _check_subset("argument_types", self.argument_types, self.relation_types)
        _check_subset(
            "argument_types values",
            [t for pair in self.argument_types.values() for t in pair],
            self.entity_types,
        )
        _check_subset("entity_type_aliases values", self.entity_type_aliases.values(), self.entity_types)
        fold_files = [s for s, f in self.files.items() if "{fold}" in f]
        if bool(fold_files) != bool(self.folds):
            raise ValueError("'folds' must be set exactly when some 'files' contain {fold}")
        if self.full_split and self.full_split not in self.files:
            raise ValueError(f"full_split {self.full_split!r} is not a key of 'files'")
        if self.splits is not None:
            unknown = [s for s in self.splits if s not in self.files and not self._held_out(s)]
            if unknown:
                raise ValueError(f"splits {unknown} have no file in 'files' (and are not a held-out dev)")
        return self

    def _held_out(self, split: str) -> bool:
        return split == "dev" and self.dev_from_train is not None and "dev" not in self.files

    def split_names(self) -> tuple[str, ...]:
        if self.splits is not None:
            return tuple(self.splits)
        names = [s for s in self.files if s != self.full_split]
        if self._held_out("dev"):
            names.insert(1 if "train" in names else 0, "dev")
        return tuple(names)


def _check_subset(what: str, values, allowed: Mapping[str, str]) -> None:
    missing = sorted({v for v in values if v not in allowed})
    if missing:
        raise ValueError(f"{what}: {', '.join(missing)} not declared in the label types")


@dataclass(frozen=True)
class _Source:
    """Where and how one dataset is read (built in or a user's path)."""

    meta: DatasetMeta
    spec: _MetadataFile
    folder: Path  # the files are folder / pattern
    origin: str  # for messages: which data directory, and where that came from
    check_labels: bool  # False when the labels were derived from the data itself
    builtin: bool = False
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- lookup


def known_datasets() -> list[str]:
    """Names of the built-in datasets."""
    return sorted(_builtin_files())


def resolve_data_dir(data_dir: str | None) -> Path:
    """``--data-dir`` if given, else ``$ANCHORALIGN_DATA``, else ``./data``."""
    return _data_dir(data_dir)[0]


def get_meta(name: str, data_dir: str | None = None) -> DatasetMeta:
    """Metadata of a built-in dataset, or of a user's data given as a path (see the module docstring)."""
    return _source(name, data_dir).meta


def load_split(name: str, split: str, data_dir: str | None = None, fold: int | None = None) -> list[Sample]:
    """The samples of one split (``fold`` for cross-validated datasets such as ADE)."""
    return load_split_with_report(name, split, data_dir, fold)[0]


def load_split_with_report(
    name: str, split: str, data_dir: str | None = None, fold: int | None = None
) -> tuple[list[Sample], LoadReport]:
    """``load_split`` plus what the load could not keep (unplaced triples, type conflicts...).

    Unplaced relations are also logged as a warning with their count, so they are never lost silently.
    """
    # Labels are only needed to check the data; for user data without meta.json there is nothing to
    # check against, so the files are not scanned for them first.
    source = _source(name, data_dir, scan_labels=False)
    samples, report = _load(source, split, fold)
    report.notes[:0] = [n for n in source.notes if n not in report.notes]
    where = f"{source.meta.name} {split}" + ("" if fold is None else f" (fold {fold})")
    if report.unplaced_relations:
        examples = "; ".join(f"{i}: {t}" for i, t in report.unplaced_examples)
        log.warning(
            "%s: %d of %d relations could not be placed on the tokens and were left out (e.g. %s)",
            where,
            report.unplaced_relations,
            report.source_relations,
            examples,
        )
    if report.type_conflicts:
        log.info("%s: %d spans got different types from different relations", where, report.type_conflicts)
    return samples, report


def split_off_dev(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(rest, dev): the ``round(fraction * n)`` samples with the smallest ``sha256("<seed>:<id>")``.

    Pure and independent of the order of ``samples``; each part keeps the input order.
    """

    def key(s: Sample) -> bytes:
        return hashlib.sha256(f"{seed}:{s.id}".encode()).digest()

    n_dev = round(fraction * len(samples))
    chosen = {s.id for s in sorted(samples, key=key)[:n_dev]}
    return [s for s in samples if s.id not in chosen], [s for s in samples if s.id in chosen]


# ---------------------------------------------------------------------------------------------- sources


@lru_cache(maxsize=1)
def _builtin_files() -> dict[str, resources.abc.Traversable]:
    folder = resources.files("anchoralign") / "metadata"
    return {f.name.removesuffix(".json"): f for f in folder.iterdir() if f.name.endswith(".json")}


@cache
def _builtin_spec(name: str) -> _MetadataFile:
    resource = _builtin_files()[name]
    return _parse_spec(resource.read_text(encoding="utf-8"), f"anchoralign/metadata/{resource.name}")


def _parse_spec(text: str, label: str) -> _MetadataFile:
    try:
        return _MetadataFile.model_validate(json.loads(text))
    except json.JSONDecodeError as err:
        raise UserError(f"{label}:{err.lineno}: not valid JSON ({err.msg})") from None
    except ValidationError as err:
        loc, msg, _ = first_error(err)
        raise UserError(f"{label}: {'field ' + repr(loc) + ': ' if loc else ''}{msg}") from None


def _data_dir(data_dir: str | None) -> tuple[Path, str]:
    if data_dir:
        return Path(data_dir), "from --data-dir"
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]), f"from ${DATA_ENV}"
    return Path("data"), f"the default; set --data-dir or ${DATA_ENV}"


def _meta_of(spec: _MetadataFile, name: str) -> DatasetMeta:
    return DatasetMeta(
        name=spec.name or name,
        language=spec.language,
        entity_types=dict(spec.entity_types),
        relation_types=dict(spec.relation_types),
        symmetric_relations=frozenset(spec.symmetric_relations),
        boundary_only=spec.boundary_only,
        self_relations=spec.self_relations,
        splits=spec.split_names(),
        folds=spec.folds,
        notes=spec.notes,
        full_split=spec.full_split,
    )


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.endswith((".jsonl", ".json")) or name.startswith(".")


def _source(name: str, data_dir: str | None, scan_labels: bool = True) -> _Source:
    if name in _builtin_files():
        spec = _builtin_spec(name)
        root, origin = _data_dir(data_dir)
        folder = root / (spec.directory or name)
        return _Source(
            _meta_of(spec, name), spec, folder, f"{root} ({origin})", check_labels=True, builtin=True
        )
    path = Path(name)
    if path.exists():
        return _user_source(path, scan_labels)
    if _looks_like_path(name):
        raise UserError(f"dataset path {name} does not exist")
    raise UserError(
        f"unknown dataset {name!r}. Known datasets: {', '.join(known_datasets())}; or give the path of "
        "your own data (a .jsonl file of records, or a directory with train.jsonl/dev.jsonl/test.jsonl)"
    )


def _user_source(path: Path, scan_labels: bool) -> _Source:
    if path.is_file() or is_datasets_folder(path):
        spec = _MetadataFile(name=path.stem, files=dict.fromkeys(USER_SPLITS, path.name))
        note = f"every split reads the same file {path}"
        return _derived_source(spec, path.parent, (note,), scan_labels)
    meta_file = path / "meta.json"
    if meta_file.is_file():
        spec = _parse_spec(meta_file.read_text(encoding="utf-8"), str(meta_file))
        if not spec.files:
            spec = spec.model_copy(update={"files": _present_jsonl(path)})
        name = spec.name or path.name
        return _Source(_meta_of(spec, name), spec, path, str(path), check_labels=True)
    spec = _MetadataFile(name=path.name, files=_present_jsonl(path))
    return _derived_source(spec, path, (), scan_labels)


def _present_jsonl(folder: Path) -> dict[str, str]:
    """The split files of a user's folder: ``<split>.jsonl``, else a saved ``datasets`` folder ``<split>/``."""
    files = {}
    for s in USER_SPLITS:
        if (folder / f"{s}.jsonl").is_file():
            files[s] = f"{s}.jsonl"
        elif is_datasets_folder(folder / s):
            files[s] = s
    if not files:
        raise UserError(
            f"{folder} holds none of {', '.join(f'{s}.jsonl' for s in USER_SPLITS)} "
            f"(nor saved `datasets` folders {', '.join(f'{s}/' for s in USER_SPLITS)})"
        )
    return files


def _derived_source(spec: _MetadataFile, folder: Path, notes: tuple[str, ...], scan_labels: bool) -> _Source:
    """User data without meta.json: labels are those in the files, described by their own text."""
    entity_types: set[str] = set()
    relation_types: set[str] = set()
    for file_name in dict.fromkeys(spec.files.values()) if scan_labels else ():
        for s in LOADERS[spec.format](folder / file_name, FormatOptions(id_prefix=spec.name))[0]:
            entity_types.update(e.type for e in s.entities)
            relation_types.update(r.type for r in s.relations)
    spec = spec.model_copy(
        update={
            "entity_types": {t: _describe_label(t) for t in sorted(entity_types)},
            "relation_types": {t: _describe_label(t) for t in sorted(relation_types)},
            "notes": "labels derived from the data (no meta.json); descriptions are the label text",
        }
    )
    return _Source(_meta_of(spec, spec.name), spec, folder, str(folder), check_labels=False, notes=notes)


def _describe_label(label: str) -> str:
    return " ".join(label.replace("_", " ").replace("-", " ").split()) or label


# ---------------------------------------------------------------------------------------------- loading


def _load(source: _Source, split: str, fold: int | None) -> tuple[list[Sample], LoadReport]:
    spec, meta = source.spec, source.meta
    if fold is not None and not spec.folds:
        raise UserError(f"dataset {meta.name!r} has no cross-validation folds; leave out --fold")
    if fold is not None and not 0 <= fold < spec.folds:
        raise UserError(f"dataset {meta.name!r} has folds 0..{spec.folds - 1}; got fold {fold}")
    held_out = spec.dev_from_train if spec._held_out("dev") and "train" in spec.files else None
    if held_out is not None and split in ("train", "dev"):
        samples, report = _read_file(source, "train", fold)
        rest, dev = split_off_dev(samples, held_out.fraction, held_out.seed)
        part = rest if split == "train" else dev
        part_report = report.subset(part)
        part_report.notes.append(
            f"dev is a held-out {held_out.fraction:.0%} of the train file (seed {held_out.seed}); "
            "train is the rest"
        )
        if split == "dev":
            train_prefix, dev_prefix = _prefix(meta.name, "train"), _prefix(meta.name, "dev")
            part = [s.model_copy(update={"id": dev_prefix + s.id[len(train_prefix) :]}) for s in part]
        return part, part_report
    if split in spec.files:
        return _read_file(source, split, fold)
    known = sorted({*meta.splits, *spec.files})
    raise UserError(f"dataset {meta.name!r} has no split {split!r} (splits: {', '.join(known)})")


def _prefix(name: str, split: str) -> str:
    return f"{name}-{split}"


def _read_file(source: _Source, split: str, fold: int | None) -> tuple[list[Sample], LoadReport]:
    """One split's file as it is on disk, with ids, type aliases and checks applied."""
    spec, meta = source.spec, source.meta
    pattern = spec.files[split]
    if "{fold}" in pattern and fold is None:
        raise UserError(
            f"dataset {meta.name!r} is split into {spec.folds} cross-validation folds: "
            f"choose one with --fold 0..{spec.folds - 1}"
        )
    path = source.folder / pattern.format(fold=fold)
    if not (path.is_file() or is_datasets_folder(path)):
        raise DataNotFoundError(_missing_message(source, path), path)
    options = FormatOptions(id_prefix=_prefix(meta.name, split), argument_types=spec.argument_types)
    samples, report = LOADERS[spec.format](path, options)
    if spec.entity_type_aliases:
        samples = [_renamed(s, spec.entity_type_aliases) for s in samples]
    if source.check_labels:
        _check_labels(samples, meta, path)
    _check_unique_ids(samples, path)
    return samples, report


def _missing_message(source: _Source, path: Path) -> str:
    if not source.builtin:
        return f"{source.meta.name}: file not found: {path}"
    spec, root = source.spec, source.folder.parent
    if root.is_dir():
        problem = f"{path} does not exist (data directory {source.origin})"
    else:
        problem = f"the data directory {source.origin} does not exist"
    layout = ", ".join(f"{source.folder.name}/{p}" for p in dict.fromkeys(spec.files.values()))
    return (
        f"{source.meta.name}: data not found: {problem}. Point --data-dir (or ${DATA_ENV}) at a directory "
        f"holding {source.folder.name}/ with the original file names ({layout}). {spec.obtain}"
    ).strip()


def _renamed(sample: Sample, aliases: Mapping[str, str]) -> Sample:
    entities = [Entity(start=e.start, end=e.end, type=aliases.get(e.type, e.type)) for e in sample.entities]
    return sample.model_copy(update={"entities": entities})


def _check_labels(samples: Sequence[Sample], meta: DatasetMeta, path: Path) -> None:
    for s in samples:
        for kind, labels, known in (
            ("entity type", (e.type for e in s.entities), meta.entity_types),
            ("relation type", (r.type for r in s.relations), meta.relation_types),
        ):
            for label in labels:
                if label not in known:
                    listed = ", ".join(known) if len(known) <= 20 else f"{len(known)} {kind}s"
                    raise UserError(
                        f"{path}: sample {s.id} has {kind} {label!r}, which the metadata of {meta.name!r} "
                        f"does not declare (declared: {listed})"
                    )


def _check_unique_ids(samples: Sequence[Sample], path: Path) -> None:
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise UserError(
                f"{path}: sample id {s.id!r} occurs more than once (ids must be unique per split)"
            )
        seen.add(s.id)
