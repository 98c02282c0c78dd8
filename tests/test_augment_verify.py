"""The optional verification pass, `augment run --verify` (augment/verify.py and the runner)."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field

from augment_fixtures import conll_like
from fake_openai import stable_fraction

from augment.config import AugmentConfig
from augment.prompts import PromptTemplate
from augment.runner import run
from augment.testing import FakeOpenAIServer, Reply, good_answer, verify_questions
from augment.verify import DEFAULT_VERIFY_PROMPT, REASON, denied, parse_verdicts, questions, verify_messages


@dataclass
class Meta:
    language: str = "en"
    entity_types: dict[str, str] = field(
        default_factory=lambda: {
            "Loc": "a place",
            "Org": "Organization",
            "Peop": "a person",
            "Other": "Other",
        }
    )
    relation_types: dict[str, str] = field(default_factory=lambda: {"Work_For": "works for"})


def test_one_question_per_entity_then_one_per_relation():
    qs = questions(conll_like(), Meta(), "en")
    assert qs == [
        'In this sentence, is "John Smith" a Peop (a person)?',
        'In this sentence, is "Acme Corp." an Org (Organization)?',
        'In this sentence, is "Boston" a Loc (a place)?',
        'In this sentence, is "Mary Jones" a Peop (a person)?',
        'Does the sentence say that "John Smith" Work_For (works for) "Acme Corp."?',
        'Does the sentence say that "Acme Corp." OrgBased_In "Boston"?',
    ]


def test_the_verification_prompt_ends_with_the_sentence_and_numbers_the_questions():
    messages = verify_messages(PromptTemplate.load(DEFAULT_VERIFY_PROMPT), conll_like(), Meta(), "en")
    last = messages[-1]["content"].splitlines()
    assert last[-1] == "Sen. John Smith , who works for Acme Corp. in Boston , met Mary Jones ."
    assert last[last.index("Questions:") + 1] == '1. In this sentence, is "John Smith" a Peop (a person)?'
    assert messages[0]["role"] == "system" and len(messages) == 4  # one worked example


def test_verdicts_are_read_by_number_with_chatter_ignored():
    text = "Sure!\n1. Yes.\n3. no, it is a person\n2) YES\n9. no\n"
    assert parse_verdicts(text, 4) == [True, True, False, None]


def test_unnumbered_verdicts_are_taken_in_order():
    assert parse_verdicts("yes\nNo\n", 3) == [True, False, None]


def test_no_clear_answer_is_none():
    assert parse_verdicts("", 2) == [None, None]
    assert parse_verdicts(None, 1) == [None]
    assert parse_verdicts("1. maybe\n2. it depends", 2) == [None, None]
    assert parse_verdicts("1. yes\n1. no", 1) == [True]  # the first answer to a question counts


def test_a_variant_is_denied_by_any_no_and_only_by_a_no():
    qs = ["q1?", "q2?", "q3?"]
    assert denied([True, None, True], qs) is None
    assert denied([True, False, False], qs) == "answered no to: 2. q2? | 3. q3?"


# -- end to end against the scripted server ---------------------------------------------------


def _deny_some(body, attempt):
    """Rewrites as good_answer; a check says "no" to its last question for about a third of the
    variants (fixed by the prompt), "yes" to everything otherwise."""
    qs = verify_questions(body)
    if qs is None:
        return Reply(text=good_answer(body))
    deny = stable_fraction(body, "deny") < 1 / 3
    return Reply(
        text="\n".join(f"{n}. {'no' if deny and n == len(qs) else 'yes'}" for n in range(1, len(qs) + 1))
    )


def _config(data, url, out, **kw) -> AugmentConfig:
    values = dict(dataset="conll04", data_dir=str(data), base_url=url, out=str(out), concurrency=4, timeout=5)
    values.update(kw)
    return AugmentConfig(**values)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_verify_rejects_denied_variants_and_journals_every_answer(shared_data, tmp_path):
    plain, checked = tmp_path / "plain", tmp_path / "checked"
    with FakeOpenAIServer(_deny_some) as srv:
        run(_config(shared_data, srv.url, plain, cap=10_000, max_sources=6))
        summary = run(_config(shared_data, srv.url, checked, cap=10_000, max_sources=6, verify=True))
        sent = srv.completions()
    st = summary.stats
    v = st["verification"]
    verify_sent = [r for r in sent if verify_questions(r.body) is not None]
    # One check per variant accepted by the parser: 6 sources x (3 mention + 3 context).
    assert v["variants_checked"] == 36 == len(verify_sent)  # (the plain run sent none)
    assert v["requests_answered"] == v["variants_checked"] and v["unclear_answers"] == 0
    assert 0 < v["variants_rejected"] < 36
    assert {r.body["temperature"] for r in verify_sent} == {0.0}

    rejected = [r for r in _lines(checked / "rejected.jsonl") if r["reason"] == REASON]
    assert len(rejected) == v["variants_rejected"] == st["rejected_by_reason"][REASON]
    assert all(r["detail"].startswith("answered no to: ") and r["raw"] and r["key"] for r in rejected)
    accepted = sum(x["accepted"] for x in st["variants"].values())
    assert accepted == 36 - v["variants_rejected"]

    # The journal keeps every answer, the checks included.
    journal = _lines(checked / "journal.jsonl")
    assert sum(e["kind"] == "verify" for e in journal) == 36 and len(journal) == 12 + 36

    # Fewer samples, all of them also made without --verify.
    with_v = {json.dumps(r["tokens"]) for r in _lines(checked / "unmasked.jsonl")}
    without = {json.dumps(r["tokens"]) for r in _lines(plain / "unmasked.jsonl")}
    assert with_v < without

    # A second run is served wholly from the journal (no endpoint) and writes the same corpus.
    before = (checked / "unmasked.jsonl").read_bytes()
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    again = run(_config(shared_data, url, checked, cap=10_000, max_sources=6, verify=True))
    assert (checked / "unmasked.jsonl").read_bytes() == before
    assert again.stats["verification"]["requests_cached"] == 36


def test_verify_added_to_a_finished_run_reuses_its_rewrites(shared_data, tmp_path):
    out = tmp_path / "out"
    with FakeOpenAIServer(_deny_some) as srv:
        run(_config(shared_data, srv.url, out, cap=10_000, max_sources=4))
        n_before = len(srv.completions())
        run(_config(shared_data, srv.url, out, cap=10_000, max_sources=4, verify=True))
        later = srv.completions()[n_before:]
    assert later and all(verify_questions(r.body) is not None for r in later)  # only the checks
