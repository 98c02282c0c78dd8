"""Record sources as validated Arrow batches: a ``.jsonl`` file or a saved ``datasets`` folder.

A *records source* is anything that holds samples in the record format (``anchoralign.schema``):
a jsonl file (what ``augment`` writes and ``load_dataset("json", ...)`` reads) or a folder written
by ``datasets.Dataset.save_to_disk``. ``schema.read_records`` reads one into ``Sample`` objects
(small files: predictions, gold files, a user's split); :func:`record_batches` streams one as Arrow
record batches of :data:`RECORD_SCHEMA` without ever holding more than a batch in Python (corpora
of millions of samples, see ``anchoralign.training_set``).

``Sample`` (pydantic) is the one definition of a valid record, and its checks cost about 100 us a
record: a minute or more for a corpus of a million. So :func:`record_batches` reads a source in
two ways that give the same result:

- the fast path parses jsonl with Arrow's JSON reader against :data:`RECORD_SCHEMA` (unknown
  fields, wrong types and broken JSON fail there) and runs :func:`surely_valid`, the same checks
  as ``Sample`` written as column operations, on every batch;
- from the first batch the fast path doubts on, each record goes through ``Sample`` itself, line
  by line, exactly as ``read_jsonl`` reads it: a real error is reported with the same message,
  naming the file and line; a record that is valid but not in the canonical form (no ``id``, a
  ``null``, a number written as a string) is accepted, as ``read_jsonl`` accepts it, only slower.

:func:`surely_valid` may doubt a valid record (that costs speed only); it must never pass one that
``Sample`` refuses (``tests/test_record_tables.py`` holds it to that, rule by rule).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from anchoralign.errors import RecordError
from anchoralign.linearize import LabelSet
from anchoralign.schema import (
    DatasetMeta,
    Sample,
    iter_jsonl,
    load_datasets_folder,
    sample_of_line,
    sample_of_row,
)

_SPAN = pa.struct([("start", pa.int32()), ("end", pa.int32()), ("type", pa.string())])
_RELATION = pa.struct([("head", pa.int32()), ("tail", pa.int32()), ("type", pa.string())])
# The record format as Arrow columns (``datasets`` features: Value, List and dicts of them).
RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("tokens", pa.list_(pa.string())),
        ("entities", pa.list_(_SPAN)),
        ("relations", pa.list_(_RELATION)),
        ("source_id", pa.string()),
        ("origin", pa.string()),
    ]
)
# Arrow's JSON reader parses blocks of this many bytes (a batch is the records of one block):
# about 2,000 corpus records. The reader keeps a few dozen blocks in flight, so this bounds the
# memory of a build (about 40 MB of Arrow buffers), at no cost in speed.
_BLOCK_BYTES = 1 << 20
# Records a batch holds on the line-by-line path and when a saved folder is read.
_BATCH_ROWS = 16384


def samples_of(batch: pa.RecordBatch | pa.Table) -> list[Sample]:
    """The samples of a batch of :data:`RECORD_SCHEMA` (already validated)."""
    return [
        Sample.model_validate({k: v for k, v in row.items() if v is not None}) for row in batch.to_pylist()
    ]


def batch_of(samples: Iterable[Sample]) -> pa.RecordBatch:
    """Samples as one record batch of :data:`RECORD_SCHEMA`."""
    return pa.RecordBatch.from_pylist([s.model_dump() for s in samples], schema=RECORD_SCHEMA)


def record_batches(path: Path, meta: DatasetMeta | None = None) -> Iterator[pa.RecordBatch]:
    """The records of a source as batches of :data:`RECORD_SCHEMA`, every one validated as a
    ``Sample`` (and, with ``meta``, its labels checked against the dataset's); the first bad record
    raises the RecordError that ``read_jsonl`` would raise for it."""
    folder = path.is_dir()
    if not folder and not path.is_file():
        raise RecordError(str(path), None, "file not found")
    done = 0  # records of the batches the fast path passed
    try:
        for batch in _folder_batches(path) if folder else _jsonl_batches(path):
            if not surely_valid(batch, meta):
                break
            yield batch
            done += batch.num_rows
        else:
            return
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass  # not in the canonical form from this batch on: Sample decides, record by record
    exact = _exact_folder(path, done, meta) if folder else _exact_jsonl(path, done, meta)
    for samples in exact:
        yield batch_of(samples)


# ---------------------------------------------------------------------------------------------- fast path


def _jsonl_batches(path: Path) -> Iterator[pa.RecordBatch]:
    import pyarrow.json as pj

    reader = pj.open_json(
        path,
        read_options=pj.ReadOptions(block_size=_BLOCK_BYTES),
        parse_options=pj.ParseOptions(explicit_schema=RECORD_SCHEMA, unexpected_field_behavior="error"),
    )
    yield from reader


def _folder_batches(path: Path) -> Iterator[pa.RecordBatch]:
    table = load_datasets_folder(path).data.table
    if not {"id", "tokens"} <= set(table.column_names) <= set(RECORD_SCHEMA.names):
        raise pa.ArrowInvalid("not the record columns")  # Sample names what is missing or extra
    for name in RECORD_SCHEMA.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, RECORD_SCHEMA.field(name).type))
    table = table.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
    yield from table.to_batches(max_chunksize=_BATCH_ROWS)


def surely_valid(batch: pa.RecordBatch, meta: DatasetMeta | None = None) -> bool:
    """True only if every record of ``batch`` passes ``Sample``'s checks (and the label check).

    The same rules as ``Sample`` and :func:`check_labels`, as column operations; a null anywhere
    (a missing field, which ``Sample`` may fill with its default) leaves the decision to ``Sample``.
    """
    if any(batch.column(n).null_count for n in ("id", "tokens", "entities", "relations")):
        return False
    tokens, entities, relations = batch.column("tokens"), batch.column("entities"), batch.column("relations")
    n_tokens = pc.list_value_length(tokens)
    if not _all(pc.greater_equal(n_tokens, 1)) or pc.list_flatten(tokens).null_count:
        return False
    spans = pc.list_flatten(entities)
    start, end, etype = (spans.field(n) for n in ("start", "end", "type"))
    if spans.null_count or start.null_count or end.null_count or etype.null_count:
        return False
    owner = pc.list_parent_indices(entities)
    if not (
        _all(pc.greater_equal(start, 0))
        and _all(pc.greater(end, start))
        and _all(pc.less_equal(end, pc.take(n_tokens, owner)))
        and _all(pc.greater_equal(pc.utf8_length(etype), 1))
        and _labels_known(etype, None if meta is None else meta.entity_types)
    ):
        return False
    if _has_duplicates(owner, start, end, etype):
        return False
    links = pc.list_flatten(relations)
    head, tail, rtype = (links.field(n) for n in ("head", "tail", "type"))
    if links.null_count or head.null_count or tail.null_count or rtype.null_count:
        return False
    n_entities = pc.take(pc.list_value_length(entities), pc.list_parent_indices(relations))
    return (
        _all(pc.greater_equal(head, 0))
        and _all(pc.greater_equal(tail, 0))
        and _all(pc.less(head, n_entities))
        and _all(pc.less(tail, n_entities))
        and _all(pc.greater_equal(pc.utf8_length(rtype), 1))
        and _labels_known(rtype, None if meta is None else meta.relation_types)
    )


def _has_duplicates(owner: pa.Array, start: pa.Array, end: pa.Array, etype: pa.Array) -> bool:
    """Whether a record holds the same (start, end, type) twice: each span as one integer."""
    if not len(owner):
        return False
    codes = pc.dictionary_encode(etype).indices.to_numpy().astype(np.int64)
    width, kinds = int(pc.max(end).as_py()) + 1, int(codes.max()) + 1
    if len(owner) * width * width * kinds >= 1 << 62:
        return True  # too large to pack: let Sample decide
    key = ((owner.to_numpy().astype(np.int64) * width + start.to_numpy()) * width + end.to_numpy()) * kinds
    return len(np.unique(key + codes)) != len(key)


def _all(mask: pa.Array) -> bool:
    return len(mask) == 0 or pc.all(mask).as_py() is True


def _labels_known(labels: pa.Array, known: Sequence[str] | None) -> bool:
    return known is None or _all(pc.is_in(labels, value_set=pa.array(list(known), pa.string())))


# ---------------------------------------------------------------------------------------------- exact path


def check_labels(sample: Sample, meta: DatasetMeta, path: str | Path, line: int | None) -> None:
    """Every label must be one of the dataset's: the model has label tokens for those only."""
    for kind, label in LabelSet.from_meta(meta).unknown_labels(sample)[:1]:
        field = "entities" if kind == "entity" else "relations"
        raise RecordError(str(path), line, f"{kind} type {label!r} is not a {meta.name} label", field)


def _exact_jsonl(path: Path, skip: int, meta: DatasetMeta | None) -> Iterator[list[Sample]]:
    """Samples from the ``skip``-th record on, read as ``read_jsonl`` reads them, in lists."""
    chunk: list[Sample] = []
    for lineno, obj in iter_jsonl(path, skip=skip):
        sample = sample_of_line(obj, path, lineno)
        if meta is not None:
            check_labels(sample, meta, path, lineno)
        chunk.append(sample)
        if len(chunk) == _BATCH_ROWS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _exact_folder(path: Path, skip: int, meta: DatasetMeta | None) -> Iterator[list[Sample]]:
    """Rows of a saved folder from row ``skip`` on, each validated as a ``Sample``, in lists."""
    ds = load_datasets_folder(path)
    for first in range(skip, len(ds), _BATCH_ROWS):
        chunk = []
        rows = ds[first : first + _BATCH_ROWS]
        for i, row in enumerate(_rows(rows), start=first):
            sample = sample_of_row(row, path, i)
            if meta is not None:
                check_labels(sample, meta, f"{path}: row [{i}]", None)
            chunk.append(sample)
        yield chunk


def _rows(columns: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    names = list(columns)
    return (dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True))
