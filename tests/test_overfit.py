"""The model can learn: a tiny model over-fits 30 CoNLL04 sentences, and decoding, parsing and
scoring agree on them (relation strict F1 >= 90 on the sentences it was trained on)."""

from __future__ import annotations

import pytest
from model_fixtures import (
    OVERFIT_MAX_STEPS,
    conll04_first,
    one_cpu_thread,  # noqa: F401  (autouse)
    overfit_checkpoint,
)

from anchoralign.decode import DecodeConfig, predict
from anchoralign.metrics import score
from anchoralign.model import AnchorAlignModel
from anchoralign.schema import Sample

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data):
    directory, losses = overfit_checkpoint(tmp_path_factory, shared_data)
    meta, samples = conll04_first(shared_data)
    return AnchorAlignModel.from_pretrained(directory), meta, samples, losses


def test_training_converges(trained):
    _, _, _, losses = trained
    assert len(losses) <= OVERFIT_MAX_STEPS
    assert losses[-1] < 0.2 and losses[-1] < losses[0] / 100


@pytest.mark.parametrize("beam", [1, 3])
def test_decoding_the_training_sentences_reaches_relation_strict_f1_90(trained, beam):
    model, meta, samples, _ = trained
    inputs = [Sample(id=s.id, tokens=s.tokens) for s in samples]  # nothing of the answer goes in
    preds = predict(model, inputs, DecodeConfig(beam=beam))
    metrics = score(samples, [p.sample for p in preds], symmetric=meta.symmetric_relations)
    assert metrics["rel_strict_f1"] >= 90, metrics
    assert metrics["ner_f1"] >= 90, metrics
    assert all(p.valid for p in preds)
