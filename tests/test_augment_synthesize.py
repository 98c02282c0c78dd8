"""Synthesis of labelled sentences, masking, de-duplication and dev/test exclusion (augment/synthesize.py)."""

from __future__ import annotations

import json
import re

import pytest
from augment_fixtures import conll_like, words

from anchoralign.schema import Entity, Relation, Sample
from augment.parse import ContextVariant, MentionVariant, parse_context_answer, parse_mention_answer
from augment.prompts import eligibility, markup_context, mention_item
from augment.synthesize import (
    InconsistentRecord,
    check_consistency,
    consistency_problems,
    context_segments,
    dedupe,
    exclude_sentences,
    fill,
    mask_sample,
    sentence_key,
    synthesize,
    template_segments,
)

MENTION_ANSWER = """Here are two versions:
1. Sen. {"Peop": "Ann Lee"} , who works for {"Org": "Zeta Ltd."} in {"Loc": "Oslo"} , met {"Peop": "Tom Hardy"} .
2. Sen. {"Peop": "Bo Ek"} , who works for {"Org": "Nordic Ferry Company"} in {"Loc": "Bergen"} , met {"Peop": "Li Wei"} ."""
CONTEXT_ANSWER = """1. <mask3> was introduced to Senator <mask0> , an employee of the <mask2> firm <mask1> .
2. Sen. <mask0> , employed by <mask1> of <mask2> , greeted <mask3> ."""


def variants(source: Sample) -> tuple[list[MentionVariant], list[ContextVariant]]:
    mentions = parse_mention_answer(MENTION_ANSWER, source)
    contexts = parse_context_answer(CONTEXT_ANSWER, source)
    assert mentions.rejected == [] and contexts.rejected == []
    return mentions.accepted, contexts.accepted


def squash(text: str) -> str:
    return "".join(text.split())


def fill_placeholders(template: str, texts: list[str]) -> str:
    return re.sub(r"<mask(\d+)>", lambda m: texts[int(m.group(1))], template)


def assert_faithful(record: Sample, source: Sample, mentions: list[str], template: str) -> None:
    """An independent check: the record is ``template`` with entity i's placeholder replaced by ``mentions[i]``."""
    assert squash("".join(record.tokens)) == squash(fill_placeholders(template, mentions))
    assert [e.type for e in record.entities] == [e.type for e in source.entities]
    assert record.relations == source.relations
    for i, e in enumerate(record.entities):
        assert "".join(record.tokens[e.start : e.end]) == squash(mentions[i]), (record.id, i)
    by_position = sorted(range(len(record.entities)), key=lambda i: record.entities[i].start)
    assert by_position == [int(i) for i in re.findall(r"<mask(\d+)>", template)]
    assert record.source_id == source.id


def test_cross_product_yields_every_combination_but_the_original():
    source = conll_like()
    mvs, cvs = variants(source)
    records = synthesize(source, mvs, cvs)
    assert len(records) == (len(mvs) + 1) * (len(cvs) + 1) - 1 == 8
    mention_sets = [[source.mention(i) for i in range(4)]] + [v.mentions for v in mvs]
    templates = [markup_context(source)] + [c.template for c in cvs]
    expected_origin = {(False, True): "context", (True, False): "mention", (True, True): "cross"}
    for r in records:
        i, j = map(int, re.fullmatch(r"s1/m(\d)c(\d)", r.id).groups())
        assert r.origin == expected_origin[(i > 0, j > 0)]
        assert_faithful(r, source, mention_sets[i], templates[j])
    assert [r.id for r in records] == [
        "s1/m0c1",
        "s1/m0c2",
        "s1/m1c0",
        "s1/m1c1",
        "s1/m1c2",
        "s1/m2c0",
        "s1/m2c1",
        "s1/m2c2",
    ]


def test_reordered_context_record_by_hand():
    source = conll_like()
    mvs, cvs = variants(source)
    record = {r.id: r for r in synthesize(source, mvs, cvs)}["s1/m1c1"]
    assert record.tokens == (
        words("Tom Hardy was introduced to Senator Ann Lee , an employee of the Oslo firm Zeta Ltd. .")
    )
    assert record.entities == [
        Entity(start=6, end=8, type="Peop"),
        Entity(start=15, end=17, type="Org"),
        Entity(start=13, end=14, type="Loc"),
        Entity(start=0, end=2, type="Peop"),
    ]
    # Relations carry by index: Work_For still links "Ann Lee" to "Zeta Ltd.", now in a new order.
    head, tail = record.entities[record.relations[0].head], record.entities[record.relations[0].tail]
    assert (record.tokens[head.start : head.end], record.tokens[tail.start : tail.end]) == (
        ["Ann", "Lee"],
        words("Zeta Ltd."),
    )


