"""Answer splitting, mention/context variant validation and reason codes (augment/parse.py)."""

from __future__ import annotations

import json
from typing import get_args

import pytest
from augment_fixtures import conll_like, words

from anchoralign.schema import Entity, Sample
from augment.parse import (
    REASONS,
    ContextVariant,
    MentionVariant,
    Reason,
    context_edits_allowed,
    edit_distance,
    normalise_tokens,
    parse_context_answer,
    parse_mention_answer,
    split_template,
    split_variants,
)
from augment.prompts import eligibility, markup_context, markup_mentions


def mention_line(
    p0="Ann Lee", o="Zeta Ltd.", loc="Oslo", p3="Tom Hardy", t=("Peop", "Org", "Loc", "Peop")
) -> str:
    return (
        f'Sen. {{"{t[0]}": "{p0}"}} , who works for {{"{t[1]}": "{o}"}} in {{"{t[2]}": "{loc}"}} , '
        f'met {{"{t[3]}": "{p3}"}} .'
    )


GOOD_MENTION = mention_line()
GOOD_CONTEXT = "<mask3> was introduced to Senator <mask0> , an employee of the <mask2> firm <mask1> ."


# --- splitting -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "lines"),
    [
        ("1. a\n2. b", ["a", "b"]),
        ("Here are three versions:\n```\n1) a\n\n2. b\n(3) c\n```\nHope this helps!", ["a", "b", "c"]),
        ("[1] a\n1: b\n**2.** c", ["a", "b", "c"]),
        ("- a\n* b\n• c", ["a", "b", "c"]),
        ("Sure, here they are:\na\n\nb", ["a", "b"]),
        ("1. 1.5 million people left\n2. 1984: a year", ["1.5 million people left", "1984: a year"]),
        ("1.5 million people left", ["1.5 million people left"]),
        ('1. "a b ."\n2. "a" said b', ["a b .", '"a" said b']),
        ("1. “a b”", ["a b"]),
        ("```text\n```", []),
        ("", []),
    ],
)
def test_split_variants_tolerates_formatting_noise(raw, lines):
    assert split_variants(raw) == lines


# --- mention variants ------------------------------------------------------------------------


def test_a_good_mention_variant_is_accepted_index_aligned():
    result = parse_mention_answer("1. " + GOOD_MENTION, conll_like())
    assert result.rejected == []
    assert result.accepted == [
        MentionVariant(mentions=["Ann Lee", "Zeta Ltd.", "Oslo", "Tom Hardy"], text=GOOD_MENTION)
    ]


@pytest.mark.parametrize(
    "line",
    [
        "Sen. {“Peop”: “Ann Lee”} , who works for {'Org': 'Zeta Ltd.'} in {Loc: Oslo} , met { \"Peop\" :\"Tom Hardy\" } .",
        mention_line(p0="Ann Lee").replace('"Peop"', '"peop"', 1),  # label case is not content
        mention_line().replace(" ,", ","),  # neither is spacing or punctuation outside the items
    ],
)
def test_quoting_and_spacing_variants_of_the_markup_are_read(line):
    result = parse_mention_answer("1. " + line, conll_like())
    assert [v.mentions for v in result.accepted] == [["Ann Lee", "Zeta Ltd.", "Oslo", "Tom Hardy"]], (
        result.rejected
    )


def test_json_escapes_and_apostrophes_in_mentions_are_decoded():
    line = mention_line(p0='Ren\\u00e9e \\"Ray\\" O\'Neil', o="O'Brien & Co")
    [variant] = parse_mention_answer("1. " + line, conll_like()).accepted
    assert variant.mentions[:2] == ['Renée "Ray" O\'Neil', "O'Brien & Co"]
    single = (
        "Sen. {'Peop': 'O'Neil'} , who works for {'Org': 'Zeta'} in {'Loc': 'Oslo'} , met {'Peop': 'Tom'} ."
    )
    assert parse_mention_answer("1. " + single, conll_like()).accepted[0].mentions[0] == "O'Neil"


def test_mentions_follow_position_when_source_entities_are_unsorted():
    source = Sample(
        id="u",
        tokens=words("Alice met Bob"),
        entities=[Entity(start=2, end=3, type="Peop"), Entity(start=0, end=1, type="Peop")],
    )
    [variant] = parse_mention_answer('1. {"Peop": "Carol"} met {"Peop": "Dan"}', source).accepted
    assert variant.mentions == ["Dan", "Carol"]


def test_context_tolerance_allows_articles_and_one_word():
    source = conll_like()
    article = mention_line().replace("works for", "works for the")
    agreement = mention_line(p0="Bo Ek").replace("works", "worked")
    two_words = mention_line().replace("works for", "worked with")
    assert len(parse_mention_answer(f"1. {article}\n2. {agreement}", source).accepted) == 2
    [rejection] = parse_mention_answer("1. " + two_words, source).rejected
    assert rejection.reason == "context_changed"
    assert rejection.detail.startswith("the text outside the entities changed by 2 token edits (1 allowed)")
    assert "-works for" in rejection.detail and "+worked with" in rejection.detail


