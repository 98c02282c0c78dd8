"""`anchoralign evaluate` and `anchoralign predict` end to end, in-process and as a real command."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from model_fixtures import (
    REPO_ROOT,
    TOY_META,
    cli,
    conll04_first,
    one_cpu_thread,  # noqa: F401  (autouse)
    overfit_checkpoint,
    tiny_model,
    toy_samples,
    write_user_dataset,
)

from anchoralign.commands.predict import plural, show
from anchoralign.schema import Sample, read_jsonl, write_jsonl


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny toy model with only 32 encoder positions (so long inputs are easy to make)."""
    return tiny_model(max_position_embeddings=32).save_pretrained(tmp_path_factory.mktemp("toy") / "ck")


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory) -> Path:
    return write_user_dataset(tmp_path_factory.mktemp("data") / "toy", TOY_META, {"test": toy_samples()})


def test_evaluate_json_is_reproduced_by_score_on_its_outputs(toy_checkpoint, toy_dataset, tmp_path, capsys):
    pred, gold = tmp_path / "pred.jsonl", tmp_path / "gold.jsonl"
    args = ["--checkpoint", toy_checkpoint, "--dataset", toy_dataset, "--split", "test", "--json"]
    code, out, err = cli(
        ["evaluate", *args, "--max-len", "8", "--output", pred, "--gold-output", gold], capsys
    )
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["n_samples"] == 3 and 0 <= metrics["complete_rate"] <= 1 and metrics["n_split"] == 0
    assert [s.id for s in read_jsonl(pred)] == [s.id for s in read_jsonl(gold)]
    code, out, err = cli(["score", "--gold", gold, "--pred", pred, "--json"], capsys)
    assert code == 0, err
    scored = json.loads(out)
    for key, value in scored.items():
        assert metrics[key] == value, key


