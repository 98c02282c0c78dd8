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

Verify (``--verify``). A source's parsed answers come back from the child with the accepted
variants to check; their questions (augment/verify.py) are served from the journal or sent like
any request, and the source goes through the child again with the verdicts. It completes only
then, so the prefix, the cap and resuming work as without.

Outputs in ``--out``: ``unmasked.jsonl``, ``masked.jsonl``, ``rejected.jsonl`` (rejections of
the prefix's sources), ``sources.jsonl`` (what happened to every source), ``failed.jsonl``
(requests that failed after all retries), ``stats.json``, ``config.json``, and
``journal.jsonl``. Every file but the journal is rewritten atomically at the end of a run,
also an interrupted one. A run with no sample writes no corpus files (and ``run`` raises a
UserError saying why); a run stopped by an error (endpoint or key refused) writes nothing but
the journal of what was answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anchoralign.errors import UserError
from anchoralign.files import atomic_write_lines, atomic_write_text
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
from augment.processing import KINDS, Failure, Outcome, ProcessingChild, Record, SourceResult, VerdictKey
from augment.progress import Goal, eta_s, goal, rate

# --------------------------------------------------------------------------------------------
# Progress and summary


@dataclass
class Progress:
    cap: int
    samples: int  # distinct sentences in the completed prefix
    sources_eligible: int
    source_limit: int  # the sources the run may try: --max-sources, else every eligible one
    bounded: bool  # --max-sources was given
    sources_scheduled: int
    sources_done: int
    requests_sent: int  # answered by the server in this run
    requests_cached: int  # served from the journal
    in_flight: int
    failed: int
    variants_accepted: int
    variants_rejected: int
    tokens: int
    elapsed_s: float  # since the run started (after the server, if any, was up)
    work_s: float = 0.0  # since the first request was sent (0 before)
    # What came wholly from the journal (no request sent): left out of the pace the ETA uses.
    samples_from_journal: int = 0
    sources_from_journal: int = 0

    @property
    def requests_per_s(self) -> float:
        return rate(self.requests_sent, self.elapsed_s)

    @property
    def goal(self) -> Goal:
        return goal(self.cap, self.samples, self.sources_done, self.source_limit, self.bounded)

    @property
    def eta_s(self) -> float | None:
        g = self.goal
        start = self.samples_from_journal if g.unit == "samples" else self.sources_from_journal
        return eta_s(g.fraction, min(start, g.total) / g.total if g.total else 1.0, self.work_s)


@dataclass
class RunSummary:
    out_dir: Path
    status: str  # cap_reached | sources_exhausted | source_limit | no_samples | interrupted | stopped
    stats: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        return self.status == "interrupted"


# --------------------------------------------------------------------------------------------
# The request scheduler

# A run stops once this many sources have been answered without a single variant accepted.
UNUSABLE_AFTER_SOURCES = 20


class _Slot:
    """One of the ``concurrency`` places for a request, released exactly once."""

    def __init__(self, semaphore: asyncio.Semaphore):
        self._semaphore = semaphore
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._semaphore.release()


class _RequestScheduler:
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
        self.waiters: dict[str, list[tuple[int, str | VerdictKey]]] = {}
        # --verify: per source, its rewrite outcomes, the checks expected and the verdicts so far.
        self.verifying: dict[int, tuple[dict[str, Outcome], int, dict[VerdictKey, Outcome]]] = {}
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
        # Sources whose every request (checks included) was served from the journal, and what
        # they gave: the ETA measures the pace of this run's own requests without them.
        self.from_journal: set[int] = set()
        self.journal_yield = 0
        self.journal_sources = 0
        self.last_answer: float | None = None
        self.limit_hit = False
        self.endpoint_checked = False
        self.sources_answered = 0  # sources whose both requests got an answer
        self.on_wire = 0  # requests sent and not yet answered (tasks waiting for a slot are not)
        self.verify_requests = Counter()  # --verify: checks answered in this run / from the journal
        self.gave_up = False

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

    def _unproven(self) -> bool:
        """Whether enough sources are under way to tell an endpoint whose every answer is
        unusable (see UNUSABLE_AFTER_SOURCES) and none has given a variant yet: then no more is
        sent until they have been processed."""
        return (
            self.variants_accepted == 0
            and self.unfinished > 0
            and self.sources_answered + self.unfinished >= UNUSABLE_AFTER_SOURCES
        )

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
            specs = self.plan.requests(index)
            if all(spec.key in self.cached for spec in specs):
                self.from_journal.add(index)
            for spec in specs:
                entry = self.cached.get(spec.key)
                if entry is not None:
                    self.n_cached += 1
                    self._deliver(index, spec.kind, entry)
                elif spec.key in self.waiters:
                    self.waiters[spec.key].append((index, spec.kind))
                else:
                    while (self._cap_may_be_reached() or self._unproven()) and not self.stop.is_set():
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
        # With --verify, processing a source can send more requests (its checks), so requests
        # and processing are waited for together until neither has anything left.
        while self.tasks or (self.processing and not self.stop.is_set()):
            await asyncio.gather(*list(self.tasks), *list(self.processing), return_exceptions=True)
        self._check_unreachable(final=True)
        if self.stop.is_set():
            for f in self.processing:
                f.cancel()
        while self.processing:
            await asyncio.gather(*list(self.processing), return_exceptions=True)

    def _task_done(self, task: asyncio.Task[None], slot: _Slot | None) -> None:
        self.tasks.discard(task)
        if slot is not None:
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
        self.on_wire += 1
        try:
            try:
                c = await self.client.complete(spec.messages, spec.max_tokens, spec.temperature)
            finally:
                # The slot bounds requests on the wire; the wait for the journal's fsync below
                # must not keep the next request from being sent.
                self.on_wire -= 1
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
        if spec.kind == "verify":
            self.verify_requests["answered"] += 1
        self.last_answer = time.perf_counter()
        self._resolve(spec.key, entry)

    def _check_unreachable(self, final: bool) -> None:
        # Nothing ever answered and a whole first wave (or everything, for a small run) failed
        # after its retries: the endpoint is down, wrong, or not speaking the chat API; grinding
        # through the dataset would not help.
        if self.answers or not self.failures or self.fatal is not None:
            return
        n = len(self.failures)
        if n >= self.cfg.concurrency or final:
            last = self.failures[-1].message
            if self.conn_failures == n:
                why = "got through; check --base-url and the network"
            else:
                why = "got a usable answer; check that --base-url is an OpenAI-compatible chat endpoint"
            self._fail(UserError(f"{last}: none of the first {n} requests {why}"))

    def _resolve(self, key: str, outcome: Outcome) -> None:
        for index, kind in self.waiters.pop(key, []):
            self._deliver(index, kind, outcome)

    def _deliver(self, index: int, kind: str | VerdictKey, outcome: Outcome) -> None:
        if isinstance(kind, tuple):
            self._deliver_verdict(index, kind, outcome)
            return
        got = self.outcomes.setdefault(index, {})
        got[kind] = outcome
        if len(got) < len(KINDS):
            return
        del self.outcomes[index]
        self._submit(index, got, None)

    def _submit(
        self, index: int, outcomes: dict[str, Outcome], verdicts: dict[VerdictKey, Outcome] | None
    ) -> None:
        future = self.processor.submit(self.plan.sources[index], outcomes, verdicts)
        self.processing.add(future)
        future.add_done_callback(lambda f: self._processed(index, outcomes, f))

    # -- verification (--verify): a second round of requests for a source's accepted variants

    def _verify(self, index: int, outcomes: dict[str, Outcome], result: SourceResult) -> None:
        specs = self.plan.verify_requests(result.checks or [])
        if not all(spec.key in self.cached for _, spec in specs):
            self.from_journal.discard(index)
        self.verifying[index] = (outcomes, len(specs), {})
        for tag, spec in specs:
            entry = self.cached.get(spec.key)
            if entry is not None:
                self.n_cached += 1
                self.verify_requests["cached"] += 1
                self._deliver_verdict(index, tag, entry)
            elif spec.key in self.waiters:
                self.waiters[spec.key].append((index, tag))
            else:
                self.waiters[spec.key] = [(index, tag)]
                task = asyncio.ensure_future(self._request_when_free(spec))
                self.tasks.add(task)
                task.add_done_callback(lambda t: self._task_done(t, None))

    async def _request_when_free(self, spec: RequestSpec) -> None:
        await self.slots.acquire()
        slot = _Slot(self.slots)
        try:
            if not self.stop.is_set():
                await self._request(spec, slot)
        finally:
            slot.release()

    def _deliver_verdict(self, index: int, tag: VerdictKey, outcome: Outcome) -> None:
        outcomes, expected, got = self.verifying[index]
        got[tag] = outcome
        if len(got) == expected:
            del self.verifying[index]
            self._submit(index, outcomes, got)

    def _processed(
        self, index: int, outcomes: dict[str, Outcome], future: asyncio.Future[SourceResult]
    ) -> None:
        self.processing.discard(future)
        if future.cancelled():
            self.unfinished -= 1
            self.processed.set()
            return
        if future.exception() is not None:
            self.unfinished -= 1
            self.processed.set()
            self._fail(future.exception())
            return
        result = future.result()
        if result.awaiting_verification:
            if not self.stop.is_set():
                self._verify(index, outcomes, result)
            else:
                self.unfinished -= 1
                self.processed.set()
            return
        self.unfinished -= 1
        self.processed.set()
        pos = self.position[index]
        self.results[pos] = result
        if index in self.from_journal:
            self.journal_sources += 1
        self.ahead_yield += len(result.records)
        self.variants_accepted += sum(result.accepted.values())
        self.variants_rejected += len(result.rejections)
        if not result.failed:
            self.sources_answered += 1
        self._advance()
        if (
            self.variants_accepted == 0
            and self.sources_answered >= UNUSABLE_AFTER_SOURCES
            and not self.stop.is_set()
        ):
            # Every answer so far was unusable: the endpoint is not following the prompts, and
            # going through the rest of the dataset would only cost time (and money).
            self.gave_up = True
            self.request_stop()

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
            if self.plan.order[self.frontier] in self.from_journal:
                self.journal_yield += len(fresh)
            self.frontier += 1

    # -- reporting

    def progress(self) -> Progress:
        now = time.perf_counter()
        return Progress(
            cap=self.cfg.cap,
            samples=self.prefix_yield,
            sources_eligible=len(self.plan.order),
            source_limit=self.plan.max_requests // 2,
            bounded=self.cfg.max_sources is not None,
            sources_scheduled=self.scheduled,
            sources_done=len(self.results),
            requests_sent=self.sent,
            requests_cached=self.n_cached,
            in_flight=self.on_wire,
            failed=len(self.failures),
            variants_accepted=self.variants_accepted,
            variants_rejected=self.variants_rejected,
            tokens=self.usage.total_tokens,
            elapsed_s=now - self.started,
            work_s=now - self.first_send if self.first_send is not None else 0.0,
            samples_from_journal=self.journal_yield,
            sources_from_journal=self.journal_sources,
        )


# --------------------------------------------------------------------------------------------
# Outputs


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _status(scheduler: _RequestScheduler) -> str:
    if scheduler.interrupted:
        return "interrupted"
    if scheduler.fatal is not None:
        return "stopped"
    if scheduler.prefix_yield == 0:
        return "no_samples"
    if scheduler.cap_reached():
        return "cap_reached"
    if scheduler.limit_hit:
        return "source_limit"
    return "sources_exhausted"


def _finish(scheduler: _RequestScheduler, journal_usage: Usage, elapsed: float) -> RunSummary:
    plan, cfg = scheduler.plan, scheduler.cfg
    out = cfg.out_dir
    groups = scheduler.prefix_groups
    n_used = prefix_for_cap([len(g) for _, g in groups], cfg.cap)
    groups = groups[:n_used]
    selected = select_round_robin(groups, cfg.cap, cfg.seed)
    status = _status(scheduler)
    if not selected:
        # Empty corpus files would look like a result; the diagnostics below are still written.
        for name in ("unmasked.jsonl", "masked.jsonl"):
            (out / name).unlink(missing_ok=True)
    else:
        atomic_write_lines(out / "unmasked.jsonl", (r.unmasked for r in selected))
        atomic_write_lines(out / "masked.jsonl", (r.masked for r in selected))

    used_results = [scheduler.results[p] for p in range(n_used)]
    rejected = [rec for r in used_results for rec in r.rejections]
    write_jsonl(out / "rejected.jsonl", rejected)

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
    write_jsonl(out / "failed.jsonl", (asdict(f) for f in scheduler.failures))

    by_reason = Counter(rec["reason"] for rec in rejected)
    by_kind_rejected = Counter(rec["kind"] for rec in rejected)
    accepted = {k: sum(r.accepted[k] for r in used_results) for k in KINDS}
    request_time = (
        scheduler.last_answer - scheduler.first_send
        if scheduler.first_send is not None and scheduler.last_answer is not None
        else 0.0
    )
    stats: dict[str, Any] = {
        "dataset": plan.meta.name,
        "split": cfg.split,
        "model": cfg.model,
        "base_url": cfg.base_url,
        "status": status,
        # True when the run stopped early because no answer gave a usable variant.
        "gave_up_unusable": scheduler.gave_up,
        "cap": cfg.cap,
        "samples": {
            "selected": len(selected),
            "by_origin": dict(sorted(Counter(r.origin for r in selected).items())),
            "in_prefix": sum(len(g) for _, g in groups),
            "dropped_in_other_split": sum(r.dropped_other_split for r in used_results),
        },
        "requests": {
            "answered": scheduler.sent,
            "cached": scheduler.n_cached,
            "failed": len(scheduler.failures),
            "refused_by_server": sum(1 for rec in rejected if rec["reason"] == "request_rejected"),
            "in_journal": scheduler.journal.appended + len(scheduler.cached),
        },
        "tokens": {
            "prompt": scheduler.usage.prompt_tokens,
            "completion": scheduler.usage.completion_tokens,
            "total": scheduler.usage.total_tokens,
        },
        "cost_usd": cost_usd(scheduler.usage, cfg.price_in, cfg.price_out),
        "tokens_all_runs": {
            "prompt": journal_usage.prompt_tokens + scheduler.usage.prompt_tokens,
            "completion": journal_usage.completion_tokens + scheduler.usage.completion_tokens,
        },
        "cost_usd_all_runs": cost_usd(journal_usage + scheduler.usage, cfg.price_in, cfg.price_out),
        "variants": {k: {"accepted": accepted[k], "rejected": by_kind_rejected.get(k, 0)} for k in KINDS},
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "sources": dict(sorted(Counter(row["status"] for row in source_rows).items())),
        "elapsed_s": round(elapsed, 3),
        # From the first request sent to the last answer journalled (the benchmark's figure);
        # the rate shown to the user is over the whole run, the same definition as live.
        "request_phase_s": round(request_time, 3),
        "requests_per_s": round(rate(scheduler.sent, elapsed), 4),
    }
    if cfg.verify:
        checks = Counter()
        for r in used_results:
            checks.update(r.verification or {})
        stats["verification"] = {
            "requests_answered": scheduler.verify_requests["answered"],
            "requests_cached": scheduler.verify_requests["cached"],
            "variants_checked": checks["checked"],
            "variants_rejected": checks["rejected"],
            "unclear_answers": checks["unclear_answers"],
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
    if scheduler.failures:
        warnings.append(
            f"{len(scheduler.failures)} request(s) failed after all retries (listed in {out / 'failed.jsonl'}); "
            "run the same command again to retry them"
        )
    return RunSummary(out, status, stats, warnings)


# --------------------------------------------------------------------------------------------
# Entry points


@contextlib.contextmanager
def _endpoint(cfg: AugmentConfig, say: Callable[[str], None]) -> Iterator[str]:
    """The base URL to send to: the embedded llama.cpp server's for ``llm: local``, the
    rule-based server's for ``llm: rules``."""
    if cfg.llm == "rules":
        from augment.rules import DEFAULT_NAME_STYLE, rewrite_answer
        from augment.scripted_server import Reply, ScriptedServer

        style = cfg.rules_names or DEFAULT_NAME_STYLE
        say(f"no LLM (--llm rules): mentions get {style} names, contexts an opener phrase")
        answer = lambda body, _attempt: Reply(text=rewrite_answer(body, cfg.variants, style))  # noqa: E731
        with ScriptedServer(answer) as srv:
            yield srv.url
        return
    if cfg.llm != "local":
        yield cfg.base_url or ""
        return
    from augment.local_llm import LocalLLMServer, default_threads
    from augment.local_models import LOCAL_MODELS

    if cfg.gguf is not None:
        gguf, title = Path(cfg.gguf), Path(cfg.gguf).name
    else:
        spec = LOCAL_MODELS[cfg.local_model or ""]
        gguf, title = spec.locate(notify=say), spec.title
    threads = cfg.local_threads or default_threads()
    say(f"starting a local llama.cpp server: {title} on {threads} CPU thread(s), model file {gguf}")
    started = time.perf_counter()
    with LocalLLMServer(gguf, n_threads=threads, seed=cfg.seed) as srv:
        say(f"local server ready in {time.perf_counter() - started:.1f} s; it answers one request at a time")
        try:
            yield srv.base_url
        except UserError as err:
            # A run that could not reach the server says why when the server itself died.
            crash = srv.crash_report()
            if crash is None:
                raise
            raise UserError(f"{crash}\nwhat the run saw: {err}") from err
        crash = srv.crash_report()
        if crash is not None:
            raise UserError(
                f"{crash}\nthe answers received before are in the journal: the same command resumes from them"
            )


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
    created = [d for d in (out, *out.parents) if not d.exists()]
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
        # Each request carries its own when "auto" (RequestSpec.max_tokens); this is the fallback.
        max_tokens=cfg.max_tokens if isinstance(cfg.max_tokens, int) else 1024,
    )
    client = LLMClient(settings, api_key)
    processor = ProcessingChild()
    await processor.start(plan.cfg.variants, plan.language, plan.forbidden, plan.labels)
    scheduler = _RequestScheduler(plan, journal, contents.entries, client, processor)
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        scheduler.request_stop(interrupted=True)
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
                on_progress(scheduler.progress())

    tick = asyncio.create_task(ticker())
    try:
        await scheduler.run()
    finally:
        tick.cancel()
        for sig in installed:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        await client.aclose()
        await journal.aclose()
        # The child's exit (interpreter teardown, ~0.1 s) overlaps writing the outputs.
        processor.close_input()
    if scheduler.fatal is not None and not scheduler.interrupted:
        # A failed run leaves nothing that looks like a result: no corpus, no stats. The answers
        # it got are kept (the journal), since the next run would otherwise pay for them again.
        await processor.close()
        _remove_if_empty(out / "journal.jsonl", created)
        raise scheduler.fatal
    try:
        if on_progress is not None:
            on_progress(scheduler.progress())
        summary = _finish(
            scheduler, _journal_usage(contents.entries), time.perf_counter() - scheduler.started
        )
    finally:
        await processor.close()
    summary.warnings[:0] = warnings
    return summary


def _remove_if_empty(journal: Path, created: list[Path]) -> None:
    """Remove an empty journal and the folders this run created for it, if nothing else is there."""
    with contextlib.suppress(OSError):
        if journal.stat().st_size == 0:
            journal.unlink()
    for folder in created:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty


def goal_line(plan: Plan) -> str:
    """What the run sets out to do, said at its start."""
    cfg = plan.cfg
    eligible = len(plan.order)
    line = (
        f"{plan.meta.name}/{cfg.split}: {eligible} sources to rewrite ({len(plan.skipped)} skipped); "
        f"goal {cfg.cap} samples"
    )
    if cfg.max_sources is not None and cfg.max_sources < eligible:
        line += f", or fewer if the first {cfg.max_sources} sources (--max-sources) do not give that many"
    return line + f"; at most {plan.max_requests} requests, {cfg.concurrency} in flight"


def no_samples_message(stats: dict[str, Any], out: Path, local_model: str | None) -> str:
    """One line: why a finished run has no samples and what to try."""
    rq = stats["requests"]
    accepted = sum(v["accepted"] for v in stats["variants"].values())
    rejected = sum(stats["rejected_by_reason"].values())
    retry = f"{rq['failed']} requests failed after their retries (listed in {out / 'failed.jsonl'})"
    if accepted + rejected == 0 and rq["failed"]:
        return f"no samples: {retry} and no source was completed; run the same command again to retry them"
    reasons = ", ".join(
        f"{k} {v}" for k, v in sorted(stats["rejected_by_reason"].items(), key=lambda kv: -kv[1])[:3]
    )
    if accepted == 0:
        what = f"none of the {rejected} variants in {rq['answered'] + rq['cached']} answers passed validation ({reasons})"
        if stats.get("gave_up_unusable"):
            what += ", so the run stopped there"
    else:
        what = (
            f"{accepted} variants passed validation but gave no new sentence ({reasons or 'no rejections'})"
        )
    failed = f"; {retry}" if rq["failed"] else ""
    hint = (
        "try the default local model (drop --local-model)"
        if local_model == "smollm2"
        else "try a stronger model"
    )
    return f"no samples: {what}{failed}; see `augment rejects --out {out}`; {hint} or more sources (--max-sources)"


def run(
    cfg: AugmentConfig,
    on_progress: Callable[[Progress], None] | None = None,
    progress_every_s: float = 0.25,
    fsync: bool = True,
    notify: Callable[[str], None] | None = None,
) -> RunSummary:
    """Build the corpus described by ``cfg`` (see the module doc). Raises UserError for anything
    the user can fix (no key, bad data, endpoint down or refusing the key, no sample at all).
    ``notify`` gets the lines worth saying before the work starts (the goal, the local server)."""
    cfg = cfg.resolved()
    api_key = resolve_api_key(cfg)
    plan = make_plan(cfg)
    say = notify or (lambda _line: None)
    say(goal_line(plan))
    with _endpoint(cfg, say) as base_url:
        summary = asyncio.run(_run_async(plan, base_url, api_key, on_progress, progress_every_s, fsync))
    if summary.status == "no_samples":
        raise UserError(no_samples_message(summary.stats, summary.out_dir, cfg.local_model))
    return summary


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