# (kind, answer, reason, fragment of the detail)
CASES: list[tuple[str, str, str, str]] = [
    ("mention", "", "empty_answer", "empty"),
    ("mention", "I am sorry, I cannot help with that.", "unparsable", "no numbered lines"),
    (
        "mention",
        f"1. {GOOD_MENTION}\n2. {mention_line(p0='Bo Ek')}",
        "extra_variant",
        "variant 2 of an answer asked for 1",
    ),
    (
        "mention",
        f"1. {GOOD_MENTION}\n2. {GOOD_MENTION.upper().replace('PEOP', 'Peop')}",
        "duplicate_variant",
        "as variant 1",
    ),
    (
        "mention",
        "1. " + mention_line().replace('{"Peop": "Tom Hardy"}', "Tom Hardy"),
        "count_mismatch",
        "found 3 entity items, expected 4",
    ),
    (
        "mention",
        "1. " + mention_line(t=("Peop", "Loc", "Loc", "Peop")),
        "type_changed",
        "entity 1: type 'Org' became 'Loc'",
    ),
    (
        "mention",
        "1. " + mention_line(t=("Peop", "Loc", "Org", "Peop")),
        "order_changed",
        "types read Peop, Loc, Org, Peop instead of Peop, Org, Loc, Peop",
    ),
    ("mention", "1. " + mention_line(loc="  "), "empty_mention", "entity 2 (Loc): the mention is empty"),
    (
        "mention",
        "1. " + mention_line(loc="<mask2>"),
        "markup_in_mention",
        "entity 2 (Loc): the mention '<mask2>' contains markup",
    ),
    (
        "mention",
        "1. "
        + mention_line().replace("who works for", "who was fired by").replace("met", "and later married"),
        "context_changed",
        "(1 allowed)",
    ),
    ("mention", "1. " + markup_mentions(conll_like()), "mention_unchanged", "every mention is the same"),
    (
        "mention",
        "1. " + mention_line("john SMITH", "Acme Corp.", "Boston", "Mary Jones"),
        "mention_unchanged",
        "every mention",
    ),
    (
        "context",
        "1. Sen. <mask0> worked for <mask1> in <mask2> .",
        "missing_placeholder",
        "missing <mask3> (the source has <mask0>, <mask1>, <mask2>, <mask3>)",
    ),
    (
        "context",
        "1. <mask0> and <mask0> work for <mask1> in <mask2> with <mask3> .",
        "duplicate_placeholder",
        "repeated <mask0> (2x)",
    ),
    (
        "context",
        "1. <mask0> works for <mask1> in <mask2> with <mask3> and <mask4> .",
        "unknown_placeholder",
        "unknown <mask4>",
    ),
    (
        "context",
        "1. <mask> works for <mask1> in <mask2> with <mask3> .",
        "unknown_placeholder",
        "unknown <mask>; missing <mask0>",
    ),
    (
        "context",
        '1. <mask0> works for <mask1> in <mask2> with <mask3> and {"Peop": "Jo"} .',
        "markup_in_context",
        "entity markup",
    ),
    (
        "context",
        "1. sen. <MASK0> who works for <mask 1> in <mask_2>, met <mask3>",
        "unchanged",
        "apart from case",
    ),
    ("context", f"1. {GOOD_CONTEXT}\n2. {GOOD_CONTEXT.lower()}", "duplicate_variant", "as variant 1"),
    (
        "context",
        f"1. {GOOD_CONTEXT}\n2. <mask0> met <mask3> at <mask1> in <mask2> .",
        "extra_variant",
        "asked for 1",
    ),
]


@pytest.mark.parametrize(("kind", "answer", "reason", "detail"), CASES)
def test_every_rejection_has_its_reason_and_detail(kind, answer, reason, detail):
    parse = parse_mention_answer if kind == "mention" else parse_context_answer
    result = parse(answer, conll_like(), "en", k=1 if reason == "extra_variant" else None)
    assert [r.reason for r in result.rejected] == [reason]
    [rejection] = result.rejected
    assert rejection.kind == kind
    assert detail in rejection.detail
    if reason in ("empty_answer", "unparsable"):
        assert rejection.text == answer and rejection.index is None
    else:
        assert rejection.text == split_variants(answer)[rejection.index - 1]


def test_the_reason_codes_are_a_closed_documented_set_all_exercised():
    assert set(get_args(Reason)) == set(REASONS)
    assert all(REASONS.values())
    assert {reason for _, _, reason, _ in CASES} == set(REASONS)


def test_rich_markup_in_an_answer_survives_verbatim():
    line = "[bold]Sen.[/bold] " + mention_line()[5:].replace(
        "who works for", "[red]who[/red] was employed by"
    )
    [rejection] = parse_mention_answer(f"1. {line}", conll_like()).rejected
    assert rejection.text == line
    [variant] = parse_mention_answer("1. " + mention_line(p0="[bold]Ann[/]"), conll_like()).accepted
    assert variant.mentions[0] == "[bold]Ann[/]"