def test_saved_datasets_folders_are_taken_where_record_files_are(toy_checkpoint, tmp_path, capsys):
    from anchoralign.schema import to_hf_dataset

    folder = tmp_path / "toy-test"
    to_hf_dataset(toy_samples()).save_to_disk(str(folder))
    pred = tmp_path / "pred.jsonl"
    args = ["--checkpoint", toy_checkpoint, "--dataset", folder, "--json", "--max-len", "8", "--output", pred]
    code, out, err = cli(["evaluate", *args], capsys)  # one folder: read whole, as one .jsonl file
    assert code == 0, err
    metrics = json.loads(out)
    to_hf_dataset(read_jsonl(pred)).save_to_disk(str(tmp_path / "pred"))
    code, out, err = cli(["score", "--gold", folder, "--pred", tmp_path / "pred", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["ner_f1"] == metrics["ner_f1"]
    code, out, err = cli(
        ["predict", "--checkpoint", toy_checkpoint, "--input", folder, "--output", tmp_path / "o.jsonl",
         "--max-len", "8", "--quiet"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert [s.id for s in read_jsonl(tmp_path / "o.jsonl")] == [s.id for s in toy_samples()]


def test_evaluate_prints_a_table_by_default(toy_checkpoint, toy_dataset, capsys):
    code, out, err = cli(
        [
            "evaluate",
            "--checkpoint",
            toy_checkpoint,
            "--dataset",
            toy_dataset,
            "--max-len",
            "6",
            "--beam",
            "2",
        ],
        capsys,
    )
    assert code == 0, err
    assert "Relation strict" in out and "complete outputs" in out


def test_evaluate_refuses_data_with_labels_the_checkpoint_lacks(toy_checkpoint, tmp_path, capsys):
    other = Sample(**{**toy_samples()[0].to_record(), "relations": []})
    other.entities[0] = other.entities[0].model_copy(update={"type": "Gene"})
    write_jsonl(tmp_path / "data" / "test.jsonl", [other])
    code, out, err = cli(["evaluate", "--checkpoint", toy_checkpoint, "--dataset", tmp_path / "data"], capsys)
    assert code == 2
    assert "was not trained with: Gene" in err and "Traceback" not in err


def test_evaluate_names_a_missing_checkpoint(toy_dataset, tmp_path, capsys):
    code, _, err = cli(["evaluate", "--checkpoint", tmp_path / "nope", "--dataset", toy_dataset], capsys)
    assert code == 2 and "checkpoint directory not found" in err


def test_evaluate_refuses_a_split_of_a_single_record_file(toy_checkpoint, toy_dataset, capsys):
    single = toy_dataset / "test.jsonl"
    base = ["evaluate", "--checkpoint", toy_checkpoint, "--dataset", single, "--max-len", "4"]
    code, _, err = cli([*base, "--split", "train"], capsys)
    assert code == 2 and "is a single file, evaluated whole; leave --split out" in err
    code, out, err = cli(base, capsys)
    assert code == 0, err
    assert f"on {single}" in " ".join(out.split()) and " test" not in out.split("\n")[0]


def test_evaluate_on_a_run_folder_suggests_its_checkpoints(toy_checkpoint, toy_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(toy_checkpoint, run / "best")
    code, _, err = cli(["evaluate", "--checkpoint", run, "--dataset", toy_dataset], capsys)
    assert code == 2 and "not a checkpoint directory" in err and "give its" in err
    assert str(run / "best") in " ".join(err.split())


def test_evaluate_moves_its_progress_bar_per_sentence(toy_checkpoint, toy_dataset, capsys, monkeypatch):
    from anchoralign.commands import predict as predict_command

    calls = []

    @contextmanager
    def recording_bar(total, what):
        calls.append(("total", total))
        yield lambda n: calls.append(n)

    monkeypatch.setattr(predict_command, "progress_bar", recording_bar)
    # One batch of three sentences of 8, 6 and 3 words: the seeded untrained model's outputs do not
    # all end at the same step, so the bar moves within the batch (it used to move once, at its end).
    code, _, err = cli(
        ["evaluate", "--checkpoint", toy_checkpoint, "--dataset", toy_dataset, "--json"], capsys
    )
    assert code == 0, err
    assert calls[0] == ("total", 3) and sum(calls[1:]) == 3 and len(calls[1:]) >= 2


def test_counts_are_written_in_the_singular_for_one():
    assert plural(1, "sentence") == "1 sentence" and plural(0, "relation") == "0 relations"
    assert plural(1, "entity", "entities") == "1 entity" and plural(2, "entity", "entities") == "2 entities"


def test_predict_says_one_sentence_in_the_singular(toy_checkpoint, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("Ann Lee works for Acme.\n", encoding="utf-8")
    argv = ["predict", "--checkpoint", toy_checkpoint, "--input", tmp_path / "in.txt"]
    code, out, err = cli([*argv, "--output", tmp_path / "o.jsonl", "--max-len", "3", "--quiet"], capsys)
    assert code == 0, err
    summary = " ".join(out.split())
    assert re.search(r"^1 sentence, \d+ (entity|entities), \d+ relations? written to", summary), summary
    assert "1 output was cut at the length bound" in summary  # 3 tokens cannot hold a finished output
    assert "1 outputs" not in summary and "1 sentences" not in summary


def test_predict_txt_is_the_python_api_on_each_line(toy_checkpoint, tmp_path, capsys):
    from anchoralign import Extractor

    lines = ["Ann Lee (IBM) works for Acme, in Oslo.", "Bob Pusterla lives in Paris."]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = ["predict", "--checkpoint", toy_checkpoint, "--input", tmp_path / "in.txt"]
    code, _, err = cli([*argv, "--output", tmp_path / "o.jsonl", "--max-len", "10"], capsys)
    assert code == 0, err
    found = Extractor.from_pretrained(toy_checkpoint).extract(lines, max_len=10)
    records = read_jsonl(tmp_path / "o.jsonl")
    assert [(r.tokens, r.entities, r.relations) for r in records] == [
        (x.record.tokens, x.record.entities, x.record.relations) for x in found
    ]


def test_predict_txt_tokenizes_lines_and_writes_records(toy_checkpoint, tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text("Ann Lee works for Acme.\n\n   \nBob's firm is in Oslo, Norway.\n", encoding="utf-8")
    code, out, err = cli(
        [
            "predict",
            "--checkpoint",
            toy_checkpoint,
            "--input",
            source,
            "--output",
            tmp_path / "o.jsonl",
            "--max-len",
            "6",
        ],
        capsys,
    )
    assert code == 0, err
    records = read_jsonl(tmp_path / "o.jsonl")
    assert [r.id for r in records] == ["in-1", "in-4"]  # blank lines are skipped, ids keep line numbers
    assert records[0].tokens == ["Ann", "Lee", "works", "for", "Acme", "."]
    assert records[1].tokens == ["Bob", "'s", "firm", "is", "in", "Oslo", ",", "Norway", "."]
    assert "in-1" in out and "2 sentences" in out


def test_predict_shows_user_text_literally(toy_checkpoint, tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", [Sample(id="m", tokens=["[red]", "Acme", "[/red]", "[bold]"])])
    code, out, err = cli(
        [
            "predict",
            "--checkpoint",
            toy_checkpoint,
            "--input",
            tmp_path / "in.jsonl",
            "--output",
            tmp_path / "o.jsonl",
        ]
        + ["--max-len", "4"],
        capsys,
    )
    assert code == 0, err
    assert "[red] Acme [/red] [bold]" in out
    assert read_jsonl(tmp_path / "o.jsonl")[0].tokens == ["[red]", "Acme", "[/red]", "[bold]"]


def test_predict_splits_or_refuses_long_lines(toy_checkpoint, tmp_path, capsys):
    source = tmp_path / "long.txt"
    source.write_text("Short one .\n" + " ".join(["Pusterla works ."] * 12) + "\n", encoding="utf-8")
    base = ["predict", "--checkpoint", toy_checkpoint, "--input", source, "--output", tmp_path / "o.jsonl"]
    code, _, err = cli([*base, "--long", "refuse"], capsys)
    assert code == 2
    assert f"{source}:2: 36 words make" in err and "--long split" in err
    code, out, err = cli([*base, "--max-len", "4", "--quiet"], capsys)
    assert code == 0, err
    records = read_jsonl(tmp_path / "o.jsonl")
    assert len(records[1].tokens) == 36
    assert "1 long sentence was split into word windows" in out


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("in.csv", "a,b\n", "expected a .txt file"),
        ("empty.txt", "\n\n", "no sentences"),
        ("bad.jsonl", '{"id": "a", "tokens": []}\n', "bad.jsonl:1"),
    ],
)
def test_predict_input_problems_are_one_line_errors(toy_checkpoint, tmp_path, capsys, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    code, _, err = cli(
        [
            "predict",
            "--checkpoint",
            toy_checkpoint,
            "--input",
            tmp_path / name,
            "--output",
            tmp_path / "o.jsonl",
        ],
        capsys,
    )
    assert code == 2 and message in err and "Traceback" not in err


def test_predict_runs_as_a_real_command(toy_checkpoint, tmp_path):
    (tmp_path / "in.txt").write_text("Ann Lee works for Acme .\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = ["--checkpoint", toy_checkpoint, "--input", tmp_path / "in.txt", "--output", tmp_path / "o.jsonl"]
    done = subprocess.run(
        [sys.executable, "-m", "anchoralign.cli", "predict", *map(str, args), "--max-len", "4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert read_jsonl(tmp_path / "o.jsonl")[0].id == "in-1"


# --- on the over-fitted CoNLL04 checkpoint (trained once per session) --------------------------


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, shared_data):
    directory, _ = overfit_checkpoint(tmp_path_factory, shared_data)
    meta, samples = conll04_first(shared_data)
    data = write_user_dataset(tmp_path_factory.mktemp("conll04_30") / "conll04_30", meta, {"train": samples})
    return directory, data, samples


@pytest.mark.slow
def test_evaluate_on_the_training_sentences_agrees_with_score(overfit, tmp_path, capsys):
    directory, data, _ = overfit
    pred, gold = tmp_path / "pred.jsonl", tmp_path / "gold.jsonl"
    args = ["--checkpoint", directory, "--dataset", data, "--split", "train", "--json"]
    code, out, err = cli(["evaluate", *args, "--output", pred, "--gold-output", gold], capsys)
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["rel_strict_f1"] >= 90 and metrics["complete_rate"] == 1.0
    code, out, err = cli(["score", "--gold", gold, "--pred", pred, "--json"], capsys)
    assert code == 0, err
    assert {k: metrics[k] for k in json.loads(out)} == json.loads(out)


@pytest.mark.slow
def test_predict_on_raw_text_prints_entities_and_relations(overfit, tmp_path, capsys):
    directory, _, samples = overfit
    chosen = [s for s in samples if s.relations][:3]
    (tmp_path / "in.txt").write_text("".join(s.text + "\n" for s in chosen), encoding="utf-8")
    code, out, err = cli(
        [
            "predict",
            "--checkpoint",
            directory,
            "--input",
            tmp_path / "in.txt",
            "--output",
            tmp_path / "o.jsonl",
        ],
        capsys,
    )
    assert code == 0, err
    records = read_jsonl(tmp_path / "o.jsonl")
    assert sum(len(r.relations) for r in records) >= len(chosen)
    first = chosen[0]
    head = first.mention(first.relations[0].head)
    assert head in out and first.relations[0].type in out


def test_show_names_the_type_of_a_relation_end_only_where_its_text_is_ambiguous():
    from rich.console import Console

    sample = Sample.model_validate(
        {
            "id": "s",
            "tokens": ["Jobs", "founded", "Apple", "in", "Cupertino", "."],
            "entities": [
                {"start": 0, "end": 1, "type": "Peop"},
                {"start": 2, "end": 3, "type": "Org"},
                {"start": 2, "end": 3, "type": "Loc"},
                {"start": 4, "end": 5, "type": "Loc"},
            ],
            "relations": [
                {"head": 0, "tail": 1, "type": "Work_For"},
                {"head": 0, "tail": 2, "type": "Work_For"},
                {"head": 1, "tail": 3, "type": "OrgBased_In"},
            ],
        }
    )
    console = Console(width=200, record=True)
    show(sample, console)
    lines = [line.strip() for line in console.export_text().splitlines() if "relation" in line]
    assert lines == [
        "relation   Jobs -Work_For-> Apple (Org)",
        "relation   Jobs -Work_For-> Apple (Loc)",
        "relation   Apple (Org) -OrgBased_In-> Cupertino",
    ]