def test_original_context_and_mentions_keep_the_dataset_tokens():
    source = conll_like()
    mvs, cvs = variants(source)
    records = {r.id: r for r in synthesize(source, mvs, cvs)}
    assert records["s1/m1c0"].tokens[:3] == words("Sen. Ann Lee")  # original context, unsplit "Sen."
    assert records["s1/m0c2"].tokens[:2] == ["Sen.", "John"]  # the LLM's text, tokenised by us
    org = records["s1/m0c1"].entities[1]
    assert records["s1/m0c1"].tokens[org.start : org.end] == ["Acme", "Corp."]


def test_segments():
    source = conll_like()
    assert context_segments(source) == [
        ["Sen."],
        0,
        words(", who works for"),
        1,
        ["in"],
        2,
        [",", "met"],
        3,
        ["."],
    ]
    assert template_segments("<mask1>'s chief <mask0>", "en") == [1, ["'s", "chief"], 0]


def test_chinese_synthesis_uses_characters():
    source = Sample(
        id="zh",
        tokens=list("李明在北京工作。"),
        entities=[Entity(start=0, end=2, type="PER"), Entity(start=3, end=5, type="LOC")],
        relations=[Relation(head=0, tail=1, type="Live_In")],
    )
    mvs = parse_mention_answer('1. {"PER": "王芳"}在{"LOC": "上海"}工作。', source, "zh").accepted
    cvs = parse_context_answer("1. <mask1>的<mask0>目前在那里上班。", source, "zh").accepted
    records = {r.id: r for r in synthesize(source, mvs, cvs, "zh")}
    assert len(records) == 3
    cross = records["zh/m1c1"]
    assert cross.tokens == list("上海的王芳目前在那里上班。")
    assert cross.entities == [Entity(start=3, end=5, type="PER"), Entity(start=0, end=2, type="LOC")]
    assert records["zh/m1c0"].tokens == list("王芳在上海工作。")


def test_mask_sample_replaces_each_mention_by_its_index_token():
    masked = mask_sample(conll_like())
    assert masked.tokens == words("Sen. <mask0> , who works for <mask1> in <mask2> , met <mask3> .")
    assert masked.entities == [
        Entity(start=1, end=2, type="Peop"),
        Entity(start=6, end=7, type="Org"),
        Entity(start=8, end=9, type="Loc"),
        Entity(start=11, end=12, type="Peop"),
    ]
    assert masked.relations == conll_like().relations and masked.id == "s1"


def test_mask_sample_of_a_reordered_record_numbers_by_entity_index():
    source = conll_like()
    mvs, cvs = variants(source)
    record = {r.id: r for r in synthesize(source, mvs, cvs)}["s1/m1c1"]
    masked = mask_sample(record)
    assert masked.tokens[:6] == words("<mask3> was introduced to Senator <mask0>")
    assert [masked.tokens[e.start] for e in masked.entities] == words("<mask0> <mask1> <mask2> <mask3>")
    assert (masked.origin, masked.source_id) == ("cross", "s1")


def test_duplicate_variants_are_removed():
    source = conll_like()
    mvs, cvs = variants(source)
    records = synthesize(source, mvs[:1], [cvs[0], cvs[0]])
    assert [r.id for r in records] == ["s1/m0c1", "s1/m1c0", "s1/m1c1"]
    kept, dropped = dedupe(records + records[:2])
    assert (len(kept), dropped) == (3, 2)


def test_sentence_key_ignores_case_spacing_and_tokenisation():
    assert sentence_key(["Sen.", "John"]) == sentence_key(words("sen . JOHN")) == "sen.john"
    assert sentence_key(["ＡＢＣ"]) == sentence_key(["abc"])
    assert sentence_key(["a", "b"]) != sentence_key(["a", "c"])


