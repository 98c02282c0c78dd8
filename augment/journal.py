"""The journal: every LLM answer, appended before it is parsed, so nothing is lost or paid twice.

``journal.jsonl`` holds one JSON object a line, one per answered request (see
:class:`JournalEntry`), keyed by :func:`request_key`. A restarted run reads it and serves every
journalled request from it instead of sending it again.

Durability: each entry is written with a single unbuffered ``write`` (so a killed process
leaves at most its last line cut short) and then made durable with ``fsync`` before
:meth:`Journal.append` returns. Concurrent appends share one ``fsync`` (group commit), run in a
worker thread, so the event loop never stalls on the disk and a burst of answers costs a few
syncs, not one each.

On reading, a last line that is cut short or garbled (the signature of a crash mid-write) is
skipped with a warning and cut off the file, so later appends start on a clean line. A bad line
anywhere else means the file was edited or mixed up, and is an error naming the line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from anchoralign.errors import RecordError, UserError
from augment.client import Usage


def request_key(
    model: str, messages: list[dict[str, str]], sampling: dict[str, Any], prompt_version: str
) -> str:
    """sha256 of everything that determines an answer's distribution: model, messages, sampling
    parameters and the prompt template's version (canonical JSON, so dict order is irrelevant)."""
    canonical = json.dumps(
        {"model": model, "messages": messages, "sampling": sampling, "prompt_version": prompt_version},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class JournalEntry:
    """One answered request. ``error`` is set (and ``text`` None) when the server refused the
    request itself (e.g. HTTP 400 context too long): a definite answer, kept like any other."""

    key: str
    source_id: str
    kind: str  # "mention" or "context"
    text: str | None
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    latency_s: float = 0.0
    attempts: int = 1
    model: str = ""
    error: dict[str, Any] | None = None
    time: float = 0.0

    def to_json(self) -> str:
        obj = {f.name: getattr(self, f.name) for f in fields(self)}  # shallow: asdict deep-copies
        obj["usage"] = {
            "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
        }
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_obj(cls, obj: Any) -> JournalEntry:
        """Raises ValueError naming the field when ``obj`` is not an entry."""
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        for name in ("key", "source_id", "kind"):
            if not isinstance(obj.get(name), str):
                raise ValueError(f"field '{name}' is missing or not a string")
        text = obj.get("text")
        if text is not None and not isinstance(text, str):
            raise ValueError("field 'text' is not a string")
        u = obj.get("usage") or {}
        return cls(
            key=obj["key"],
            source_id=obj["source_id"],
            kind=obj["kind"],
            text=text,
            finish_reason=obj.get("finish_reason"),
            usage=Usage(int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))),
            latency_s=float(obj.get("latency_s", 0.0)),
            attempts=int(obj.get("attempts", 1)),
            model=str(obj.get("model", "")),
            error=obj.get("error"),
            time=float(obj.get("time", 0.0)),
        )


@dataclass
class JournalContents:
    entries: dict[str, JournalEntry]  # by key; a key journalled twice keeps its first answer
    lines: int
    valid_bytes: int  # length of the file up to the end of its last good line
    warnings: list[str]


def read_journal(path: str | Path) -> JournalContents:
    """Read a journal; a missing file is an empty journal. See the module doc for bad lines."""
    path = Path(path)
    if not path.exists():
        return JournalContents({}, 0, 0, [])
    data = path.read_bytes()
    entries: dict[str, JournalEntry] = {}
    warnings: list[str] = []
    offset = 0
    lineno = 0
    n_lines = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        complete = end != -1
        raw = data[offset : end if complete else len(data)]
        lineno += 1
        next_offset = end + 1 if complete else len(data)
        is_last = next_offset >= len(data)
        if raw.strip():
            try:
                if not complete:
                    raise ValueError("line has no end (cut short)")
                entry = JournalEntry.from_obj(json.loads(raw))
            except (ValueError, UnicodeDecodeError) as err:
                if is_last:
                    warnings.append(
                        f"{path}:{lineno}: skipped a cut-short last line ({len(raw)} bytes: {err}); "
                        "its request will be sent again"
                    )
                    return JournalContents(entries, n_lines, offset, warnings)
                raise RecordError(
                    str(path),
                    lineno,
                    f"not a journal entry ({err}); only the last line can be cut short by a crash, "
                    "so this file was changed by hand: fix or remove the line",
                ) from None
            entries.setdefault(entry.key, entry)
            n_lines += 1
        offset = next_offset
    return JournalContents(entries, n_lines, offset, warnings)


def _lock_or_fail(fd: int, path: Path) -> None:
    """One run per journal: a second run on the same folder would send the same requests and
    race on the outputs. The lock goes with the process, so a killed run never leaves it behind."""
    if fcntl is None:  # not POSIX: no advisory locks
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(
            f"{path} is in use by another augment run; wait for it or choose another --out"
        ) from None


class Journal:
    """Append-only, durable writer. Use :meth:`open`, which also reads what is there."""

    def __init__(self, path: Path, valid_bytes: int, fsync: bool = True):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size > valid_bytes:
            # Cut off a partial last line so the next append does not glue onto it.
            with path.open("r+b") as f:
                f.truncate(valid_bytes)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _lock_or_fail(self._fd, path)
        self._fsync = fsync
        self._written = 0
        self._synced = 0
        self._sync_task: asyncio.Task[None] | None = None
        self.appended = 0

    @classmethod
    def open(cls, path: str | Path, fsync: bool = True) -> tuple[Journal, JournalContents]:
        contents = read_journal(path)
        return cls(Path(path), contents.valid_bytes, fsync), contents

    def write(self, entry: JournalEntry) -> None:
        """Write one entry now (one syscall; on disk once the OS flushes, on a kill included)."""
        line = (entry.to_json() + "\n").encode("utf-8")
        view = memoryview(line)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._written += 1
        self.appended += 1

    async def append(self, entry: JournalEntry) -> None:
        """Write ``entry`` and return once it is durable (fsync, shared with concurrent appends)."""
        if not entry.time:
            entry = JournalEntry(**{**entry.__dict__, "time": time.time()})
        self.write(entry)
        if not self._fsync:
            return
        target = self._written
        while self._synced < target:
            if self._sync_task is None:
                self._sync_task = asyncio.ensure_future(self._sync_once())
            # Shielded: one waiter being cancelled must not cancel the sync that others await.
            await asyncio.shield(self._sync_task)

    async def _sync_once(self) -> None:
        upto = self._written
        try:
            await asyncio.to_thread(os.fsync, self._fd)
            self._synced = max(self._synced, upto)
        finally:
            self._sync_task = None

    async def aclose(self) -> None:
        """Wait for a sync in progress, then close."""
        task = self._sync_task
        if task is not None:
            await asyncio.shield(task)
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            if self._fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
