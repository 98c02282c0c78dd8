import json

import pytest

from anchoralign.errors import RecordError
from anchoralign.schema import (
    Entity,
    Relation,
    Sample,
    from_hf_dataset,
    parse_record,
    read_jsonl,
    to_hf_dataset,
    write_jsonl,
)


def _sample(**kw):
    base = dict(
        id="s1",
        tokens=["John", "works", "for", "Acme", "."],
        entities=[{"start": 0, "end": 1, "type": "Peop"}, {"start": 3, "end": 4, "type": "Org"}],
        relations=[{"head": 0, "tail": 1, "type": "Work_For"}],
    )
    base.update(kw)
    return base


def test_valid_record_round_trips_through_jsonl(tmp_path):
    s = parse_record(_sample())
    assert s.mention(1) == "Acme"
    path = tmp_path / "a.jsonl"
    assert (
        write_jsonl(path, [s, s.model_copy(update={"id": "s2", "origin": "cross", "source_id": "s1"})]) == 2
    )
    back = read_jsonl(path)
    assert back[0] == s
    assert back[1].origin == "cross" and back[1].source_id == "s1"
    # optional fields are omitted, not written as null
    assert "origin" not in json.loads(path.read_text().splitlines()[0])


@pytest.mark.parametrize(
    "record, needle",
    [
        (_sample(entities=[{"start": 3, "end": 9, "type": "Org"}], relations=[]), "past the end"),
        (_sample(entities=[{"start": 2, "end": 2, "type": "Org"}], relations=[]), "end"),
        (_sample(relations=[{"head": 7, "tail": 0, "type": "Kill"}]), "points at entity 7 of 2"),
        (
            _sample(
                entities=[{"start": 0, "end": 1, "type": "P"}, {"start": 0, "end": 1, "type": "P"}],
                relations=[],
            ),
            "duplicate entity",
        ),
        (_sample(tokens=[]), "tokens"),
        (_sample(extra_field=1), "extra_field"),
    ],
)
def test_invalid_records_name_file_line_and_field(tmp_path, record, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_sample()) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(RecordError) as err:
        read_jsonl(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3:"), msg
    assert needle in msg
    assert "\n" not in msg


def test_line_that_is_not_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_sample()) + "\n{not json\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_missing_id_gets_file_and_line_id(tmp_path):
    path = tmp_path / "mine.jsonl"
    rec = _sample()
    del rec["id"]
    path.write_text(json.dumps(rec) + "\n")
    assert read_jsonl(path)[0].id == "mine-1"


def test_hf_dataset_round_trip():
    samples = [parse_record(_sample()), Sample(id="e", tokens=["x"])]
    ds = to_hf_dataset(samples)
    assert len(ds) == 2 and ds[0]["entities"][1]["type"] == "Org"
    assert from_hf_dataset(ds) == samples


def test_models_are_strict():
    with pytest.raises(ValueError):
        Entity(start=-1, end=1, type="X")
    assert Relation(head=0, tail=0, type="r").head == 0
