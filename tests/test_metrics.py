import math

import pytest

from anchoralign.errors import UserError
from anchoralign.metrics import (
    COUNTS,
    FIGURES,
    average_folds,
    boundary_relation_keys,
    entity_keys,
    prf,
    score,
    strict_relation_keys,
)
from anchoralign.schema import Sample


def sample(sid, text, entities=(), relations=()):
    """entities: (start, end, type); relations: (head index, tail index, type)."""
    return Sample(
        id=sid,
        tokens=text.split(),
        entities=[{"start": s, "end": e, "type": t} for s, e, t in entities],
        relations=[{"head": h, "tail": t, "type": r} for h, t, r in relations],
    )


S1 = "John Smith works for Acme Corp in Boston ."
S2 = "Paris and Rome , Paris 's twin ."
S3 = "Mary lives in Rome ."


def three_sentences():
    """Gold and prediction of the worked example in test_three_sentence_example."""
    gold = [
        sample(
            "s1",
            S1,
            [(0, 2, "Peop"), (4, 6, "Org"), (7, 8, "Loc")],
            [(0, 1, "Work_For"), (1, 2, "OrgBased_In")],
        ),
        sample("s2", S2, [(0, 1, "Loc"), (2, 3, "Loc"), (4, 5, "Loc")], [(0, 1, "Sister_City")]),
        sample("s3", S3, [(0, 1, "Peop"), (3, 4, "Loc")], [(0, 1, "Live_In")]),
    ]
    pred = [
        # listed in another order than the gold: matching is by id
        sample("s2", S2, [(0, 1, "Loc"), (2, 3, "Loc")], [(1, 0, "Sister_City")]),
        sample(
            "s1",
            S1,
            [(0, 2, "Peop"), (4, 6, "Loc"), (7, 8, "Loc")],
            [(0, 1, "Work_For"), (2, 1, "OrgBased_In")],
        ),
        # s3 has no prediction
    ]
    return gold, pred


def test_three_sentence_example():
    # s1: "Acme Corp" predicted as Loc instead of Org; OrgBased_In predicted reversed (asymmetric).
    #   NER   gold {JS/Peop, Acme/Org, Boston/Loc}  pred {JS/Peop, Acme/Loc, Boston/Loc}  tp 2
    #   strict gold {(JS,Peop,Acme,Org,WF), (Acme,Org,Boston,Loc,OBI)}
    #          pred {(JS,Peop,Acme,Loc,WF), (Boston,Loc,Acme,Loc,OBI)}                  tp 0
    #   bound. gold {(JS,Acme,WF), (Acme,Boston,OBI)}  pred {(JS,Acme,WF), (Boston,Acme,OBI)} tp 1
    # s2: "Paris" twice in the gold -> one key; Sister_City (symmetric) predicted reversed.
    #   NER gold 2 pred 2 tp 2; strict 1/1/1; boundary 1/1/1
    # s3: no prediction: NER gold 2, strict gold 1, boundary gold 1, nothing predicted.
    # NER:      tp 4, pred 5, gold 7 -> P 80, R 400/7, F1 = 2*4/(5+7)*100 = 200/3
    # strict:   tp 1, pred 3, gold 4 -> P 100/3, R 25, F1 = 2*1/(3+4)*100 = 200/7
    # boundary: tp 2, pred 3, gold 4 -> P 200/3, R 50, F1 = 2*2/7*100 = 400/7
    gold, pred = three_sentences()
    m = score(gold, pred, symmetric={"Sister_City"})
    expected = {
        "ner_p": 80.0,
        "ner_r": 400 / 7,
        "ner_f1": 200 / 3,
        "rel_strict_p": 100 / 3,
        "rel_strict_r": 25.0,
        "rel_strict_f1": 200 / 7,
        "rel_boundary_p": 200 / 3,
        "rel_boundary_r": 50.0,
        "rel_boundary_f1": 400 / 7,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value), key
    assert (m["ner_tp"], m["ner_n_pred"], m["ner_n_gold"]) == (4, 5, 7)
    assert (m["rel_strict_tp"], m["rel_strict_n_pred"], m["rel_strict_n_gold"]) == (1, 3, 4)
    assert (m["rel_boundary_tp"], m["rel_boundary_n_pred"], m["rel_boundary_n_gold"]) == (2, 3, 4)
    assert m["n_samples"] == 3 and m["n_missing_pred"] == 1
    assert m["primary"] == "rel_strict_f1"
    assert set(FIGURES) | set(COUNTS) <= m.keys()
    # By offsets, s2's second "Paris" is a gold key of its own (NER gold 8, the prediction still
    # names 5 with 4 right: F1 = 2*4/(5+8)*100 = 800/13); the relations have no repeats, so their
    # families are the text ones.
    assert (m["ner_offsets_tp"], m["ner_offsets_n_pred"], m["ner_offsets_n_gold"]) == (4, 5, 8)
    assert m["ner_offsets_f1"] == pytest.approx(800 / 13)
    for family in ("rel_strict", "rel_boundary"):
        for figure in ("p", "r", "f1", "tp", "n_pred", "n_gold"):
            assert m[f"{family}_offsets_{figure}"] == m[f"{family}_{figure}"], (family, figure)


