"""The collator: sub-word alignment, decoder inputs and labels, pairs, masks, and no truncation."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import (
    TOY_META,
    one_cpu_thread,  # noqa: F401  (autouse)
    toy_samples,
)
from transformers import AutoTokenizer

from anchoralign.backbones import minilm_dir
from anchoralign.batching import Collator
from anchoralign.errors import UserError
from anchoralign.linearize import IGNORE, LabelSet, Paradigm, decoder_pairs, linearize
from anchoralign.model import add_label_tokens
from anchoralign.schema import Sample

LABELS = LabelSet.from_meta(TOY_META)


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    add_label_tokens(tok, TOY_META)
    return tok


@pytest.fixture(scope="module")
def batch(tokenizer):
    return Collator(tokenizer, LABELS, Paradigm.GROUPED_ALL, max_length=64)(toy_samples())


def test_input_ids_are_special_tokens_around_per_word_pieces(tokenizer, batch):
    samples = toy_samples()
    for b, s in enumerate(samples):
        pieces = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in s.tokens]
        expected = [tokenizer.cls_token_id, *[p for ps in pieces for p in ps], tokenizer.sep_token_id]
        n = len(expected)
        assert batch["input_ids"][b, :n].tolist() == expected
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["input_ids"][b, n:] == tokenizer.pad_token_id).all()


def test_word_starts_point_at_each_words_first_piece(tokenizer, batch):
    # "Pusterla" is several word pieces, so the word after it starts more than one position later.
    s = toy_samples()[1]
    starts = batch["word_starts"][1, : len(s.tokens)].tolist()
    n_pusterla = len(tokenizer("Pusterla", add_special_tokens=False)["input_ids"])
    assert n_pusterla > 1
    assert starts[:3] == [1, 2, 2 + n_pusterla]
    for i, word in enumerate(s.tokens):
        first = tokenizer(word, add_special_tokens=False)["input_ids"][0]
        assert batch["input_ids"][1, starts[i]].item() == first
    assert batch["word_mask"].sum(1).tolist() == [len(x.tokens) for x in toy_samples()]


def test_vocab_mask_excludes_bos_and_words_past_the_sentence(batch):
    n_fixed = LABELS.n_fixed
    mask = batch["vocab_mask"]
    assert mask.shape == (3, n_fixed + 8)
    assert not mask[:, 0].any()
    assert mask[:, 1:n_fixed].all()
    assert mask[2, n_fixed : n_fixed + 3].all() and not mask[2, n_fixed + 3 :].any()


def test_decoder_inputs_and_labels_are_the_shifted_targets(batch):
    for b, s in enumerate(toy_samples()):
        t = linearize(s, LABELS, Paradigm.GROUPED_ALL)
        for name in ("ner", "fwd", "rev"):
            target = getattr(t, name)
            labels = batch[f"{name}_labels"][b].tolist()
            inputs = batch[f"{name}_input"][b].tolist()
            n = len(target)
            assert labels[:n] == target and set(labels[n:]) <= {IGNORE}
            assert inputs[:n] == [0, *target[:-1]] and set(inputs[n:]) <= {1}


def test_pairs_are_decoder_pairs_with_the_batch_index(batch):
    expected = {"ner_fwd": [], "ner_rev": [], "fwd_rev": []}
    for b, s in enumerate(toy_samples()):
        for key, pairs in decoder_pairs(linearize(s, LABELS)).items():
            expected[key] += [[b, i, j] for i, j in pairs]
    for key, rows in expected.items():
        assert batch[f"{key}_pairs"].dtype == torch.long
        assert batch[f"{key}_pairs"].tolist() == rows
    assert len(expected["ner_fwd"]) > 0  # the toy data does exercise alignment


def test_neg_mask_is_valid_ids_in_no_target(batch):
    n_fixed = LABELS.n_fixed
    neg = batch["neg_mask"]
    # Sentence 1 "Ann Lee works for Acme in Oslo .": words 2 ("works"), 3, 5, 7 are in no target.
    for word, negative in [(0, False), (1, False), (2, True), (3, True), (4, False), (5, True), (6, False)]:
        assert neg[0, n_fixed + word].item() is negative
    assert not neg[:, 0].any() and not neg[:, 1].any()  # <bos> invalid, <eos> in every target
    assert neg[2, 2].item() and not neg[0, 2].item()  # <sep> only written when there are relations
    assert not (neg & ~batch["vocab_mask"]).any()  # padding words are never negatives


def test_words_without_pieces_become_unknown_and_mask_tokens_stay_whole(tokenizer):
    s = Sample(id="odd", tokens=["a", "\u200b", "<mask3>", "b"])
    inputs = Collator(tokenizer, LABELS, max_length=64).inputs([s])
    ids = inputs["input_ids"][0].tolist()
    starts = inputs["word_starts"][0].tolist()
    assert len(starts) == 4 and len(ids) == 6  # one id per word: no word was dropped
    assert ids[starts[1]] == tokenizer.unk_token_id
    assert ids[starts[2]] == tokenizer.convert_tokens_to_ids("<mask3>")


def test_too_long_sentence_is_refused_not_truncated(tokenizer):
    s = Sample(id="long-1", tokens=["word"] * 20)
    collate = Collator(tokenizer, LABELS, max_length=21)
    with pytest.raises(UserError, match=r"sample 'long-1'.*22 sub-word tokens.*max_length 21"):
        collate([s])
    assert collate.inputs([Sample(id="ok", tokens=["word"] * 19)])["input_ids"].shape == (1, 21)


def test_too_long_target_is_refused(tokenizer):
    s = toy_samples()[0]
    with pytest.raises(UserError, match=r"sample 's1': the fwd target has 11 tokens"):
        Collator(tokenizer, LABELS, max_length=64, max_target_length=8)([s])  # ner (8 tokens) fits


def test_whitespace_sensitive_tokenizers_get_a_leading_space():
    from model_fixtures import byte_level_tokenizer

    tok = byte_level_tokenizer()
    collate = Collator(tok, LABELS, max_length=64)
    assert collate.pieces.prefix == " "
    ids = collate.inputs([Sample(id="x", tokens=["Acme", "hired", "Ann"])])["input_ids"][0].tolist()
    assert ids[1:-1] == tok(" Acme hired Ann", add_special_tokens=False)["input_ids"]


def test_word_pieces_are_the_tokenizers_own_ids_whatever_its_padding_state(tokenizer):
    from anchoralign.batching import WordPieces

    words = ["Ann", "Lee", "FL1402001894", "<Peop>", "<mask3>", "naïve", "\u200b", "", "Zürich"]
    expected = [
        ids or [tokenizer.unk_token_id] for ids in tokenizer(words, add_special_tokens=False)["input_ids"]
    ]
    pieces = WordPieces(tokenizer)
    assert pieces(words) == expected  # the direct path to the tokenizers backend
    tokenizer.backend_tokenizer.enable_padding(length=8)  # left on by some earlier call
    try:
        assert pieces(words) == expected  # the tokenizer's own call, which resets it
    finally:
        tokenizer.backend_tokenizer.no_padding()
