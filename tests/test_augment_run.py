"""Runs against the loopback server (augment/runner.py): selection, resume, faults, kill -9, index
consistency of the corpus."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from augment_fixtures import run_config
from fake_openai import fault_script, malformed_script

from anchoralign.datasets import load_split
from anchoralign.errors import UserError
from anchoralign.schema import Relation, Sample
from anchoralign.tokenize import detokenize, tokenize
from augment.journal import read_journal, request_key
from augment.plan import make_plan
from augment.processing import ALL_REASONS, ProcessingChild, ProcessingError
from augment.prompts import DEFAULT_CONTEXT_PROMPT, DEFAULT_MENTION_PROMPT
from augment.rules import OPENERS, fake_mention, is_context_prompt, prompt_line
from augment.runner import run
from augment.scripted_server import Reply, ScriptedServer, good_script

REPO = Path(__file__).resolve().parent.parent
CORPUS_FILES = ("unmasked.jsonl", "masked.jsonl", "rejected.jsonl")


# -- runs against the loopback server ------------------------------------------------------------


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _positional(s: Sample) -> Sample:
    """Independent of the runner: entities sorted by position, relations re-pointed."""
    order = sorted(range(len(s.entities)), key=lambda i: (s.entities[i].start, s.entities[i].end))
    new = {old: k for k, old in enumerate(order)}
    return Sample(
        id=s.id,
        tokens=s.tokens,
        entities=[s.entities[i] for i in order],
        relations=[Relation(head=new[r.head], tail=new[r.tail], type=r.type) for r in s.relations],
    )


def check_corpus(out: Path, data: Path, k: int = 3) -> None:
    """Every record is what the fake server's rewrites make of its source, index by index."""
    sources = {s.id: _positional(s) for s in load_split("conll04", "train", str(data))}
    unmasked, masked = _records(out / "unmasked.jsonl"), _records(out / "masked.jsonl")
    assert [r["id"] for r in unmasked] == [r["id"] for r in masked]
    assert len({r["id"] for r in unmasked}) == len(unmasked)
    for rec, mrec in zip(unmasked, masked, strict=True):
        src = sources[rec["source_id"]]
        ents = rec["entities"]
        assert [e["type"] for e in ents] == [e.type for e in src.entities]
        assert [(r["head"], r["tail"], r["type"]) for r in rec["relations"]] == [
            (r.head, r.tail, r.type) for r in src.relations
        ]
        assert all(0 <= e["start"] < e["end"] <= len(rec["tokens"]) for e in ents)
        spans = [rec["tokens"][e["start"] : e["end"]] for e in ents]
        originals = [src.tokens[e.start : e.end] for e in src.entities]
        candidates = [originals] + [
            [
                tokenize(fake_mention(e.type, detokenize(o), v))
                for e, o in zip(src.entities, originals, strict=True)
            ]
            for v in range(k)
        ]
        assert spans in candidates, f"{rec['id']}: mentions {spans} are not one of the server's rewrites"
        inside = {t for e in ents for t in range(e["start"], e["end"])}
        context = "".join(t for i, t in enumerate(rec["tokens"]) if i not in inside)
        src_inside = {t for e in src.entities for t in range(e.start, e.end)}
        src_context = "".join(t for i, t in enumerate(src.tokens) if i not in src_inside)
        assert context in [src_context] + ["".join(tokenize(o)) + src_context for o in OPENERS[:k]]
        # The masked twin: entity i is the single token <mask{i}>, the context unchanged.
        assert [mrec["tokens"][e["start"] : e["end"]] for e in mrec["entities"]] == [
            [f"<mask{i}>"] for i in range(len(ents))
        ]
        assert [e["type"] for e in mrec["entities"]] == [e["type"] for e in ents]
        assert mrec["relations"] == rec["relations"]


def _snapshot(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in CORPUS_FILES}


def test_capped_run_spreads_over_sources_and_pays_only_for_the_cap(shared_data, tmp_path):
    with ScriptedServer(good_script()) as srv:
        summary = run(run_config(shared_data, srv.url, tmp_path / "a"))
        n_requests = len(srv.requests)
    out = tmp_path / "a"
    assert summary.status == "cap_reached"
    check_corpus(out, shared_data)
    unmasked = _records(out / "unmasked.jsonl")
    assert len(unmasked) == 100
    rows = _records(out / "sources.jsonl")
    split_ids = [s.id for s in load_split("conll04", "train", str(shared_data))]
    assert [r["source_id"] for r in rows] == split_ids  # every source accounted for, once
    used = [i for i, r in enumerate(rows) if r["status"] == "used"]
    assert {r["source_id"] for r in unmasked} == {rows[i]["source_id"] for i in used}
    assert max(used) > 3 * len(used)  # a seeded sample of the split, not its first sentences
    assert {r["status"] for r in rows} == {"used", "not_needed"}
    # Two requests a used source, plus at most what was in flight when the cap was reached.
    assert 2 * len(used) <= n_requests <= 2 * len(used) + 2 * 4
    stats = json.loads((out / "stats.json").read_text())
    assert stats["samples"]["selected"] == 100
    assert stats["requests"]["answered"] == n_requests
    assert stats["tokens"]["total"] > 0
    assert json.loads((out / "config.json").read_text())["cap"] == 100

    # The same command again: everything comes from the journal and the files are unchanged.
    before = _snapshot(out)
    with ScriptedServer(good_script()) as srv:
        again = run(run_config(shared_data, srv.url, out))
        assert srv.requests == []
    assert _snapshot(out) == before
    assert again.stats["requests"]["cached"] >= 2 * len(used)

    # A larger cap reuses every journalled answer and only asks for the rest.
    with ScriptedServer(good_script()) as srv:
        bigger = run(run_config(shared_data, srv.url, out, cap=200))
        assert len(srv.requests) < n_requests + 2 * len(used) + 8
    assert bigger.stats["samples"]["selected"] == 200
    check_corpus(out, shared_data)


