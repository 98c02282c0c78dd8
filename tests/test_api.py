"""The Python API: raw text in, entities with character offsets and relations out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from model_fixtures import (
    REPO_ROOT,
    one_cpu_thread,  # noqa: F401  (autouse)
    tiny_model,
)

from anchoralign import Extraction, Extractor
from anchoralign.api import Entity, Relation, to_extraction
from anchoralign.decode import DecodeConfig
from anchoralign.errors import UserError
from anchoralign.schema import Entity as TokenEntity
from anchoralign.schema import Relation as TokenRelation
from anchoralign.schema import Sample
from anchoralign.tokenize import tokenize, tokenize_with_offsets

SENTENCES = [
    "Steve Jobs founded Apple, Inc. in Cupertino.",
    "Ann Lee (IBM) works for Acme in Oslo, Norway.",
    "  Bob's   firm,\tBigCo,  is in\u00a0Paris...  ",
    "\u201cAcme\u201d\u2014a U.S.-based firm\u2014hired Dr. Smith (CEO).",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny model: the constrained decoder still writes entities and relations."""
    return tiny_model().save_pretrained(tmp_path_factory.mktemp("api") / "ck")


@pytest.fixture(scope="module")
def short_checkpoint(tmp_path_factory) -> Path:
    """32 encoder positions, so that a long text is split into many word windows."""
    return tiny_model(max_position_embeddings=32).save_pretrained(tmp_path_factory.mktemp("api32") / "ck")


@pytest.fixture(scope="module")
def extractor(checkpoint) -> Extractor:
    return Extractor.from_pretrained(checkpoint, device="cpu", decode=DecodeConfig(max_len=12))


def check_consistent(x: Extraction) -> None:
    """What every result must satisfy, whatever the model found."""
    for e in x.entities:
        assert x.text[e.start : e.end] == e.text, e
        assert e.text == e.text.strip() and e.text
    assert [(e.start, e.end) for e in x.entities] == sorted((e.start, e.end) for e in x.entities)
    for r in x.relations:
        assert any(r.head is e for e in x.entities) and any(r.tail is e for e in x.entities), r


# --- the offset mapping as a pure function ---------------------------------------------------------


def test_entities_of_several_words_cover_the_original_characters_between_them():
    text = "  Ann \t Lee works for Acme, Inc.\u00a0(Oslo)."
    tokens, spans = tokenize_with_offsets(text)
    assert tokens == ["Ann", "Lee", "works", "for", "Acme", ",", "Inc.", "(", "Oslo", ")", "."]
    sample = Sample(
        id="x",
        tokens=tokens,
        entities=[
            TokenEntity(start=8, end=9, type="Loc"),
            TokenEntity(start=0, end=2, type="Peop"),
            TokenEntity(start=4, end=7, type="Org"),
        ],
        relations=[
            TokenRelation(head=1, tail=2, type="Work_For"),
            TokenRelation(head=1, tail=0, type="Live_In"),
        ],
    )
    x = to_extraction(text, spans, sample)
    assert [(e.text, e.type, e.start, e.end) for e in x.entities] == [
        ("Ann \t Lee", "Peop", 2, 11),
        ("Acme, Inc.", "Org", 22, 32),
        ("Oslo", "Loc", 34, 38),
    ]
    ann, acme, oslo = x.entities
    assert [(r.head, r.tail, r.type) for r in x.relations] == [
        (ann, acme, "Work_For"),
        (ann, oslo, "Live_In"),
    ]
    assert x.relations[0].head is ann and x.relations[1].tail is oslo
    assert x.record is sample
    check_consistent(x)


def test_the_mapping_refuses_spans_that_do_not_match_the_tokens():
    with pytest.raises(ValueError, match="2 character spans for 3 tokens"):
        to_extraction("a b c", [(0, 1), (2, 3)], Sample(id="x", tokens=["a", "b", "c"]))


# --- to_dict ---------------------------------------------------------------------------------------


def test_to_dict_is_json_ready_and_round_trips():
    ann, acme = Entity("Ann Lee", "Peop", 0, 7), Entity("Acme", "Org", 18, 22)
    x = Extraction("Ann Lee works for Acme.", [ann, acme], [Relation(ann, acme, "Work_For")])
    d = x.to_dict()
    assert d == {
        "text": "Ann Lee works for Acme.",
        "entities": [
            {"text": "Ann Lee", "type": "Peop", "start": 0, "end": 7},
            {"text": "Acme", "type": "Org", "start": 18, "end": 22},
        ],
        "relations": [
            {"head": 0, "tail": 1, "type": "Work_For", "head_text": "Ann Lee", "tail_text": "Acme"}
        ],
        "valid": True,
        "split": False,
    }
    again = json.loads(json.dumps(d))
    assert again == d
    back = Extraction.from_dict(again)
    assert back == x
    assert back.relations[0].head is back.entities[0] and back.relations[0].tail is back.entities[1]


def test_to_dict_of_real_results_round_trips(extractor):
    for x in extractor.extract(SENTENCES):
        d = json.loads(json.dumps(x.to_dict()))
        assert Extraction.from_dict(d) == x
        for r in d["relations"]:
            assert d["entities"][r["head"]]["text"] == r["head_text"]
            assert d["entities"][r["tail"]]["text"] == r["tail_text"]


# --- Extractor on raw text ----------------------------------------------------------------------