def test_lines_are_numbered_among_variants_and_limited_to_k():
    answer = f"Here you go:\n1. {GOOD_MENTION}\n2. nonsense\n3. {mention_line(p0='Bo Ek')}\n4. {mention_line(p0='Al Bo')}"
    result = parse_mention_answer(answer, conll_like(), k=3)
    assert [v.mentions[0] for v in result.accepted] == ["Ann Lee", "Bo Ek"]
    assert [(r.index, r.reason) for r in result.rejected] == [(2, "count_mismatch"), (4, "extra_variant")]


# --- context variants ------------------------------------------------------------------------


def test_context_variant_with_reordered_and_respelled_placeholders_is_accepted():
    line = "<MASK3> was introduced to Senator < mask 0 > , an employee of the <mask_2> firm <mask1> ."
    [variant] = parse_context_answer("1. " + line, conll_like()).accepted
    assert variant == ContextVariant(template=GOOD_CONTEXT, text=line)
    assert split_template(variant.template) == [
        3,
        " was introduced to Senator ",
        0,
        " , an employee of the ",
        2,
        " firm ",
        1,
        " .",
    ]


def test_a_context_variant_may_keep_an_original_mention():
    result = parse_context_answer(
        "1. <mask0> , like Boston , works for <mask1> in <mask2> near <mask3> .", conll_like()
    )
    assert len(result.accepted) == 1


def test_chinese_variants():
    source = Sample(
        id="zh",
        tokens=list("李明在北京工作。"),
        entities=[Entity(start=0, end=2, type="PER"), Entity(start=3, end=5, type="LOC")],
    )
    mention = parse_mention_answer(
        '1. {"PER": "王芳"}在{"LOC": "上海"}工作。\n2. {"PER": "王芳"}在{"LOC": "上海"}上班呢。', source, "zh"
    )
    assert [v.mentions for v in mention.accepted] == [["王芳", "上海"]]
    assert [r.reason for r in mention.rejected] == ["context_changed"]
    context = parse_context_answer("1. <mask0>目前在<mask1>上班。\n2. <mask0>在<mask1>工作！", source, "zh")
    assert [v.template for v in context.accepted] == ["<mask0>目前在<mask1>上班。"]
    assert [r.reason for r in context.rejected] == ["unchanged"]


# --- pure helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        (list("kitten"), list("sitting"), 3),
        ([], ["a", "b"], 2),
        (["a", "b"], ["b", "a"], 2),
        (words("x y z"), words("x y z"), 0),
        (["works", "for"], ["worked", "with"], 2),
    ],
)
def test_edit_distance(a, b, distance):
    assert edit_distance(a, b) == distance == edit_distance(b, a)


@pytest.mark.parametrize(("n", "allowed"), [(0, 1), (9, 1), (10, 1), (19, 1), (25, 2), (40, 4)])
def test_context_edits_allowed(n, allowed):
    assert context_edits_allowed(n) == allowed


def test_normalise_tokens():
    assert normalise_tokens("The Cat, sat -- on a ＭＡＴ!", "en", drop_articles=True) == words(
        "cat sat on mat"
    )
    assert normalise_tokens("The Cat, sat", "en") == words("the cat sat")
    assert normalise_tokens("李明，工作。", "zh") == list("李明工作")


# --- real data -------------------------------------------------------------------------------


def conll04_train(shared_data, n: int) -> list[Sample]:
    path = shared_data / "conll04" / "conll04_train.json"
    if not path.is_file():
        pytest.skip(f"CoNLL04 not found at {path}")
    records = json.loads(path.read_text(encoding="utf-8"))[:n]
    samples = []
    for i, r in enumerate(records):
        order = sorted(
            range(len(r["entities"])), key=lambda k: (r["entities"][k]["start"], r["entities"][k]["end"])
        )
        where = {old: new for new, old in enumerate(order)}
        samples.append(
            Sample(
                id=f"conll04-train-{i}",
                tokens=r["tokens"],
                entities=[r["entities"][k] for k in order],
                relations=[
                    {**rel, "head": where[rel["head"]], "tail": where[rel["tail"]]} for rel in r["relations"]
                ],
            )
        )
    return samples


def test_markup_and_parser_agree_on_real_conll04(shared_data):
    samples = [s for s in conll04_train(shared_data, 50) if eligibility(s) is None]
    assert len(samples) == 50
    for s in samples:
        echo_mentions = parse_mention_answer(f"1. {markup_mentions(s)}", s)
        echo_context = parse_context_answer(f"1. {markup_context(s)}", s)
        assert [r.reason for r in echo_mentions.rejected] == ["mention_unchanged"], (
            s.id,
            echo_mentions.rejected,
        )
        assert [r.reason for r in echo_context.rejected] == ["unchanged"], (s.id, echo_context.rejected)
