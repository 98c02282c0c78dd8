"""Linearisation: hand-written targets, parser recovery rules, alignment, round trips.

The example sentence is the one of the module docstring. Its ids (CoNLL04 labels):
<eos>=1 <sep>=2, <Loc>=3 <Org>=4 <Peop>=5 <Other>=6, <Work_For>=7 <Kill>=8 <OrgBased_In>=9
<Live_In>=10 <Located_In>=11, word i = 12 + i.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from anchoralign.errors import UserError
from anchoralign.linearize import (
    EOS,
    DecoderReport,
    LabelSet,
    Paradigm,
    accepted,
    align_pairs,
    decoder_pairs,
    grammar_of,
    is_entity_key,
    linearize,
    parse,
    parse_entities,
    parse_relations,
    parse_with_report,
)
from anchoralign.schema import Entity, Relation, Sample

LABELS = LabelSet(
    ("Loc", "Org", "Peop", "Other"), ("Work_For", "Kill", "OrgBased_In", "Live_In", "Located_In")
)
TOKENS = ["Ann", "Lee", "leads", "Acme", "in", "Oslo", ",", "says", "Reuters", "."]
ANN, ACME, OSLO, REUTERS = (0, 2, "Peop"), (3, 4, "Org"), (5, 6, "Loc"), (8, 9, "Org")
WORKS, LIVES, BASED = (ANN, ACME, "Work_For"), (ANN, OSLO, "Live_In"), (ACME, OSLO, "OrgBased_In")


def make_sample(tokens, entities, triples, sample_id="s"):
    """A Sample from (start, end, type) spans and (head span, tail span, relation) triples."""
    index = {span: i for i, span in enumerate(entities)}
    return Sample(
        id=sample_id,
        tokens=tokens,
        entities=[Entity(start=s, end=e, type=t) for s, e, t in entities],
        relations=[Relation(head=index[h], tail=index[t], type=r) for h, t, r in triples],
    )


def structure(sample):
    """What a round trip must preserve: the entity set and the triple set."""
    spans = [(e.start, e.end, e.type) for e in sample.entities]
    return set(spans), {(spans[r.head], spans[r.tail], r.type) for r in sample.relations}


EXAMPLE = make_sample(TOKENS, [ANN, ACME, OSLO, REUTERS], [WORKS, LIVES, BASED], "ex")


def e(span, k):
    return ("ent", *span, k)


def rel(triple):
    return ("rel", *triple)


def keys_of(*mentions_and_labels):
    """Keys of written mentions (spans) and relation labels (triples); "sep"/"eos" give None."""
    keys = []
    for item in mentions_and_labels:
        if item in ("sep", "eos"):
            keys.append(None)
        elif len(item) == 3 and isinstance(item[2], str) and isinstance(item[0], int):
            keys.extend(e(item, k) for k in range(item[1] - item[0] + 1))
        else:
            keys.append(rel(item))
    return keys


# --------------------------------------------------------------------------- label set


def test_label_set_id_layout():
    assert LABELS.n_fixed == 12
    assert LABELS.vocab_size(10) == 22
    assert [LABELS.entity_id(t) for t in ("Loc", "Org", "Peop", "Other")] == [3, 4, 5, 6]
    assert [LABELS.relation_id(r) for r in LABELS.relation_types] == [7, 8, 9, 10, 11]
    assert LABELS.word_id(0) == 12 and LABELS.word_id(9) == 21


def test_decode_id_names_every_kind():
    assert [LABELS.decode_id(i) for i in (0, 1, 2)] == [("bos", None), ("eos", None), ("sep", None)]
    assert LABELS.decode_id(4) == ("entity", "Org")
    assert LABELS.decode_id(11) == ("relation", "Located_In")
    assert LABELS.decode_id(21) == ("word", 9)
    assert LABELS.decode_id(21, n_words=10) == ("word", 9)
    assert LABELS.decode_id(22, n_words=10) == ("invalid", 22)
    assert LABELS.decode_id(-1) == ("invalid", -1)


def test_label_set_from_meta_keeps_metadata_order_and_normalises_to_tuples():
    meta = SimpleNamespace(entity_types={"B": "bee", "A": "ay"}, relation_types={"r": "arr"})
    labels = LabelSet.from_meta(meta)
    assert labels == LabelSet(("B", "A"), ("r",))
    assert labels.entity_id("B") == 3 and labels.relation_id("r") == 5
    assert LabelSet(["x"], ["y"]) == LabelSet(("x",), ("y",))


@pytest.mark.parametrize(
    ("entities", "relations", "message"),
    [(("A", "A"), (), "duplicate entity labels"), (("A",), ("",), "relation labels must be non-empty")],
)
def test_bad_label_sets_are_user_errors(entities, relations, message):
    with pytest.raises(UserError, match=message):
        LabelSet(entities, relations)


def test_unknown_labels_are_user_errors_naming_the_sample():
    sample = make_sample(["x"], [(0, 1, "Planet")], [], "doc-7")
    with pytest.raises(UserError, match=r"sample 'doc-7': entity type 'Planet'"):
        linearize(sample, LABELS)
    sample = make_sample(["x"], [(0, 1, "Loc")], [((0, 1, "Loc"), (0, 1, "Loc"), "Orbits")], "doc-8")
    with pytest.raises(UserError, match=r"sample 'doc-8': relation type 'Orbits'"):
        linearize(sample, LABELS)


def test_paradigm_must_be_one_to_four():
    assert linearize(EXAMPLE, LABELS, 3) == linearize(EXAMPLE, LABELS, Paradigm.GROUPED_ALL)
    with pytest.raises(UserError, match="paradigm must be one of 1, 2, 3, 4; got 5"):
        linearize(EXAMPLE, LABELS, 5)


# --------------------------------------------------------------------------- hand-written targets

# Ann Lee <Peop> Acme <Org> Oslo <Loc> Reuters <Org> <eos>
NER_ALL = [12, 13, 5, 15, 4, 17, 3, 20, 4, 1]
NER_ALL_KEYS = keys_of(ANN, ACME, OSLO, REUTERS, "eos")
# Reuters <Org> <eos>
NER_NONREL = [20, 4, 1]
NER_NONREL_KEYS = keys_of(REUTERS, "eos")
# Ann Lee <Peop> Acme <Org> <Work_For> Oslo <Loc> <Live_In> <sep> Acme <Org> Oslo <Loc> <OrgBased_In> <sep> <eos>
FWD_GROUPED = [12, 13, 5, 15, 4, 7, 17, 3, 10, 2, 15, 4, 17, 3, 9, 2, 1]
FWD_GROUPED_KEYS = keys_of(ANN, ACME, WORKS, OSLO, LIVES, "sep", ACME, OSLO, BASED, "sep", "eos")
# Acme <Org> Ann Lee <Peop> <Work_For> <sep> Oslo <Loc> Ann Lee <Peop> <Live_In> Acme <Org> <OrgBased_In> <sep> <eos>
REV_GROUPED = [15, 4, 12, 13, 5, 7, 2, 17, 3, 12, 13, 5, 10, 15, 4, 9, 2, 1]
REV_GROUPED_KEYS = keys_of(ACME, ANN, WORKS, "sep", OSLO, ANN, LIVES, ACME, BASED, "sep", "eos")
# Ann Lee <Peop> Acme <Org> <Work_For> Ann Lee <Peop> Oslo <Loc> <Live_In> Acme <Org> Oslo <Loc> <OrgBased_In> <eos>
FWD_FLAT = [12, 13, 5, 15, 4, 7, 12, 13, 5, 17, 3, 10, 15, 4, 17, 3, 9, 1]
FWD_FLAT_KEYS = keys_of(ANN, ACME, WORKS, ANN, OSLO, LIVES, ACME, OSLO, BASED, "eos")
# Acme <Org> Ann Lee <Peop> <Work_For> Oslo <Loc> Ann Lee <Peop> <Live_In> Oslo <Loc> Acme <Org> <OrgBased_In> <eos>
REV_FLAT = [15, 4, 12, 13, 5, 7, 17, 3, 12, 13, 5, 10, 17, 3, 15, 4, 9, 1]
REV_FLAT_KEYS = keys_of(ACME, ANN, WORKS, OSLO, ANN, LIVES, OSLO, ACME, BASED, "eos")

EXPECTED_TARGETS = {
    Paradigm.FLAT_ALL: (NER_ALL, FWD_FLAT, REV_FLAT, NER_ALL_KEYS, FWD_FLAT_KEYS, REV_FLAT_KEYS),
    Paradigm.FLAT_NONREL: (NER_NONREL, FWD_FLAT, REV_FLAT, NER_NONREL_KEYS, FWD_FLAT_KEYS, REV_FLAT_KEYS),
    Paradigm.GROUPED_ALL: (
        NER_ALL,
        FWD_GROUPED,
        REV_GROUPED,
        NER_ALL_KEYS,
        FWD_GROUPED_KEYS,
        REV_GROUPED_KEYS,
    ),
    Paradigm.GROUPED_NONREL: (
        NER_NONREL,
        FWD_GROUPED,
        REV_GROUPED,
        NER_NONREL_KEYS,
        FWD_GROUPED_KEYS,
        REV_GROUPED_KEYS,
    ),
}


def test_keys_helper_spells_out_what_it_abbreviates():
    assert keys_of(ANN, WORKS, "sep") == [
        ("ent", 0, 2, "Peop", 0),
        ("ent", 0, 2, "Peop", 1),
        ("ent", 0, 2, "Peop", 2),
        ("rel", (0, 2, "Peop"), (3, 4, "Org"), "Work_For"),
        None,
    ]


@pytest.mark.parametrize("paradigm", list(Paradigm))
def test_targets_of_the_example_sentence(paradigm):
    t = linearize(EXAMPLE, LABELS, paradigm)
    ner, fwd, rev, ner_keys, fwd_keys, rev_keys = EXPECTED_TARGETS[paradigm]
    assert (t.ner, t.fwd, t.rev) == (ner, fwd, rev)
    assert (t.ner_keys, t.fwd_keys, t.rev_keys) == (ner_keys, fwd_keys, rev_keys)


@pytest.mark.parametrize("paradigm", list(Paradigm))
def test_target_order_ignores_the_order_of_the_record(paradigm):
    shuffled = make_sample(TOKENS, [REUTERS, OSLO, ACME, ANN], [BASED, LIVES, WORKS], "ex")
    assert linearize(shuffled, LABELS, paradigm) == linearize(EXAMPLE, LABELS, paradigm)


@pytest.mark.parametrize("paradigm", list(Paradigm))
def test_empty_sample_is_just_eos(paradigm):
    t = linearize(make_sample(["Hello", "."], [], []), LABELS, paradigm)
    assert (t.ner, t.fwd, t.rev) == ([EOS], [EOS], [EOS])
    assert (t.ner_keys, t.fwd_keys, t.rev_keys) == ([None], [None], [None])


def test_same_span_orders_types_by_label_order_and_nested_by_end():
    # Org precedes Peop in the label set, so (0, 1, Org) is written before (0, 1, Peop).
    sample = make_sample(["a", "b"], [(0, 1, "Peop"), (0, 2, "Loc"), (0, 1, "Org"), (1, 2, "Loc")], [])
    assert linearize(sample, LABELS).ner == [12, 4, 12, 5, 12, 13, 3, 13, 3, 1]


def test_grouped_block_repeats_the_partner_for_each_relation_of_a_pair():
    a, b = (0, 1, "Peop"), (1, 2, "Org")
    sample = make_sample(["a", "b"], [a, b], [(a, b, "Kill"), (a, b, "Work_For"), (a, a, "Kill")])
    t = linearize(sample, LABELS, Paradigm.GROUPED_ALL)
    # a <Peop> a <Peop> <Kill> b <Org> <Work_For> b <Org> <Kill> <sep> <eos>
    assert t.fwd == [12, 5, 12, 5, 8, 13, 4, 7, 13, 4, 8, 2, 1]
    # a <Peop> a <Peop> <Kill> <sep> b <Org> a <Peop> <Work_For> a <Peop> <Kill> <sep> <eos>
    assert t.rev == [12, 5, 12, 5, 8, 2, 13, 4, 12, 5, 7, 12, 5, 8, 2, 1]


# --------------------------------------------------------------------------- round trips of special cases

A, B, C = (0, 1, "Peop"), (1, 3, "Org"), (2, 3, "Loc")
SPECIAL_CASES = {
    "self relation": ([A, B], [(A, A, "Kill"), (A, B, "Work_For")]),
    "several relations of one pair": ([A, B], [(A, B, "Work_For"), (A, B, "Kill"), (B, A, "Kill")]),
    "symmetric relation both ways": ([A, C], [(A, C, "Located_In"), (C, A, "Located_In")]),
    "same span, two types": ([A, (0, 1, "Org"), B], [(A, B, "Kill"), ((0, 1, "Org"), B, "Kill")]),
    "nested entities in relations": ([A, B, C], [(B, C, "OrgBased_In"), (C, B, "Located_In")]),
    "entities only": ([A, B, C], []),
    "one entity in several blocks": (
        [A, B, C],
        [(A, C, "Live_In"), (B, C, "OrgBased_In"), (A, B, "Work_For")],
    ),
}


@pytest.mark.parametrize("paradigm", list(Paradigm))
@pytest.mark.parametrize("case", list(SPECIAL_CASES))
def test_special_cases_round_trip(case, paradigm):
    entities, triples = SPECIAL_CASES[case]
    sample = make_sample(["w0", "w1", "w2", "w3"], entities, triples)
    t = linearize(sample, LABELS, paradigm)
    back, report = parse_with_report(
        t.ner, t.fwd, t.rev, sample.tokens, LABELS, paradigm, sample_id="s", self_relations=True
    )
    assert structure(back) == structure(sample)
    assert report.valid


def test_self_relations_are_dropped_unless_the_dataset_has_them():
    entities, triples = SPECIAL_CASES["self relation"]
    sample = make_sample(["w0", "w1", "w2", "w3"], entities, triples)
    t = linearize(sample, LABELS)
    back = parse(t.ner, t.fwd, t.rev, sample.tokens, LABELS, sample_id="s")
    assert [(r.head, r.tail, r.type) for r in back.relations] == [(0, 1, "Work_For")]


def test_duplicate_relations_collapse():
    sample = make_sample(["w0", "w1", "w2", "w3"], [A, B], [(A, B, "Kill"), (A, B, "Kill")])
    t = linearize(sample, LABELS)
    assert t.fwd == [12, 5, 13, 14, 4, 8, 2, 1]
    back = parse(t.ner, t.fwd, t.rev, sample.tokens, LABELS)
    assert [(r.head, r.tail, r.type) for r in back.relations] == [(0, 1, "Kill")]


# --------------------------------------------------------------------------- parser recovery rules

N = 10  # words in the sentence of the recovery tests; ids 12..21 are words, 22+ invalid


@pytest.mark.parametrize(
    ("ids", "entities", "dropped", "ended"),
    [
        ([], [], 0, False),
        ([1], [], 0, True),
        ([12, 5], [(0, 1, "Peop")], 0, False),  # no <eos>: kept, but not ended
        ([0, 12, 5, 1], [(0, 1, "Peop")], 0, True),  # a leading <bos> is skipped
        ([12, 0, 13, 5, 1], [(1, 2, "Peop")], 2, True),  # a later <bos> splits the run
        ([12, 14, 5, 15, 4, 1], [(3, 4, "Org")], 3, True),  # non-consecutive words
        ([13, 12, 5, 1], [], 3, True),  # decreasing
        ([12, 12, 5, 1], [], 3, True),  # repeated word
        ([12, 13, 1], [], 2, True),  # nothing after the last word
        ([12, 13, 7, 15, 4, 1], [(3, 4, "Org")], 3, True),  # a relation label where a type belongs
        ([5, 12, 5, 1], [(0, 1, "Peop")], 1, True),  # type with no words
        ([22, 4, 1], [], 2, True),  # word past the sentence, then a bare type
        ([-5, 12, 5, 1], [(0, 1, "Peop")], 1, True),  # negative id
        ([12, 5, 7, 2, 13, 4, 1], [(0, 1, "Peop"), (1, 2, "Org")], 2, True),  # no labels/<sep> in NER
        ([12, 5, 1, 13, 4, 99], [(0, 1, "Peop")], 0, True),  # reading stops at <eos>
        ([12, 5, 12, 5, 1], [(0, 1, "Peop")], 0, True),  # duplicates collapse, nothing dropped
        ([21, 3, 1], [(9, 10, "Loc")], 0, True),  # the last word
    ],
)
def test_ner_recovery(ids, entities, dropped, ended):
    found, report = _parse_alone(ner=ids)
    assert found.entities == [Entity(start=s, end=e, type=t) for s, e, t in entities]
    assert report.ner == DecoderReport(ended=ended, dropped=dropped)
    assert parse_entities(ids, N, LABELS) == entities


def _parse_alone(ner=(1,), fwd=(1,), rev=(1,), paradigm=Paradigm.GROUPED_ALL):
    return parse_with_report(ner, fwd, rev, [f"w{i}" for i in range(N)], LABELS, paradigm, anchor=False)


P0, P1, O1, O3 = (0, 1, "Peop"), (1, 2, "Peop"), (1, 2, "Org"), (3, 4, "Org")


@pytest.mark.parametrize(
    ("ids", "triples", "dropped"),
    [
        ([12, 5, 13, 4, 7, 1], [(P0, O1, "Work_For")], 0),
        ([12, 5, 7, 13, 4, 15, 4, 9, 1], [(O1, O3, "OrgBased_In")], 3),  # label after one mention
        ([12, 5, 13, 4, 15, 4, 7, 1], [(O1, O3, "Work_For")], 2),  # a third mention pushes out the first
        ([12, 5, 2, 13, 4, 7, 1], [(P0, O1, "Work_For")], 1),  # <sep> has no place in flat output
        ([12, 5, 99, 13, 4, 7, 1], [(P0, O1, "Work_For")], 1),  # junk is removed before the grammar
        ([12, 5, 13, 4, 7, 15, 4, 1], [(P0, O1, "Work_For")], 2),  # mention left at the end
        ([7, 12, 5, 12, 5, 8, 1], [(P0, P0, "Kill")], 1),  # label first; self-relation
    ],
)
def test_flat_recovery(ids, triples, dropped):
    for paradigm in (Paradigm.FLAT_ALL, Paradigm.FLAT_NONREL):
        assert parse_relations(ids, N, LABELS, paradigm) == triples
        assert _parse_alone(fwd=ids, paradigm=paradigm)[1].fwd == DecoderReport(True, dropped)


def test_flat_reverse_writes_the_object_first():
    # Acme-like (1, 2, Org) <Org> then (0, 1, Peop): head is the second mention.
    assert parse_relations([13, 4, 12, 5, 7, 1], N, LABELS, Paradigm.FLAT_ALL, reverse=True) == [
        (P0, O1, "Work_For")
    ]


@pytest.mark.parametrize(
    ("ids", "triples", "dropped", "unclosed"),
    [
        ([12, 5, 13, 4, 7, 15, 4, 10, 2, 1], [(P0, O1, "Work_For"), (P0, O3, "Live_In")], 0, False),
        ([12, 5, 13, 4, 7, 1], [(P0, O1, "Work_For")], 0, True),  # last block without <sep>
        ([12, 5, 13, 4, 7], [(P0, O1, "Work_For")], 0, True),  # ... and without <eos>
        ([2, 12, 5, 13, 4, 7, 2, 1], [(P0, O1, "Work_For")], 1, False),  # <sep> with no open block
        ([12, 5, 2, 13, 4, 15, 4, 7, 2, 1], [(O1, O3, "Work_For")], 2, False),  # anchor with no pair
        ([12, 5, 7, 13, 4, 7, 2, 1], [(P0, O1, "Work_For")], 1, False),  # label with no partner
        ([12, 5, 13, 4, 15, 4, 7, 2, 1], [(P0, O3, "Work_For")], 2, False),  # partner without label
        ([12, 5, 13, 4, 7, 15, 4, 2, 1], [(P0, O1, "Work_For")], 2, False),  # partner closed by <sep>
        ([12, 5, 13, 4, 7, 8, 2, 1], [(P0, O1, "Work_For")], 1, False),  # two labels, one partner
        ([12, 5, 12, 5, 8, 2, 1], [(P0, P0, "Kill")], 0, False),  # self-relation
        ([12, 5, 2, 2, 1], [], 3, False),  # empty block, then a stray <sep>
    ],
)
def test_grouped_recovery(ids, triples, dropped, unclosed):
    for paradigm in (Paradigm.GROUPED_ALL, Paradigm.GROUPED_NONREL):
        assert parse_relations(ids, N, LABELS, paradigm) == triples
        report = _parse_alone(fwd=ids, paradigm=paradigm)[1].fwd
        assert report == DecoderReport(EOS in ids, dropped, unclosed)


def test_grouped_reverse_anchors_on_the_object():
    ids = [13, 4, 12, 5, 7, 15, 4, 10, 2, 1]
    assert parse_relations(ids, N, LABELS, Paradigm.GROUPED_ALL, reverse=True) == [
        (P0, O1, "Work_For"),
        (O3, O1, "Live_In"),
    ]


def test_report_flags():
    assert DecoderReport(True, 0).ok
    assert not DecoderReport(False, 0).ok
    assert not DecoderReport(True, 1).ok
    assert not DecoderReport(True, 0, unclosed=True).ok
    t = linearize(EXAMPLE, LABELS)
    assert parse_with_report(t.ner, t.fwd, t.rev, TOKENS, LABELS)[1].valid
    assert not parse_with_report(t.ner, t.fwd, t.rev[:-1], TOKENS, LABELS)[1].valid


def test_parse_accepts_integer_like_scalars():
    np = pytest.importorskip("numpy")
    t = linearize(EXAMPLE, LABELS)
    back = parse(np.array(t.ner), np.array(t.fwd), np.array(t.rev), TOKENS, LABELS, sample_id="ex")
    assert back == EXAMPLE


# --------------------------------------------------------------------------- recombination


def test_parse_returns_an_ordered_sample_with_id_and_tokens():
    t = linearize(EXAMPLE, LABELS)
    assert parse(t.ner, t.fwd, t.rev, TOKENS, LABELS, sample_id="ex") == EXAMPLE


def test_anchor_keeps_only_relations_whose_mentions_ner_produced():
    # NER found Ann Lee and Acme but not Oslo: Live_In loses its anchor.
    ner = [12, 13, 5, 15, 4, 1]
    fwd = [12, 13, 5, 15, 4, 7, 17, 3, 10, 2, 1]
    anchored = parse(ner, fwd, [1], TOKENS, LABELS, Paradigm.GROUPED_ALL)
    assert structure(anchored) == ({ANN, ACME}, {WORKS})
    free = parse(ner, fwd, [1], TOKENS, LABELS, Paradigm.GROUPED_ALL, anchor=False)
    assert structure(free) == ({ANN, ACME, OSLO}, {WORKS, LIVES})


def test_anchor_also_checks_the_type():
    ner = [12, 13, 6, 15, 4, 1]  # Ann Lee typed Other, not Peop
    fwd = [12, 13, 5, 15, 4, 7, 2, 1]
    assert structure(parse(ner, fwd, [1], TOKENS, LABELS)) == ({(0, 2, "Other"), ACME}, set())
    assert structure(parse(ner, fwd, [1], TOKENS, LABELS, anchor="typed")) == ({(0, 2, "Other"), ACME}, set())


def test_span_anchor_checks_the_mentions_and_keeps_the_relation_types():
    ner = [12, 13, 6, 15, 4, 1]  # Ann Lee typed Other by NER, Peop by the forward decoder
    fwd = [12, 13, 5, 15, 4, 7, 17, 3, 10, 2, 1]  # Work_For(Ann Lee, Acme), Live_In(Ann Lee, Oslo)
    # Work_For survives with the forward decoder's types (so Ann Lee is an entity of two types);
    # Live_In does not: NER found no mention at Oslo's span.
    assert structure(parse(ner, fwd, [1], TOKENS, LABELS, anchor="span")) == (
        {(0, 2, "Other"), ANN, ACME},
        {WORKS},
    )
    with pytest.raises(ValueError, match="anchor"):
        parse(ner, fwd, [1], TOKENS, LABELS, anchor="loose")


def test_union_adds_the_re_mentions_that_overlap_no_ner_mention_and_keeps_the_anchor():
    ner = [12, 13, 5, 1]  # NER found Ann Lee only
    fwd = [12, 13, 5, 15, 4, 7, 17, 3, 10, 2, 1]  # Work_For(Ann Lee, Acme), Live_In(Ann Lee, Oslo)
    rev = [16, 17, 3, 12, 5, 10, 2, 1]  # Live_In(Ann, in Oslo): both mentions cut differently
    assert structure(parse(ner, fwd, rev, TOKENS, LABELS)) == ({ANN}, set())
    united = parse(ner, fwd, rev, TOKENS, LABELS, entities="union")
    # Acme is new; "Ann" overlaps NER's Ann Lee and is left out; of the two overlapping places
    # the first in sentence order ("in Oslo") is taken. No relation survives: the anchor still
    # checks against NER's own mentions, not the added ones.
    assert structure(united) == ({ANN, ACME, (4, 6, "Loc")}, set())
    free = parse(ner, fwd, rev, TOKENS, LABELS, anchor="off", entities="union")
    assert structure(free)[1] == {WORKS, LIVES, ((0, 1, "Peop"), (4, 6, "Loc"), "Live_In")}
    # Anchored on the reported entities: Acme, added by the union, keeps its Work_For; Live_In(Ann
    # Lee, Oslo) does not (Oslo lost its place to "in Oslo"), nor the reverse decoder's (Ann).
    reported = parse(ner, fwd, rev, TOKENS, LABELS, anchor="reported", entities="union")
    assert structure(reported) == ({ANN, ACME, (4, 6, "Loc")}, {WORKS})
    # Without the union the reported entities are the NER decoder's: the typed anchor.
    assert structure(parse(ner, fwd, rev, TOKENS, LABELS, anchor="reported")) == ({ANN}, set())
    with pytest.raises(ValueError, match="entities"):
        parse(ner, fwd, rev, TOKENS, LABELS, entities="all")


def test_span_head_mentions_are_reported_while_the_typed_anchor_checks_the_ner_decoder():
    ner = [12, 13, 5, 15, 4, 1]  # NER decoder: Ann Lee, Acme
    fwd = [12, 13, 5, 15, 4, 7, 17, 3, 10, 2, 1]  # Work_For(Ann Lee, Acme), Live_In(Ann Lee, Oslo)
    head = [(0, 1, "Peop"), OSLO]  # the span head: "Ann" and Oslo
    typed = parse(ner, fwd, [1], TOKENS, LABELS, entities="ner", mentions=head)
    # Entities: the head's, plus the mentions of the relations the NER decoder anchors (Work_For).
    assert structure(typed) == ({(0, 1, "Peop"), OSLO, ANN, ACME}, {WORKS})
    reported = parse(ner, fwd, [1], TOKENS, LABELS, entities="ner", anchor="reported", mentions=head)
    # Anchored on the head's mentions: neither relation has both of its mentions there.
    assert structure(reported) == ({(0, 1, "Peop"), OSLO}, set())


@pytest.mark.parametrize("paradigm", [Paradigm.FLAT_NONREL, Paradigm.GROUPED_NONREL])
def test_anchor_is_a_no_op_when_ner_lists_only_non_relational_entities(paradigm):
    t = linearize(EXAMPLE, LABELS, paradigm)
    for anchor in (True, False):
        back = parse(t.ner, t.fwd, t.rev, TOKENS, LABELS, paradigm, anchor=anchor)
        assert structure(back) == structure(EXAMPLE)


def test_aggregate_unites_forward_and_reverse():
    fwd = [12, 13, 5, 15, 4, 7, 2, 1]  # Work_For only
    rev = [17, 3, 15, 4, 9, 2, 1]  # OrgBased_In only
    united = parse([1], fwd, rev, TOKENS, LABELS, anchor=False)
    assert structure(united) == ({ANN, ACME, OSLO}, {WORKS, BASED})
    forward_only = parse([1], fwd, rev, TOKENS, LABELS, aggregate=False, anchor=False)
    assert structure(forward_only) == ({ANN, ACME}, {WORKS})


def test_relations_found_by_both_decoders_appear_once():
    t = linearize(EXAMPLE, LABELS)
    back = parse(t.ner, t.fwd, t.rev, TOKENS, LABELS)
    assert len(back.relations) == 3


# --------------------------------------------------------------------------- alignment


def test_align_pairs_matches_repeated_keys_in_order():
    x, y = ("ent", 0, 1, "Org", 0), ("rel", (0, 1, "Org"), (0, 1, "Org"), "r")
    keys_a = [x, None, y, x]
    keys_b = [y, x, x, x, None]
    # x: a has [0, 3], b has [1, 2, 3] -> (0, 1), (3, 2), and b's surplus 3 with a's first 0.
    assert align_pairs(keys_a, keys_b) == [(0, 1), (0, 3), (2, 0), (3, 2)]
    assert align_pairs(keys_b, keys_a) == [(0, 2), (1, 0), (2, 3), (3, 0)]  # the same pairs, swapped
    assert align_pairs(keys_a, keys_b, want=is_entity_key) == [(0, 1), (0, 3), (3, 2)]
    assert align_pairs([None], [None]) == []


def test_decision_pairs_of_the_grouped_example():
    """Only positions where both decoders make the same decision: later tokens and the type of a
    mention (k >= 1) and relation labels; forward and reverse paired by (triple, role)."""
    t = linearize(EXAMPLE, LABELS, Paradigm.GROUPED_ALL)
    pairs = decoder_pairs(t)
    # NER: Ann Lee <Peop> 0-2, Acme <Org> 3-4, Oslo <Loc> 5-6. Lee and the three types pair with
    # every RE occurrence; Ann, Acme and Oslo (first tokens, k = 0) with none.
    assert pairs["ner_fwd"] == [(1, 1), (2, 2), (4, 4), (4, 11), (6, 7), (6, 13)]
    assert pairs["ner_rev"] == [(1, 3), (1, 10), (2, 4), (2, 11), (4, 1), (4, 14), (6, 8)]
    # fwd: Ann Lee <Peop> (anchor of Work_For and Live_In) Acme <Org> <Work_For> Oslo <Loc> <Live_In>
    # <sep> | Acme <Org> (anchor of OrgBased_In) Oslo <Loc> <OrgBased_In> <sep>.
    # rev: Acme <Org> Ann Lee <Peop> <Work_For> <sep> | Oslo <Loc> (anchor of Live_In and
    # OrgBased_In) Ann Lee <Peop> <Live_In> Acme <Org> <OrgBased_In> <sep>.
    assert pairs["fwd_rev"] == [
        (1, 3),  # Lee, head of Work_For
        (1, 10),  # Lee, head of Live_In
        (2, 4),
        (2, 11),
        (4, 1),  # Acme's type, tail of Work_For
        (5, 5),  # <Work_For>
        (7, 8),  # Oslo's type, tail of Live_In
        (8, 12),  # <Live_In>
        (11, 14),  # Acme's type, head of OrgBased_In
        (13, 8),  # Oslo's type, tail of OrgBased_In
        (14, 15),  # <OrgBased_In>
    ]
    for i, j in pairs["fwd_rev"]:
        assert t.fwd[i] == t.rev[j]


def test_all_pairs_of_the_grouped_example():
    pairs = decoder_pairs(linearize(EXAMPLE, LABELS, Paradigm.GROUPED_ALL), "all")
    # NER: Ann 0-2, Acme 3-4, Oslo 5-6. fwd: Ann 0-2, Acme 3-4 and 10-11, Oslo 6-7 and 12-13.
    ner_fwd = [(0, 0), (1, 1), (2, 2), (3, 3), (3, 10), (4, 4), (4, 11), (5, 6), (5, 12), (6, 7), (6, 13)]
    assert pairs["ner_fwd"] == ner_fwd
    # rev: Acme 0-1 and 13-14, Ann 2-4 and 9-11, Oslo 7-8.
    ner_rev = [
        (0, 2),
        (0, 9),
        (1, 3),
        (1, 10),
        (2, 4),
        (2, 11),
        (3, 0),
        (3, 13),
        (4, 1),
        (4, 14),
        (5, 7),
        (6, 8),
    ]
    assert pairs["ner_rev"] == ner_rev
    # fwd/rev: every entity token, plus the relation labels fwd 5/8/14 <-> rev 5/12/15.
    assert pairs["fwd_rev"] == [
        (0, 2),
        (0, 9),
        (1, 3),
        (1, 10),
        (2, 4),
        (2, 11),
        (3, 0),
        (4, 1),
        (5, 5),
        (6, 7),
        (7, 8),
        (8, 12),
        (10, 13),
        (11, 14),
        (12, 7),
        (13, 8),
        (14, 15),
    ]


@pytest.mark.parametrize("paradigm", [Paradigm.FLAT_NONREL, Paradigm.GROUPED_NONREL])
def test_no_ner_re_pairs_when_ner_omits_relational_entities(paradigm):
    pairs = decoder_pairs(linearize(EXAMPLE, LABELS, paradigm))
    assert pairs["ner_fwd"] == pairs["ner_rev"] == []
    assert pairs["fwd_rev"]


def test_fwd_rev_pairs_skip_triples_only_one_side_writes():
    t = linearize(EXAMPLE, LABELS, Paradigm.FLAT_ALL)
    only_works = linearize(make_sample(TOKENS, [ANN, ACME], [WORKS]), LABELS, Paradigm.FLAT_ALL)
    t.rev, t.rev_keys, t.rev_roles = only_works.rev, only_works.rev_keys, only_works.rev_roles
    pairs = decoder_pairs(t, "all")["fwd_rev"]
    # Only Work_For is shared: Ann Lee and Acme tokens (also where fwd writes them for other
    # triples) and the Work_For label; nothing of Oslo.
    assert {t.fwd_keys[i] for i, _ in pairs} == set(keys_of(ANN, ACME, WORKS))
    assert all(t.fwd_keys[i] == t.rev_keys[j] for i, j in pairs)
    # By (triple, role): only where fwd writes Work_For's head and tail, past their first token.
    decision = decoder_pairs(t)["fwd_rev"]
    assert decision and all(any(r[0][2] == "Work_For" for r in t.fwd_roles[i]) for i, _ in decision)
    assert all(t.fwd[i] == t.rev[j] for i, j in decision)


# --------------------------------------------------------------------------- properties


def _random_sample(rng, labels):
    n = rng.randint(1, 12)
    spans = set()
    for _ in range(rng.randint(0, 6)):
        start = rng.randrange(n)
        spans.add((start, rng.randint(start + 1, min(n, start + 4)), rng.choice(labels.entity_types)))
    spans = list(spans)
    rng.shuffle(spans)
    triples = [
        (rng.choice(spans), rng.choice(spans), rng.choice(labels.relation_types))
        for _ in range(rng.randint(0, 6) if spans else 0)
    ]
    return make_sample([f"t{i}" for i in range(n)], spans, triples)


def _assert_well_formed(sample, n_words, labels):
    for ent in sample.entities:
        assert 0 <= ent.start < ent.end <= n_words
        assert ent.type in labels.entity_types
    for r in sample.relations:
        assert r.type in labels.relation_types


@pytest.mark.parametrize("paradigm", list(Paradigm))
def test_random_samples_round_trip(paradigm):
    rng = random.Random(1000 + paradigm)
    for _ in range(1500):
        sample = _random_sample(rng, LABELS)
        t = linearize(sample, LABELS, paradigm)
        back, report = parse_with_report(
            t.ner, t.fwd, t.rev, sample.tokens, LABELS, paradigm, self_relations=True
        )
        assert structure(back) == structure(sample), sample
        assert report.valid
        assert len(t.ner_keys) == len(t.ner) and len(t.fwd_keys) == len(t.fwd)
        # The grammar the decoder is constrained by accepts every target the writers produce.
        for name in ("ner", "fwd", "rev"):
            assert accepted(getattr(t, name), grammar_of(name, paradigm), LABELS), (name, sample)


@pytest.mark.parametrize("paradigm", list(Paradigm))
def test_random_id_lists_never_raise_and_give_well_formed_output(paradigm):
    rng = random.Random(paradigm)
    n_words = 6
    top = LABELS.vocab_size(n_words) + 3

    def random_ids():
        ids = [rng.randint(-3, top) for _ in range(rng.randint(0, 30))]
        if rng.random() < 0.5:  # mostly in-range ids, so the grammar (not only the lexer) is exercised
            ids = [i if rng.random() < 0.2 else rng.randint(1, top - 4) for i in ids]
        return ids

    for _ in range(2500):
        outputs = [random_ids(), random_ids(), random_ids()]
        for aggregate in (True, False):
            back, report = parse_with_report(
                *outputs, [f"t{i}" for i in range(n_words)], LABELS, paradigm, aggregate
            )
            _assert_well_formed(back, n_words, LABELS)
            for ids, decoder in zip(outputs, (report.ner, report.fwd, report.rev), strict=True):
                body = ids[: ids.index(EOS)] if EOS in ids else ids
                assert decoder.ended == (EOS in ids)
                assert 0 <= decoder.dropped <= len(body)


JUNK = (-1, 0, 3, 1000)  # negative, <bos> (not first), a type with no words, a word past the end


@pytest.mark.parametrize("paradigm", list(Paradigm))
def test_junk_between_units_is_dropped_and_changes_nothing_else(paradigm):
    rng = random.Random(50 + paradigm)
    for _ in range(600):
        sample = _random_sample(rng, LABELS)
        n = len(sample.tokens)
        t = linearize(sample, LABELS, paradigm)
        for ids, reverse in ((t.fwd, False), (t.rev, True)):
            boundaries = [i + 1 for i, x in enumerate(ids[:-1]) if x < LABELS.n_fixed]
            if not boundaries:
                continue
            at = rng.choice(boundaries)
            noisy = ids[:at] + [rng.choice(JUNK)] + ids[at:]
            assert parse_relations(noisy, n, LABELS, paradigm, reverse) == parse_relations(
                ids, n, LABELS, paradigm, reverse
            )
            report = _relations_report(noisy, sample.tokens, paradigm, reverse)
            assert report.dropped == 1


def _relations_report(ids, tokens, paradigm, reverse):
    if reverse:
        return parse_with_report([1], [1], ids, tokens, LABELS, paradigm)[1].rev
    return parse_with_report([1], ids, [1], tokens, LABELS, paradigm)[1].fwd


@pytest.mark.parametrize("paradigm", list(Paradigm))
def test_prefixes_parse_to_subsets(paradigm):
    rng = random.Random(70 + paradigm)
    for _ in range(300):
        sample = _random_sample(rng, LABELS)
        n = len(sample.tokens)
        t = linearize(sample, LABELS, paradigm)
        full_entities = set(parse_entities(t.ner, n, LABELS))
        full_triples = set(parse_relations(t.fwd, n, LABELS, paradigm))
        for cut in range(len(t.fwd)):
            assert set(parse_relations(t.fwd[:cut], n, LABELS, paradigm)) <= full_triples
        for cut in range(len(t.ner)):
            assert set(parse_entities(t.ner[:cut], n, LABELS)) <= full_entities


# --------------------------------------------------------------------------- real datasets


@functools.cache  # read once per session: several tests use the same files
def _spert_samples(folder: Path):
    """Every distinct sentence of the SpERT-format files of one dataset, and its label set."""
    types = json.loads(next(folder.glob("*_types.json")).read_text(encoding="utf-8"))
    labels = LabelSet(tuple(types["entities"]), tuple(types["relations"]))
    records = {}
    for path in sorted(folder.glob("*.json")):
        if path.name.endswith("_types.json"):
            continue
        for i, rec in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            content = json.dumps([rec["tokens"], rec["entities"], rec["relations"]])
            records.setdefault(content, (f"{path.name}:{i}", rec))
    samples = [
        Sample(id=sid, tokens=rec["tokens"], entities=rec["entities"], relations=rec["relations"])
        for sid, rec in records.values()
    ]
    return samples, labels


@functools.cache
def _jointer_samples(folder: Path):
    """JointER WebNLG: spo_details rows (s_start, s_end, s_type, rel, o_start, o_end, o_type)."""
    samples, entity_types, relation_types = [], {}, {}
    for path in sorted(folder.glob("*.json")):
        for i, rec in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            spans, triples = {}, []
            for s0, s1, st, r, o0, o1, ot in rec["spo_details"]:
                head, tail = (s0, s1, st), (o0, o1, ot)
                spans.update(dict.fromkeys([head, tail]))
                entity_types.update(dict.fromkeys([st, ot]))
                relation_types[r] = None
                triples.append((head, tail, r))
            samples.append(make_sample(rec["tokens"], list(spans), triples, f"{path.name}:{i}"))
    return samples, LabelSet(tuple(entity_types), tuple(relation_types))


REAL_DATASETS = {
    "conll04": (_spert_samples, "conll04"),
    "scierc": (_spert_samples, "scierc"),
    "ade": (_spert_samples, "ade"),
    "webnlg": (_jointer_samples, "webnlg/JointER_WebNLG"),
}


def _round_trip_all(samples, labels):
    """Round-trip every sample in every paradigm; returns the failures (sample id, paradigm)."""
    failures = []
    for paradigm in Paradigm:
        for sample in samples:
            t = linearize(sample, labels, paradigm)
            back, report = parse_with_report(
                t.ner, t.fwd, t.rev, sample.tokens, labels, paradigm, self_relations=True
            )
            grammatical = all(
                accepted(ids, grammar_of(name, paradigm), labels)
                for name, ids in (("ner", t.ner), ("fwd", t.fwd), ("rev", t.rev))
            )
            if structure(back) != structure(sample) or not report.valid or not grammatical:
                failures.append((sample.id, paradigm.name))
    return failures


@pytest.mark.parametrize("name", list(REAL_DATASETS))
def test_every_real_sample_round_trips(shared_data, name):
    read, folder = REAL_DATASETS[name]
    if not (shared_data / folder).is_dir():
        pytest.skip(f"{shared_data / folder} not found")
    samples, labels = read(shared_data / folder)
    assert samples
    assert _round_trip_all(samples, labels) == []


def test_real_data_covers_the_hard_cases(shared_data):
    """Guards the round-trip test's claim: nested/overlapping entities, several relations of
    one pair and self-relations all occur in the data it runs on."""
    folders = [shared_data / "scierc", shared_data / "ade", shared_data / "webnlg/JointER_WebNLG"]
    if not all(f.is_dir() for f in folders):
        pytest.skip("scierc, ade or webnlg data not found")
    samples = [s for f in folders[:2] for s in _spert_samples(f)[0]] + _jointer_samples(folders[2])[0]
    overlapping = self_relations = shared_pairs = 0
    for sample in samples:
        spans = [(x.start, x.end) for x in sample.entities]
        overlapping += any(a != b and a[0] < b[1] and b[0] < a[1] for a in spans for b in spans)
        pairs = [(r.head, r.tail) for r in sample.relations]
        self_relations += any(h == t for h, t in pairs)
        shared_pairs += len(set(pairs)) < len(pairs)
    assert overlapping > 100 and self_relations > 10 and shared_pairs > 10


def test_every_loaded_dataset_round_trips(shared_data):
    """Through anchoralign.datasets, so every built-in dataset (NYT included) is covered."""
    datasets = pytest.importorskip("anchoralign.datasets")
    if not hasattr(datasets, "load_split"):
        pytest.skip("anchoralign.datasets has no load_split yet")
    if not datasets.known_datasets():
        pytest.skip("anchoralign.datasets has no built-in datasets yet")
    checked, unavailable = [], []
    for name in datasets.known_datasets():
        meta = datasets.get_meta(name, str(shared_data))
        labels = LabelSet.from_meta(meta)
        # Cross-validation folds hold the same sentences: the splits of fold 0 hold all of them.
        fold = 0 if meta.folds else None
        for split in meta.splits:
            try:
                samples = datasets.load_split(name, split, str(shared_data), fold=fold)
            except UserError as err:
                unavailable.append(f"{name}/{split}: {err}")
                continue
            assert _round_trip_all(samples, labels) == [], f"{name}/{split}"
            checked.append(f"{name}/{split}")
    if not checked:
        pytest.skip(f"no dataset could be loaded: {unavailable}")