def test_reversed_relation_counts_only_when_the_type_is_symmetric():
    gold, pred = three_sentences()
    # Without Sister_City declared symmetric, s2's reversed relation is wrong in both families:
    # strict tp 0 of pred 3 / gold 4, boundary tp 1 (s1's Work_For) of 3 / 4.
    m = score(gold, pred)
    assert m["rel_strict_tp"] == 0 and m["rel_strict_f1"] == 0.0
    assert m["rel_boundary_tp"] == 1
    assert m["rel_boundary_f1"] == pytest.approx(200 / 7)
    # Declaring an unrelated type symmetric does not rescue s1's reversed OrgBased_In.
    assert score(gold, pred, symmetric={"Sister_City"})["rel_boundary_tp"] == 2
    assert score(gold, pred, symmetric={"Sister_City", "OrgBased_In"})["rel_boundary_tp"] == 3


def test_wrong_entity_type_costs_strict_but_not_boundary():
    gold = [sample("a", S3, [(0, 1, "Peop"), (3, 4, "Loc")], [(0, 1, "Live_In")])]
    pred = [sample("a", S3, [(0, 1, "Org"), (3, 4, "Loc")], [(0, 1, "Live_In")])]
    m = score(gold, pred)
    assert m["rel_strict_f1"] == 0.0
    assert m["rel_boundary_f1"] == 100.0
    assert m["ner_tp"] == 1 and m["ner_f1"] == 50.0  # Rome/Loc right, Mary/Org wrong: P 50, R 50


def test_wrong_relation_type_costs_both_relation_families():
    gold = [sample("a", S3, [(0, 1, "Peop"), (3, 4, "Loc")], [(0, 1, "Live_In")])]
    pred = [sample("a", S3, [(0, 1, "Peop"), (3, 4, "Loc")], [(0, 1, "Work_For")])]
    m = score(gold, pred)
    assert m["ner_f1"] == 100.0
    assert m["rel_strict_tp"] == 0 and m["rel_boundary_tp"] == 0


