"""Parsing and synthesis in the processing child (augment/processing.py)."""

from __future__ import annotations

import asyncio

import pytest
from augment_fixtures import run_config

from augment.journal import JournalEntry
from augment.plan import make_plan
from augment.processing import ProcessingChild, ProcessingError, split_truncated
from augment.scripted_server import good_answer


def test_split_truncated_only_for_length_stops():
    assert split_truncated("1. a\n2. b", "stop") == ("1. a\n2. b", None)
    assert split_truncated("1. a\n2. b is cu", "length") == ("1. a", "2. b is cu")


def test_processing_child_answers_and_reports_failures(shared_data, tmp_path):
    plan = make_plan(run_config(shared_data, "http://127.0.0.1:9/v1", tmp_path).resolved())
    index = plan.order[0]
    source = plan.sources[index]
    specs = plan.requests(index)
    body = {"messages": specs[0].messages}
    mention = JournalEntry(specs[0].key, source.id, "mention", good_answer(body))
    context = JournalEntry(specs[1].key, source.id, "context", good_answer({"messages": specs[1].messages}))

    async def go():
        proc = ProcessingChild()
        await proc.start(plan.cfg.variants, plan.language, plan.forbidden)
        ok = await proc.submit(source, {"mention": mention, "context": context})
        with pytest.raises(ProcessingError, match="KeyError"):
            await proc.submit(source, {"mention": mention})  # a bug: an incomplete source
        await proc.close()
        return ok

    result = asyncio.run(go())
    assert result == plan.process(index, {"mention": mention, "context": context})
    assert len(result.records) == 15 and result.accepted == {"mention": 3, "context": 3}
