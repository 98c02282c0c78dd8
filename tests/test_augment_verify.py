"""The optional verification pass, `augment run --verify` (augment/verify.py and the runner)."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field

from augment_fixtures import conll_like
from fake_openai import stable_fraction

from augment.config import AugmentConfig
from augment.plan import make_plan
from augment.prompts import PromptTemplate
from augment.rules import OPENERS
from augment.runner import run
from augment.scripted_server import Reply, ScriptedServer, good_answer, verify_question
from augment.verify import (
    DEFAULT_VERIFY_PROMPT,
    LAST_LINE,
    REASON,
    SENSE_QUESTION,
    denied,
    parse_verdict,
    questions,
    relation_phrase,
    verify_messages,
)


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


def test_the_sense_question_then_one_question_per_relation():
    qs = questions(conll_like(), Meta(), "en")
    assert qs == [
        SENSE_QUESTION,
        'Does the sentence clearly state that "John Smith" works for "Acme Corp."?',
        'Does the sentence clearly state that "Acme Corp." is OrgBased In "Boston"?',
    ]


def test_relations_read_as_words_between_the_names():
    descriptions = {
        "Work_For": "works for, a person is employed by an organization",
        "Kill": "killed, a person killed another person",
        "Located_In": "located in, a place lies inside another place",
        "OrgBased_In": "organization based in, an organization is located in a place",
        "Used-for": "used for",
    }
    assert relation_phrase("Work_For", descriptions) == "works for"
    assert relation_phrase("Kill", descriptions) == "killed"
    assert relation_phrase("Located_In", descriptions) == "is located in"
    assert relation_phrase("OrgBased_In", descriptions) == "is organization based in"
    assert relation_phrase("Used-for", descriptions) == "is used for"
    assert relation_phrase("Part_Whole", {}) == "is Part Whole"


def test_the_verification_prompt_gives_the_sentence_then_asks_one_question():
    template = PromptTemplate.load(DEFAULT_VERIFY_PROMPT, last_line=LAST_LINE)
    messages = verify_messages(template, conll_like(), "Is it?", "en")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[-1]["content"].splitlines() == [
        "Sentence: Sen. John Smith , who works for Acme Corp. in Boston , met Mary Jones .",
        "Question: Is it?",
    ]


def test_the_first_word_of_the_answer_decides():
    assert parse_verdict("Yes.") is True
    assert parse_verdict("no, it does not") is False
    assert parse_verdict("  NO") is False
    assert parse_verdict("The sentence says yes") is None
    assert parse_verdict("") is None and parse_verdict(None) is None
    assert parse_verdict("yesterday") is None


def test_a_variant_is_denied_by_any_no_and_only_by_a_no():
    qs = ["q1?", "q2?", "q3?"]
    assert denied([True, None, True], qs) is None
    assert denied([True, False, False], qs) == "answered no to: q2? | q3?"


# -- end to end against the scripted server ---------------------------------------------------


def _deny_some(body, attempt):
    """Rewrites as good_answer; a question is answered "no" for about one in five (fixed by the
    prompt), "yes" otherwise."""
    if verify_question(body) is None:
        return Reply(text=good_answer(body))
    return Reply(text="No." if stable_fraction(body, "deny") < 0.2 else "Yes.")


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
    with ScriptedServer(_deny_some) as srv:
        run(_config(shared_data, srv.url, plain, cap=10_000, max_sources=6))
        summary = run(_config(shared_data, srv.url, checked, cap=10_000, max_sources=6, verify=True))
        sent = srv.completions()
    st = summary.stats
    v = st["verification"]
    verify_sent = [r for r in sent if verify_question(r.body) is not None]
    # Every variant the parser accepted, 6 sources x (3 mention + 3 context), is asked the sense
    # question and one question per relation of its source.
    plan = make_plan(_config(shared_data, srv.url, checked, max_sources=6, verify=True).resolved())
    # (and so is each source, to judge its variants against)
    n_questions = sum(7 * (1 + len(plan.sources[i].relations)) for i in plan.order[:6])
    assert v["variants_checked"] == 36
    assert v["requests_answered"] == n_questions == len(verify_sent)  # (the plain run sent none)
    assert v["unclear_answers"] == 0
    assert 0 < v["variants_rejected"] < 36
    assert {r.body["temperature"] for r in verify_sent} == {0.0}

    rejected = [r for r in _lines(checked / "rejected.jsonl") if r["reason"] == REASON]
    assert len(rejected) == v["variants_rejected"] == st["rejected_by_reason"][REASON]
    assert all(r["detail"].startswith("answered no to: ") and r["raw"] and r["key"] for r in rejected)
    accepted = sum(x["accepted"] for x in st["variants"].values())
    assert accepted == 36 - v["variants_rejected"]

    # The journal keeps every answer, the checks included.
    journal = _lines(checked / "journal.jsonl")
    assert sum(e["kind"] == "verify" for e in journal) == n_questions and len(journal) == 12 + n_questions

    # Fewer samples, all of them also made without --verify.
    with_v = {json.dumps(r["tokens"]) for r in _lines(checked / "unmasked.jsonl")}
    without = {json.dumps(r["tokens"]) for r in _lines(plain / "unmasked.jsonl")}
    assert with_v < without

    # A second run is served wholly from the journal (no endpoint) and writes the same corpus.
    before = (checked / "unmasked.jsonl").read_bytes()
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    again = run(_config(shared_data, url, checked, cap=10_000, max_sources=6, verify=True))
    assert (checked / "unmasked.jsonl").read_bytes() == before
    assert again.stats["verification"]["requests_cached"] == n_questions


def test_a_variant_is_rejected_only_for_what_its_source_was_said_to_state(shared_data, tmp_path):
    def script(body, attempt):
        question = verify_question(body)
        if question is None:
            return Reply(text=good_answer(body))
        # The stand-in's context variants start with an opener phrase; say "no" about them only.
        sentence = [m for m in body["messages"] if m["role"] == "user"][-1]["content"].splitlines()[0]
        rewritten = any(sentence.removeprefix("Sentence: ").startswith(o) for o in OPENERS)
        return Reply(text="No." if rewritten else "Yes.")

    def never(body, attempt):  # every question is denied, the sources' own included
        return Reply(text=good_answer(body) if verify_question(body) is None else "No.")

    with ScriptedServer(script) as srv:
        st = run(_config(shared_data, srv.url, tmp_path / "a", cap=10_000, max_sources=3, verify=True)).stats
    assert st["verification"]["variants_rejected"] == st["variants"]["context"]["rejected"] == 9
    assert st["variants"]["mention"]["accepted"] == 9 and st["variants"]["context"]["accepted"] == 0
    with ScriptedServer(never) as srv:
        st = run(_config(shared_data, srv.url, tmp_path / "b", cap=10_000, max_sources=3, verify=True)).stats
    assert st["verification"]["variants_rejected"] == 0  # the sources got "no" too: nothing to judge by


def test_the_summary_says_what_verification_did(shared_data, tmp_path, capsys, monkeypatch):
    from anchoralign.cli import run_cli
    from augment.cli import build_parser

    monkeypatch.setenv("COLUMNS", "250")
    out = tmp_path / "out"
    with ScriptedServer(_deny_some) as srv:
        args = ["run", "--dataset", "conll04", "--data-dir", str(shared_data), "--base-url", srv.url]
        assert run_cli(build_parser(), [*args, "--out", str(out), "--max-sources", "3", "--verify"]) == 0
    printed = capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())["verification"]
    assert (
        f"{stats['variants_checked']} variants asked {stats['requests_answered']} questions (0 from journal), "
        f"{stats['variants_rejected']} rejected" in printed
    )


def test_verify_added_to_a_finished_run_reuses_its_rewrites(shared_data, tmp_path):
    out = tmp_path / "out"
    with ScriptedServer(_deny_some) as srv:
        run(_config(shared_data, srv.url, out, cap=10_000, max_sources=4))
        n_before = len(srv.completions())
        run(_config(shared_data, srv.url, out, cap=10_000, max_sources=4, verify=True))
        later = srv.completions()[n_before:]
    assert later and all(verify_question(r.body) is not None for r in later)  # only the checks
