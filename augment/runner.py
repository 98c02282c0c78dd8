"""``augment run``: plan, schedule, journal, parse, synthesize, select and write a corpus.

Plan. The split's sentences (*sources*) are put in a seeded order (``--seed``); sources that
cannot be rewritten are skipped with a reason (``augment.prompts.eligibility``). Entities are
put in position order first so that placeholders read ``<mask0>``, ``<mask1>``, ... left to
right (relations are re-pointed; corpus records are index-aligned with this ordered source).
Each remaining source costs two requests, mention rewriting and context rewriting, identified
by :func:`augment.journal.request_key`.

Schedule. Sources are sent in the seeded order, at most ``concurrency`` requests in flight. A
request whose key is in the journal is served from it (no network). A source is *complete*
once both its requests have an outcome: an answer, a refusal of the request (HTTP 400, kept in
the journal as an answer), or a failure after all retries (not journalled: the next run asks
again). Its answers are then parsed, synthesised into records, and its sentences that appear in
another split (dev/test) are dropped. The *completed prefix* is the longest run of complete
sources from the start of the seeded order; its yield counts the distinct sentences it holds,
each credited to the first source that produced it. Scheduling stops as soon as that yield
reaches the cap.
Parsing and synthesis run in a child interpreter so that they do not slow the transport. While
the sources under way (in flight or being processed) could, at best, reach the cap, no new
request is sent, so a capped run pays only for what it may need.

Select. The corpus is a pure function of (sources, journal answers, config): take the shortest
prefix of the completed prefix whose yield reaches the cap (or all of it), then pick samples
round-robin, one per source per round in seeded order, each source's samples in a seeded order
of their own, until the cap. Because of this, a run interrupted at any moment (Ctrl-C, kill -9)
and restarted with the same command produces the same files as a run never interrupted: the
restart replays journalled answers in the same order and completes the same prefix.

Outputs in ``--out``: ``unmasked.jsonl``, ``masked.jsonl``, ``rejected.jsonl`` (rejections of
the prefix's sources), ``sources.jsonl`` (what happened to every source), ``failed.jsonl``
(requests that failed after all retries), ``stats.json``, ``config.json``, and
``journal.jsonl``. Every file but the journal is rewritten atomically at the end of a run,
also an interrupted one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import pickle
import random
import signal
import struct
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from anchoralign.datasets import get_meta, load_split
from anchoralign.errors import UserError
from anchoralign.schema import Relation, Sample, write_jsonl
from augment.client import (
    ClientSettings,
    FatalLLMError,
    LLMClient,
    RequestFailed,
    RequestRejected,
    Usage,
    cost_usd,
)
from augment.config import AugmentConfig, resolve_api_key, save_config
from augment.journal import Journal, JournalEntry, read_journal, request_key
from augment.parse import REASONS, Rejection, parse_context_answer, parse_mention_answer
from augment.prompts import (
    DEFAULT_CONTEXT_PROMPT,
    DEFAULT_MENTION_PROMPT,
    PromptSet,
    eligibility,
    position_order,
)
from augment.synthesize import exclude_sentences, mask_sample, sentence_key, synthesize

T = TypeVar("T")
KINDS = ("mention", "context")
# Rejections decided here rather than by the parser (which sees only the answer text).
RUN_REASONS: dict[str, str] = {
    "request_rejected": "the server refused the request itself (e.g. HTTP 400, prompt too long)",
    "truncated": "the answer hit max_tokens and this last line was cut off",
}
ALL_REASONS: dict[str, str] = {**REASONS, **RUN_REASONS}


# --------------------------------------------------------------------------------------------
# Pure pieces: entity order, prefix, selection


def by_position(sample: Sample) -> Sample:
    """The sample with its entities in position order and relations re-pointed accordingly."""
    order = position_order(sample)
    if order == list(range(len(order))):
        return sample
    new_index = {old: new for new, old in enumerate(order)}
    return Sample(
        id=sample.id,
        tokens=sample.tokens,
        entities=[sample.entities[i] for i in order],
        relations=[
            Relation(head=new_index[r.head], tail=new_index[r.tail], type=r.type) for r in sample.relations
        ],
        source_id=sample.source_id,
        origin=sample.origin,
    )


def prefix_for_cap(yields: list[int], cap: int) -> int:
    """Length of the shortest prefix of ``yields`` summing to at least ``cap`` (all if none)."""
    total = 0
    for n, y in enumerate(yields, start=1):
        total += y
        if total >= cap:
            return n
    return len(yields)


def select_round_robin(groups: list[tuple[str, list[T]]], cap: int, seed: int) -> list[T]:
    """Up to ``cap`` samples, one per group per round in group order; within a group in an order
    seeded by (seed, group id), so a group's choice does not depend on the other groups."""
    queues = []
    for gid, samples in groups:
        shuffled = list(samples)
        random.Random(f"{seed}:{gid}").shuffle(shuffled)
        queues.append(shuffled)
    chosen: list[T] = []
    depth = 0
    while len(chosen) < cap:
        took = False
        for q in queues:
            if depth < len(q):
                chosen.append(q[depth])
                took = True
                if len(chosen) == cap:
                    break
        if not took:
            break
        depth += 1
    return chosen


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
# Plan


