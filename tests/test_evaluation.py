"""Evaluation: teacher-forced loss terms averaged over batches, and the one scoring path."""

from __future__ import annotations

import re

import pytest
from model_fixtures import TOY_META, tiny_model, toy_samples
from trainer_fixtures import FEATURES, StandIn, collate, samples

from anchoralign.config import DecodeConfig
from anchoralign.errors import UserError
from anchoralign.evaluation import evaluate_split, mean_loss_terms, selection_score
from anchoralign.losses import LOSS_KEYS


def test_mean_loss_terms_weights_batches_by_size() -> None:
    def loss_fn(outputs, batch, weights):
        # The batch's mean of x[:, 0] as every term, so the expected value is the overall mean.
        v = batch["x"][:, 0].mean()
        return {k: v for k in LOSS_KEYS}

    got = mean_loss_terms(
        StandIn(), samples(10), collate, loss_fn, {"ce_ner": 1.0}, batch_size=4, device="cpu"
    )
    assert got["loss"] == pytest.approx(float(FEATURES[:10, 0].mean()), abs=1e-6)
    assert set(got) == set(LOSS_KEYS)


def test_evaluate_split_scores_and_names_its_rates() -> None:
    model = tiny_model().eval()
    gold = toy_samples()
    result = evaluate_split(model, gold, DecodeConfig(max_len=6), TOY_META, validity=True)
    scores = result.scores
    for key in ("ner_f1", "rel_strict_f1", "rel_boundary_f1", "complete_rate", "free_valid_rate", "n_split"):
        assert key in scores, key
    assert 0.0 <= scores["complete_rate"] <= 1.0 and 0.0 <= scores["free_valid_rate"] <= 1.0
    assert [p.sample.id for p in result.predictions] == [s.id for s in gold]
    # The decoder sees ids and tokens only.
    assert all(p.sample.tokens == s.tokens for p, s in zip(result.predictions, gold, strict=True))
    assert "free_valid_rate" not in evaluate_split(model, gold, DecodeConfig(max_len=6), TOY_META).scores


def test_selection_score_is_the_primary_a_named_score_or_the_mean_of_several() -> None:
    scores = {"primary": "rel_strict_f1", "rel_strict_f1": 60.0, "ner_f1": 82.0, "n_samples": 231}
    assert selection_score(scores, None) == ("rel_strict_f1", 60.0)
    assert selection_score({**scores, "primary": "ner_f1"}, None) == ("ner_f1", 82.0)
    assert selection_score(scores, "ner_f1") == ("ner_f1", 82.0)
    # A joint extractor judged on both: (82 + 60) / 2.
    assert selection_score(scores, "ner_f1+rel_strict_f1") == ("mean(ner_f1, rel_strict_f1)", 71.0)
    for bad, named in (("ner_f2", "ner_f2"), ("ner_f1+primary", "primary"), ("ner_f1+", "an empty name")):
        with pytest.raises(
            UserError, match=rf"'{re.escape(bad)}': {named} is not a score; choose from ner_f1, rel_strict_f1"
        ):
            selection_score(scores, bad)
