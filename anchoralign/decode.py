"""Constrained batched generation with the three decoders, then parsing and aggregation.

One encoding per batch; the NER, forward RE and reverse RE decoders then advance together,
one step each per loop iteration, each with its own key/value cache (only the newest token is
fed at a step). A decoder whose rows have all finished stops being run.

Search: beam search over each decoder independently (``beam=1`` is greedy and uses the
same code). Rows are ``sample * k + beam`` (k = ``cfg.beam``); a beam's score is the sum of its
log-probabilities over the restricted vocabulary; a finished beam keeps its score and can only
continue with ``<eos>`` (at no cost), so finished and running beams compete on probability and
the best beam of each sample is taken at the end.

Grammar (``constrained=True``): a small state machine per row masks the ids that would make the
output unparseable, so every output parses with nothing dropped (``linearize`` rules):

- every decoder: a mention is a run of consecutive, increasing word ids closed by an entity
  label; a new mention may start at any word; ``<eos>`` only where a complete output can end;
- NER: mentions only;
- grouped RE (paradigms 3, 4): ``anchor (partner relation)+ <sep>``, repeated;
- flat RE (paradigms 1, 2): ``first second relation``, repeated.

``constrained=False`` (ablation) allows every valid id at every step; the parser then recovers
what it can and ``Prediction.valid`` says whether it had to drop anything.

Stopping: ``eos_penalty`` is subtracted from the logit of ``<eos>`` at every step, so that the
decoders go on writing where ending was only slightly more likely (recall for precision).

Length: a decoder may write at most ``max_len`` tokens, by default ``3 * n_words + 16`` for a
sentence of ``n_words`` (every target of the bundled datasets' training sets fits in
``3 * n_words + 1``), and never more than the decoder's positions. A row that reaches its bound
without ``<eos>`` is cut there and its prediction is marked invalid, never silently accepted.

Samples are decoded in batches of ``batch_size`` sorted by length (less padding) and returned in
input order. Relations: the forward decoder's, united with the reverse decoder's when
``aggregate``; with ``anchor``, only relations whose two mentions the NER decoder produced.
Entities: the NER decoder's, and with ``entities="union"`` (the default) also the RE decoders'
mentions that overlap none of them (on CoNLL04 +0.85 NER F1 on test and dev, BENCHMARKS.md).
With a span head (``ner_source``: ``auto`` or ``span_head``) its mentions take the NER decoder's
place among the entities reported; the relations' anchor stays on the NER decoder's mentions
(``anchor="reported"`` moves it to the reported entities). The NER decoder still runs, and its
output is kept in ``Prediction.outputs``. With a relation head (``relation_head``: ``auto``), its
vote (``anchoralign.relation_head.vote``) then decides the relations between the reported entities.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from anchoralign.config import DecodeConfig
from anchoralign.errors import UserError
from anchoralign.linearize import (
    ANY_WORD,
    BOS,
    CAT_ENT,
    CAT_EOS,
    CAT_REL,
    CAT_WORD,
    DECODERS,
    DONE,
    EOS,
    N_SPECIAL,
    NEXT_WORD,
    NO_WORD,
    START,
    GrammarState,
    LabelSet,
    Paradigm,
    ParseReport,
    Span,
    Triple,
    grammar_of,
    parse_with_report,
    structure,
)
from anchoralign.model import AnchorAlignModel, EncoderState
from anchoralign.relation_head import entity_pairs, pair_inputs, pair_probabilities, typed_spans, vote
from anchoralign.schema import Sample
from anchoralign.span_head import decode_spans

__all__ = ["DecodeConfig", "Prediction", "generate", "predict", "predict_long"]


@dataclass
class Prediction:
    sample: Sample  # the input id and tokens with the predicted entities and relations
    valid: bool  # every decoder ended with <eos> and the parser dropped nothing
    outputs: dict[str, list[int]] = field(default_factory=dict)  # raw ids of each decoder, up to <eos>
    report: ParseReport | None = None


def default_max_len(n_words: int) -> int:
    return 3 * n_words + 16


# ---------------------------------------------------------------------- grammar


class Grammar:
    """Tensor tables of one decoder's state machine (``linearize.grammar_of``); ``mask`` and
    ``step`` work on all rows at once.

    Without ``self_relations`` a partner mention may not start at its anchor's first word, so a
    relation can never link a mention to itself (an approximation on the safe side: a partner
    nested in its anchor and starting at the same word is refused too).
    """

    def __init__(
        self,
        specs: Sequence[GrammarState],
        labels: LabelSet,
        device: torch.device,
        self_relations: bool = False,
    ):
        n_states = len(specs)
        self.n_fixed = labels.n_fixed
        self.first_relation = N_SPECIAL + len(labels.entity_types)
        allowed = torch.zeros(n_states, 6, dtype=torch.bool)
        # Illegal moves (possible only in unconstrained runs) lead to DONE, the default.
        trans = torch.zeros(n_states, 6, dtype=torch.long)
        word_rule = torch.zeros(n_states, dtype=torch.long)
        for s, spec in enumerate(specs):
            word_rule[s] = spec.words
            if spec.words != NO_WORD:
                allowed[s, CAT_WORD] = True
                trans[s, CAT_WORD] = spec.after_word
            for cat, nxt in spec.moves.items():
                allowed[s, cat] = True
                trans[s, cat] = nxt
        allowed[DONE, CAT_EOS] = True
        self.allowed = allowed.to(device)
        self.trans = trans.to(device)
        self.word_rule = word_rule.to(device)
        self.starts_anchor = torch.tensor([spec.starts_anchor for spec in specs], device=device)
        self.no_self = torch.tensor(
            [spec.starts_partner and not self_relations for spec in specs], device=device
        )
        self.fixed_cat = self.category(torch.arange(self.n_fixed, device=device))

    @classmethod
    def for_decoder(
        cls,
        name: str,
        labels: LabelSet,
        paradigm: Paradigm,
        device: torch.device,
        self_relations: bool = False,
    ) -> Grammar:
        return cls(grammar_of(name, paradigm), labels, device, self_relations)

    def category(self, ids: torch.Tensor) -> torch.Tensor:
        cat = torch.where(ids >= self.first_relation, CAT_REL, torch.where(ids >= N_SPECIAL, CAT_ENT, ids))
        return torch.where(ids >= self.n_fixed, CAT_WORD, cat)

    def mask(
        self,
        state: torch.Tensor,
        last_word: torch.Tensor,
        vocab_mask: torch.Tensor,
        anchor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Legal ids [N,V] for rows in ``state`` whose last emitted word is ``last_word`` (-1: none)
        and whose current anchor starts at word ``anchor`` (-1: none)."""
        fixed = self.allowed[state][:, self.fixed_cat]
        n_words = vocab_mask.shape[1] - self.n_fixed
        positions = torch.arange(n_words, device=state.device)
        rule = self.word_rule[state][:, None]
        words = (rule == ANY_WORD) | ((rule == NEXT_WORD) & (positions[None, :] == last_word[:, None] + 1))
        if anchor is not None:
            words &= ~(self.no_self[state][:, None] & (positions[None, :] == anchor[:, None]))
        return torch.cat([fixed, words], dim=1) & vocab_mask

    def step(
        self, state: torch.Tensor, ids: torch.Tensor, anchor: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Next states, last words and anchor starts after emitting ``ids``."""
        cat = self.category(ids)
        nxt = self.trans[state, cat]
        is_word = cat == CAT_WORD
        last = torch.where(is_word, ids - self.n_fixed, torch.full_like(ids, -1))
        if anchor is not None:
            anchor = torch.where(is_word & self.starts_anchor[state], ids - self.n_fixed, anchor)
        return nxt, last, anchor


# ---------------------------------------------------------------------- search


@dataclass
class _Rows:
    """Search state of one decoder over N = B * K rows."""

    tokens: torch.Tensor  # [N, t] ids emitted so far
    scores: torch.Tensor  # [N] float32 sum of log-probabilities
    state: torch.Tensor  # [N] grammar state
    last: torch.Tensor  # [N] last emitted word (-1: none)
    anchor: torch.Tensor  # [N] first word of the current anchor mention (-1: none)
    done: torch.Tensor  # [N] bool
    cut: torch.Tensor  # [N] bool: stopped by the length bound, not by <eos>
    cache: object

    def select(self, src: torch.Tensor, reorder_cache: bool) -> None:
        self.tokens, self.scores = self.tokens[src], self.scores[src]
        self.state, self.last, self.anchor, self.done, self.cut = (
            self.state[src],
            self.last[src],
            self.anchor[src],
            self.done[src],
            self.cut[src],
        )
        if reorder_cache:
            self.cache.reorder_cache(src)


@torch.no_grad()
def generate(
    model: AnchorAlignModel,
    batch: dict[str, torch.Tensor],
    cfg: DecodeConfig,
    finished: Callable[[list[int]], None] | None = None,
    state: EncoderState | None = None,
) -> dict[str, tuple[list[list[int]], list[bool]]]:
    """Per decoder: the best output ids of every sample (up to and with ``<eos>``) and whether it was cut.

    ``finished(indices)`` is called with the samples of the batch whose three decoders have just
    all finished (every beam), so a progress bar can move per sentence rather than per batch.
    ``state``: the batch's encoding, when the caller already has it.
    """
    k = cfg.beam
    if k < 1:
        raise ValueError(f"beam must be >= 1, got {k}")
    state = (model.encode(batch) if state is None else state).repeat(k)
    vocab_mask = state.vocab_mask
    n_rows, device = vocab_mask.shape[0], vocab_mask.device
    n_samples = n_rows // k
    n_words = batch["word_mask"].sum(1).repeat_interleave(k)
    limit = model.backbone.max_positions
    bound = (torch.full_like(n_words, cfg.max_len) if cfg.max_len else default_max_len(n_words)).clamp(
        max=limit
    )
    first = torch.full((n_samples, k), float("-inf"), device=device)
    first[:, 0] = 0.0  # all beams start identical: keep one so the first step does not repeat it k times
    rows: dict[str, _Rows] = {}
    self_relations = bool(getattr(model.meta, "self_relations", False))
    grammars = {
        name: Grammar.for_decoder(name, model.labels, model.paradigm, device, self_relations)
        for name in DECODERS
    }
    for name in DECODERS:
        empty = torch.zeros(n_rows, dtype=torch.bool, device=device)
        rows[name] = _Rows(
            tokens=torch.full((n_rows, 1), BOS, dtype=torch.long, device=device),
            scores=first.flatten().clone(),
            state=torch.full((n_rows,), START, dtype=torch.long, device=device),
            last=torch.full((n_rows,), -1, dtype=torch.long, device=device),
            anchor=torch.full((n_rows,), -1, dtype=torch.long, device=device),
            done=empty,
            cut=empty.clone(),
            cache=model.backbone.new_cache(),
        )
    eos_only = torch.zeros_like(vocab_mask)
    eos_only[:, EOS] = True
    reported = torch.zeros(n_samples, dtype=torch.bool, device=device)
    for step in range(int(bound.max()) + 1):
        active = [name for name in DECODERS if not bool(rows[name].done.all())]
        if not active:
            break
        for name in active:
            _advance(model, name, rows[name], grammars[name], state, cfg, k, eos_only, bound, step)
        if finished is not None:
            reported = _report_finished(rows, k, reported, finished)
    out: dict[str, tuple[list[list[int]], list[bool]]] = {}
    best = torch.arange(n_samples, device=device) * k  # beams are kept sorted: beam 0 is the best
    limits = bound[best].tolist()
    for name in DECODERS:
        r = rows[name]
        # A row cut at its bound kept emitting <eos> while others ran on: those are not its output.
        seqs = [_until_eos(ids[:n]) for ids, n in zip(r.tokens[best, 1:].tolist(), limits, strict=True)]
        out[name] = (seqs, r.cut[best].tolist())
    return out


def _advance(
    model: AnchorAlignModel,
    name: str,
    r: _Rows,
    grammar: Grammar,
    state: EncoderState,
    cfg: DecodeConfig,
    k: int,
    eos_only: torch.Tensor,
    bound: torch.Tensor,
    step: int,
) -> None:
    """One decoding step of one decoder over all its rows."""
    logits = model.decoder_logits(name, r.tokens[:, -1:], state, r.cache)[:, -1].float()
    if cfg.eos_penalty:
        # A finished row has <eos> as its only legal id, so the shift costs it nothing after
        # the step it ended at: only the decision to stop moves.
        logits[:, EOS] -= cfg.eos_penalty
    if cfg.constrained:
        legal = grammar.mask(r.state, r.last, state.vocab_mask, r.anchor)
        legal[:, EOS] |= ~legal.any(1)  # a state with no legal id (a label set without relations) ends
    else:
        legal = state.vocab_mask.clone()
    legal = torch.where(r.done[:, None], eos_only, legal)
    log_p = torch.log_softmax(logits.masked_fill(~legal, float("-inf")), dim=-1)
    n_rows, vocab = log_p.shape
    candidates = (r.scores[:, None] + log_p).view(n_rows // k, k * vocab)
    top_scores, top_index = candidates.topk(k, dim=1)
    beam, ids = top_index // vocab, (top_index % vocab).flatten()
    if k > 1:
        src = (torch.arange(n_rows // k, device=beam.device)[:, None] * k + beam).flatten()
        r.select(src, reorder_cache=True)
    r.scores = top_scores.flatten()
    was_done = r.done
    new_state, new_last, r.anchor = grammar.step(r.state, ids, r.anchor)
    r.state = torch.where(was_done, DONE, new_state)
    r.last = new_last
    r.tokens = torch.cat([r.tokens, ids[:, None]], dim=1)
    r.done = was_done | (ids == EOS)
    hit = ~r.done & (step + 1 >= bound)
    r.cut |= hit
    r.done |= hit


def _report_finished(
    rows: dict[str, _Rows], k: int, reported: torch.Tensor, finished: Callable[[list[int]], None]
) -> torch.Tensor:
    """Call ``finished`` with the samples whose rows are now done in every decoder; the new ``reported``."""
    done = torch.stack([r.done.view(-1, k).all(1) for r in rows.values()]).all(0)
    new = (done & ~reported).nonzero().flatten().tolist()
    if new:
        finished(new)
    return done | reported


def _until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


# ---------------------------------------------------------------------- prediction


def predict(
    model: AnchorAlignModel,
    samples: Sequence[Sample],
    cfg: DecodeConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Prediction]:
    """Predicted entities and relations of every sample, in input order.

    Only ``id`` and ``tokens`` of the samples are read. ``progress(n)`` is called as decoding goes
    with the number of samples whose three decoders have just finished.
    """
    return _predict(model, samples, cfg, None if progress is None else lambda done: progress(len(done)))


def _predict(
    model: AnchorAlignModel,
    samples: Sequence[Sample],
    cfg: DecodeConfig | None,
    finished: Callable[[list[int]], None] | None,
) -> list[Prediction]:
    """``predict``, calling ``finished(indices)`` with the indices into ``samples`` that just finished."""
    cfg = cfg or DecodeConfig()
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    collate = model.collator()
    device = model.device
    spans = uses_span_head(model, cfg)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].tokens), reverse=True)
    results: list[Prediction | None] = [None] * len(samples)
    was_training = model.training
    model.eval()
    try:
        for begin in range(0, len(order), cfg.batch_size):
            chunk = order[begin : begin + cfg.batch_size]
            inputs = [Sample(id=samples[i].id, tokens=samples[i].tokens) for i in chunk]
            batch = {key: t.to(device) for key, t in collate.inputs(inputs).items()}
            done = None if finished is None else (lambda js, chunk=chunk: finished([chunk[j] for j in js]))
            with torch.no_grad():
                state = model.encode(batch)
                mentions = span_mentions(model, state, batch, cfg) if spans else [None] * len(chunk)
            outputs = generate(model, batch, cfg, done, state)
            for j, i in enumerate(chunk):
                ids = {n: outputs[n][0][j] for n in DECODERS}
                results[i] = to_prediction(model, inputs[j], ids, cfg, mentions[j])
            if uses_relation_head(model, cfg):
                with torch.no_grad():
                    words, starts = model.relation_inputs(state)
                    for j, i in enumerate(chunk):
                        results[i] = relation_vote(model, words[j], starts[j], results[i], cfg)
    finally:
        model.train(was_training)
    return [p for p in results if p is not None]


def uses_span_head(model: AnchorAlignModel, cfg: DecodeConfig) -> bool:
    """Whether the entities reported come from the span head (``cfg.ner_source``)."""
    if cfg.ner_source == "span_head" and model.span_head is None:
        raise UserError("ner_source=span_head: this checkpoint has no span head")
    return model.span_head is not None and cfg.ner_source != "decoder"


def uses_relation_head(model: AnchorAlignModel, cfg: DecodeConfig) -> bool:
    """Whether the relation head votes on the relations (``cfg.relation_head``)."""
    return model.relation_head is not None and cfg.relation_head == "auto"


def relation_vote(
    model: AnchorAlignModel,
    words: torch.Tensor,
    start: torch.Tensor,
    prediction: Prediction,
    cfg: DecodeConfig,
) -> Prediction:
    """``prediction`` with the relations that ``relation_head.vote`` reports between its entities;
    ``words`` [W, H] (padded) and ``start`` [H] are what the head reads of the sentence
    (``AnchorAlignModel.relation_inputs``)."""
    keep, add = model.relation_thresholds
    keep = keep if cfg.relation_keep is None else cfg.relation_keep
    add = add if cfg.relation_add is None else cfg.relation_add
    scored = relation_scores(model, words, start, prediction.sample)
    return dataclasses.replace(prediction, sample=voted(prediction.sample, scored, keep, add))


def relation_scores(
    model: AnchorAlignModel, words: torch.Tensor, start: torch.Tensor, sample: Sample
) -> dict[Triple, float]:
    """The relation head's probability of every relation between two of ``sample``'s entities."""
    spans, _ = structure(sample)
    pairs = entity_pairs(spans)
    if not pairs:
        return {}
    entities, index = pair_inputs([(typed_spans(spans, model.labels.entity_types), pairs)], words.device)
    probs = model.relation_head(words[None], start[None], entities, index)
    return pair_probabilities(spans, pairs, probs, model.labels.relation_types)


def voted(sample: Sample, scored: dict[Triple, float], keep: float, add: float) -> Sample:
    """``sample`` with the relations of ``relation_head.vote`` between its entities."""
    spans, predicted = structure(sample)
    index = {span: k for k, span in enumerate(spans)}
    relations = [
        {"head": index[head], "tail": index[tail], "type": label}
        for head, tail, label in vote(predicted, scored, keep, add)
    ]
    return Sample(id=sample.id, tokens=sample.tokens, entities=sample.entities, relations=relations)


def span_mentions(
    model: AnchorAlignModel, state: EncoderState, batch: dict[str, torch.Tensor], cfg: DecodeConfig
) -> list[list[Span]]:
    """The span head's mentions of every sample of the batch."""
    logits = model.span_logits(state)
    n_words = batch["word_mask"].sum(1).tolist()
    types = model.labels.entity_types
    return [decode_spans(logits[b], n, types, cfg.span_threshold) for b, n in enumerate(n_words)]


def to_prediction(
    model: AnchorAlignModel,
    sample: Sample,
    ids: dict[str, list[int]],
    cfg: DecodeConfig,
    mentions: Sequence[Span] | None = None,
) -> Prediction:
    """Parse three decoder outputs into a Prediction (aggregation and anchor constraint as ``cfg``
    says); ``mentions``, the span head's, take the NER decoder's place among the entities reported."""
    parsed, report = parse_with_report(
        ids["ner"],
        ids["fwd"],
        ids["rev"],
        sample.tokens,
        model.labels,
        model.paradigm,
        aggregate=cfg.aggregate,
        anchor=cfg.anchor,
        entities=cfg.entities,
        self_relations=bool(getattr(model.meta, "self_relations", False)),
        sample_id=sample.id,
        mentions=mentions,
    )
    return Prediction(sample=parsed, valid=report.valid, outputs=ids, report=report)


# ---------------------------------------------------------------------- long inputs


def word_windows(piece_counts: Sequence[int], max_length: int) -> list[tuple[int, int]]:
    """Consecutive word windows ``(start, end)`` whose sub-words plus the 2 special tokens fit ``max_length``.

    Greedy from the left, so every window but the last is as long as it can be. Raises ValueError
    for a single word that does not fit on its own.
    """
    windows: list[tuple[int, int]] = []
    start, used = 0, 2
    for i, count in enumerate(piece_counts):
        if count + 2 > max_length:
            raise ValueError(f"word {i} alone has {count} sub-words, more than max_length {max_length} - 2")
        if used + count > max_length:
            windows.append((start, i))
            start, used = i, 2
        used += count
    windows.append((start, len(piece_counts)))
    return windows


def merge_windows(sample_id: str, tokens: list[str], parts: Sequence[tuple[int, Prediction]]) -> Prediction:
    """One prediction from the predictions of consecutive windows (``(word offset, prediction)``)."""
    entities, relations = [], []
    for offset, part in parts:
        first = len(entities)
        entities += [
            e.model_copy(update={"start": e.start + offset, "end": e.end + offset})
            for e in part.sample.entities
        ]
        relations += [
            r.model_copy(update={"head": r.head + first, "tail": r.tail + first})
            for r in part.sample.relations
        ]
    merged = Sample(id=sample_id, tokens=tokens, entities=entities, relations=relations)
    return Prediction(sample=merged, valid=all(p.valid for _, p in parts))


def predict_long(
    model: AnchorAlignModel,
    samples: Sequence[Sample],
    cfg: DecodeConfig | None = None,
    long: str = "split",
    where: Callable[[Sample], str] | None = None,
    progress: Callable[[int | Fraction], None] | None = None,
) -> tuple[list[Prediction], list[str]]:
    """``predict`` for inputs of any length, and the ids of the samples that had to be split.

    A sample longer than the encoder takes is split into consecutive word windows that fit,
    predicted window by window and merged back with its offsets (``long="split"``; relations
    across two windows cannot be found), or refused with a UserError naming it (``long="refuse"``;
    ``where(sample)`` says where it came from, e.g. ``file:line``).

    ``progress(n)`` counts input samples as ``predict``'s does; a sample decoded in ``w`` windows
    counts ``Fraction(1, w)`` as each window finishes (exact, so whole samples add up to integers).
    """
    if long not in ("split", "refuse"):
        raise ValueError(f"long must be 'split' or 'refuse', got {long!r}")
    pieces = model.collator().pieces
    max_length = model.backbone.max_positions
    plan: list[list[tuple[int, Sample]]] = []
    split_ids: list[str] = []
    for s in samples:
        counts = [len(p) for p in pieces(s.tokens)]
        if sum(counts) + 2 <= max_length:
            plan.append([(0, s)])
            continue
        place = where(s) if where else f"sample {s.id!r}"
        if long == "refuse":
            raise UserError(
                f"{place}: {len(s.tokens)} words make {sum(counts) + 2} sub-word tokens, more than the "
                f"model's {max_length}; shorten it or use --long split"
            )
        try:
            windows = word_windows(counts, max_length)
        except ValueError as err:
            raise UserError(f"{place}: {err}") from None
        split_ids.append(s.id)
        plan.append([(a, Sample(id=f"{s.id}#{a}", tokens=s.tokens[a:b])) for a, b in windows])
    flat = [part for parts in plan for _, part in parts]
    share = [Fraction(1, len(parts)) for parts in plan for _ in parts]
    finished = None
    if progress is not None:

        def finished(done: list[int]) -> None:
            n = sum((share[i] for i in done), Fraction(0))
            progress(n.numerator if n.denominator == 1 else n)

    preds = iter(_predict(model, flat, cfg, finished))
    results = []
    for s, parts in zip(samples, plan, strict=True):
        got = [(offset, next(preds)) for offset, _ in parts]
        results.append(got[0][1] if len(got) == 1 else merge_windows(s.id, s.tokens, got))
    return results, split_ids
