import argparse
import json

import pytest

from anchoralign.cli import run_cli
from anchoralign.commands import score as score_command
from anchoralign.schema import write_jsonl

TOKENS = ["Mary", "lives", "in", "Rome", "."]
GOLD = {
    "id": "a",
    "tokens": TOKENS,
    "entities": [{"start": 0, "end": 1, "type": "Peop"}, {"start": 3, "end": 4, "type": "Loc"}],
    "relations": [{"head": 0, "tail": 1, "type": "Live_In"}],
}
# Mary typed Org: NER 1 of 2 right (P = R = F1 = 50), strict relation wrong (0), boundary right (100).
PRED = {**GOLD, "entities": [{"start": 0, "end": 1, "type": "Org"}, {"start": 3, "end": 4, "type": "Loc"}]}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    # rich wraps at 80 columns when not on a terminal; long tmp paths would split the error line.
    monkeypatch.setenv("COLUMNS", "1000")


def cli(argv):
    """Run the score command through the shared CLI runner (user errors become one stderr line)."""
    parser = argparse.ArgumentParser(prog="anchoralign")
    score_command.register(parser.add_subparsers(dest="command", required=True))
    return run_cli(parser, ["score", *argv])


@pytest.fixture
def files(tmp_path):
    gold, pred = tmp_path / "gold.jsonl", tmp_path / "pred.jsonl"
    write_jsonl(gold, [GOLD])
    write_jsonl(pred, [PRED])
    return gold, pred


