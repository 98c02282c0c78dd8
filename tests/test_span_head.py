"""The span head: its gold classes, loss and decoding against hand-computed values, the model and
checkpoint plumbing, decoding through it, and a training run that learns with it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from model_fixtures import TOY_META, init_from_config, toy_samples
from test_train_e2e import rows, sft_with_a_head

from anchoralign.config import DecodeConfig, SFTConfig
from anchoralign.decode import predict
from anchoralign.errors import UserError
from anchoralign.linearize import IGNORE
from anchoralign.model import AnchorAlignModel
from anchoralign.span_head import (
    SpanHead,
    decode_spans,
    span_labels,
    span_loss,
    span_mask,
    span_maxima,
    too_wide,
    word_maxima,
)
from anchoralign.stages import load_model

TYPES = ("Peop", "Org")
X = IGNORE


def test_span_labels_mark_each_mention_and_ignore_what_lies_outside() -> None:
    # Sentence 0 has 3 words, sentence 1 two; spans of up to 2 words. (0, 3) is too wide.
    mentions = [[(0, 2, "Peop"), (2, 3, "Org")], [(0, 1, "Org"), (0, 3, "Peop")]]
    got = span_labels(mentions, [3, 2], padded_words=3, width=2, types=TYPES)
    # [sentence][start word][width - 1]
    assert got.tolist() == [
        [[0, 1], [0, 0], [2, X]],
        [[2, 0], [0, X], [X, X]],
    ]
    assert too_wide(mentions, 2) == 1
    word_mask = torch.tensor([[True, True, True], [True, True, False]])
    assert torch.equal(span_mask(word_mask, 2), got != IGNORE)


def test_span_loss_is_the_mean_cross_entropy_of_the_spans_inside() -> None:
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 0, 0] = torch.tensor([0.0, math.log(3.0)])  # p(class 1) = 3/4
    labels = torch.tensor([[[1], [0]]])
    expected = (-math.log(0.75) + math.log(2.0)) / 2
    assert span_loss(logits, labels).item() == pytest.approx(expected)
    labels[0, 1, 0] = IGNORE  # only the first span counts now
    assert span_loss(logits, labels).item() == pytest.approx(-math.log(0.75))
    assert span_loss(logits, torch.full_like(labels, IGNORE)).item() == 0.0


def test_decode_keeps_the_most_probable_spans_that_do_not_overlap() -> None:
    logits = torch.zeros(4, 2, 3)  # 4 padded words, widths 1-2, classes none/Peop/Org
    logits[:, :, 0] = 5.0  # "not an entity" everywhere unless set below
    logits[0, 1] = torch.tensor([0.0, 3.0, 0.0])  # (0, 2) Peop, p ~ 0.91
    logits[1, 0] = torch.tensor([0.0, 0.0, 4.0])  # (1, 2) Org, p ~ 0.96: overlaps (0, 2), wins
    logits[2, 0] = torch.tensor([0.0, 1.0, 0.0])  # (2, 3) Peop, p ~ 0.58
    logits[2, 1] = torch.tensor([0.0, 0.0, 9.0])  # (2, 4): past the 3-word sentence, never taken
    assert decode_spans(logits, 3, TYPES) == [(1, 2, "Org"), (2, 3, "Peop")]
    # A span whose likeliest class is "not an entity" (0.44) but that is an entity with p 0.56,
    # split between two types, is kept as its likelier type.
    logits[2, 1] = torch.tensor([5.0, 0.0, 0.0])  # (2, 4), inside a 4-word sentence: none
    logits[3, 0] = torch.tensor([1.0, 0.6, 0.5])  # (3, 4): p(none) 0.44, Peop 0.29, Org 0.27
    assert decode_spans(logits, 4, TYPES) == [(1, 2, "Org"), (2, 3, "Peop"), (3, 4, "Peop")]
    # Higher thresholds keep fewer: (3, 4) at p 0.56, then (2, 3) at 0.79.
    assert decode_spans(logits, 4, TYPES, threshold=0.65) == [(1, 2, "Org"), (2, 3, "Peop")]
    assert decode_spans(logits, 4, TYPES, threshold=0.8) == [(1, 2, "Org")]


def test_span_head_is_the_classifier_of_first_word_last_word_and_width() -> None:
    torch.manual_seed(0)
    head = SpanHead(hidden=6, n_types=2, width=3, dropout=0.0).eval()
    words = torch.randn(2, 4, 6)
    got = head(words)
    assert got.shape == (2, 4, 3, 3)
    for b in range(2):
        for i in range(4):
            for w in range(3):
                last = min(i + w, 3)  # spans past the end are computed, and masked by the labels
                x = head.start(words[b, i]) + head.end(words[b, last]) + head.widths.weight[w]
                assert torch.allclose(got[b, i, w], head.out(x), atol=1e-6)


def test_word_maxima_take_each_words_maximum_over_its_sub_words() -> None:
    # [CLS] ann ##a lee [SEP] [PAD]  |  [CLS] bo b ##ob x [SEP]; "b" twice: the second word of
    # the second sentence has no sub-word of its own (its start is the third word's).
    hidden = torch.tensor(
        [
            [[9.0, 9.0], [1.0, 5.0], [3.0, 2.0], [4.0, 4.0], [9.0, 9.0], [9.0, 9.0]],
            [[9.0, 9.0], [2.0, 0.0], [0.0, 7.0], [6.0, 1.0], [5.0, 5.0], [9.0, 9.0]],
        ]
    )
    word_starts = torch.tensor([[1, 3, 0, 0], [1, 2, 2, 4]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    first = hidden.gather(1, word_starts[..., None].expand(-1, -1, 2))  # the model's word states
    got = word_maxima(hidden, first, word_starts, attention_mask)
    expected = [
        [[3.0, 5.0], [4.0, 4.0], [9.0, 9.0], [9.0, 9.0]],  # past the last word: the state at 0
        [[2.0, 0.0], [0.0, 7.0], [6.0, 7.0], [5.0, 5.0]],
    ]
    assert got.tolist() == expected


def test_span_maxima_run_the_maximum_over_each_spans_words() -> None:
    maxima = torch.tensor([[[1.0], [3.0], [2.0]]])
    assert span_maxima(maxima, 2)[0, :, :, 0].tolist() == [[1.0, 3.0], [3.0, 3.0], [2.0, 2.0]]


def test_a_pooled_span_head_adds_the_spans_maximum_and_needs_it() -> None:
    torch.manual_seed(0)
    head = SpanHead(hidden=6, n_types=2, width=3, dropout=0.0, pooled=True).eval()
    words, maxima = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    got = head(words, maxima)
    for b in range(2):
        for i in range(4):
            for w in range(3):
                last = min(i + w, 3)
                pooled = maxima[b, i : last + 1].max(0).values
                x = (
                    head.start(words[b, i])
                    + head.end(words[b, last])
                    + head.widths.weight[w]
                    + head.pool(pooled)
                )
                assert torch.allclose(got[b, i, w], head.out(x), atol=1e-6)
    with pytest.raises(ValueError, match="needs the word maxima"):
        head(words)


def test_a_pooled_span_head_is_saved_and_decodes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AnchorAlignModel.from_backbone("tiny", TOY_META)
    model.add_span_head(3, pooled=True)
    again = AnchorAlignModel.from_pretrained(model.save_pretrained(tmp_path / "pooled"))
    assert again.span_pooled and again.span_width == 3 and again.span_head.pool is not None
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    model.eval()
    cfg = DecodeConfig(max_len=8, entities="ner", anchor="reported", span_threshold=0.01)
    predicted = [p.sample.entities for p in predict(model, toy_samples(), cfg)]
    assert predicted == [p.sample.entities for p in predict(again, toy_samples(), cfg)]
    assert all(predicted)  # a threshold near 0 reports a mention in every sentence


@pytest.fixture(scope="module")
def with_head(tmp_path_factory: pytest.TempPathFactory) -> tuple[AnchorAlignModel, Path]:
    torch.manual_seed(0)
    model = AnchorAlignModel.from_backbone("tiny", TOY_META, span_width=3)
    return model, model.save_pretrained(tmp_path_factory.mktemp("span") / "model")


def test_a_model_with_a_span_head_scores_spans_and_saves_it(with_head) -> None:
    model, saved = with_head
    batch = model.collator()(toy_samples())
    assert batch["span_labels"].shape == (3, 8, 3)  # 3 sentences of up to 8 words, widths 1-3
    out = model(batch)
    assert out["span_logits"].shape == (3, 8, 3, 4)  # none + 3 entity types
    assert "span_logits" not in model(batch, spans=False)
    counts = model.parameter_counts()
    assert counts["span_head"] > 0 and counts["total"] == sum(p.numel() for p in model.parameters())
    assert all(n.startswith("span_head.") for n in model.new_parameter_names())  # BART provides the rest
    again = AnchorAlignModel.from_pretrained(saved)
    assert again.span_width == 3
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_init_from_adds_a_span_head_or_refuses_another_width(with_head, tmp_path: Path) -> None:
    model, saved = with_head
    plain = AnchorAlignModel.from_backbone("tiny", TOY_META).save_pretrained(tmp_path / "plain")

    def cfg(init_from: Path, width: int) -> SFTConfig:
        return init_from_config(tmp_path / "o", init_from, span_head_width=width)

    grown = load_model(cfg(plain, 4), TOY_META)
    assert grown.span_width == 4 and grown.span_head is not None
    assert load_model(cfg(saved, 3), TOY_META).span_width == 3
    with pytest.raises(
        UserError, match="has a span head of width 3 but the config has model.span_head_width=0"
    ):
        load_model(cfg(saved, 0), TOY_META)


def test_decoding_takes_the_mentions_of_the_span_head(with_head) -> None:
    model, _ = with_head
    head = model.span_head
    # A head that calls every one-word span a Peop and nothing else an entity.
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.widths.weight[0, 0] = 1.0
        head.out[2].weight[1, 0] = 10.0  # class 1 = Peop, from the width-1 feature alone
        head.out[2].bias[0] = 0.5  # "not an entity" wherever that feature is 0
    samples = toy_samples()
    # Anchored on the reported entities, relations can only add mentions the head already found.
    cfg = DecodeConfig(max_len=12, entities="ner", anchor="reported")
    for pred, sample in zip(predict(model, samples, cfg), samples, strict=True):
        assert [(e.start, e.end, e.type) for e in pred.sample.entities] == [
            (i, i + 1, "Peop") for i in range(len(sample.tokens))
        ]
        assert pred.outputs["ner"]  # the NER decoder still ran
    # ner_source=decoder: the NER decoder's mentions again (an untrained one: not the head's).
    decoder = predict(model, samples, DecodeConfig(max_len=12, entities="ner", ner_source="decoder"))
    assert [p.sample.entities for p in decoder] != [p.sample.entities for p in predict(model, samples, cfg)]
    plain = AnchorAlignModel.from_backbone("tiny", TOY_META)
    with pytest.raises(UserError, match="ner_source=span_head: this checkpoint has no span head"):
        predict(plain, samples, DecodeConfig(max_len=12, ner_source="span_head"))


def test_training_with_a_span_head_lowers_its_loss(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "sft"
    done = sft_with_a_head(out, shared_data, "--model.span_head_width=4")
    assert done.returncode == 0, done.stderr[-4000:]
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "span head: spans of up to 4 words;" in log and "of the evaluation split are wider" in log
    assert "loss terms: ce, span x1" in log
    spans = [r["span"] for r in rows(out, "train")]
    assert len(spans) >= 4 and spans[-1] < 0.5 * spans[0]
    assert all(r["span"] > 0 for r in rows(out, "eval_loss"))  # scored on dev as well
    assert AnchorAlignModel.from_pretrained(out / "final").span_width == 4