def test_transport_faults_change_nothing_in_the_corpus(shared_data, tmp_path):
    with ScriptedServer(good_script()) as srv:
        run(run_config(shared_data, srv.url, tmp_path / "clean", cap=150))
    with ScriptedServer(fault_script(rate=0.3, slow_s=1.0)) as srv:
        summary = run(run_config(shared_data, srv.url, tmp_path / "faulty", cap=150, timeout=0.4))
        statuses = [r.status for r in srv.requests]
    assert summary.stats["requests"]["failed"] == 0
    assert statuses.count(429) and statuses.count(500) and statuses.count(503) and statuses.count(0)
    assert _snapshot(tmp_path / "faulty") == _snapshot(tmp_path / "clean")
    journal = (tmp_path / "faulty" / "journal.jsonl").read_text().splitlines()
    keys = [json.loads(line)["key"] for line in journal]
    assert len(keys) == len(set(keys)) == summary.stats["requests"]["answered"]
    assert (tmp_path / "faulty" / "failed.jsonl").read_text() == ""


def test_failed_requests_are_listed_and_retried_by_the_next_run(shared_data, tmp_path):
    broken = {"on": True}

    def script(body, attempt):
        if broken["on"] and is_context_prompt(prompt_line(body)):
            return Reply(status=500, message="down")
        return good_script()(body, attempt)

    out = tmp_path / "out"
    # Every source failed: a run with no sample is an error, which says how to retry.
    with (
        ScriptedServer(script) as srv,
        pytest.raises(UserError, match=r"no samples: 5 requests failed .* run the same command again"),
    ):
        run(run_config(shared_data, srv.url, out, cap=30, max_retries=1, max_sources=5))
    failed = _records(out / "failed.jsonl")
    assert len(failed) == 5 and {f["kind"] for f in failed} == {"context"}
    assert "HTTP 500" in failed[0]["message"]
    assert json.loads((out / "stats.json").read_text())["sources"] == {"failed": 5, "not_tried": 917}
    broken["on"] = False
    with ScriptedServer(script) as srv:
        second = run(run_config(shared_data, srv.url, out, cap=30, max_retries=1, max_sources=5))
        assert {is_context_prompt(prompt_line(r.body)) for r in srv.requests} == {
            True
        }  # only the failed ones
    assert (out / "failed.jsonl").read_text() == ""
    assert second.stats["samples"]["selected"] == 30


def test_every_reason_code_is_recorded_with_the_raw_answer(shared_data, tmp_path):
    out = tmp_path / "out"
    with ScriptedServer(malformed_script()) as srv:
        summary = run(run_config(shared_data, srv.url, out, cap=5000, max_sources=120))
    assert summary.status == "source_limit"
    assert any("fewer than the cap" in w for w in summary.warnings)
    rejected = _records(out / "rejected.jsonl")
    assert {r["reason"] for r in rejected} == set(ALL_REASONS) - {"failed_verification"}  # --verify only
    for r in rejected:
        assert r["detail"] and r["kind"] in ("mention", "context") and r["source_id"]
        if r["reason"] == "request_rejected":
            assert "maximum context length" in r["detail"] and r["raw"] is None
        else:
            assert r["raw"] and r["key"]
    stats = summary.stats
    assert sum(stats["rejected_by_reason"].values()) == len(rejected)
    check_corpus(out, shared_data)


def test_a_cut_short_journal_line_is_tolerated(shared_data, tmp_path):
    out = tmp_path / "out"
    with ScriptedServer(good_script()) as srv:
        run(run_config(shared_data, srv.url, out, cap=40))
    before = _snapshot(out)
    with (out / "journal.jsonl").open("a") as f:
        f.write('{"key": "abc", "source_id": "x", "ki')
    with ScriptedServer(good_script()) as srv:
        summary = run(run_config(shared_data, srv.url, out, cap=40))
        assert srv.requests == []
    assert any("cut-short" in w for w in summary.warnings)
    assert _snapshot(out) == before
    assert read_journal(out / "journal.jsonl").warnings == []


