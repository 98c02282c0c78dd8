"""`anchoralign data-stats`: the figures on hand-made samples, the command on fixtures and on the real data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from anchoralign.cli import run_cli
from anchoralign.commands import data_stats
from anchoralign.commands.data_stats import (
    duplicate_relations,
    has_nested_entities,
    has_overlapping_relations,
    split_stats,
)
from anchoralign.schema import Sample

FIXTURES = str(Path(__file__).parent / "fixtures" / "datasets")


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    # rich wraps at 80 columns when not on a terminal; keep error lines and tables on one line each.
    monkeypatch.setenv("COLUMNS", "1000")


def cli(argv: list[str]) -> int:
    """The data-stats command through the shared CLI runner (user errors become one stderr line)."""
    parser = argparse.ArgumentParser(prog="anchoralign")
    data_stats.register(parser.add_subparsers(dest="command", required=True))
    return run_cli(parser, ["data-stats", *argv])


def stats_json(argv: list[str], capsys) -> dict:
    assert cli([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def sample(entities, relations, n_tokens=6) -> Sample:
    return Sample(
        id="s",
        tokens=["w"] * n_tokens,
        entities=[{"start": s, "end": e, "type": "T"} for s, e in entities],
        relations=[{"head": h, "tail": t, "type": r} for h, t, r in relations],
    )


# A: entity 2 is in two relations, entity 1 lies inside entity 0. B: one relation listed twice, so
# after removing the copy no entity is in two relations. C: nothing.
A = sample([(0, 2), (1, 2), (4, 5)], [(0, 2, "R"), (1, 2, "S")])
B = sample([(0, 1), (2, 3)], [(0, 1, "R"), (0, 1, "R")])
C = sample([], [])


def test_overlapping_relations_counts_distinct_relations_per_entity():
    assert has_overlapping_relations(A)
    assert not has_overlapping_relations(B)
    assert not has_overlapping_relations(C)
    assert not has_overlapping_relations(sample([(0, 1)], [(0, 0, "R")]))  # a self-relation is one relation
    # The same pair with two relation types: two distinct relations.
    assert has_overlapping_relations(sample([(0, 1), (2, 3)], [(0, 1, "R"), (0, 1, "S")]))


def test_nested_entities_means_any_shared_token():
    assert has_nested_entities(A)
    assert not has_nested_entities(B)
    assert has_nested_entities(sample([(0, 2), (1, 3)], []))  # crossing
    assert has_nested_entities(sample([(4, 6), (0, 1), (5, 6)], []))  # unsorted input
    assert not has_nested_entities(sample([(0, 1), (1, 2)], []))  # adjacent


def test_duplicate_relations_counts_extra_copies():
    assert duplicate_relations(B) == 1
    assert duplicate_relations(A) == 0


def test_split_stats_by_hand():
    assert split_stats([A, B, C]) == {
        "sentences": 3,
        "entities": 5,
        "relations": 4,
        "relations_per_sentence": 1.3333,
        "overlapping_share": 0.3333,
        "nested_share": 0.3333,
        "duplicate_relations": 1,
    }
    assert split_stats([])["relations_per_sentence"] == 0.0


def test_json_on_the_ace05_fixture(capsys):
    out = stats_json(["--dataset", "ace05", "--data-dir", FIXTURES], capsys)
    assert out["dataset"] == "ace05" and out["missing"] == {}
    train = out["splits"]["train"]
    assert {
        k: train[k] for k in ("sentences", "entities", "relations", "source_relations", "unplaced_relations")
    } == {
        "sentences": 5,
        "entities": 16,
        "relations": 7,
        "source_relations": 8,
        "unplaced_relations": 1,
    }
    # Overlapping: John Smith (2 relations) and Troops (2); nested: The Iraqi army / Iraqi.
    assert (train["overlapping_share"], train["nested_share"]) == (0.4, 0.2)
    assert out["splits"]["test"]["relations"] == 2


def test_json_on_the_text2dt_fixture_reports_merged_and_unplaced(capsys):
    out = stats_json(["--dataset", "text2dt", "--data-dir", FIXTURES], capsys)
    assert out["language"] == "zh"
    assert out["splits"]["train"]["merged_duplicates"] == 1
    assert out["splits"]["dev"]["unplaced_relations"] == 1
    assert out["splits"]["dev"]["unplaced_examples"] == ["text2dt-dev-0: ('糖尿病', '治疗药物', '胰岛素')"]


def test_missing_splits_are_listed_not_fatal(capsys):
    out = stats_json(["--dataset", "nyt", "--data-dir", FIXTURES], capsys)
    assert list(out["splits"]) == ["train"]
    assert set(out["missing"]) == {"dev", "test"}
    assert out["missing"]["dev"]["path"].endswith("nyt/NYT/dev_triples.json")


def test_table_output(capsys):
    assert cli(["--dataset", "text2dt", "--data-dir", FIXTURES]) == 0
    out = capsys.readouterr().out
    assert "with nested entities" in out and "merged duplicates" in out
    assert "relations = source relations - unplaced - merged duplicates" in out
    assert "dev: unplaced text2dt-dev-0" in out


def test_user_jsonl_with_a_bad_record_is_one_line_naming_file_and_line(tmp_path, capsys):
    path = tmp_path / "mine.jsonl"
    good = {"id": "a", "tokens": ["x"], "entities": [], "relations": []}
    path.write_text(json.dumps(good) + "\n" + '{"id": "b", "tokens": []}\n', encoding="utf-8")
    assert cli(["--dataset", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and f"{path}:2: field 'tokens'" in lines[0]


def test_unknown_dataset_is_one_line_listing_known_ones(capsys):
    assert cli(["--dataset", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Known datasets: ace05, ade, conll04" in err


# ---------------------------------------------------------------------------------------------- real data


def _counts(out: dict, key: str) -> list[int]:
    return [out["splits"][s][key] for s in ("train", "dev", "test")]


def test_scierc_counts(shared_data, capsys):
    out = stats_json(["--dataset", "scierc", "--data-dir", str(shared_data)], capsys)
    assert _counts(out, "sentences") == [1861, 275, 551]
    assert _counts(out, "entities") == [5598, 811, 1685]
    assert _counts(out, "relations") == [3219, 455, 974]
    assert _counts(out, "duplicate_relations") == [4, 0, 0]


def test_conll04_counts(shared_data, capsys):
    out = stats_json(["--dataset", "conll04", "--data-dir", str(shared_data)], capsys)
    assert _counts(out, "sentences") == [922, 231, 288]
    assert _counts(out, "relations") == [1283, 343, 422]


def test_ade_whole_corpus_and_folds(shared_data, capsys):
    out = stats_json(["--dataset", "ade", "--data-dir", str(shared_data)], capsys)
    assert list(out["splits"]) == ["full"]
    assert (out["splits"]["full"]["sentences"], out["splits"]["full"]["relations"]) == (4272, 6821)
    assert len(out["folds"]) == 10
    for parts in out["folds"].values():
        assert parts["test"]["sentences"] in (427, 429)
        assert sum(p["sentences"] for p in parts.values()) == 4272
        assert sum(p["relations"] for p in parts.values()) == 6821


def test_ade_one_fold(shared_data, capsys):
    out = stats_json(["--dataset", "ade", "--data-dir", str(shared_data), "--fold", "9"], capsys)
    assert _counts(out, "sentences") == [3459, 384, 429]


@pytest.mark.parametrize(("name", "triples"), [("nyt", 8120), ("nyt_star", 8110)])
def test_nyt_test_split_counts_every_triple(shared_data, capsys, name, triples):
    out = stats_json(["--dataset", name, "--data-dir", str(shared_data)], capsys)
    test = out["splits"]["test"]
    assert test["sentences"] == 5000
    assert test["source_relations"] == triples
    assert test["relations"] + test["unplaced_relations"] + test["merged_duplicates"] == triples
    assert "train" in out["missing"]  # the shared copy has no train split
