"""Per-source processing: a source's two answers parsed, validated and synthesised into corpus
records, in a child interpreter so that it never slows the event loop that drives the requests.

:func:`process_source` is a pure function of (source, outcomes, K, language, forbidden
sentences). :class:`ProcessingChild` runs it in ``python -c`` over pickled frames on stdin and
stdout: the runner submits a source and gets a future of its :class:`SourceResult`.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import struct
import sys
import traceback
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from anchoralign.schema import Sample
from augment.journal import JournalEntry
from augment.parse import REASONS, Rejection, parse_context_answer, parse_mention_answer
from augment.synthesize import exclude_sentences, mask_sample, sentence_key, synthesize, variant_samples
from augment.verify import REASON as VERIFY_REASON
from augment.verify import REASON_TEXT as VERIFY_REASON_TEXT
from augment.verify import Labels, VariantCheck, denied, parse_verdict, questions

KINDS = ("mention", "context")
# Rejections decided here rather than by the parser (which sees only the answer text).
RUN_REASONS: dict[str, str] = {
    "request_rejected": "the server refused the request itself (e.g. HTTP 400, prompt too long)",
    "truncated": "the answer hit max_tokens and this last line was cut off",
    VERIFY_REASON: VERIFY_REASON_TEXT,
}
ALL_REASONS: dict[str, str] = {**REASONS, **RUN_REASONS}


def split_truncated(text: str, finish_reason: str | None) -> tuple[str, str | None]:
    """(text to parse, cut-off last line or None): an answer stopped by max_tokens ends mid-line,
    and a half-written variant could still pass the checks, so its last line is not parsed."""
    if finish_reason != "length":
        return text, None
    lines = text.rstrip("\n").split("\n")
    if not lines or not lines[-1].strip():
        return text, None
    return "\n".join(lines[:-1]), lines[-1]


# --------------------------------------------------------------------------------------------
# Per-source outcome


@dataclass(frozen=True)
class Failure:
    """A request that failed after all retries (not journalled)."""

    key: str
    source_id: str
    kind: str
    message: str
    attempts: int
    connection: bool


Outcome = JournalEntry | Failure


@dataclass(frozen=True)
class Record:
    """One synthesised sample, already serialised: the loop that selects and writes the corpus
    never rebuilds or re-validates a Sample."""

    source_id: str
    key: str  # sentence_key: a sentence is in the corpus once
    origin: str
    unmasked: str  # the JSON line (no newline)
    masked: str


@dataclass
class SourceResult:
    source_id: str
    failed: bool
    accepted: dict[str, int]
    rejections: list[dict[str, Any]]
    records: list[Record]  # not in another split, distinct sentences, in synthesis order
    dropped_other_split: int = 0
    # With --verify, the first pass returns the accepted variants to ask about (and nothing
    # else); the runner gets their verdicts and processes the source again with them.
    checks: list[VariantCheck] | None = None
    verification: dict[str, int] | None = None  # checked, rejected, unclear answers

    @property
    def awaiting_verification(self) -> bool:
        return self.checks is not None


def _rejection_record(r: Rejection, source_id: str, entry: JournalEntry) -> dict[str, Any]:
    return {
        "source_id": source_id,
        "kind": r.kind,
        "reason": r.reason,
        "detail": r.detail,
        "text": r.text,
        "line": r.index,
        "raw": entry.text,
        "key": entry.key,
    }


def _dumps(sample: Sample) -> str:
    return json.dumps(sample.to_record(), ensure_ascii=False)


def _request_rejected(source: Sample, kind: str, entry: JournalEntry) -> dict[str, Any]:
    err = entry.error or {}
    return {
        "source_id": source.id,
        "kind": kind,
        "reason": "request_rejected",
        "detail": f"HTTP {err.get('status', '?')}: {err.get('message', '')}",
        "text": "",
        "line": None,
        "raw": None,
        "key": entry.key,
    }


# (variant kind, 0-based index among that kind's accepted variants, question number); the
# source's own answers are under (SOURCE_CHECK, 0, question number).
VerdictKey = tuple[str, int, int]
SOURCE_CHECK = "source"


def process_source(
    source: Sample,
    outcomes: dict[str, Outcome],
    k: int,
    language: str,
    forbidden: AbstractSet[str],
    verify: Labels | None = None,
    verdicts: dict[VerdictKey, Outcome] | None = None,
) -> SourceResult:
    """Parse a complete source's answers and synthesise its records: a pure function of its
    arguments (it runs in a worker process, see :class:`ProcessingChild`).

    With ``verify`` (``--verify``) and no ``verdicts`` yet, the result only lists the accepted
    variants to check (``checks``); called again with the journalled answers to those checks,
    it drops the variants the LLM denied (augment/verify.py) and synthesises from the rest."""
    if any(isinstance(o, Failure) for o in outcomes.values()):
        return SourceResult(source.id, True, {kind: 0 for kind in KINDS}, [], [])
    rejections: list[dict[str, Any]] = []
    accepted: dict[str, list[Any]] = {kind: [] for kind in KINDS}
    for kind in KINDS:
        entry = outcomes[kind]
        assert isinstance(entry, JournalEntry)
        if entry.text is None:
            rejections.append(_request_rejected(source, kind, entry))
            continue
        text, cut = split_truncated(entry.text, entry.finish_reason)
        parse = parse_mention_answer if kind == "mention" else parse_context_answer
        result = parse(text, source, language, k)
        accepted[kind] = list(result.accepted)
        rejections.extend(_rejection_record(r, source.id, entry) for r in result.rejected)
        if cut is not None:
            cut_off = Rejection(kind, "truncated", "the answer was cut off by max_tokens", cut, None)  # type: ignore[arg-type]
            rejections.append(_rejection_record(cut_off, source.id, entry))
    verification = None
    if verify is not None:
        mention_samples, context_samples = variant_samples(
            source, accepted["mention"], accepted["context"], language
        )
        checks = [
            VariantCheck(kind, i, sample, variant.text)
            for kind, samples in (("mention", mention_samples), ("context", context_samples))
            for i, (sample, variant) in enumerate(zip(samples, accepted[kind], strict=True))
        ]
        if checks:
            # The source is asked the same questions: a variant is judged against it, so a
            # relation the dataset annotates but the source itself only implies does not count
            # against every rewrite of it.
            checks.insert(0, VariantCheck(SOURCE_CHECK, 0, source, ""))
        if verdicts is None:
            if checks:
                return SourceResult(source.id, False, {kind: 0 for kind in KINDS}, [], [], checks=checks)
        elif any(isinstance(o, Failure) for o in verdicts.values()):
            return SourceResult(source.id, True, {kind: 0 for kind in KINDS}, [], [])

        def answers_of(check: VariantCheck) -> tuple[list[str], list[JournalEntry], list[bool | None]]:
            qs = questions(check.sample, verify, language)
            entries = [(verdicts or {})[(check.kind, check.index, q)] for q in range(len(qs))]
            assert all(isinstance(e, JournalEntry) for e in entries)
            # A check the server refused (entry.error) leaves that question unanswered.
            return qs, entries, [None if e.text is None else parse_verdict(e.text) for e in entries]  # type: ignore[union-attr]

        verification = {"checked": max(0, len(checks) - 1), "rejected": 0, "unclear_answers": 0}
        keep: dict[str, set[int]] = {kind: set(range(len(accepted[kind]))) for kind in KINDS}
        baseline = answers_of(checks[0])[2] if checks else []
        for check in checks[1:]:
            qs, entries, answers = answers_of(check)
            verification["unclear_answers"] += sum(a is None for a in answers)
            # Only a question the source itself was answered yes to can reject its variant.
            counted = [a if base is True else None for a, base in zip(answers, baseline, strict=True)]
            why = denied(counted, qs)
            if why is not None:
                keep[check.kind].discard(check.index)
                verification["rejected"] += 1
                said_no = [e for e, a in zip(entries, counted, strict=True) if a is False]
                rejections.append(
                    {
                        "source_id": source.id,
                        "kind": check.kind,
                        "reason": VERIFY_REASON,
                        "detail": why,
                        "text": check.text,
                        "line": None,
                        "raw": "\n".join(str(e.text) for e in said_no),
                        "key": said_no[0].key,
                    }
                )
        accepted = {kind: [v for i, v in enumerate(accepted[kind]) if i in keep[kind]] for kind in KINDS}
    samples = synthesize(source, accepted["mention"], accepted["context"], language)
    kept, dropped = exclude_sentences(samples, forbidden)
    records: list[Record] = []
    keys: set[str] = set()
    for s in kept:
        key = sentence_key(s.tokens)
        if key not in keys:
            keys.add(key)
            records.append(Record(source.id, key, s.origin or "", _dumps(s), _dumps(mask_sample(s))))
    counts = {kind: len(v) for kind, v in accepted.items()}
    return SourceResult(source.id, False, counts, rejections, records, dropped, verification=verification)


# Parsing and synthesis take about as much CPU as the HTTP exchange of a request; done in the
# event loop they slow the transport down at high request rates. They run in a child
# interpreter instead, fed over its stdin and answering on its stdout: frames of an 8-byte
# length and a pickle. A plain pipe rather than multiprocessing: the child imports nothing of
# the caller's main script, and it exits by itself when the pipe closes, however the runner
# ended (kill -9 included).
_FRAME = struct.Struct(">Q")
_WORKER_CODE = "from augment.processing import worker_main; worker_main()"


def _frame(obj: Any) -> bytes:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(payload)) + payload


def _read_frame(stream: BinaryIO) -> Any:
    header = stream.read(_FRAME.size)
    if len(header) < _FRAME.size:
        return None
    (size,) = _FRAME.unpack(header)
    return pickle.loads(stream.read(size))


def worker_main() -> None:
    """The processing child: the run's constants, then (seq, source, outcomes) until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the runner's to handle
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the frames
    setup = _read_frame(inp)
    if setup is None:
        return
    k, language, forbidden, verify = setup
    while (task := _read_frame(inp)) is not None:
        seq, source, outcomes, verdicts = task
        try:
            reply = (seq, True, process_source(source, outcomes, k, language, forbidden, verify, verdicts))
        except Exception:  # any failure goes back to the runner, which stops with it
            reply = (seq, False, f"processing source {source.id!r} failed:\n{traceback.format_exc()}")
        out.write(_frame(reply))
        out.flush()
    # Nothing to clean up (every reply is flushed): skip the interpreter's teardown of a large
    # heap, which the runner would otherwise wait ~0.1 s for at the end of every run.
    os._exit(0)