def test_repeated_mentions_count_once():
    text = "Paris , Paris and Rome"
    gold = [
        sample("a", text, [(0, 1, "Loc"), (2, 3, "Loc"), (4, 5, "Loc")], [(0, 2, "Near"), (1, 2, "Near")])
    ]
    # Gold: two Paris occurrences -> keys {Paris/Loc, Rome/Loc}; two Near relations -> one key.
    assert entity_keys(gold[0]) == {("Paris", "Loc"), ("Rome", "Loc")}
    assert boundary_relation_keys(gold[0]) == {("Paris", "Rome", "Near")}
    # A prediction naming Paris once (either occurrence) gets full recall...
    once = [sample("a", text, [(2, 3, "Loc"), (4, 5, "Loc")], [(0, 1, "Near")])]
    m = score(gold, once)
    assert (m["ner_tp"], m["ner_n_pred"], m["ner_n_gold"]) == (2, 2, 2)
    assert (m["rel_strict_tp"], m["rel_strict_n_pred"], m["rel_strict_n_gold"]) == (1, 1, 1)
    # ...and a prediction repeating it is not rewarded or penalised for the repeat.
    text_keys = [k for k in m if "_offsets_" not in k]
    assert {k: score(gold, gold)[k] for k in text_keys} == {k: m[k] for k in text_keys}
    # The same mention with another type is a different key.
    two_types = [sample("a", text, [(0, 1, "Loc"), (2, 3, "Org")])]
    assert entity_keys(two_types[0]) == {("Paris", "Loc"), ("Paris", "Org")}


def test_by_offsets_each_occurrence_is_a_key_and_must_be_the_right_one():
    text = "Paris , Paris and Rome"
    gold = [
        sample("a", text, [(0, 1, "Loc"), (2, 3, "Loc"), (4, 5, "Loc")], [(0, 2, "Near"), (1, 2, "Near")])
    ]
    assert entity_keys(gold[0], offsets=True) == {((0, 1), "Loc"), ((2, 3), "Loc"), ((4, 5), "Loc")}
    assert boundary_relation_keys(gold[0], offsets=True) == {
        ((0, 1), (4, 5), "Near"),
        ((2, 3), (4, 5), "Near"),
    }
    # Paris named once, at its second occurrence, with one Near: full marks by text; by offsets
    # NER 2 of 3 gold (P 100, R 200/3, F1 80) and the relation 1 of 2 (F1 = 2*1/(1+2)*100).
    once = [sample("a", text, [(2, 3, "Loc"), (4, 5, "Loc")], [(0, 1, "Near")])]
    m = score(gold, once)
    assert m["ner_f1"] == m["rel_strict_f1"] == 100.0
    assert (m["ner_offsets_tp"], m["ner_offsets_n_pred"], m["ner_offsets_n_gold"]) == (2, 2, 3)
    assert m["ner_offsets_f1"] == pytest.approx(80.0)
    assert (m["rel_strict_offsets_tp"], m["rel_strict_offsets_n_pred"], m["rel_strict_offsets_n_gold"]) == (
        1,
        1,
        2,
    )
    assert m["rel_strict_offsets_f1"] == pytest.approx(200 / 3)
    # The same text at a position the gold does not have is wrong by offsets, right by text.
    moved = [sample("a", "Paris , Rome and Paris", [(0, 1, "Loc"), (2, 3, "Loc")], [(0, 1, "Near")])]
    moved_gold = [sample("a", "Paris , Rome and Paris", [(4, 5, "Loc"), (2, 3, "Loc")], [(0, 1, "Near")])]
    m = score(moved_gold, moved)
    assert m["ner_f1"] == 100.0 and m["rel_strict_f1"] == 100.0
    assert m["ner_offsets_tp"] == 1 and m["rel_strict_offsets_tp"] == 0 and m["rel_boundary_offsets_tp"] == 0
    # A symmetric type sorts offset mentions too.
    pair = sample("b", S2, [(0, 1, "Loc"), (2, 3, "Loc")], [(1, 0, "Sister_City")])
    assert strict_relation_keys(pair, {"Sister_City"}, offsets=True) == {
        ((0, 1), "Loc", (2, 3), "Loc", "Sister_City")
    }