def test_a_dev_sentence_is_excluded():
    source = conll_like()
    mvs, cvs = variants(source)
    records = synthesize(source, mvs, cvs)
    dev = Sample(
        id="dev-7",
        tokens=words("sen . ann lee , who works for zeta ltd. in oslo , met tom hardy ."),
    )
    kept, dropped = exclude_sentences(records, {sentence_key(dev.tokens)})
    assert dropped == 1
    assert [r.id for r in records if r not in kept] == ["s1/m1c0"]


def test_consistency_check_catches_tampering():
    source = conll_like()
    mvs, cvs = variants(source)
    record = synthesize(source, mvs, cvs)[0]
    mentions = [record.tokens[e.start : e.end] for e in record.entities]
    assert consistency_problems(record, source, mentions) == []

    def tampered(**update) -> Sample:
        return Sample(**{**record.model_dump(), **update})

    wrong_type = tampered(entities=[{**e.model_dump(), "type": "Loc"} for e in record.entities])
    assert "entity 0: type 'Loc' instead of 'Peop'" in consistency_problems(wrong_type, source)
    flipped = tampered(
        relations=[{"head": 1, "tail": 0, "type": "Work_For"}, record.relations[1].model_dump()]
    )
    assert "relations differ from the source's" in consistency_problems(flipped, source)
    shifted = tampered(
        entities=[
            {**e.model_dump(), "start": e.start + 1, "end": e.end + 1} if i == 0 else e.model_dump()
            for i, e in enumerate(record.entities)
        ]
    )
    assert any(p.startswith("entity 0: span holds") for p in consistency_problems(shifted, source, mentions))
    leftover = tampered(tokens=["<", "mask9", ">", *record.tokens[3:]])
    assert any("placeholder" in p for p in consistency_problems(leftover, source))
    orphan = tampered(origin=None)
    with pytest.raises(InconsistentRecord, match="origin None"):
        check_consistency(orphan, source)


def test_fill_rejects_bad_segments():
    with pytest.raises(ValueError, match="placed twice"):
        fill([0, ["x"], 0], [["a"]])
    with pytest.raises(ValueError, match=r"entities \[1\] have no place"):
        fill([0], [["a"], ["b"]])
    with pytest.raises(ValueError, match="empty mention"):
        fill([0], [[]])
    assert fill([["x"], 1, ["y"], 0], [["a", "b"], ["c"]]) == (words("x c y a b"), [(3, 5), (1, 2)])


def test_synthesize_refuses_ineligible_sources_and_misaligned_variants():
    nested = Sample(
        id="n",
        tokens=["a", "b"],
        entities=[Entity(start=0, end=2, type="X"), Entity(start=1, end=2, type="Y")],
    )
    with pytest.raises(ValueError, match="nested_entities"):
        synthesize(nested, [], [])
    with pytest.raises(ValueError, match="1 mentions for 4 entities"):
        synthesize(conll_like(), [MentionVariant(mentions=["x"], text="x")], [])


def test_round_trip_on_real_conll04(shared_data):
    path = shared_data / "conll04" / "conll04_train.json"
    if not path.is_file():
        pytest.skip(f"CoNLL04 not found at {path}")
    checked = 0
    for n, raw in enumerate(json.loads(path.read_text(encoding="utf-8"))[:50]):
        source = Sample(
            id=f"c{n}", tokens=raw["tokens"], entities=raw["entities"], relations=raw["relations"]
        )
        if eligibility(source) is not None:
            continue
        names = [f"Zed{i} Quux" for i in range(len(source.entities))]
        line = markup_context(source)
        items = [mention_item(e.type, names[k]) for k, e in enumerate(source.entities)]
        mvs = parse_mention_answer(f"1. {fill_placeholders(line, items)}", source).accepted
        cvs = parse_context_answer(f"1. Reportedly , {line}", source).accepted
        assert (len(mvs), len(cvs)) == (1, 1), source.id
        records = {r.id: r for r in synthesize(source, mvs, cvs)}
        assert len(records) == 3
        original = [source.mention(i) for i in range(len(source.entities))]
        assert_faithful(records[f"c{n}/m1c0"], source, names, line)
        assert_faithful(records[f"c{n}/m0c1"], source, original, cvs[0].template)
        assert_faithful(records[f"c{n}/m1c1"], source, names, cvs[0].template)
        checked += 1
    assert checked == 50
