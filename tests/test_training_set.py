"""Training sets: the cache is built once, reused, and rebuilt when its source or tokenizer changes;
the lazy view gives what the records hold, with the sub-words the collator would compute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from schema_fixtures import PEOP_ORG_META

from anchoralign.backbones import minilm_dir
from anchoralign.batching import Collator, WordPieces
from anchoralign.errors import RecordError, UserError
from anchoralign.linearize import LabelSet
from anchoralign.schema import DatasetMeta, Sample, to_hf_dataset, write_jsonl
from anchoralign.training_set import CACHE_ENV, TrainingSet, in_memory, open_cached, sample_lengths

REPO = Path(__file__).resolve().parent.parent
META = PEOP_ORG_META
WORDS = [
    "Ann",
    "Lee",
    "works",
    "for",
    "Acme",
    "Corporation",
    "in",
    "Oslo",
    ",",
    "says",
    "Reuters'",
    "correspondent",
    "<mask0>",
    ".",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tok.add_tokens(["<mask0>"], special_tokens=True)
    return tok


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def samples(n: int, offset: int = 0) -> list[Sample]:
    out = []
    for i in range(offset, offset + n):
        k = 4 + (i * 7) % (len(WORDS) - 3)
        entities = [
            {"start": 0, "end": 2, "type": "Peop"},
            {"start": 2 + i % 2, "end": 3 + i % 2, "type": "Org"},
        ]
        relations = [{"head": 0, "tail": 1, "type": "Work_For"}] * (i % 3 > 0)
        out.append(Sample(id=f"s{i}", tokens=WORDS[:k], entities=entities, relations=relations))
    return out


class Notes(list):
    def __call__(self, line: str) -> None:
        self.append(line)


def test_built_once_then_reused(tmp_path: Path, cache: Path, tokenizer) -> None:
    path = tmp_path / "corpus" / "masked.jsonl"
    write_jsonl(path, samples(50))
    notes = Notes()
    first = open_cached(path, tokenizer, META, notes)
    second = open_cached(path, tokenizer, META, notes)
    assert "50 samples tokenised in" in notes[0] and "50 samples from the cache" in notes[1]
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [f"masked-{p}" for p in _keys(cache)]
    assert len(first) == len(second) == 50
    assert first.data.cache_files and second.data.cache_files  # memory-mapped from the entry


def _keys(cache: Path) -> list[str]:
    return [p.name.split("-", 1)[1] for p in cache.iterdir() if p.is_dir()]


def test_rebuilt_when_the_source_changes_and_the_old_entry_removed(
    tmp_path: Path, cache: Path, tokenizer
) -> None:
    path = tmp_path / "unmasked.jsonl"
    write_jsonl(path, samples(10))
    open_cached(path, tokenizer, META)
    old = set(_keys(cache))
    write_jsonl(path, samples(12))
    notes = Notes()
    data = open_cached(path, tokenizer, META, notes)
    assert len(data) == 12 and "tokenised in" in notes[0]
    assert len(_keys(cache)) == 1 and set(_keys(cache)) != old  # the stale entry is gone


def test_rebuilt_for_another_tokenizer_or_label_set(tmp_path: Path, cache: Path, tokenizer) -> None:
    from transformers import AutoTokenizer

    path = tmp_path / "masked.jsonl"
    write_jsonl(path, samples(10))
    a = open_cached(path, tokenizer, META)
    other = AutoTokenizer.from_pretrained(str(minilm_dir()))  # without the <mask0> token
    b = open_cached(path, other, META)
    wider = DatasetMeta(**{**META.__dict__, "entity_types": {**META.entity_types, "Loc": "location"}})
    open_cached(path, tokenizer, wider)
    assert len(_keys(cache)) == 3  # different tokenizers and labels coexist
    i = len(WORDS) - 2  # <mask0>: one added token for the first, word pieces for the other
    long = next(k for k in range(10) if len(a[k].sample.tokens) > i)
    assert len(a[long].pieces[i]) == 1 and len(b[long].pieces[i]) > 1


def test_lazy_view_gives_samples_pieces_and_lengths(tmp_path: Path, cache: Path, tokenizer) -> None:
    path = tmp_path / "masked.jsonl"
    data = samples(40)
    write_jsonl(path, data)
    view = open_cached(path, tokenizer, META)
    pieces = WordPieces(tokenizer)
    assert [x.sample for x in view] == data
    assert all(x.pieces == pieces(s.tokens) for x, s in zip(view, data, strict=True))
    assert list(view.input_lengths) == [pieces.input_length(s.tokens) for s in data]
    assert list(sample_lengths(view)) == [len(s.tokens) for s in data] == list(sample_lengths(data))
    assert list(view.relation_counts()) == [len(s.relations) for s in data]
    part = view[5:15].select([9, 0, 3])
    assert [x.sample.id for x in part] == ["s14", "s5", "s8"]
    assert list(part.input_lengths) == [view.input_lengths[i] for i in (14, 5, 8)]
    assert list(part.word_counts) == [len(data[i].tokens) for i in (14, 5, 8)]
    assert view[-1].sample == data[-1]
    with pytest.raises(IndexError):
        view[40]
    assert isinstance(view, TrainingSet) and in_memory(data, tokenizer, "x")[7] == view[7]


def test_encoded_samples_collate_as_plain_samples(tokenizer) -> None:
    data = samples(6)
    labels = LabelSet.from_meta(META)
    collate = Collator(tokenizer, labels, max_length=64)
    encoded = list(in_memory(data, tokenizer, "train"))
    mixed = [encoded[0], data[1], encoded[2], data[3], data[4], encoded[5]]
    plain = collate(data)
    for batch in (collate(encoded), collate(mixed)):
        assert batch.keys() == plain.keys()
        for k in plain:
            assert torch.equal(batch[k], plain[k]), k


def test_saved_datasets_folder_as_input(tmp_path: Path, cache: Path, tokenizer) -> None:
    data = samples(20)
    folder = tmp_path / "masked"
    to_hf_dataset(data).save_to_disk(str(folder))
    view = open_cached(folder, tokenizer, META)
    assert [x.sample for x in view] == data


def test_bad_records_and_labels_are_named_and_nothing_is_cached(
    tmp_path: Path, cache: Path, tokenizer
) -> None:
    path = tmp_path / "masked.jsonl"
    write_jsonl(path, samples(5))
    with path.open("a") as f:
        f.write(
            json.dumps({"id": "x", "tokens": ["a"], "entities": [{"start": 0, "end": 1, "type": "Gene"}]})
            + "\n"
        )
    with pytest.raises(
        RecordError, match=r"masked.jsonl:6: field 'entities': entity type 'Gene' is not a toy label"
    ):
        open_cached(path, tokenizer, META)
    assert not [p for p in cache.iterdir() if p.is_dir()]  # no entry, no temporary folder left
    with pytest.raises(RecordError, match="file not found"):
        open_cached(tmp_path / "none.jsonl", tokenizer, META)


def test_too_long_sample_is_refused_before_training(tmp_path: Path, tokenizer) -> None:
    data = samples(3) + [Sample(id="long", tokens=["word"] * 70)]
    view = in_memory(data, tokenizer, "toy train")
    view.check_lengths(72)
    with pytest.raises(
        UserError,
        match=r"toy train: sample 'long': 70 words make 72 sub-word tokens, more than max_length 71",
    ):
        view.check_lengths(71)


def test_ranks_building_at_once_build_once(tmp_path: Path, cache: Path, tokenizer) -> None:
    path = tmp_path / "masked.jsonl"
    write_jsonl(path, samples(300))
    notes, views = Notes(), []
    threads = [
        threading.Thread(target=lambda: views.append(open_cached(path, tokenizer, META, notes)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum("tokenised in" in n for n in notes) == 1 and sum("from the cache" in n for n in notes) == 2
    assert len(views) == 3 and all(len(v) == 300 for v in views)


# The memory bound: a child process builds and opens the cache of an n-sample corpus in Arrow
# blocks of 256 KB and walks the set as the trainer does (lengths, an epoch order, some rows); its
# peak memory must hardly grow with n. Read as a list of Samples, a corpus takes about 7 KB a sample.
_CHILD = """
import json, resource, sys
from pathlib import Path
import anchoralign.record_tables as rt
rt._BLOCK_BYTES = 1 << 18
from transformers import AutoTokenizer
from anchoralign.backbones import minilm_dir
from anchoralign.schedule import epoch_order
from anchoralign.training_set import open_cached
from tests.schema_fixtures import PEOP_ORG_META as META
tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
data = open_cached(Path(sys.argv[1]), tok, META)
order = epoch_order(0, 0, len(data), data.word_counts, 64 * 8, 8)
rows = [data[i] for i in order[:200]]
print(json.dumps({"n": len(data), "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _peak_kib(path: Path, cache: Path) -> int:
    env = {**os.environ, CACHE_ENV: str(cache), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_kib"]


def test_memory_does_not_grow_with_the_corpus(tmp_path: Path) -> None:
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    write_jsonl(small, samples(2_000))
    write_jsonl(large, samples(40_000))
    grew = _peak_kib(large, tmp_path / "c") - _peak_kib(small, tmp_path / "c")
    # 38,000 more samples: about 260 MB as Sample objects; measured growth about 27 MB (the memory
    # allocators' own), the bound a quarter of the objects' size.
    assert grew < 64 * 1024, f"peak memory grew by {grew / 1024:.0f} MiB"
