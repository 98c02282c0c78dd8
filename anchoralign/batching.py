"""Samples to model batches (docs/CONTRACTS.md "Batches").

The encoder reads ``<start> sub-words of word 0 ... sub-words of word n-1 <end>`` where start/end
are the tokenizer's own (``[CLS]``/``[SEP]`` or ``<s>``/``</s>``). Each word is tokenised on its
own so that the first sub-word of every word is known exactly (``word_starts``); whitespace-
sensitive tokenizers (byte-level BPE) get a leading space so every word takes its mid-sentence
form. A word the tokenizer turns into nothing (a zero-width or control character) becomes the
unknown token, so no word is ever dropped and word ``i`` is always pointer id ``n_fixed + i``.

Nothing is ever truncated: an input longer than ``max_length`` sub-words (with the two special
tokens) or a target longer than the decoder's positions raises a UserError naming the sample.

The collator takes samples, or :class:`Encoded` samples whose words' sub-word ids were computed
once, when the training set was cached (``anchoralign.training_set``), with this same
:class:`WordPieces`; it tokenises only what comes without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from anchoralign.errors import UserError
from anchoralign.linearize import (
    DECODERS,
    EOS,
    IGNORE,
    LabelSet,
    Paradigm,
    Targets,
    as_paradigm,
    decoder_pairs,
    gold_structure,
    linearize,
)
from anchoralign.relation_head import entity_pairs, pair_inputs, pair_targets, typed_spans
from anchoralign.schema import Sample
from anchoralign.span_head import span_labels

PAIR_KEYS = {"ner_fwd": "ner_fwd_pairs", "ner_rev": "ner_rev_pairs", "fwd_rev": "fwd_rev_pairs"}


class SpecialIds(NamedTuple):
    """The tokenizer's own sequence-start, sequence-end, padding and unknown ids."""

    start: int
    end: int
    pad: int
    unk: int


def special_ids(tokenizer: Any) -> SpecialIds:
    """``[CLS]``/``[SEP]`` for BERT-like tokenizers, ``<s>``/``</s>`` for BART-like ones: the one place
    that knows which names a tokenizer may use."""
    return SpecialIds(
        start=_first_id(tokenizer, "cls_token_id", "bos_token_id"),
        end=_first_id(tokenizer, "sep_token_id", "eos_token_id"),
        pad=_first_id(tokenizer, "pad_token_id", "eos_token_id"),
        unk=_first_id(tokenizer, "unk_token_id", "pad_token_id"),
    )


class Encoded(NamedTuple):
    """A sample with the sub-word ids of each of its words (``WordPieces(tokenizer)(sample.tokens)``)."""

    sample: Sample
    pieces: list[list[int]]


Item = Sample | Encoded


def sample_of(item: Item) -> Sample:
    return item.sample if isinstance(item, Encoded) else item


