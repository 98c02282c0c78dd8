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

The plan and the pure selection functions are in :mod:`augment.plan`, parsing and synthesis
(and the child that runs them) in :mod:`augment.processing`; this module schedules, journals
and writes.

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
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anchoralign.errors import UserError
from anchoralign.schema import write_jsonl
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
from augment.journal import Journal, JournalEntry, read_journal
from augment.plan import Plan, RequestSpec, make_plan, prefix_for_cap, select_round_robin
from augment.processing import KINDS, Failure, Outcome, ProcessingChild, Record, SourceResult

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
        processor: ProcessingChild,
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
    processor = ProcessingChild()
    await processor.start(plan.cfg.variants, plan.language, plan.forbidden)
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