# -- kill -9 and Ctrl-C: a restarted run equals an uninterrupted one ---------------------------


def _cli(data: Path, url: str, out: Path, cap: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "augment.cli",
        "run",
        "--dataset",
        "conll04",
        "--data-dir",
        str(data),
        "--base-url",
        url,
        "--out",
        str(out),
        "--cap",
        str(cap),
        "--concurrency",
        "4",
        "--timeout",
        "5",
        "--backoff",
        "0.01",
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "160"}


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {n} lines")


def _key_of(body: dict) -> str:
    version = DEFAULT_CONTEXT_PROMPT if is_context_prompt(prompt_line(body)) else DEFAULT_MENTION_PROMPT
    sampling = {"temperature": body["temperature"], "max_tokens": body["max_tokens"]}
    return request_key(body["model"], body["messages"], sampling, version)


@pytest.mark.parametrize("how", ["kill -9", "ctrl-c"])
def test_an_interrupted_run_resumes_to_the_same_corpus(shared_data, tmp_path, how):
    cap = 500
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    with ScriptedServer(good_script(delay=0.05)) as srv:
        proc = subprocess.Popen(
            _cli(shared_data, srv.url, resumed, cap),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _wait_for_lines(resumed / "journal.jsonl", 12, proc)
        proc.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGINT)
        # Returns only once every holder of the pipes is gone: the parsing worker exits too.
        stdout, stderr = proc.communicate(timeout=60)
        journalled = set(read_journal(resumed / "journal.jsonl").entries)
        assert journalled
        if how == "ctrl-c":
            assert proc.returncode == 130, stderr.decode()
            assert "resume with" in stderr.decode()
            stats = json.loads((resumed / "stats.json").read_text())
            assert stats["status"] == "interrupted"
        else:
            assert proc.returncode == -signal.SIGKILL
        n_before = len(srv.requests)
        done = subprocess.run(
            _cli(shared_data, srv.url, resumed, cap), env=_env(), capture_output=True, timeout=120
        )
        assert done.returncode == 0, done.stderr.decode()
        resent = [r for r in srv.requests[n_before:] if _key_of(r.body) in journalled]
        assert resent == [], "a journalled request was sent again"
    with ScriptedServer(good_script()) as srv:
        run(run_config(shared_data, srv.url, clean, cap=cap))
    assert _snapshot(resumed) == _snapshot(clean)
    keys = [json.loads(line)["key"] for line in (resumed / "journal.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys))
    check_corpus(resumed, shared_data)


# -- the processing child ----------------------------------------------------------------------


def test_a_processing_failure_stops_the_run_instead_of_hanging(shared_data, tmp_path, monkeypatch):
    def broken(self, source, outcomes, verdicts=None):
        future = asyncio.get_running_loop().create_future()
        future.set_exception(ProcessingError("synthesis bug"))
        return future

    monkeypatch.setattr(ProcessingChild, "submit", broken)
    with ScriptedServer(good_script()) as srv, pytest.raises(ProcessingError, match="synthesis bug"):
        run(run_config(shared_data, srv.url, tmp_path / "out", cap=50))


def test_auto_max_tokens_sizes_each_answer_to_its_sentence(shared_data, tmp_path):
    from augment.plan import answer_budget

    assert answer_budget("x" * 100, 3) == 3 * (50 + 12) + 16  # half a token a character, per variant
    auto = make_plan(run_config(shared_data, "http://127.0.0.1:9/v1", tmp_path, max_tokens="auto").resolved())
    fixed = make_plan(run_config(shared_data, "http://127.0.0.1:9/v1", tmp_path, max_tokens=256).resolved())
    budgets = set()
    for index in auto.order[:20]:
        for a, f in zip(auto.requests(index), fixed.requests(index), strict=True):
            line = a.messages[-1]["content"].splitlines()[-1]
            assert a.max_tokens == answer_budget(line, 3) and f.max_tokens == 256
            assert a.key != f.key  # the answer's length limit shapes it: part of the request key
            budgets.add(a.max_tokens)
    assert len(budgets) > 10


def test_progress_leaves_what_the_journal_gave_out_of_the_pace(shared_data, tmp_path):
    out = tmp_path / "out"
    with ScriptedServer(good_script()) as srv:
        first = run(run_config(shared_data, srv.url, out, cap=10_000, max_sources=6))
        seen = []
        run(run_config(shared_data, srv.url, out, cap=10_000, max_sources=10), on_progress=seen.append)
    last = seen[-1]
    assert (last.sources_from_journal, last.samples_from_journal) == (6, first.stats["samples"]["in_prefix"])
    assert last.sources_done == 10 and last.goal.unit == "sources" and last.eta_s is None  # done
    assert last.requests_cached == 12 and last.requests_sent == 8