class WordPieces:
    """Per-word sub-word ids for one tokenizer, with its start/end/pad/unknown ids."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.start_id, self.end_id, self.pad_id, self.unk_id = special_ids(tokenizer)
        # A tokenizer for which " a" and "a" differ keeps spaces in its pieces (byte-level BPE):
        # words inside a sentence follow a space, so give every word one.
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        spaced = tokenizer(" a", add_special_tokens=False)["input_ids"]
        self.prefix = " " if plain != spaced else ""

    def __call__(self, words: Sequence[str]) -> list[list[int]]:
        if not words:
            return []
        texts = [self.prefix + w for w in words]
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.padding is None and backend.truncation is None:
            # What tokenizer(texts) computes, without building its BatchEncoding: about 7 times
            # faster a word. (With padding or truncation left on the backend, the tokenizer's own
            # call, which switches them off first, is the safe one.)
            encoded = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        else:
            encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [ids if ids else [self.unk_id] for ids in encoded]

    def input_length(self, words: Sequence[str]) -> int:
        """Encoder length of a sentence: its sub-words plus the start and end tokens."""
        return sum(len(p) for p in self(words)) + 2


def too_long(sample: Sample, input_length: int, max_length: int, where: str = "") -> UserError:
    """The error for an input the encoder cannot take whole (inputs are never truncated)."""
    return UserError(
        f"{where}sample {sample.id!r}: {len(sample.tokens)} words make {input_length} sub-word tokens, more "
        f"than max_length {max_length}; split the sentence or raise max_length (never truncated)"
    )


def _first_id(tokenizer: Any, *names: str) -> int:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise UserError(f"the tokenizer defines none of {', '.join(names)}")


class Collator:
    """``Collator(tokenizer, labels, paradigm, max_length)(samples)`` -> dict of tensors."""

    def __init__(
        self,
        tokenizer: Any,
        labels: LabelSet,
        paradigm: int | Paradigm = Paradigm.GROUPED_ALL,
        max_length: int = 512,
        max_target_length: int | None = None,
        align_positions: str = "decision",
        span_width: int = 0,
        relation_pairs: bool = False,
    ):
        self.pieces = WordPieces(tokenizer)
        self.span_width = span_width  # > 0: the gold classes of the span head's spans too
        self.relation_pairs = relation_pairs  # the relation heads' gold entity pairs and targets too
        self.align_positions = align_positions
        self.labels = labels
        self.paradigm = as_paradigm(paradigm)
        self.max_length = max_length
        self.max_target_length = max_target_length

    def __call__(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """Inputs, the three decoders' inputs and labels, alignment pairs, the negative mask and,
        with a span head, the gold class of every span (``span_labels``)."""
        batch = self.inputs(items)
        samples = [sample_of(x) for x in items]
        targets = [linearize(s, self.labels, self.paradigm) for s in samples]
        for s, t in zip(samples, targets, strict=True):
            self._check_target_length(s, t)
        for name in DECODERS:
            seqs = [getattr(t, name) for t in targets]
            batch[f"{name}_input"] = _pad([[0, *seq[:-1]] for seq in seqs], EOS)
            batch[f"{name}_labels"] = _pad(seqs, IGNORE)
        pairs = {key: [] for key in PAIR_KEYS}
        for b, t in enumerate(targets):
            for key, found in decoder_pairs(t, self.align_positions).items():
                pairs[key].extend((b, i, j) for i, j in found)
        for key, name in PAIR_KEYS.items():
            batch[name] = torch.tensor(pairs[key], dtype=torch.long).reshape(-1, 3)
        batch["neg_mask"] = self._neg_mask(batch["vocab_mask"], targets)
        if self.span_width:
            batch["span_labels"] = span_labels(
                [[(e.start, e.end, e.type) for e in s.entities] for s in samples],
                [len(s.tokens) for s in samples],
                batch["word_mask"].shape[1],
                self.span_width,
                self.labels.entity_types,
            )
        if self.relation_pairs:
            batch.update(self._pairs(samples))
        return batch

    def _pairs(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """``pair_entities``, ``pair_index`` (``relation_head.pair_inputs``) and ``pair_targets`` of every
        ordered pair of each sample's gold entities."""
        sentences, targets = [], []
        for sample in samples:
            spans, triples = gold_structure(sample, self.labels)
            pairs = entity_pairs(spans)
            sentences.append((typed_spans(spans, self.labels.entity_types), pairs))
            targets.append(pair_targets(spans, pairs, triples, self.labels.relation_types))
        entities, index = pair_inputs(sentences)
        return {"pair_entities": entities, "pair_index": index, "pair_targets": torch.cat(targets)}

    def inputs(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """The encoder side only (what decoding needs): input ids, word starts and the vocab mask."""
        if not items:
            raise ValueError("cannot collate an empty list of samples")
        samples = [sample_of(x) for x in items]
        # One tokenizer call for all the words that come without their sub-words.
        flat = self.pieces([w for x in items if not isinstance(x, Encoded) for w in x.tokens])
        rows, starts = [], []
        offset = 0
        for x, s in zip(items, samples, strict=True):
            if isinstance(x, Encoded):
                pieces = x.pieces
            else:
                pieces, offset = flat[offset : offset + len(s.tokens)], offset + len(s.tokens)
            ids = [self.pieces.start_id]
            word_starts = []
            for word_pieces in pieces:
                word_starts.append(len(ids))
                ids.extend(word_pieces)
            ids.append(self.pieces.end_id)
            if len(ids) > self.max_length:
                raise too_long(s, len(ids), self.max_length)
            rows.append(ids)
            starts.append(word_starts)
        input_ids = _pad(rows, self.pieces.pad_id)
        attention_mask = _pad([[1] * len(r) for r in rows], 0)
        word_starts = _pad(starts, 0)
        word_mask = _pad([[1] * len(w) for w in starts], 0).bool()
        n_fixed = self.labels.n_fixed
        fixed = torch.ones(len(samples), n_fixed, dtype=torch.bool)
        fixed[:, 0] = False  # <bos> is a decoder input, never an output
        vocab_mask = torch.cat([fixed, word_mask], dim=1)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "word_starts": word_starts,
            "word_mask": word_mask,
            "vocab_mask": vocab_mask,
        }

    def _check_target_length(self, sample: Sample, targets: Targets) -> None:
        if self.max_target_length is None:
            return
        for name in DECODERS:
            n = len(getattr(targets, name))
            if n > self.max_target_length:
                raise UserError(
                    f"sample {sample.id!r}: the {name} target has {n} tokens, more than the decoder's "
                    f"{self.max_target_length} positions"
                )

    @staticmethod
    def _neg_mask(vocab_mask: torch.Tensor, targets: Sequence[Targets]) -> torch.Tensor:
        used = torch.zeros_like(vocab_mask)
        for b, t in enumerate(targets):
            ids = torch.tensor(sorted({*t.ner, *t.fwd, *t.rev}), dtype=torch.long)
            used[b, ids] = True
        return vocab_mask & ~used


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out