def test_symmetric_gold_pair_listed_both_ways_counts_once():
    gold = [sample("a", S2, [(0, 1, "Loc"), (2, 3, "Loc")], [(0, 1, "Sister_City"), (1, 0, "Sister_City")])]
    assert strict_relation_keys(gold[0], {"Sister_City"}) == {("Paris", "Loc", "Rome", "Loc", "Sister_City")}
    assert len(strict_relation_keys(gold[0])) == 2  # asymmetric: both directions are facts
    pred = [sample("a", S2, [(0, 1, "Loc"), (2, 3, "Loc")], [(1, 0, "Sister_City")])]
    m = score(gold, pred, symmetric=["Sister_City"])
    assert m["rel_strict_n_gold"] == 1 and m["rel_strict_f1"] == 100.0
    # Symmetric sorting keeps each argument's type with its mention.
    mixed = sample("b", S3, [(0, 1, "Peop"), (3, 4, "Loc")], [(1, 0, "Meets")])
    assert strict_relation_keys(mixed, {"Meets"}) == {("Mary", "Peop", "Rome", "Loc", "Meets")}


def test_boundary_only_names_the_primary_figure_and_keeps_every_key():
    gold, pred = three_sentences()
    plain = score(gold, pred)
    nyt = score(gold, pred, boundary_only=True)
    assert nyt["primary"] == "rel_boundary_f1"
    assert {k: v for k, v in nyt.items() if k != "primary"} == {
        k: v for k, v in plain.items() if k != "primary"
    }


def test_zero_division_gives_zero():
    assert prf(0, 0, 0) == (0.0, 0.0, 0.0)
    assert prf(0, 3, 0) == (0.0, 0.0, 0.0)
    assert prf(0, 0, 3) == (0.0, 0.0, 0.0)
    # A sentence with no entities at all, predicted empty.
    m = score([sample("a", "nothing here")], [sample("a", "nothing here")])
    assert all(m[k] == 0.0 for k in FIGURES)


def test_a_missing_prediction_scores_as_empty():
    gold, _ = three_sentences()
    m = score(gold, [])
    assert m["n_missing_pred"] == 3
    assert m["ner_n_pred"] == 0 and m["ner_n_gold"] == 7 and m["ner_f1"] == 0.0


def test_a_predicted_id_missing_from_gold_is_a_user_error():
    gold, pred = three_sentences()
    with pytest.raises(UserError, match="'zz'"):
        score(gold, [*pred, sample("zz", S3)])


@pytest.mark.parametrize("role", ["gold", "pred"])
def test_a_repeated_id_is_a_user_error(role):
    gold, pred = three_sentences()
    if role == "gold":
        gold = [*gold, gold[0]]
    else:
        pred = [*pred, pred[0]]
    with pytest.raises(UserError, match="'s\\d' occurs more than once"):
        score(gold, pred)


def test_predicted_tokens_that_differ_from_gold_are_a_user_error():
    gold, _ = three_sentences()
    with pytest.raises(UserError, match="'s3'.*tokens differ"):
        score(gold, [sample("s3", "Mary lived in Rome .")])


def test_average_folds_means_figures_and_sums_counts():
    gold, pred = three_sentences()
    f1 = score(gold, pred, symmetric={"Sister_City"})  # NER F1 200/3, strict 200/7
    f2 = score(gold, gold)  # everything 100
    avg = average_folds([f1, f2])
    assert avg["ner_f1"] == pytest.approx((200 / 3 + 100) / 2)
    # population std of two values is half their distance
    assert avg["ner_f1_std"] == pytest.approx((100 - 200 / 3) / 2)
    assert avg["rel_strict_f1"] == pytest.approx((200 / 7 + 100) / 2)
    assert avg["ner_tp"] == 4 + 7 and avg["ner_n_gold"] == 14
    assert avg["n_samples"] == 6 and avg["n_missing_pred"] == 1
    assert avg["folds"] == 2 and avg["primary"] == "rel_strict_f1"
    single = average_folds([f1])
    assert single["ner_f1"] == f1["ner_f1"] and single["ner_f1_std"] == 0.0
    assert all(math.isfinite(single[f"{k}_std"]) for k in FIGURES)


def test_average_folds_rejects_empty_and_mixed_primary():
    gold, pred = three_sentences()
    with pytest.raises(ValueError):
        average_folds([])
    with pytest.raises(ValueError, match="primary"):
        average_folds([score(gold, pred), score(gold, pred, boundary_only=True)])