class ProcessingError(RuntimeError):
    """The processing child failed (a bug, reported with its traceback)."""


class ProcessingChild:
    """:func:`process_source` in a child interpreter; :meth:`submit` returns a future."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, asyncio.Future[SourceResult]] = {}
        self._seq = 0
        self._reader: asyncio.Task[None] | None = None

    async def start(
        self, k: int, language: str, forbidden: AbstractSet[str], verify: Labels | None = None
    ) -> None:
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        }
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WORKER_CODE,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,  # out of the terminal's process group: Ctrl-C reaches the runner only
        )
        assert self._proc.stdin is not None
        self._proc.stdin.write(_frame((k, language, frozenset(forbidden), verify)))
        self._reader = asyncio.create_task(self._read_replies())

    def submit(
        self,
        source: Sample,
        outcomes: dict[str, Outcome],
        verdicts: dict[VerdictKey, Outcome] | None = None,
    ) -> asyncio.Future[SourceResult]:
        assert self._proc is not None and self._proc.stdin is not None
        self._seq += 1
        future: asyncio.Future[SourceResult] = asyncio.get_running_loop().create_future()
        self._pending[self._seq] = future
        self._proc.stdin.write(_frame((self._seq, source, outcomes, verdicts)))
        return future

    async def _read_replies(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        try:
            while True:
                (size,) = _FRAME.unpack(await stdout.readexactly(_FRAME.size))
                seq, ok, value = pickle.loads(await stdout.readexactly(size))
                future = self._pending.pop(seq)
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(ProcessingError(value))
        except asyncio.IncompleteReadError:
            code = await self._proc.wait()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ProcessingError(f"the processing child exited with code {code}"))
            self._pending.clear()

    def close_input(self) -> None:
        """Tell the child no more work comes (it exits once it has answered what it has)."""
        if self._proc is not None and self._proc.stdin is not None and not self._proc.stdin.is_closing():
            self._proc.stdin.close()

    async def close(self) -> None:
        if self._proc is None:
            return
        self.close_input()
        try:
            await asyncio.wait_for(self._proc.wait(), 10)
        except asyncio.TimeoutError:
            self._proc.kill()
            await self._proc.wait()
        if self._reader is not None:
            await self._reader