def test_extract_raw_sentences_with_attached_punctuation(extractor):
    results = extractor.extract(SENTENCES)
    assert isinstance(results, list) and [x.text for x in results] == SENTENCES
    for x in results:
        check_consistent(x)
        assert x.record.tokens == tokenize(x.text)  # the training-time word list: Apple , Inc.
    assert results[0].record.tokens[:5] == ["Steve", "Jobs", "founded", "Apple", ","]
    assert sum(len(x.entities) for x in results) > 0  # the untrained model still writes entities
    assert sum(len(x.relations) for x in results) > 0


def test_extract_one_text_gives_one_extraction(extractor):
    one = extractor.extract(SENTENCES[1])
    assert isinstance(one, Extraction)
    assert one == extractor.extract([SENTENCES[1]])[0]


def test_texts_without_words_give_empty_results(extractor):
    results = extractor.extract(["", "   \n", SENTENCES[0]])
    assert [(x.entities, x.relations, x.valid) for x in results[:2]] == [([], [], True)] * 2
    assert results[2] == extractor.extract(SENTENCES[0])


def test_batch_size_is_honoured(extractor, monkeypatch):
    import anchoralign.decode as decode

    sizes = []
    real = decode.generate

    def counting(model, batch, cfg, finished=None, state=None):
        sizes.append(batch["input_ids"].shape[0])
        return real(model, batch, cfg, finished, state)

    monkeypatch.setattr(decode, "generate", counting)
    extractor.extract(SENTENCES + SENTENCES[:1], batch_size=2)
    assert sizes == [2, 2, 1]


def test_decoding_options_are_decode_config_fields(extractor):
    assert extractor.config(beam=2, anchor=False) == DecodeConfig(max_len=12, beam=2, anchor=False)
    x = extractor.extract(SENTENCES[0], beam=2, aggregate=False, constrained=False)
    check_consistent(x)
    cfg = DecodeConfig(max_len=6, anchor=False)
    check_consistent(extractor.extract(SENTENCES[1], cfg))
    with pytest.raises(TypeError, match="unknown decoding option"):
        extractor.extract(SENTENCES[0], beam_size=2)


def test_non_text_inputs_are_refused(extractor):
    with pytest.raises(TypeError, match=r"texts\[1\] is a list"):
        extractor.extract(["fine", ["tokens"]])


def test_labels_and_language_are_exposed(extractor):
    assert extractor.language == "en"
    assert extractor.entity_types == ["Peop", "Org", "Loc"]
    assert extractor.relation_types == ["Work_For", "Live_In"]


# --- long texts -----------------------------------------------------------------------------------


def long_text(n_words: int) -> str:
    """Raw text of at least ``n_words`` words, with attached punctuation and irregular spacing."""
    pieces = ["Ann Lee (IBM) works for Acme,  in Oslo.", "Bob\tPusterla lives in Paris, France."]
    words, text = 0, []
    while words < n_words:
        text.append(pieces[len(text) % 2])
        words += len(tokenize(text[-1]))
    return "  ".join(text)


def test_a_3000_word_text_is_split_into_windows_never_truncated(short_checkpoint):
    extractor = Extractor.from_pretrained(short_checkpoint, decode=DecodeConfig(max_len=4))
    text = long_text(3000)
    x = extractor.extract(text)
    assert x.split and x.record.tokens == tokenize(text) and len(x.record.tokens) >= 3000
    check_consistent(x)
    assert x.entities and max(e.end for e in x.entities) > len(text) // 2  # found past the first windows
    d = json.loads(json.dumps(x.to_dict()))
    assert Extraction.from_dict(d) == x


def test_long_texts_can_be_refused_with_their_place(short_checkpoint):
    extractor = Extractor.from_pretrained(short_checkpoint)
    texts = ["Short one.", long_text(40)]
    with pytest.raises(UserError, match=r"^in\.txt:2: \d+ words make"):
        extractor.predict(texts, long="refuse", places=["in.txt:1", "in.txt:2"])
    with pytest.raises(UserError, match=r"^text 1: \d+ words make"):
        extractor.predict(texts, long="refuse")
    results, split = extractor.predict(texts, decode=DecodeConfig(max_len=4))
    assert split == [1] and [x.split for x in results] == [False, True]


def test_progress_counts_every_text_once(short_checkpoint):
    extractor = Extractor.from_pretrained(short_checkpoint)
    calls = []
    cfg = DecodeConfig(max_len=4, batch_size=1)
    extractor.predict(["", "Short one.", long_text(40)], decode=cfg, progress=calls.append)
    windows = [n for n in calls if n < 1]  # the long text counts a share as each of its windows ends
    assert len(windows) >= 2 and len(set(windows)) == 1 and sum(windows) == 1
    assert sum(calls) == 3 and type(sum(calls)) is not float  # exact: the bar ends on 3/3


# --- loading --------------------------------------------------------------------------------------


def test_a_run_folder_points_at_its_checkpoints(checkpoint, tmp_path):
    import shutil

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, run / "best")
    shutil.copytree(checkpoint, run / "final")
    with pytest.raises(UserError, match="not a checkpoint directory") as err:
        Extractor.from_pretrained(run)
    assert f"{run / 'best'} or {run / 'final'}" in str(err.value)
    assert "\n" not in str(err.value)
    assert Extractor.from_pretrained(run / "final").entity_types == ["Peop", "Org", "Loc"]


def test_bad_devices_are_user_errors(checkpoint):
    with pytest.raises(UserError, match="device: not a torch device"):
        Extractor.from_pretrained(checkpoint, device="gpu9")


def test_importing_the_package_does_not_load_torch():
    code = "import sys, anchoralign, anchoralign.tokenize; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