@dataclass(frozen=True)
class RequestSpec:
    key: str
    source_id: str
    kind: str
    messages: list[dict[str, str]]


@dataclass
class Plan:
    cfg: AugmentConfig  # resolved
    meta: Any  # anchoralign.datasets.DatasetMeta
    sources: list[Sample]  # file order, entities in position order when eligible
    skipped: dict[int, str]  # source index -> skip reason
    order: list[int]  # eligible source indices, in the seeded order
    forbidden: set[str]  # sentence keys of the other splits
    prompts: PromptSet

    @property
    def language(self) -> str:
        return str(self.meta.language)

    @property
    def sampling(self) -> dict[str, Any]:
        return {"temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}

    def requests(self, index: int) -> tuple[RequestSpec, RequestSpec]:
        src = self.sources[index]
        k = self.cfg.variants
        model = self.cfg.model or ""
        specs = []
        for kind, build, version in (
            ("mention", self.prompts.mention_messages, self.prompts.mention_version),
            ("context", self.prompts.context_messages, self.prompts.context_version),
        ):
            messages = build(src, self.meta, k, self.language)
            specs.append(
                RequestSpec(request_key(model, messages, self.sampling, version), src.id, kind, messages)
            )
        return specs[0], specs[1]

    def process(self, index: int, outcomes: dict[str, Outcome]) -> SourceResult:
        """:func:`process_source` for source ``index`` with this plan's settings (in-process)."""
        return process_source(self.sources[index], outcomes, self.cfg.variants, self.language, self.forbidden)

    @property
    def max_requests(self) -> int:
        n = len(self.order) if self.cfg.max_sources is None else min(len(self.order), self.cfg.max_sources)
        return 2 * n


def make_plan(cfg: AugmentConfig) -> Plan:
    """Load the data and fix the order of work (no network). ``cfg`` must be resolved."""
    meta = get_meta(cfg.dataset, cfg.data_dir)
    if cfg.split not in meta.splits:
        raise UserError(
            f"dataset {meta.name!r} has no split {cfg.split!r} (splits: {', '.join(meta.splits)})"
        )
    if meta.folds and cfg.fold is None:
        raise UserError(
            f"dataset {meta.name!r} is cross-validated: choose a fold with --fold 0..{meta.folds - 1}"
        )
    fold = cfg.fold if meta.folds else None
    raw = load_split(cfg.dataset, cfg.split, cfg.data_dir, fold=fold)
    if not raw:
        raise UserError(f"dataset {meta.name!r} split {cfg.split!r} has no sentences")
    seen: dict[str, int] = {}
    for i, s in enumerate(raw):
        if s.id in seen:
            raise UserError(
                f"dataset {meta.name!r} split {cfg.split!r}: sentences {seen[s.id]} and {i} share the id {s.id!r}"
            )
        seen[s.id] = i
    sources, skipped = [], {}
    for i, s in enumerate(raw):
        reason = eligibility(s)
        if reason is None:
            sources.append(by_position(s))
        else:
            skipped[i] = reason
            sources.append(s)
    order = [i for i in range(len(sources)) if i not in skipped]
    random.Random(cfg.seed).shuffle(order)
    forbidden: set[str] = set()
    for split in meta.splits:
        if split != cfg.split:
            forbidden.update(
                sentence_key(s.tokens) for s in load_split(cfg.dataset, split, cfg.data_dir, fold=fold)
            )
    prompts = PromptSet(
        cfg.mention_prompt or DEFAULT_MENTION_PROMPT, cfg.context_prompt or DEFAULT_CONTEXT_PROMPT
    )
    return Plan(cfg, meta, sources, skipped, order, forbidden, prompts)


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


def process_source(
    source: Sample, outcomes: dict[str, Outcome], k: int, language: str, forbidden: AbstractSet[str]
) -> SourceResult:
    """Parse a complete source's answers and synthesise its records: a pure function of its
    arguments (it runs in a worker process, see :class:`_Processor`)."""
    if any(isinstance(o, Failure) for o in outcomes.values()):
        return SourceResult(source.id, True, {kind: 0 for kind in KINDS}, [], [])
    rejections: list[dict[str, Any]] = []
    accepted: dict[str, list[Any]] = {kind: [] for kind in KINDS}
    for kind in KINDS:
        entry = outcomes[kind]
        assert isinstance(entry, JournalEntry)
        if entry.text is None:
            err = entry.error or {}
            rejections.append(
                {
                    "source_id": source.id,
                    "kind": kind,
                    "reason": "request_rejected",
                    "detail": f"HTTP {err.get('status', '?')}: {err.get('message', '')}",
                    "text": "",
                    "line": None,
                    "raw": None,
                    "key": entry.key,
                }
            )
            continue
        text, cut = split_truncated(entry.text, entry.finish_reason)
        parse = parse_mention_answer if kind == "mention" else parse_context_answer
        result = parse(text, source, language, k)
        accepted[kind] = list(result.accepted)
        rejections.extend(_rejection_record(r, source.id, entry) for r in result.rejected)
        if cut is not None:
            cut_off = Rejection(kind, "truncated", "the answer was cut off by max_tokens", cut, None)  # type: ignore[arg-type]
            rejections.append(_rejection_record(cut_off, source.id, entry))
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
    return SourceResult(source.id, False, counts, rejections, records, dropped)


# Parsing and synthesis take about as much CPU as the HTTP exchange of a request; done in the
# event loop they slow the transport down at high request rates. They run in a child
# interpreter instead, fed over its stdin and answering on its stdout: frames of an 8-byte
# length and a pickle. A plain pipe rather than multiprocessing: the child imports nothing of
# the caller's main script, and it exits by itself when the pipe closes, however the runner
# ended (kill -9 included).
_FRAME = struct.Struct(">Q")
_WORKER_CODE = "from augment.runner import worker_main; worker_main()"


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
    k, language, forbidden = setup
    while (task := _read_frame(inp)) is not None:
        seq, source, outcomes = task
        try:
            reply = (seq, True, process_source(source, outcomes, k, language, forbidden))
        except Exception:  # any failure goes back to the runner, which stops with it
            reply = (seq, False, f"processing source {source.id!r} failed:\n{traceback.format_exc()}")
        out.write(_frame(reply))
        out.flush()
    # Nothing to clean up (every reply is flushed): skip the interpreter's teardown of a large
    # heap, which the runner would otherwise wait ~0.1 s for at the end of every run.
    os._exit(0)


class ProcessingError(RuntimeError):
    """The processing child failed (a bug, reported with its traceback)."""


class _Processor:
    """:func:`process_source` in a child interpreter; :meth:`submit` returns a future."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, asyncio.Future[SourceResult]] = {}
        self._seq = 0
        self._reader: asyncio.Task[None] | None = None

    async def start(self, plan: Plan) -> None:
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
        self._proc.stdin.write(_frame((plan.cfg.variants, plan.language, frozenset(plan.forbidden))))
        self._reader = asyncio.create_task(self._read_replies())

    def submit(self, source: Sample, outcomes: dict[str, Outcome]) -> asyncio.Future[SourceResult]:
        assert self._proc is not None and self._proc.stdin is not None
        self._seq += 1
        future: asyncio.Future[SourceResult] = asyncio.get_running_loop().create_future()
        self._pending[self._seq] = future
        self._proc.stdin.write(_frame((self._seq, source, outcomes)))
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


# --------------------------------------------------------------------------------------------
# Progress and summary


@dataclass
class Progress:
    cap: int
    samples: int  # distinct sentences in the completed prefix
    sources_eligible: int
    sources_scheduled: int
    sources_done: int
    requests_sent: int  # answered by the server in this run
    requests_cached: int  # served from the journal
    in_flight: int
    failed: int
    variants_accepted: int
    variants_rejected: int
    tokens: int
    elapsed_s: float

    @property
    def requests_per_s(self) -> float:
        return self.requests_sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.samples <= 0 or self.samples >= self.cap:
            return None
        return self.elapsed_s * (self.cap - self.samples) / self.samples


@dataclass
class RunSummary:
    out_dir: Path
    status: str  # cap_reached | sources_exhausted | source_limit | interrupted | stopped
    stats: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        return self.status == "interrupted"


# --------------------------------------------------------------------------------------------
# The engine


class _Slot:
    """One of the ``concurrency`` places for a request, released exactly once."""

    def __init__(self, semaphore: asyncio.Semaphore):
        self._semaphore = semaphore
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._semaphore.release()


class _Engine:
    def __init__(
        self,
        plan: Plan,
        journal: Journal,
        cached: dict[str, JournalEntry],
        client: LLMClient,
        processor: _Processor,
    ):
        self.plan = plan
        self.cfg = plan.cfg
        self.journal = journal
        self.cached = cached
        self.client = client
        self.processor = processor
        self.slots = asyncio.Semaphore(self.cfg.concurrency)
        self.stop = asyncio.Event()
        self.processed = asyncio.Event()
        self.interrupted = False
        self.fatal: BaseException | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.processing: set[asyncio.Future[SourceResult]] = set()
        self.waiters: dict[str, list[tuple[int, str]]] = {}
        self.outcomes: dict[int, dict[str, Outcome]] = {}
        self.results: dict[int, SourceResult] = {}
        self.failures: list[Failure] = []
        # The completed prefix, by seeded position.
        self.frontier = 0
        self.prefix_keys: set[str] = set()
        self.prefix_groups: list[tuple[str, list[Record]]] = []
        self.prefix_yield = 0
        self.scheduled = 0
        self.position: dict[int, int] = {}  # source index -> seeded position
        self.max_yield = (self.cfg.variants + 1) ** 2 - 1  # records one source can give
        self.unfinished = 0  # sources scheduled and not yet processed
        self.ahead_yield = 0  # records of processed sources past the frontier (not de-duplicated)
        # Counters.
        self.sent = 0
        self.n_cached = 0
        self.conn_failures = 0
        self.answers = 0
        self.usage = Usage()
        self.variants_accepted = 0
        self.variants_rejected = 0
        self.started = time.perf_counter()
        self.first_send: float | None = None
        self.last_answer: float | None = None
        self.limit_hit = False
        self.endpoint_checked = False

    # -- control

    def request_stop(self, interrupted: bool = False) -> None:
        """Stop scheduling and cancel what is in flight (answers already written stay journalled)."""
        self.interrupted = self.interrupted or interrupted
        self.stop.set()
        self.processed.set()  # wake the scheduler if it waits for processing
        for t in list(self.tasks):
            t.cancel()

    def cap_reached(self) -> bool:
        return self.prefix_yield >= self.cfg.cap

    def _cap_may_be_reached(self) -> bool:
        """Whether the sources already under way could, at best, reach the cap. While they
        could, no new request is sent: it might be one the corpus does not need."""
        best = self.prefix_yield + self.ahead_yield + self.max_yield * self.unfinished
        return self.unfinished > 0 and best >= self.cfg.cap

    # -- scheduling

    async def run(self) -> None:
        for pos, index in enumerate(self.plan.order):
            if self.stop.is_set() or self.cap_reached():
                break
            if self.cfg.max_sources is not None and pos >= self.cfg.max_sources:
                self.limit_hit = True
                break
            self.position[index] = pos
            self.scheduled = pos + 1
            for spec in self.plan.requests(index):
                entry = self.cached.get(spec.key)
                if entry is not None:
                    self.n_cached += 1
                    self._deliver(index, spec.kind, entry)
                elif spec.key in self.waiters:
                    self.waiters[spec.key].append((index, spec.kind))
                else:
                    while self._cap_may_be_reached() and not self.stop.is_set():
                        self.processed.clear()
                        await self.processed.wait()
                    if self.cap_reached():
                        break
                    if not self.endpoint_checked:
                        # Only now, when the first request must be sent: a resumed run served
                        # wholly from the journal does not need the endpoint at all.
                        self.endpoint_checked = True
                        try:
                            await self.client.check_reachable()
                        except FatalLLMError as err:
                            self._fail(err)
                            break
                    await self.slots.acquire()
                    if self.stop.is_set():
                        self.slots.release()
                        break
                    self.waiters[spec.key] = [(index, spec.kind)]
                    slot = _Slot(self.slots)
                    task = asyncio.create_task(self._request(spec, slot))
                    self.tasks.add(task)
                    # A callback, not a finally: a task cancelled before it starts never runs its body.
                    task.add_done_callback(lambda t, slot=slot: self._task_done(t, slot))
            # Counted once all its requests are under way (not before: the wait above must not
            # wait for the very source it is about to send). It cannot complete before this line.
            self.unfinished += 1
            if pos % 64 == 63:
                await asyncio.sleep(0)  # a long run of journalled sources must not starve the display
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        self._check_unreachable(final=True)
        if self.stop.is_set():
            for f in self.processing:
                f.cancel()
        while self.processing:
            await asyncio.gather(*list(self.processing), return_exceptions=True)

    def _task_done(self, task: asyncio.Task[None], slot: _Slot) -> None:
        self.tasks.discard(task)
        slot.release()
        if not task.cancelled() and task.exception() is not None:
            # A bug, not a transport fault (those are handled in _request): stop rather than
            # carry on with a source that will never complete.
            self._fail(task.exception())

    def _fail(self, err: BaseException | None) -> None:
        self.fatal = self.fatal or err
        self.request_stop()

    async def _request(self, spec: RequestSpec, slot: _Slot) -> None:
        if self.first_send is None:
            self.first_send = time.perf_counter()
        try:
            try:
                c = await self.client.complete(spec.messages)
            finally:
                # The slot bounds requests on the wire; the wait for the journal's fsync below
                # must not keep the next request from being sent.
                slot.release()
            entry = JournalEntry(
                key=spec.key,
                source_id=spec.source_id,
                kind=spec.kind,
                text=c.text,
                finish_reason=c.finish_reason,
                usage=c.usage,
                latency_s=round(c.latency_s, 4),
                attempts=c.attempts,
                model=self.cfg.model or "",
                time=time.time(),
            )
            self.usage = self.usage + c.usage
        except RequestRejected as err:
            entry = JournalEntry(
                key=spec.key,
                source_id=spec.source_id,
                kind=spec.kind,
                text=None,
                model=self.cfg.model or "",
                error={"status": err.status, "message": err.message},
                time=time.time(),
            )
        except RequestFailed as err:
            fail = Failure(spec.key, spec.source_id, spec.kind, err.message, err.attempts, err.connection)
            self.failures.append(fail)
            if err.connection:
                self.conn_failures += 1
            self._resolve(spec.key, fail)
            self._check_unreachable(final=False)
            return
        except FatalLLMError as err:
            self._fail(err)
            return
        self.answers += 1
        # Journalled (and durable) before it is parsed: nothing returned is ever lost.
        await self.journal.append(entry)
        self.sent += 1
        self.last_answer = time.perf_counter()
        self._resolve(spec.key, entry)

    def _check_unreachable(self, final: bool) -> None:
        # Nothing ever answered and a whole first wave (or everything, for a small run) could not
        # connect: the endpoint is down or wrong; grinding through the dataset would not help.
        if self.answers or not self.conn_failures or self.fatal is not None:
            return
        if self.conn_failures >= self.cfg.concurrency or (final and self.conn_failures == len(self.failures)):
            last = self.failures[-1].message
            self._fail(
                UserError(
                    f"{last}: none of the first {self.conn_failures} requests got through; "
                    "check --base-url and the network"
                )
            )

    def _resolve(self, key: str, outcome: Outcome) -> None:
        for index, kind in self.waiters.pop(key, []):
            self._deliver(index, kind, outcome)

    def _deliver(self, index: int, kind: str, outcome: Outcome) -> None:
        got = self.outcomes.setdefault(index, {})
        got[kind] = outcome
        if len(got) < len(KINDS):
            return
        del self.outcomes[index]
        future = self.processor.submit(self.plan.sources[index], got)
        self.processing.add(future)
        future.add_done_callback(lambda f: self._processed(self.position[index], f))

    def _processed(self, pos: int, future: asyncio.Future[SourceResult]) -> None:
        self.processing.discard(future)
        self.unfinished -= 1
        self.processed.set()
        if future.cancelled():
            return
        if future.exception() is not None:
            self._fail(future.exception())
            return
        result = future.result()
        self.results[pos] = result
        self.ahead_yield += len(result.records)
        self.variants_accepted += sum(result.accepted.values())
        self.variants_rejected += len(result.rejections)
        self._advance()

    def _advance(self) -> None:
        while self.frontier in self.results:
            r = self.results[self.frontier]
            self.ahead_yield -= len(r.records)
            fresh = []
            for rec in r.records:
                if rec.key not in self.prefix_keys:
                    self.prefix_keys.add(rec.key)
                    fresh.append(rec)
            self.prefix_groups.append((r.source_id, fresh))
            self.prefix_yield += len(fresh)
            self.frontier += 1

    # -- reporting

    def progress(self) -> Progress:
        return Progress(
            cap=self.cfg.cap,
            samples=self.prefix_yield,
            sources_eligible=len(self.plan.order),
            sources_scheduled=self.scheduled,
            sources_done=len(self.results),
            requests_sent=self.sent,
            requests_cached=self.n_cached,
            in_flight=len(self.tasks),
            failed=len(self.failures),
            variants_accepted=self.variants_accepted,
            variants_rejected=self.variants_rejected,
            tokens=self.usage.total_tokens,
            elapsed_s=time.perf_counter() - self.started,
        )


# --------------------------------------------------------------------------------------------
# Outputs


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    tmp.replace(path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _status(engine: _Engine) -> str:
    if engine.interrupted:
        return "interrupted"
    if engine.fatal is not None:
        return "stopped"
    if engine.cap_reached():
        return "cap_reached"
    if engine.limit_hit:
        return "source_limit"
    return "sources_exhausted"


def _finish(engine: _Engine, journal_usage: Usage, elapsed: float) -> RunSummary:
    plan, cfg = engine.plan, engine.cfg
    out = cfg.out_dir
    groups = engine.prefix_groups
    n_used = prefix_for_cap([len(g) for _, g in groups], cfg.cap)
    groups = groups[:n_used]
    selected = select_round_robin(groups, cfg.cap, cfg.seed)
    _write_lines(out / "unmasked.jsonl", (r.unmasked for r in selected))
    _write_lines(out / "masked.jsonl", (r.masked for r in selected))

    used_results = [engine.results[p] for p in range(n_used)]
    rejected = [rec for r in used_results for rec in r.rejections]
    write_jsonl(out / "rejected.jsonl", rejected)

    status = _status(engine)
    chosen_per_source = Counter(s.source_id for s in selected)
    used_ids = {r.source_id: r for r in used_results}
    source_rows = []
    for i, src in enumerate(plan.sources):
        row: dict[str, Any] = {"source_id": src.id}
        if i in plan.skipped:
            row["status"] = f"skipped:{plan.skipped[i]}"
        elif src.id in used_ids:
            r = used_ids[src.id]
            row["status"] = "failed" if r.failed else ("used" if chosen_per_source[src.id] else "no_yield")
            row.update(
                accepted_mentions=r.accepted["mention"],
                accepted_contexts=r.accepted["context"],
                rejected=len(r.rejections),
                samples=chosen_per_source[src.id],
            )
        elif status == "cap_reached":
            row["status"] = "not_needed"
        else:
            row["status"] = "not_tried"
        source_rows.append(row)
    write_jsonl(out / "sources.jsonl", source_rows)
    write_jsonl(out / "failed.jsonl", (asdict(f) for f in engine.failures))

    by_reason = Counter(rec["reason"] for rec in rejected)
    by_kind_rejected = Counter(rec["kind"] for rec in rejected)
    accepted = {k: sum(r.accepted[k] for r in used_results) for k in KINDS}
    request_time = (
        engine.last_answer - engine.first_send
        if engine.first_send is not None and engine.last_answer is not None
        else 0.0
    )
    stats: dict[str, Any] = {
        "dataset": plan.meta.name,
        "split": cfg.split,
        "model": cfg.model,
        "base_url": cfg.base_url,
        "status": status,
        "cap": cfg.cap,
        "samples": {
            "selected": len(selected),
            "by_origin": dict(sorted(Counter(r.origin for r in selected).items())),
            "in_prefix": sum(len(g) for _, g in groups),
            "dropped_in_other_split": sum(r.dropped_other_split for r in used_results),
        },
        "requests": {
            "answered": engine.sent,
            "cached": engine.n_cached,
            "failed": len(engine.failures),
            "refused_by_server": sum(1 for rec in rejected if rec["reason"] == "request_rejected"),
            "in_journal": engine.journal.appended + len(engine.cached),
        },
        "tokens": {
            "prompt": engine.usage.prompt_tokens,
            "completion": engine.usage.completion_tokens,
            "total": engine.usage.total_tokens,
        },
        "cost_usd": cost_usd(engine.usage, cfg.price_in, cfg.price_out),
        "tokens_all_runs": {
            "prompt": journal_usage.prompt_tokens + engine.usage.prompt_tokens,
            "completion": journal_usage.completion_tokens + engine.usage.completion_tokens,
        },
        "cost_usd_all_runs": cost_usd(journal_usage + engine.usage, cfg.price_in, cfg.price_out),
        "variants": {k: {"accepted": accepted[k], "rejected": by_kind_rejected.get(k, 0)} for k in KINDS},
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "sources": dict(sorted(Counter(row["status"] for row in source_rows).items())),
        "elapsed_s": round(elapsed, 3),
        "request_phase_s": round(request_time, 3),
        "requests_per_s": round(engine.sent / request_time, 2) if request_time > 0 else None,
    }
    _write_json(out / "stats.json", stats)
    save_config(cfg, out / "config.json")

    warnings = []
    if status in ("sources_exhausted", "source_limit") and len(selected) < cfg.cap:
        why = (
            "every eligible source was tried"
            if status == "sources_exhausted"
            else f"--max-sources {cfg.max_sources} reached"
        )
        warnings.append(f"the corpus has {len(selected)} samples, fewer than the cap of {cfg.cap}: {why}")
    if engine.failures:
        warnings.append(
            f"{len(engine.failures)} request(s) failed after all retries (listed in {out / 'failed.jsonl'}); "
            "run the same command again to retry them"
        )
    return RunSummary(out, status, stats, warnings)


# --------------------------------------------------------------------------------------------
# Entry points


@contextlib.contextmanager
def _endpoint(cfg: AugmentConfig) -> Iterator[str]:
    """The base URL to send to: the embedded llama.cpp server's for ``llm: local``."""
    if cfg.llm != "local":
        yield cfg.base_url or ""
        return
    from augment.local_llm import LocalLLMServer

    with LocalLLMServer(cfg.gguf, seed=cfg.seed) as srv:
        yield srv.base_url


def _journal_usage(entries: dict[str, JournalEntry]) -> Usage:
    total = Usage()
    for e in entries.values():
        total = total + e.usage
    return total


async def _run_async(
    plan: Plan,
    base_url: str,
    api_key: str,
    on_progress: Callable[[Progress], None] | None,
    progress_every_s: float,
    fsync: bool,
) -> RunSummary:
    cfg = plan.cfg
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    journal, contents = Journal.open(out / "journal.jsonl", fsync=fsync)
    warnings = list(contents.warnings)
    settings = ClientSettings(
        base_url=base_url,
        model=cfg.model or "",
        concurrency=cfg.concurrency,
        timeout_s=cfg.timeout,
        max_retries=cfg.max_retries,
        backoff_s=cfg.backoff,
        backoff_max_s=cfg.backoff_max,
        temperature=cfg.temperature,
        max_tokens=cfg.max_tokens,
    )
    client = LLMClient(settings, api_key)
    processor = _Processor()
    await processor.start(plan)
    engine = _Engine(plan, journal, contents.entries, client, processor)
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        engine.request_stop(interrupted=True)
        # A second Ctrl-C falls back to the default handler: immediate KeyboardInterrupt.
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or no signal support: Ctrl-C then stops without outputs

    async def ticker() -> None:
        while True:
            await asyncio.sleep(progress_every_s)
            if on_progress is not None:
                on_progress(engine.progress())

    tick = asyncio.create_task(ticker())
    try:
        await engine.run()
    finally:
        tick.cancel()
        for sig in installed:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        await client.aclose()
        await journal.aclose()
        # The child's exit (interpreter teardown, ~0.1 s) overlaps writing the outputs.
        processor.close_input()
    try:
        if on_progress is not None:
            on_progress(engine.progress())
        summary = _finish(engine, _journal_usage(contents.entries), time.perf_counter() - engine.started)
    finally:
        await processor.close()
    summary.warnings[:0] = warnings
    if engine.fatal is not None and not engine.interrupted:
        raise engine.fatal
    return summary


def run(
    cfg: AugmentConfig,
    on_progress: Callable[[Progress], None] | None = None,
    progress_every_s: float = 0.25,
    fsync: bool = True,
) -> RunSummary:
    """Build the corpus described by ``cfg`` (see the module doc). Raises UserError for anything
    the user can fix (no key, bad data, endpoint down or refusing the key)."""
    cfg = cfg.resolved()
    api_key = resolve_api_key(cfg)
    plan = make_plan(cfg)
    with _endpoint(cfg) as base_url:
        return asyncio.run(_run_async(plan, base_url, api_key, on_progress, progress_every_s, fsync))


@dataclass
class DryRun:
    plan: Plan
    first: tuple[RequestSpec, RequestSpec] | None
    cached: int  # journalled requests among those of the first `checked` sources
    checked: int
    max_requests: int
    best_case_requests: int


def dry_run(cfg: AugmentConfig) -> DryRun:
    """What ``run`` would do, without sending anything: the first prompts and request counts."""
    cfg = cfg.resolved()
    plan = make_plan(cfg)
    journal_path = cfg.out_dir / "journal.jsonl"
    journalled = read_journal(journal_path).entries if journal_path.exists() else {}
    first = plan.requests(plan.order[0]) if plan.order else None
    limit = plan.max_requests // 2
    per_source = (cfg.variants + 1) ** 2 - 1  # records of a source whose every variant is accepted
    best = 2 * min(limit, math.ceil(cfg.cap / per_source))
    # Rendering every prompt of a large split takes a while; the sources a run will reach first
    # are what matters for the estimate.
    checked = plan.order[: min(limit, max(1000, best))]
    cached = 0
    if journalled:
        for index in checked:
            cached += sum(spec.key in journalled for spec in plan.requests(index))
    return DryRun(plan, first, cached, len(checked), plan.max_requests, best)
