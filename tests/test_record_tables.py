"""Record sources as Arrow batches: the fast path gives what read_jsonl gives, and the column
checks never pass a record that Sample refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from schema_fixtures import PEOP_ORG_META

from anchoralign.errors import RecordError, UserError
from anchoralign.record_tables import batch_of, record_batches, samples_of, surely_valid
from anchoralign.schema import DatasetMeta, Sample, read_jsonl, read_records, to_hf_dataset, write_jsonl

META = PEOP_ORG_META


def record(**kw) -> dict:
    base = {
        "id": "s1",
        "tokens": ["Ann", "works", "for", "Acme", "."],
        "entities": [{"start": 0, "end": 1, "type": "Peop"}, {"start": 3, "end": 4, "type": "Org"}],
        "relations": [{"head": 0, "tail": 1, "type": "Work_For"}],
    }
    return {**base, **kw}


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_all(path: Path, meta: DatasetMeta | None = META) -> list[Sample]:
    return [s for batch in record_batches(path, meta) for s in samples_of(batch)]


def test_fast_path_equals_read_jsonl(tmp_path: Path) -> None:
    records = [record(id=f"s{i}", source_id="x", origin="cross") for i in range(5)]
    records += [record(id="bare", entities=[], relations=[])]
    path = write_lines(tmp_path / "c.jsonl", records)
    assert read_all(path) == read_jsonl(path)
    (batch,) = record_batches(path, META)
    assert surely_valid(batch, META)  # canonical records take the fast path


def test_canonical_but_unusual_records_are_read_as_read_jsonl_reads_them(tmp_path: Path) -> None:
    # No id (-> file-line id), a blank line, a missing entities field, a number as a string,
    # null optional fields: valid for Sample, not in the canonical Arrow form.
    rec = record()
    del rec["id"]
    path = tmp_path / "odd.jsonl"
    lines = [json.dumps(record(id="a")), "", json.dumps(rec), json.dumps({"id": "b", "tokens": ["x"]})]
    lines += [
        json.dumps(record(id="c", origin=None, relations=[{"head": "0", "tail": 1, "type": "Work_For"}]))
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    got = read_all(path)
    assert got == read_jsonl(path)
    assert [s.id for s in got] == ["a", "odd-3", "b", "c"]


# Each breaks one rule of Sample or of the label check; the column checks must not pass any.
INVALID = {
    "past the end": record(entities=[{"start": 3, "end": 9, "type": "Org"}], relations=[]),
    "empty span": record(entities=[{"start": 2, "end": 2, "type": "Org"}], relations=[]),
    "negative start": record(entities=[{"start": -1, "end": 1, "type": "Org"}], relations=[]),
    "duplicate entity": record(
        entities=[{"start": 0, "end": 1, "type": "Peop"}, {"start": 0, "end": 1, "type": "Peop"}],
        relations=[],
    ),
    "relation past entities": record(relations=[{"head": 7, "tail": 0, "type": "Work_For"}]),
    "negative tail": record(relations=[{"head": 0, "tail": -1, "type": "Work_For"}]),
    "no tokens": record(tokens=[], entities=[], relations=[]),
    "empty entity type": record(entities=[{"start": 0, "end": 1, "type": ""}], relations=[]),
    "empty relation type": record(relations=[{"head": 0, "tail": 1, "type": ""}]),
    "unknown entity label": record(entities=[{"start": 0, "end": 1, "type": "Gene"}], relations=[]),
    "unknown relation label": record(relations=[{"head": 0, "tail": 1, "type": "Kill"}]),
    "null token": record(tokens=["Ann", None, "for", "Acme", "."]),
    "extra field": record(extra=1),
    "extra entity field": record(entities=[{"start": 0, "end": 1, "type": "Peop", "x": 1}], relations=[]),
    "id a number": record(id=5),
    "tokens a string": record(tokens="Ann works"),
    "null entity": record(entities=[None], relations=[]),
    "entity without end": record(entities=[{"start": 0, "type": "Peop"}], relations=[]),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_a_bad_record_is_named_by_file_and_line_as_read_jsonl_names_it(tmp_path: Path, name: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record(id="ok")) + "\n\n" + json.dumps(INVALID[name]) + "\n", encoding="utf-8")
    with pytest.raises(RecordError) as fast:
        read_all(path)
    assert str(fast.value).startswith(f"{path}:3:"), fast.value
    if "label" not in name:
        with pytest.raises(RecordError) as exact:
            read_jsonl(path)
        assert str(fast.value) == str(exact.value)


def test_the_column_checks_never_pass_what_sample_refuses(tmp_path: Path) -> None:
    import pyarrow as pa

    for name, rec in INVALID.items():
        try:
            batch = pa.RecordBatch.from_pylist([rec], schema=batch_of([]).schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
            continue  # not even Arrow takes it as a record: the exact path decides
        if _without_nulls(batch.to_pylist()[0]) != _without_nulls(rec):
            continue  # Arrow changed it (dropped a field, split a string): the JSON reader refuses it
        assert not surely_valid(batch, META), name


def _without_nulls(x):
    if isinstance(x, dict):
        return {k: _without_nulls(v) for k, v in x.items() if v is not None}
    return [_without_nulls(v) for v in x] if isinstance(x, list) else x


def test_errors_after_many_good_records_name_their_line(tmp_path: Path, monkeypatch) -> None:
    from anchoralign import record_tables

    monkeypatch.setattr(record_tables, "_BLOCK_BYTES", 4096)  # many batches
    good = [record(id=f"s{i}") for i in range(300)]
    path = write_lines(tmp_path / "c.jsonl", [*good, INVALID["past the end"], *good])
    with pytest.raises(RecordError, match=r"c.jsonl:301: entities\[0\]: span 3..9 is past the end"):
        read_all(path)
    fine = write_lines(tmp_path / "fine.jsonl", good)
    assert len(list(record_batches(fine, META))) > 1
    assert read_all(fine) == read_jsonl(fine)


def test_malformed_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps(record()) + "\n" + '{"id": "x", "tokens": ["a"]\n', encoding="utf-8")
    for read in (read_all, read_jsonl):
        with pytest.raises(
            RecordError, match=r"cut.jsonl:2: not valid JSON \(Expecting ',' delimiter at column 28\)"
        ):
            read(path)
    path.write_text('{"id": "x", "tokens": ["a"] "entities": []}\n', encoding="utf-8")
    with pytest.raises(RecordError, match=r"cut.jsonl:1: not valid JSON \(.* at column 29\)"):
        read_jsonl(path)


def test_saved_datasets_folder_is_a_records_source(tmp_path: Path) -> None:
    samples = [Sample.model_validate(record(id=f"s{i}")) for i in range(3)]
    samples.append(Sample(id="e", tokens=["x"], origin="cross"))
    folder = tmp_path / "saved"
    to_hf_dataset(samples).save_to_disk(str(folder))
    assert read_records(folder) == samples
    assert read_all(folder) == samples


def test_saved_folder_errors_name_the_row(tmp_path: Path) -> None:
    import datasets

    rows = [record(id="a"), record(id="b", entities=[{"start": 3, "end": 9, "type": "Org"}], relations=[])]
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    for read in (read_all, read_records):
        with pytest.raises(RecordError, match=r"saved: row \[1\]: entities\[0\]: span 3..9 is past the end"):
            read(folder)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match="DatasetDict folder; give the folder of one split"):
        read_records(tmp_path / "dd")


def test_jsonl_written_by_us_loads_with_load_dataset_json(tmp_path: Path) -> None:
    import datasets

    samples = [Sample.model_validate(record(id=f"s{i}")) for i in range(3)]
    samples.append(Sample(id="e", tokens=["x"], source_id="s0", origin="cross"))
    path = tmp_path / "unmasked.jsonl"
    write_jsonl(path, samples)
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds[0]["tokens"] == samples[0].tokens and ds[3]["origin"] == "cross"
