"""The request journal: keys, round trip, damaged lines, one run per journal, shared fsyncs (augment/journal.py)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from anchoralign.errors import RecordError, UserError
from augment.client import Usage
from augment.journal import Journal, JournalEntry, read_journal, request_key


def _entry(i: int, text: str | None = "1. x") -> JournalEntry:
    return JournalEntry(
        key=f"k{i}", source_id=f"s{i}", kind="mention", text=text, usage=Usage(3, 4), time=1.0
    )


def test_request_key_depends_on_everything_that_shapes_the_answer():
    msgs = [{"role": "user", "content": "a"}]
    base = request_key("m", msgs, {"temperature": 1.0, "max_tokens": 9}, "v1")
    assert base == request_key("m", msgs, {"max_tokens": 9, "temperature": 1.0}, "v1")  # dict order
    assert (
        len(
            {
                base,
                request_key("m2", msgs, {"temperature": 1.0, "max_tokens": 9}, "v1"),
                request_key(
                    "m", [{"role": "user", "content": "b"}], {"temperature": 1.0, "max_tokens": 9}, "v1"
                ),
                request_key("m", msgs, {"temperature": 0.5, "max_tokens": 9}, "v1"),
                request_key("m", msgs, {"temperature": 1.0, "max_tokens": 9}, "v2"),
            }
        )
        == 5
    )


def test_journal_round_trip(tmp_path):
    path = tmp_path / "journal.jsonl"

    async def write():
        journal, contents = Journal.open(path)
        assert contents.entries == {}
        await asyncio.gather(*(journal.append(_entry(i)) for i in range(5)))
        await journal.append(
            JournalEntry("k9", "s9", "context", None, error={"status": 400, "message": "too long"})
        )
        await journal.aclose()

    asyncio.run(write())
    got = read_journal(path)
    assert sorted(got.entries) == ["k0", "k1", "k2", "k3", "k4", "k9"]
    assert got.entries["k3"] == _entry(3)
    assert got.entries["k9"].error == {"status": 400, "message": "too long"}
    assert got.warnings == []


def test_a_cut_short_last_line_is_skipped_and_cut_off(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text(_entry(0).to_json() + "\n" + _entry(1).to_json() + "\n" + _entry(2).to_json()[:25])
    journal, contents = Journal.open(path)
    assert sorted(contents.entries) == ["k0", "k1"]
    assert len(contents.warnings) == 1 and ":3:" in contents.warnings[0]
    journal.write(_entry(3))
    journal.close()
    again = read_journal(path)
    assert sorted(again.entries) == ["k0", "k1", "k3"]
    assert again.warnings == []


def test_a_bad_line_in_the_middle_is_an_error_naming_it(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text(_entry(0).to_json() + "\n{not json\n" + _entry(1).to_json() + "\n")
    with pytest.raises(RecordError, match=r"journal.jsonl:2"):
        read_journal(path)


def test_one_run_per_journal(tmp_path):
    first, _ = Journal.open(tmp_path / "journal.jsonl")
    with pytest.raises(UserError, match="in use by another augment run"):
        Journal.open(tmp_path / "journal.jsonl")
    first.close()
    second, _ = Journal.open(tmp_path / "journal.jsonl")  # free again once the first is closed
    second.close()


def test_concurrent_appends_share_fsyncs(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), time.sleep(0.01), real(fd)))

    async def write():
        journal, _ = Journal.open(tmp_path / "j.jsonl")
        await asyncio.gather(*(journal.append(_entry(i)) for i in range(200)))
        assert journal._synced == 200  # every append returned only once durable
        await journal.aclose()

    asyncio.run(write())
    assert len(read_journal(tmp_path / "j.jsonl").entries) == 200
    assert len(calls) < 20  # group commit: a handful of syncs, not one per line
