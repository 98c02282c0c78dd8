"""Training sets as Arrow tables, tokenised once: what the trainers index.

A :class:`TrainingSet` is a ``datasets.Dataset`` of records plus two columns computed once per
sample, ``pieces`` (the sub-word ids of each word, by the collator's own ``WordPieces``) and
``length`` (the encoder input length, sub-words plus the two special tokens, so that an input the
encoder cannot take is an error before training, not at its batch). It is a sequence: ``data[i]``
turns row ``i`` into an :class:`Encoded` sample only then, so a corpus of millions of samples is
never held as Python objects; the trainer's epoch order is a permutation of indices
(``schedule.epoch_order``) and the word counts it buckets by are read from the token lists' offsets.

Corpora (:func:`open_cached`) are read from their records source (``anchoralign.record_tables``:
a jsonl file or a saved ``datasets`` folder), validated record by record with the errors of
``read_jsonl`` and written once to an Arrow file that later runs memory-map:

- **where**: ``$ANCHORALIGN_CACHE``, else ``$XDG_CACHE_HOME/anchoralign`` (``~/.cache/anchoralign``),
  one folder per entry. A user cache like Hugging Face's own, rather than a folder beside the data,
  because data folders may be read-only or shared (``../shared/data``) and a run folder should hold
  results only; every run, stage and rank on the machine shares the entries. An entry whose source
  has since changed can never be used again and is deleted when its replacement is built.
- **key**: the source (resolved path, and the size and modification time of each file), the
  tokenizer (a hash of its full serialisation: vocabulary, added label tokens, normaliser), the
  label set (the build checks every label against it) and :data:`FORMAT`. Not the paradigm: no
  column depends on it (targets are written by the collator, which is cheap).
- **concurrency**: ranks that start together take a file lock, so one builds while the others wait
  and then read its result; the entry is written in a temporary folder renamed into place, so a
  reader (or a build killed midway) never sees half of one.

Training sets already in memory (a benchmark's train split, :func:`in_memory`) are converted the
same way without a disk entry: they are at most some tens of thousands of sentences, a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from anchoralign.batching import Encoded, WordPieces, sample_of, too_long
from anchoralign.errors import RecordError
from anchoralign.record_tables import RECORD_SCHEMA, batch_of, record_batches
from anchoralign.schema import DatasetMeta, Sample

CACHE_ENV = "ANCHORALIGN_CACHE"
# Version of what an entry holds and how it is computed (the columns, WordPieces' rules): bump it
# when either changes, so that older entries are not read as current ones.
FORMAT = 1
DATA_FILE = "data.arrow"
INFO_FILE = "info.json"
CACHE_SCHEMA = RECORD_SCHEMA.append(pa.field("pieces", pa.list_(pa.list_(pa.int32())))).append(
    pa.field("length", pa.int32())
)
_CHUNK = 16384  # samples converted at a time by in_memory
# Distinct words whose sub-words a build keeps at a time (about 150 MB at most): a corpus repeats
# most of its words, but an augmented one keeps bringing new mentions.
_KNOWN_WORDS = 1 << 20


class TrainingSet(Sequence[Encoded]):
    """The rows ``rows`` (all when None) of an Arrow table of :data:`CACHE_SCHEMA`, as a sequence."""

    def __init__(self, data: Any, name: str, rows: np.ndarray | None = None):
        self.data = data  # datasets.Dataset
        self.name = name  # for messages: the source file, or "<dataset> <split>"
        self.rows = rows

    def __len__(self) -> int:
        return len(self.data) if self.rows is None else len(self.rows)

    @overload
    def __getitem__(self, i: int) -> Encoded: ...
    @overload
    def __getitem__(self, i: slice) -> TrainingSet: ...
    def __getitem__(self, i: int | slice) -> Encoded | TrainingSet:
        if isinstance(i, slice):
            return self.select(np.arange(len(self))[i])
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        row = self.data[int(i if self.rows is None else self.rows[i])]
        pieces = row.pop("pieces")
        del row["length"]
        return Encoded(Sample.model_validate({k: v for k, v in row.items() if v is not None}), pieces)

    def __iter__(self) -> Iterator[Encoded]:
        return (self[i] for i in range(len(self)))

    def select(self, indices: Sequence[int] | np.ndarray) -> TrainingSet:
        """The samples at ``indices`` (positions in this set), in that order; nothing is copied."""
        indices = np.asarray(indices, dtype=np.int64)
        return TrainingSet(self.data, self.name, indices if self.rows is None else self.rows[indices])

    def _column(self, values: pa.ChunkedArray) -> np.ndarray:
        """A numeric column of the table, as these rows (nothing else of the table is read)."""
        array = values.to_numpy()
        return array if self.rows is None else array[self.rows]

    @property
    def input_lengths(self) -> np.ndarray:
        """Encoder input length of each sample: sub-words plus the start and end tokens."""
        return self._column(self.data.data.column("length"))

    @property
    def word_counts(self) -> np.ndarray:
        return self._column(pc.list_value_length(self.data.data.column("tokens")))

    def relation_counts(self) -> np.ndarray:
        return self._column(pc.list_value_length(self.data.data.column("relations")))

    def check_lengths(self, max_length: int) -> None:
        """The first sample longer than the encoder takes is an error now, not at its batch."""
        lengths = self.input_lengths
        over = np.flatnonzero(lengths > max_length)
        if len(over):
            first = int(over[0])
            raise too_long(self[first].sample, int(lengths[first]), max_length, f"{self.name}: ")


def sample_lengths(data: Sequence[Any]) -> Sequence[int]:
    """Sentence lengths for length bucketing: the word count of each sample."""
    if isinstance(data, TrainingSet):
        return data.word_counts
    return [len(sample_of(s).tokens) for s in data]


# ---------------------------------------------------------------------------------------------- building


class _PieceTable:
    """Adds ``pieces`` and ``length`` to record batches, tokenising each distinct word once."""

    def __init__(self, tokenizer: Any):
        self.word_pieces = WordPieces(tokenizer)
        self.known: dict[str, list[int]] = {}

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        tokens = batch.column("tokens")
        words = pc.dictionary_encode(pc.list_flatten(tokens))
        distinct = words.dictionary.to_pylist()
        new = [w for w in distinct if w not in self.known]
        if len(self.known) + len(new) > _KNOWN_WORDS:
            self.known = {w: self.known[w] for w in distinct if w in self.known}
        self.known.update(zip(new, self.word_pieces(new), strict=True))
        by_word = pc.take(pa.array([self.known[w] for w in distinct], pa.list_(pa.int32())), words.indices)
        offsets = pc.subtract(tokens.offsets, tokens.offsets[0])
        pieces = pa.ListArray.from_arrays(offsets, by_word)
        ends = by_word.offsets.to_numpy()[offsets.to_numpy()]
        length = pa.array((np.diff(ends) + 2).astype(np.int32))
        return pa.RecordBatch.from_arrays([*batch.columns, pieces, length], schema=CACHE_SCHEMA)


def concat(sets: Sequence[TrainingSet], name: str) -> TrainingSet:
    """One training set of the samples of ``sets``, in their order; the tables are joined, not copied."""
    import datasets

    if len(sets) == 1:
        return sets[0]
    offsets = np.cumsum([0, *(len(s.data) for s in sets[:-1])])
    rows = None
    if any(s.rows is not None for s in sets):
        rows = np.concatenate(
            [
                off + (np.arange(len(s.data)) if s.rows is None else s.rows)
                for off, s in zip(offsets, sets, strict=True)
            ]
        )
    return TrainingSet(datasets.concatenate_datasets([s.data for s in sets]), name, rows)


def in_memory(samples: Sequence[Sample], tokenizer: Any, name: str) -> TrainingSet:
    """A training set of samples already loaded (converted in memory, not cached)."""
    import datasets
    from datasets.table import InMemoryTable

    add = _PieceTable(tokenizer)
    batches = [add(batch_of(samples[i : i + _CHUNK])) for i in range(0, len(samples), _CHUNK)]
    table = pa.Table.from_batches(batches, schema=CACHE_SCHEMA)
    return TrainingSet(datasets.Dataset(InMemoryTable(table)), name)


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "anchoralign"


def open_cached(
    source: Path, tokenizer: Any, meta: DatasetMeta, note: Callable[[str], None] = lambda _: None
) -> TrainingSet:
    """The training set of a records source, from its cache entry (built first if there is none).

    ``note`` receives one line saying whether the entry was reused or built, and where it is.
    """
    from filelock import FileLock

    if not source.exists():
        raise RecordError(str(source), None, "file not found")
    identity = source_identity(source)
    key = _digest(
        {
            "format": FORMAT,
            "source": identity,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "labels": [list(meta.entity_types), list(meta.relation_types)],
        }
    )
    root = cache_root()
    entry = root / f"{source.name.removesuffix('.jsonl')}-{key[:16]}"
    if not entry.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f"{entry.name}.lock")):
            if not entry.is_dir():  # not built by another rank meanwhile
                start = time.perf_counter()
                rows = _build(entry, source, tokenizer, meta, identity)
                note(
                    f"{source}: {rows} samples tokenised in {time.perf_counter() - start:.1f} s, cached in {entry}"
                )
                _remove_stale(root, identity, entry)
                return _open(entry, source)
    data = _open(entry, source)
    note(f"{source}: {len(data)} samples from the cache {entry}")
    return data


def _open(entry: Path, source: Path) -> TrainingSet:
    import datasets

    return TrainingSet(datasets.Dataset.from_file(str(entry / DATA_FILE)), str(source))


def _build(entry: Path, source: Path, tokenizer: Any, meta: DatasetMeta, identity: dict[str, Any]) -> int:
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        add = _PieceTable(tokenizer)
        rows = _write(tmp / DATA_FILE, (add(batch) for batch in record_batches(source, meta)))
        info = {
            "source": identity,
            "rows": rows,
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        tmp.rename(entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rows


def _write(path: Path, batches: Iterable[pa.RecordBatch]) -> int:
    """Batches as one Arrow stream file (the format ``datasets`` memory-maps)."""
    rows = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, CACHE_SCHEMA) as writer:
        for batch in batches:
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


def _remove_stale(root: Path, identity: dict[str, Any], keep: Path) -> None:
    """Delete the entries of the same source made from an earlier version of it."""
    for info in root.glob(f"*/{INFO_FILE}"):
        if info.parent == keep or info.parent.name.startswith("."):
            continue
        try:
            old = json.loads(info.read_text(encoding="utf-8"))["source"]
        except (OSError, ValueError, KeyError):
            continue
        if old["path"] == identity["path"] and old != identity:
            shutil.rmtree(info.parent, ignore_errors=True)
            (root / f"{info.parent.name}.lock").unlink(missing_ok=True)


def source_identity(source: Path) -> dict[str, Any]:
    """The resolved path, and the name, size and modification time of each file of the source."""
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    return {
        "path": str(source.resolve()),
        "files": [[str(p.relative_to(source)) if source.is_dir() else p.name, *_stamp(p)] for p in files],
    }


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides how the tokenizer splits a word."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The whole tokenizer.json (vocabulary, added tokens, normaliser, pre-tokeniser), less the
        # padding and truncation settings, which calling the tokenizer changes and words never see.
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
    else:
        spec = sorted(tokenizer.get_vocab().items())
    return _digest([type(tokenizer).__name__, spec])


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()