def test_json_output_has_rounded_percentages_and_counts(files, capsys):
    gold, pred = files
    assert cli(["--gold", str(gold), "--pred", str(pred), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ner_p"] == 50.0 and out["ner_r"] == 50.0 and out["ner_f1"] == 50.0
    assert out["rel_strict_f1"] == 0.0 and out["rel_boundary_f1"] == 100.0
    assert out["ner_tp"] == 1 and out["ner_n_gold"] == 2 and out["rel_boundary_n_pred"] == 1
    assert out["primary"] == "rel_strict_f1" and out["n_missing_pred"] == 0


def test_json_figures_are_rounded_to_two_decimals(tmp_path, capsys):
    # Three gold entities, one predicted right: R = 100/3 = 33.333... -> 33.33; F1 = 2*1/(1+3) = 50.
    gold, pred = tmp_path / "g.jsonl", tmp_path / "p.jsonl"
    three = {**GOLD, "entities": [*GOLD["entities"], {"start": 2, "end": 3, "type": "Other"}]}
    write_jsonl(gold, [three])
    write_jsonl(pred, [{**GOLD, "entities": GOLD["entities"][:1], "relations": []}])
    assert cli(["--gold", str(gold), "--pred", str(pred), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ner_r"] == 33.33 and out["ner_p"] == 100.0 and out["ner_f1"] == 50.0


def test_table_output(files, capsys):
    gold, pred = files
    assert cli(["--gold", str(gold), "--pred", str(pred)]) == 0
    out = capsys.readouterr().out
    rows = [("NER", "50.00"), ("Relation strict", "0.00"), ("Relation boundary", "100.00")]
    # Each family keyed by token offsets has a row of its own (no repeats here: the same figures).
    rows += [("NER by offsets", "50.00"), ("Strict by offsets", "0.00"), ("Boundary by offsets", "100.00")]
    for row, figures in rows:
        line = next(ln for ln in out.splitlines() if f" {row} " in ln)
        assert figures in line, line
    assert "rel_strict_f1" in out


def test_missing_predictions_are_reported(files, tmp_path, capsys):
    gold, _ = files
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli(["--gold", str(gold), "--pred", str(empty)]) == 0
    assert "1 gold sentences have no prediction" in capsys.readouterr().out


def test_missing_file_is_one_line_naming_it(files, tmp_path, capsys):
    gold, _ = files
    missing = tmp_path / "nope.jsonl"
    assert cli(["--gold", str(gold), "--pred", str(missing), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "nope.jsonl" in err and "file not found" in err


def test_bad_line_is_one_line_naming_file_and_line(files, tmp_path, capsys):
    gold, _ = files
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PRED) + "\n" + '{"id": "b", "tokens": []}\n')
    assert cli(["--gold", str(gold), "--pred", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "bad.jsonl:2" in err and "tokens" in err


def test_unknown_predicted_id_is_a_user_error(files, tmp_path, capsys):
    gold, _ = files
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [{**PRED, "id": "zz"}])
    assert cli(["--gold", str(gold), "--pred", str(other)]) == 2
    assert "'zz' is not in the gold" in capsys.readouterr().err


def test_data_dir_without_dataset_is_a_user_error(files, capsys):
    gold, pred = files
    assert cli(["--gold", str(gold), "--pred", str(pred), "--data-dir", "x"]) == 2
    assert "--dataset" in capsys.readouterr().err


def test_a_real_file_scored_against_itself_is_100_everywhere(shared_data, tmp_path, capsys):
    source = shared_data / "conll04" / "conll04_test.json"
    if not source.is_file():
        pytest.skip(f"{source} not found")
    records = [
        {
            "id": str(r["orig_id"]),
            "tokens": r["tokens"],
            "entities": r["entities"],
            "relations": r["relations"],
        }
        for r in json.loads(source.read_text())
    ]
    path = tmp_path / "conll04_test.jsonl"
    write_jsonl(path, records)
    assert cli(["--gold", str(path), "--pred", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("ner", "rel_strict", "rel_boundary"):
        for figure in ("p", "r", "f1"):
            assert out[f"{key}_{figure}"] == 100.0, key
    assert out["n_samples"] == 288 and out["n_missing_pred"] == 0
    # Mentions compared as text: 1079 annotated spans, fewer distinct (mention, type) keys per sentence.
    assert 0 < out["ner_n_gold"] <= 1079 and out["rel_strict_n_gold"] <= 422


def test_dataset_metadata_sets_symmetric_relations_and_headline(shared_data, tmp_path, capsys):
    pytest.importorskip("anchoralign.datasets", reason="anchoralign.datasets is not written yet")
    tokens = ["We", "compare", "parsing", "with", "tagging", "."]
    ents = [{"start": 2, "end": 3, "type": "Task"}, {"start": 4, "end": 5, "type": "Task"}]
    gold, pred = tmp_path / "g.jsonl", tmp_path / "p.jsonl"
    record = {"id": "a", "tokens": tokens, "entities": ents}
    write_jsonl(gold, [{**record, "relations": [{"head": 0, "tail": 1, "type": "Compare"}]}])
    write_jsonl(pred, [{**record, "relations": [{"head": 1, "tail": 0, "type": "Compare"}]}])
    base = ["--gold", str(gold), "--pred", str(pred), "--json"]

    assert cli(base) == 0
    assert json.loads(capsys.readouterr().out)["rel_strict_f1"] == 0.0
    # SciERC declares Compare symmetric, so the reversed pair is right.
    assert cli([*base, "--dataset", "scierc", "--data-dir", str(shared_data)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rel_strict_f1"] == 100.0 and out["primary"] == "rel_strict_f1"
    # NYT is scored on boundary F1.
    assert cli([*base, "--dataset", "nyt", "--data-dir", str(shared_data)]) == 0
    assert json.loads(capsys.readouterr().out)["primary"] == "rel_boundary_f1"


def test_several_pairs_are_averaged_as_folds(files, tmp_path, capsys):
    # Fold 1: GOLD vs PRED (NER F1 50, boundary 100); fold 2: GOLD vs itself (100, 100).
    # Mean NER F1 = 75 with population std 25; counts are summed over the folds.
    gold, pred = files
    assert (
        cli(["--gold", str(gold), "--pred", str(pred), "--gold", str(gold), "--pred", str(gold), "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["folds"] == 2 and out["ner_f1"] == 75.0 and out["ner_f1_std"] == 25.0
    assert out["rel_strict_f1"] == 50.0 and out["rel_boundary_f1"] == 100.0
    assert out["ner_n_gold"] == 4


def test_unpaired_gold_and_pred_is_a_user_error(files, capsys):
    gold, pred = files
    assert cli(["--gold", str(gold), "--gold", str(gold), "--pred", str(pred)]) == 2
    assert "one --pred per --gold" in capsys.readouterr().err


def test_flags_take_either_spelling(files, tmp_path, capsys):
    gold, pred = files
    outputs = []
    for flag in ("--data-dir", "--data_dir"):
        argv = ["--gold", gold, "--pred", pred, "--json", "--dataset", "conll04", flag, tmp_path]
        assert cli([str(a) for a in argv]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and json.loads(outputs[0])["ner_f1"] == 50.0
