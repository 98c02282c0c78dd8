"""Dataset loaders and metadata: placement rules, every format on hand-made files, the real data, errors."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from anchoralign.datasets import (
    DataNotFoundError,
    get_meta,
    known_datasets,
    load_split,
    load_split_with_report,
    resolve_data_dir,
    split_off_dev,
)
from anchoralign.errors import RecordError, UserError
from anchoralign.formats.common import LoadReport, sample_ids
from anchoralign.formats.placement import choose_span, find_occurrences, normalise, place_triples
from anchoralign.schema import Entity, Relation, Sample, write_jsonl

FIXTURES = str(Path(__file__).parent / "fixtures" / "datasets")
BUILTIN = ["ace05", "ade", "conll04", "nyt", "nyt_star", "scierc", "text2dt", "webnlg"]


def spans(sample: Sample) -> list[tuple[int, int, str, str]]:
    """Entities as (start, end, type, mention) for readable assertions."""
    return [(e.start, e.end, e.type, " ".join(sample.tokens[e.start : e.end])) for e in sample.entities]


def rels(sample: Sample) -> list[tuple[int, int, str]]:
    return [(r.head, r.tail, r.type) for r in sample.relations]


# ---------------------------------------------------------------------------------------------- placement

TYPES = {"contains": ("location", "location"), "works_for": ("person", "organization")}


def test_find_occurrences_lists_every_start_of_a_contiguous_run():
    tokens = ["a", "b", "a", "b", "c", "a", "b"]
    assert find_occurrences(tokens, ["a", "b"]) == [0, 2, 5]
    assert find_occurrences(tokens, ["b", "c"]) == [3]
    assert find_occurrences(tokens, ["c", "a", "b", "x"]) == []
    assert find_occurrences(tokens, []) == []


def test_choose_span_skips_occurrences_inside_a_longer_mention():
    # "New York" at 3 lies inside "New York City" 3..6, so the later one at 11 is chosen.
    assert choose_span([3, 11], 2, longer=[(3, 6)]) == (11, 13)
    # Every occurrence inside a longer one: the first is used.
    assert choose_span([3], 2, longer=[(3, 6)]) == (3, 5)
    # A span equal to a "longer" one is not strictly inside it.
    assert choose_span([0], 2, longer=[(0, 2)]) == (0, 2)


def test_normalise_drops_accents_and_folds_full_width_characters():
    assert normalise("Cancún") == "Cancun"
    assert normalise("Juárez") == "Juarez"
    assert normalise("１０mg") == "10mg"


def test_place_triples_applies_occurrence_typing_and_reporting_rules():
    tokens = [
        "Slim",
        "of",
        "Telmex",
        "left",
        "New",
        "York",
        "City",
        "for",
        "New",
        "York",
        "and",
        "Juarez",
        ".",
    ]
    # 0 Slim, 2 Telmex, 4-6 New York City, 8-9 New York, 11 Juarez
    triples = [
        ("Slim", "works_for", "Telmex"),
        ("New York", "contains", "New York City"),
        ("New York", "contains", "Telmex"),  # Telmex already typed organization: a conflict
        ("New York", "contains", "Juárez"),  # found only without the accent
        ("Slim", "works_for", "Atlantis Corp"),  # object absent: unplaced, Slim stays an entity
    ]
    p = place_triples(tokens, triples, TYPES, str.split)
    assert [(e.start, e.end, e.type) for e in p.entities] == [
        (0, 1, "person"),
        (2, 3, "organization"),
        (4, 7, "location"),
        (8, 10, "location"),
        (11, 12, "location"),
    ]
    assert [(r.head, r.tail, r.type) for r in p.relations] == [
        (0, 1, "works_for"),
        (3, 2, "contains"),
        (3, 1, "contains"),
        (3, 4, "contains"),
    ]
    assert p.unplaced == [("Slim", "works_for", "Atlantis Corp")]
    assert p.type_conflicts == 1
    assert p.normalised_matches == 1


def test_place_triples_makes_one_entity_of_one_span_reached_by_two_strings():
    tokens = ["Hotels", "in", "Cancun", ",", "Mexico"]
    triples = [("Mexico", "contains", "Cancun"), ("Mexico", "contains", "Cancún")]
    p = place_triples(tokens, triples, TYPES, str.split)
    assert [(e.start, e.end) for e in p.entities] == [(2, 3), (4, 5)]
    assert [(r.head, r.tail) for r in p.relations] == [(1, 0), (1, 0)]


# ---------------------------------------------------------------------------------------------- helpers


def test_sample_ids_use_source_ids_only_when_all_present_and_distinct():
    assert sample_ids("d-train", [7, 3]) == ["d-train-7", "d-train-3"]
    assert sample_ids("d-train", [7, 7]) == ["d-train-0", "d-train-1"]
    assert sample_ids("d-train", [7, None]) == ["d-train-0", "d-train-1"]


def _sample(i: int, n_rel: int = 0) -> Sample:
    ents = [Entity(start=0, end=1, type="A"), Entity(start=1, end=2, type="B")]
    return Sample(
        id=f"x-{i}", tokens=["a", "b"], entities=ents, relations=[Relation(head=0, tail=1, type="R")] * n_rel
    )


def test_split_off_dev_is_deterministic_disjoint_and_order_independent():
    samples = [_sample(i) for i in range(50)]
    rest, dev = split_off_dev(samples, 0.1, seed=0)
    assert len(dev) == 5 and len(rest) == 45
    assert {s.id for s in rest}.isdisjoint(s.id for s in dev)
    rest2, dev2 = split_off_dev(list(reversed(samples)), 0.1, seed=0)
    assert {s.id for s in dev2} == {s.id for s in dev}
    dev_ids = {d.id for d in dev}
    assert [s.id for s in rest] == [s.id for s in samples if s.id not in dev_ids]  # input order kept
    assert {s.id for s in split_off_dev(samples, 0.1, seed=1)[1]} != {s.id for s in dev}


def test_load_report_subset_is_exact_per_sample():
    report = LoadReport(files=["f"], source_relations=7)
    report.add_unplaced("x-0", "t1")
    report.add_unplaced("x-0", "t2")
    report.count("x-1", "merged_duplicates")
    report.count("x-1", "type_conflicts", 2)
    samples = [_sample(0, n_rel=1), _sample(1, n_rel=3)]  # 1 + 2 dropped, 3 + 1 dropped: 7 in the source
    sub = report.subset(samples[1:])
    assert (sub.source_relations, sub.unplaced_relations) == (4, 0)
    assert (sub.merged_duplicates, sub.type_conflicts) == (1, 2)
    sub0 = report.subset(samples[:1])
    assert (sub0.source_relations, sub0.unplaced_relations) == (3, 2)
    assert sub0.unplaced_examples == [("x-0", "t1"), ("x-0", "t2")]


# ---------------------------------------------------------------------------------------------- metadata


def test_known_datasets_are_the_builtin_metadata_files():
    assert known_datasets() == BUILTIN


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_metadata_is_complete(name):
    meta = get_meta(name)
    assert meta.name == name
    assert meta.entity_types and meta.relation_types
    assert all(d.strip() for d in [*meta.entity_types.values(), *meta.relation_types.values()])
    assert meta.symmetric_relations <= set(meta.relation_types)
    assert meta.notes
    assert set(meta.splits) == {"train", "dev", "test"}


def test_symmetric_flags_follow_the_dataset_conventions():
    assert get_meta("scierc").symmetric_relations == {"Compare", "Conjunction"}
    assert get_meta("ace05").symmetric_relations == {"PER-SOC"}
    for name in ("conll04", "ade", "nyt", "nyt_star", "webnlg", "text2dt"):
        assert get_meta(name).symmetric_relations == frozenset()


def test_dataset_level_flags():
    ade = get_meta("ade")
    assert (ade.folds, ade.full_split) == (10, "full")
    assert get_meta("text2dt").language == "zh"
    assert {n for n in BUILTIN if get_meta(n).boundary_only} == {"nyt", "nyt_star", "text2dt", "webnlg"}
    assert set(get_meta("ace05").entity_types) == {"FAC", "GPE", "LOC", "ORG", "PER", "VEH", "WEA"}
    assert set(get_meta("ace05").relation_types) == {
        "ART",
        "GEN-AFF",
        "ORG-AFF",
        "PART-WHOLE",
        "PER-SOC",
        "PHYS",
    }


def test_nyt_metadata_covers_the_24_relations_with_readable_descriptions():
    meta = get_meta("nyt")
    assert len(meta.relation_types) == 24
    assert meta.relation_types["/location/location/contains"].startswith("location contains")
    assert get_meta("nyt_star").relation_types == meta.relation_types


def test_resolve_data_dir_prefers_flag_then_environment(monkeypatch):
    monkeypatch.setenv("ANCHORALIGN_DATA", "/from/env")
    assert resolve_data_dir("/from/flag") == Path("/from/flag")
    assert resolve_data_dir(None) == Path("/from/env")
    monkeypatch.delenv("ANCHORALIGN_DATA")
    assert resolve_data_dir(None) == Path("data")


# ---------------------------------------------------------------------------------------------- fixtures


def test_ace05_documents_become_sentences_with_sentence_offsets():
    samples, report = load_split_with_report("ace05", "train", FIXTURES)
    assert [s.id for s in samples] == [
        "ace05-train-APW_ENG_20030304.0555-0",
        "ace05-train-APW_ENG_20030304.0555-1",
        "ace05-train-CNN_CF_20030303.1900.00-0",
        "ace05-train-CNN_CF_20030303.1900.00-1",
        "ace05-train-CNN_CF_20030303.1900.00-2",
    ]
    first, second, _, empty, iraq = samples
    assert spans(first) == [
        (0, 2, "PER", "John Smith"),
        (4, 5, "PER", "chief"),
        (6, 8, "ORG", "Acme Corp"),
        (11, 12, "GPE", "Paris"),
    ]
    assert rels(first) == [(0, 2, "ORG-AFF"), (0, 3, "PHYS")]
    # The second sentence starts at document token 13.
    assert spans(second) == [
        (0, 1, "PER", "His"),
        (1, 2, "PER", "brother"),
        (2, 3, "PER", "Tom"),
        (4, 5, "PER", "him"),
        (7, 8, "FAC", "airport"),
    ]
    assert rels(second) == [(1, 0, "PER-SOC"), (3, 4, "PHYS")]
    assert empty.tokens == ["No", "comment", "."] and not empty.entities
    # Nested entities are kept; the PHYS relation to "valley" (no entity there) is counted, not kept.
    assert spans(iraq) == [(0, 3, "ORG", "The Iraqi army"), (1, 2, "GPE", "Iraqi"), (6, 7, "LOC", "Tigris")]
    assert rels(iraq) == [(0, 1, "PART-WHOLE")]
    assert (report.source_relations, report.unplaced_relations) == (8, 1)
    assert [len(load_split("ace05", s, FIXTURES)) for s in ("dev", "test")] == [1, 1]


def test_text2dt_trees_become_character_level_triples():
    samples, report = load_split_with_report("text2dt", "train", FIXTURES)
    first, second = samples
    assert first.tokens[:5] == ["高", "血", "压", "患", "者"]
    assert [(s, e, t) for s, e, t, _ in spans(first)] == [
        (0, 3, "被描述对象"),  # 高血压
        (7, 9, "临床表现"),  # 头痛
        (14, 18, "药物"),  # 硝苯地平
        (19, 27, "用法用量"),  # 每次10mg口服
    ]
    assert rels(first) == [(0, 1, "临床表现"), (0, 2, "治疗药物"), (2, 3, "用法用量")]
    # 青霉素 first occurs inside 青霉素过敏 (6..11), so its own mention at 15 is used.
    assert [(s, e, t) for s, e, t, _ in spans(second)] == [
        (0, 2, "基本情况"),  # 老年
        (2, 4, "被描述对象"),  # 患者
        (6, 11, "临床表现"),  # 青霉素过敏
        (15, 18, "药物"),  # 青霉素
        (22, 25, "药物"),  # 红霉素
    ]
    assert rels(second) == [(1, 0, "基本情况"), (1, 2, "临床表现"), (1, 3, "禁用药物"), (1, 4, "治疗药物")]
    # The repeated (患者, 基本情况, 老年) is merged: 8 triples in the source, 7 relations kept.
    assert (report.source_relations, report.merged_duplicates, report.unplaced_relations) == (8, 1, 0)


def test_text2dt_unplaced_triple_is_counted_and_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="anchoralign.datasets"):
        samples, report = load_split_with_report("text2dt", "dev", FIXTURES)
    (dev,) = samples
    assert [(s, e, t) for s, e, t, _ in spans(dev)] == [(0, 3, "被描述对象"), (6, 10, "治疗方案")]
    assert rels(dev) == [(0, 1, "治疗方案")]
    assert report.unplaced_relations == 1
    assert report.unplaced_examples == [("text2dt-dev-0", "('糖尿病', '治疗药物', '胰岛素')")]
    assert "1 of 2 relations could not be placed" in caplog.text


def test_nyt_train_file_loads_with_the_placement_rules():
    samples, report = load_split_with_report("nyt", "train", FIXTURES)
    fischer, yankees, juarez, slim = samples
    assert spans(fischer) == [
        (0, 2, "person", "Bobby Fischer"),
        (4, 5, "location", "Reykjavik"),
        (6, 7, "location", "Iceland"),
    ]
    assert [(h, t) for h, t, _ in rels(fischer)] == [(0, 1), (2, 1), (2, 1)]
    assert spans(yankees) == [(3, 6, "location", "New York City"), (11, 13, "location", "New York")]
    assert spans(juarez) == [(4, 5, "location", "Juarez"), (6, 7, "location", "Mexico")]
    assert rels(juarez) == [(1, 0, "/location/country/administrative_divisions")]
    assert spans(slim)[1] == (6, 7, "organization", "Telmex")  # first relation's type wins
    assert (report.source_relations, report.unplaced_relations) == (9, 1)
    assert (report.type_conflicts, report.normalised_matches) == (1, 1)
    assert sum(len(s.relations) for s in samples) == 8


# ---------------------------------------------------------------------------------------------- real data


def test_every_label_in_the_real_data_has_a_description(shared_data):
    for name in ("scierc", "conll04", "webnlg", "nyt", "nyt_star", "ade"):
        meta = get_meta(name)
        splits = [meta.full_split] if meta.folds else meta.splits
        for split in splits:
            try:
                samples = load_split(name, split, str(shared_data))
            except DataNotFoundError:
                continue  # NYT has no train split in the shared copy
            assert {e.type for s in samples for e in s.entities} <= set(meta.entity_types), (name, split)
            assert {r.type for s in samples for r in s.relations} <= set(meta.relation_types), (name, split)


def test_ade_dev_is_held_out_of_the_fold_train_file(shared_data):
    train = load_split("ade", "train", str(shared_data), fold=0)
    dev = load_split("ade", "dev", str(shared_data), fold=0)
    test = load_split("ade", "test", str(shared_data), fold=0)
    assert (len(train) + len(dev), len(dev), len(test)) == (3845, 384, 427)
    suffix = {s.id.removeprefix("ade-train-") for s in train}
    assert suffix.isdisjoint(s.id.removeprefix("ade-dev-") for s in dev)
    assert all(s.id.startswith("ade-dev-") for s in dev)
    assert [s.id for s in load_split("ade", "dev", str(shared_data), fold=0)] == [s.id for s in dev]


def test_real_splits_load_quickly(shared_data):
    import time

    start = time.perf_counter()
    load_split("scierc", "train", str(shared_data))
    load_split("nyt", "test", str(shared_data))
    assert time.perf_counter() - start < 5.0  # about 0.5 s on the dev machine; generous for shared CPUs


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown dataset 'sciERC'.*ace05, ade, conll04"):
        get_meta("sciERC")


def test_missing_data_directory_says_where_it_looked_and_how_to_fix_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as err:
        load_split("conll04", "train", str(missing))
    message = str(err.value)
    assert f"the data directory {missing} (from --data-dir) does not exist" in message
    assert "conll04/conll04_train.json" in message and "--data-dir" in message


def test_missing_file_names_the_path(tmp_path):
    (tmp_path / "scierc").mkdir()
    with pytest.raises(DataNotFoundError, match=r"scierc_dev\.json does not exist"):
        load_split("scierc", "dev", str(tmp_path))


def test_fold_errors():
    with pytest.raises(UserError, match="10 cross-validation folds: choose one with --fold 0..9"):
        load_split("ade", "train", FIXTURES)
    with pytest.raises(UserError, match="has folds 0..9; got fold 10"):
        load_split("ade", "train", FIXTURES, fold=10)
    with pytest.raises(UserError, match="'ace05' has no cross-validation folds"):
        load_split("ace05", "train", FIXTURES, fold=1)
    with pytest.raises(UserError, match=r"no split 'validation' \(splits: dev, test, train\)"):
        load_split("ace05", "validation", FIXTURES)


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def test_bad_item_of_a_json_array_names_file_item_and_field(tmp_path):
    good = {"tokens": ["a", "b"], "entities": [{"type": "Task", "start": 0, "end": 1}], "relations": []}
    bad = {"tokens": ["a", "b"], "entities": [{"type": "Task", "start": 1, "end": 1}], "relations": []}
    path = _write(tmp_path / "scierc" / "scierc_train.json", [good, bad])
    with pytest.raises(RecordError) as err:
        load_split("scierc", "train", str(tmp_path))
    assert str(err.value).startswith(f"{path}: item [1]: field 'entities.0':")


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "conll04" / "conll04_test.json"
    path.parent.mkdir()
    path.write_text('[\n{"tokens": ["a"]},\n{"tokens": ]\n', encoding="utf-8")
    with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}:3: not valid JSON"):
        load_split("conll04", "test", str(tmp_path))


def test_unknown_relation_in_triples_names_item_and_field(tmp_path):
    items = [{"text": "A in B", "triple_list": [["B", "/made/up", "A"]]}]
    path = _write(tmp_path / "nyt" / "NYT" / "dev_triples.json", items)
    with pytest.raises(
        RecordError,
        match=rf"^{re.escape(str(path))}: item \[0\]: field 'triple_list\[0\]': relation '/made/up'",
    ):
        load_split("nyt", "dev", str(tmp_path))


def test_dygie_entity_outside_its_sentence_names_line_and_field(tmp_path):
    doc = {
        "doc_key": "d",
        "sentences": [["a", "b"], ["c"]],
        "ner": [[[1, 2, "PER"]], []],
        "relations": [[], []],
    }
    path = tmp_path / "ace05" / "dev.json"
    path.parent.mkdir()
    path.write_text(json.dumps(doc) + "\n", encoding="utf-8")
    with pytest.raises(
        RecordError,
        match=rf"^{re.escape(str(path))}:1: field 'ner\[0\]\[0\]': span 1..2 is outside sentence 0",
    ):
        load_split("ace05", "dev", str(tmp_path))


def test_label_missing_from_the_metadata_is_an_error(tmp_path):
    item = {"tokens": ["a"], "entities": [{"type": "Person", "start": 0, "end": 1}], "relations": []}
    _write(tmp_path / "conll04" / "conll04_dev.json", [item])
    with pytest.raises(
        UserError, match="entity type 'Person', which the metadata of 'conll04' does not declare"
    ):
        load_split("conll04", "dev", str(tmp_path))


# ---------------------------------------------------------------------------------------------- user data

RECORDS = [
    {
        "id": "u1",
        "tokens": ["Ann", "works", "for", "Acme"],
        "entities": [{"start": 0, "end": 1, "type": "person"}, {"start": 3, "end": 4, "type": "org_unit"}],
        "relations": [{"head": 0, "tail": 1, "type": "works-for"}],
    },
]


def test_user_jsonl_file_serves_every_split_and_derives_metadata(tmp_path):
    path = tmp_path / "mine.jsonl"
    write_jsonl(path, RECORDS)
    meta = get_meta(str(path))
    assert meta.name == "mine" and meta.splits == ("train", "dev", "test")
    assert meta.entity_types == {"org_unit": "org unit", "person": "person"}
    assert meta.relation_types == {"works-for": "works for"}
    samples, report = load_split_with_report(str(path), "test")
    assert [s.id for s in samples] == ["u1"]
    assert any("every split reads the same file" in n for n in report.notes)


def test_saved_datasets_folders_are_accepted_as_record_files(tmp_path):
    import datasets

    split = datasets.Dataset.from_list(RECORDS)
    split.save_to_disk(str(tmp_path / "mine"))  # one folder: like one .jsonl file
    meta = get_meta(str(tmp_path / "mine"))
    assert meta.splits == ("train", "dev", "test") and meta.relation_types == {"works-for": "works for"}
    assert [s.id for s in load_split(str(tmp_path / "mine"), "dev")] == ["u1"]
    # A saved DatasetDict is a folder of split folders, like a folder of split files.
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    assert get_meta(str(tmp_path / "dd")).splits == ("train", "test")
    assert load_split(str(tmp_path / "dd"), "test") == load_split(str(tmp_path / "mine"), "test")


def test_user_directory_with_meta_json(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", RECORDS)
    write_jsonl(tmp_path / "dev.jsonl", RECORDS)
    meta_json = {
        "name": "jobs",
        "entity_types": {"person": "a person", "org_unit": "a unit of an organization"},
        "relation_types": {"works-for": "is employed by"},
        "symmetric_relations": [],
    }
    _write(tmp_path / "meta.json", meta_json)
    meta = get_meta(str(tmp_path))
    assert (meta.name, meta.splits) == ("jobs", ("train", "dev"))
    assert meta.relation_types == {"works-for": "is employed by"}
    assert load_split(str(tmp_path), "dev")[0].id == "u1"
    with pytest.raises(UserError, match="no split 'test'"):
        load_split(str(tmp_path), "test")
    _write(tmp_path / "meta.json", {**meta_json, "relation_types": {"employs": "employs"}})
    with pytest.raises(
        UserError, match="relation type 'works-for', which the metadata of 'jobs' does not declare"
    ):
        load_split(str(tmp_path), "train")


def test_user_directory_without_meta_json_uses_present_files(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", RECORDS)
    meta = get_meta(str(tmp_path))
    assert meta.splits == ("test",) and "labels derived from the data" in meta.notes


def test_bad_meta_json_names_file_and_field(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", RECORDS)
    _write(tmp_path / "meta.json", {"entity_types": {"person": "a person"}, "symetric_relations": []})
    with pytest.raises(
        UserError, match=r"meta\.json: field 'symetric_relations': Extra inputs are not permitted"
    ):
        get_meta(str(tmp_path))
    _write(tmp_path / "meta.json", {"relation_types": {"r": "r"}, "symmetric_relations": ["s"]})
    with pytest.raises(UserError, match=r"meta\.json: symmetric_relations: s not declared"):
        get_meta(str(tmp_path))


def test_bad_user_record_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps(RECORDS[0])
        + "\n"
        + json.dumps({**RECORDS[0], "relations": [{"head": 0, "tail": 5, "type": "r"}]})
        + "\n",
        encoding="utf-8",
    )
    with pytest.raises(
        RecordError, match=rf"^{re.escape(str(path))}:2: relations\[0\]\.tail: points at entity 5 of 2$"
    ):
        load_split(str(path), "train")


def test_missing_user_path():
    with pytest.raises(UserError, match="dataset path ./no/such.jsonl does not exist"):
        get_meta("./no/such.jsonl")
