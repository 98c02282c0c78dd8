"""Decoding: the output grammar, cached batched search, length bounds, aggregation, long inputs."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from model_fixtures import (
    TOY_META,
    one_cpu_thread,  # noqa: F401  (autouse)
    tiny_model,
    toy_samples,
)

from anchoralign.decode import (
    START,
    DecodeConfig,
    Grammar,
    generate,
    merge_windows,
    predict,
    predict_long,
    to_prediction,
    word_windows,
)
from anchoralign.errors import UserError
from anchoralign.linearize import EOS, LabelSet, Paradigm, linearize, parse_with_report
from anchoralign.schema import Entity, Relation, Sample

LABELS = LabelSet.from_meta(TOY_META)  # Peop 3, Org 4, Loc 5, Work_For 6, Live_In 7, words from 8
W = LABELS.n_fixed
CPU = torch.device("cpu")


def allowed(grammar: Grammar, prefix: list[int], n_words: int, labels: LabelSet = LABELS) -> set[int]:
    """Ids the grammar allows after ``prefix`` in a sentence of ``n_words`` words."""
    state = torch.tensor([START])
    last = torch.tensor([-1])
    anchor = torch.tensor([-1])
    for token in prefix:
        state, last, anchor = grammar.step(state, torch.tensor([token]), anchor)
    vocab = torch.ones(1, labels.n_fixed + n_words, dtype=torch.bool)
    vocab[0, 0] = False
    return set(torch.nonzero(grammar.mask(state, last, vocab, anchor)[0]).flatten().tolist())


ENTITIES, RELATIONS = {3, 4, 5}, {6, 7}


def words(n: int, start: int = 0) -> set[int]:
    return {W + i for i in range(start, n)}


def test_ner_grammar_allows_mentions_then_types():
    g = Grammar.for_decoder("ner", LABELS, Paradigm.GROUPED_ALL, CPU)
    assert allowed(g, [], 4) == {EOS} | words(4)
    assert allowed(g, [W + 1], 4) == {W + 2} | ENTITIES  # continue the span, or close it
    assert allowed(g, [W + 3], 4) == ENTITIES  # last word: the span can only be closed
    assert allowed(g, [W + 1, 3], 4) == {EOS} | words(4)
    assert allowed(g, [W + 1, 3, EOS], 4) == {EOS}


def test_grouped_grammar_writes_blocks_closed_by_sep():
    g = Grammar.for_decoder("fwd", LABELS, Paradigm.GROUPED_ALL, CPU, self_relations=True)
    anchor = [W + 0, W + 1, 3]
    assert allowed(g, anchor, 5) == words(5)  # an anchor needs a partner
    assert allowed(g, [*anchor, W + 4, 4], 5) == RELATIONS
    assert allowed(g, [*anchor, W + 4, 4, 6], 5) == {2} | words(5)  # another partner or <sep>
    assert allowed(g, [*anchor, W + 4, 4, 6, 2], 5) == {EOS} | words(5)


def test_flat_grammar_writes_triples_without_sep():
    g = Grammar.for_decoder("rev", LABELS, Paradigm.FLAT_ALL, CPU, self_relations=True)
    triple = [W + 0, 3, W + 2, 4]
    assert allowed(g, triple, 3) == RELATIONS
    assert allowed(g, [*triple, 6], 3) == {EOS} | words(3)


@pytest.mark.parametrize("paradigm", [Paradigm.GROUPED_ALL, Paradigm.FLAT_ALL])
def test_a_partner_cannot_start_where_its_anchor_starts(paradigm):
    g = Grammar.for_decoder("fwd", LABELS, paradigm, CPU)
    anchor = [W + 1, W + 2, 3]  # the anchor (or first mention) spans words 1-2
    assert allowed(g, anchor, 5) == words(5) - {W + 1}
    if paradigm.grouped:
        # The next partner of the same block neither; a new block forgets the old anchor.
        assert allowed(g, [*anchor, W + 4, 4, 6], 5) == {2} | words(5) - {W + 1}
        assert allowed(g, [*anchor, W + 4, 4, 6, 2, W + 3, 5], 5) == words(5) - {W + 3}
    else:
        assert allowed(g, [*anchor, W + 4, 4, 6, W + 3, 5], 5) == words(5) - {W + 3}
    # NER mentions are not affected.
    assert allowed(Grammar.for_decoder("ner", LABELS, paradigm, CPU), [W + 1, 3], 5) == {EOS} | words(5)


def assert_grammar_accepts(samples: list[Sample], labels: LabelSet, paradigm: Paradigm) -> None:
    for s in samples:
        targets = linearize(s, labels, paradigm)
        for name in ("ner", "fwd", "rev"):
            g = Grammar.for_decoder(name, labels, paradigm, CPU)
            ids = getattr(targets, name)
            for t, token in enumerate(ids):
                assert token in allowed(g, ids[:t], len(s.tokens), labels), (s.id, name, t, ids)


@pytest.mark.parametrize("paradigm", list(Paradigm))
def test_every_toy_target_is_allowed_by_the_grammar(paradigm):
    assert_grammar_accepts(toy_samples(), LABELS, paradigm)


@pytest.mark.parametrize("paradigm", list(Paradigm))
def test_every_conll04_target_is_allowed_by_the_grammar(paradigm, shared_data):
    from model_fixtures import conll04_first

    meta, samples = conll04_first(shared_data, 300)
    assert_grammar_accepts(samples, LabelSet.from_meta(meta), paradigm)


def random_output(grammar: Grammar, n_words: int, rng: random.Random, wind_down_after: int = 12) -> list[int]:
    """A random output the grammar allows; past ``wind_down_after`` ids it heads for <eos>."""
    state, last, anchor = torch.tensor([START]), torch.tensor([-1]), torch.tensor([-1])
    vocab = torch.ones(1, W + n_words, dtype=torch.bool)
    vocab[0, 0] = False
    ids: list[int] = []
    while not ids or ids[-1] != EOS:
        legal = torch.nonzero(grammar.mask(state, last, vocab, anchor)[0]).flatten().tolist()
        if len(ids) < wind_down_after:
            choices = [i for i in legal if i != EOS] or legal
        else:  # prefer ending: <eos>, then <sep>, then closing labels, then words
            choices = next(c for c in ([EOS], [2], list(range(3, W)), legal) if set(c) & set(legal))
            choices = [i for i in choices if i in legal]
        ids.append(rng.choice(choices))
        state, last, anchor = grammar.step(state, torch.tensor(ids[-1:]), anchor)
    return ids


@pytest.mark.parametrize("paradigm", list(Paradigm))
def test_random_grammatical_outputs_always_parse_with_nothing_dropped(paradigm):
    rng = random.Random(int(paradigm))
    grammars = {name: Grammar.for_decoder(name, LABELS, paradigm, CPU) for name in ("ner", "fwd", "rev")}
    for _ in range(100):
        # Two words at least: in a one-word sentence an anchor has no partner but itself, which
        # the grammar forbids (generate then ends the output, which is reported as not valid).
        n_words = rng.randint(2, 7)
        outputs = {name: random_output(g, n_words, rng) for name, g in grammars.items()}
        _, report = parse_with_report(
            outputs["ner"], outputs["fwd"], outputs["rev"], ["w"] * n_words, LABELS, paradigm
        )
        assert report.valid, (outputs, report)


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


def reference_greedy(model, batch, name: str, steps: int, eos_shift: float = 0.0) -> list[list[int]]:
    """Greedy constrained decoding that re-reads the whole prefix at every step (no cache), with
    ``eos_shift`` subtracted from the logit of <eos>."""
    state = model.encode(batch)
    g = Grammar.for_decoder(name, model.labels, model.paradigm, CPU)
    n = batch["input_ids"].shape[0]
    ids = torch.zeros(n, 1, dtype=torch.long)
    gstate, last, anchor = torch.full((n,), START), torch.full((n,), -1), torch.full((n,), -1)
    for _ in range(steps):
        logits = model.decoder_logits(name, ids, state)[:, -1].clone()
        logits[:, EOS] -= eos_shift
        legal = g.mask(gstate, last, state.vocab_mask, anchor)
        nxt = logits.masked_fill(~legal, float("-inf")).argmax(-1)
        gstate, last, anchor = g.step(gstate, nxt, anchor)
        ids = torch.cat([ids, nxt[:, None]], 1)
    return [row[1:] for row in ids.tolist()]


@torch.no_grad()
def test_cached_batched_greedy_matches_decoding_without_cache(model):
    batch = model.collator().inputs(toy_samples())
    steps = 8
    out = generate(model, batch, DecodeConfig(max_len=steps))
    for name in ("ner", "fwd", "rev"):
        ref = reference_greedy(model, batch, name, steps)
        for got, want in zip(out[name][0], ref, strict=True):
            n = len(got)
            assert got == want[:n]
            assert got[-1] == EOS or n == steps


@torch.no_grad()
def test_eos_penalty_moves_only_the_decision_to_stop(model):
    batch = model.collator().inputs(toy_samples())
    steps = 12
    plain = generate(model, batch, DecodeConfig(max_len=steps))
    shifted = generate(model, batch, DecodeConfig(max_len=steps, eos_penalty=2.0))
    for name in ("ner", "fwd", "rev"):
        ref = reference_greedy(model, batch, name, steps, eos_shift=2.0)
        for got, want in zip(shifted[name][0], ref, strict=True):
            assert got == want[: len(got)]
            assert got[-1] == EOS or len(got) == steps
        for longer, base in zip(shifted[name][0], plain[name][0], strict=True):
            assert len(longer) >= len(base)  # the same greedy path until it would have stopped
            assert longer[: len(base) - 1] == base[:-1]
    # A penalty below 0 stops every decoder where it may first stop: before writing anything.
    eager = generate(model, batch, DecodeConfig(max_len=steps, eos_penalty=-1e4))
    assert all(ids == [EOS] for name in ("ner", "fwd", "rev") for ids in eager[name][0])


def sequence_log_prob(model, batch, row: int, name: str, ids: list[int]) -> float:
    """Log-probability of ``ids`` under the model with the grammar masks, by teacher forcing."""
    state = model.encode({k: v[row : row + 1] for k, v in batch.items()})
    g = Grammar.for_decoder(name, model.labels, model.paradigm, CPU)
    inputs = torch.tensor([[0, *ids[:-1]]])
    logits = model.decoder_logits(name, inputs, state)[0]
    total, gstate, last, anchor = 0.0, torch.tensor([START]), torch.tensor([-1]), torch.tensor([-1])
    for t, token in enumerate(ids):
        legal = g.mask(gstate, last, state.vocab_mask, anchor)[0]
        total += torch.log_softmax(logits[t].masked_fill(~legal, float("-inf")), -1)[token].item()
        gstate, last, anchor = g.step(gstate, torch.tensor([token]), anchor)
    return total


@torch.no_grad()
def test_beam_search_finds_outputs_at_least_as_likely_as_greedy(model):
    batch = model.collator().inputs(toy_samples())
    greedy = generate(model, batch, DecodeConfig(max_len=10))
    beam = generate(model, batch, DecodeConfig(max_len=10, beam=4))
    compared = 0
    for name in ("ner", "fwd", "rev"):
        for row in range(3):
            g_ids, b_ids = greedy[name][0][row], beam[name][0][row]
            if (g_ids[-1] == EOS) != (b_ids[-1] == EOS):
                continue  # a finished output and one cut at the bound are not comparable
            compared += 1
            assert (
                sequence_log_prob(model, batch, row, name, b_ids)
                >= sequence_log_prob(model, batch, row, name, g_ids) - 1e-4
            )
    assert compared >= 6


def test_outputs_cut_at_the_length_bound_are_invalid(model):
    preds = predict(model, toy_samples(), DecodeConfig(max_len=3))
    for p in preds:
        assert all(len(ids) <= 3 for ids in p.outputs.values())
        cut = any(ids[-1] != EOS for ids in p.outputs.values())
        assert p.valid is (not cut and p.report.valid)
    assert not all(p.valid for p in preds)  # an untrained model does not stop within 3 tokens


def test_rows_cut_early_stay_cut_while_longer_rows_run_on(model):
    short, long = Sample(id="a", tokens=["word"] * 4), Sample(id="b", tokens=["word"] * 10)
    preds = predict(model, [short, long])  # default bounds: 3 * n_words + 16, i.e. 28 and 46
    for p, bound in zip(preds, (28, 46), strict=True):
        for ids in p.outputs.values():
            assert len(ids) <= bound
            if len(ids) == bound and ids[-1] != EOS:
                assert not p.valid
    assert any(len(ids) == 28 and ids[-1] != EOS for ids in preds[0].outputs.values())


def test_predict_keeps_input_order_ids_and_tokens_whatever_the_batching(model):
    samples = toy_samples()[::-1]
    a = predict(model, samples, DecodeConfig(max_len=12, batch_size=1))
    b = predict(model, samples, DecodeConfig(max_len=12, batch_size=2))
    assert [p.sample.id for p in a] == [s.id for s in samples]
    assert [p.sample.tokens for p in a] == [s.tokens for s in samples]
    assert [p.outputs for p in a] == [p.outputs for p in b]
    assert model.training is False


def test_predict_restores_training_mode_and_reads_only_tokens(model):
    model.train()
    try:
        preds = predict(model, toy_samples()[:1], DecodeConfig(max_len=4, beam=2))
        assert model.training
    finally:
        model.eval()
    assert len(preds) == 1


def test_unconstrained_decoding_reports_validity(model):
    preds = predict(model, toy_samples(), DecodeConfig(max_len=6, constrained=False))
    for p in preds:
        assert p.valid == (p.report.valid and all(ids[-1] == EOS for ids in p.outputs.values()))


def test_aggregation_and_anchor_constraint_switch_independently():
    fake = SimpleNamespace(labels=LABELS, paradigm=Paradigm.GROUPED_ALL, meta=TOY_META)
    sample = Sample(id="s1", tokens=toy_samples()[0].tokens)
    ids = {
        "ner": [W + 0, W + 1, 3, W + 4, 4, EOS],  # Ann Lee/Peop, Acme/Org (not Oslo)
        "fwd": [W + 0, W + 1, 3, W + 4, 4, 6, 2, EOS],  # Work_For(Ann Lee, Acme)
        "rev": [W + 6, 5, W + 0, W + 1, 3, 7, 2, EOS],  # Live_In(Ann Lee, Oslo), written from Oslo
    }

    def relations(**flags):
        p = to_prediction(fake, sample, ids, DecodeConfig(**flags))
        assert p.valid
        return {(p.sample.mention(r.head), r.type, p.sample.mention(r.tail)) for r in p.sample.relations}

    work, live = ("Ann Lee", "Work_For", "Acme"), ("Ann Lee", "Live_In", "Oslo")
    assert relations() == {work}  # Oslo is not an NER output
    assert relations(anchor=False) == {work, live}
    assert relations(aggregate=False, anchor=False) == {work}


def test_word_windows_fill_greedily_and_refuse_oversized_words():
    assert word_windows([3, 3, 3], 8) == [(0, 2), (2, 3)]
    assert word_windows([1] * 5, 7) == [(0, 5)]
    assert word_windows([2, 2, 1], 6) == [(0, 2), (2, 3)]
    assert word_windows([2, 4, 1], 6) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="word 1 alone has 7 sub-words"):
        word_windows([1, 7], 8)


def test_merge_windows_shifts_spans_and_relation_indices():
    from anchoralign.decode import Prediction

    left = Sample(id="x#0", tokens=["A", "b"], entities=[Entity(start=0, end=1, type="Peop")])
    right = Sample(
        id="x#2",
        tokens=["C", "d"],
        entities=[Entity(start=0, end=1, type="Peop"), Entity(start=1, end=2, type="Loc")],
        relations=[Relation(head=0, tail=1, type="Live_In")],
    )
    merged = merge_windows(
        "x", ["A", "b", "C", "d"], [(0, Prediction(left, True)), (2, Prediction(right, False))]
    )
    assert merged.sample.id == "x" and not merged.valid
    assert [(e.start, e.end) for e in merged.sample.entities] == [(0, 1), (2, 3), (3, 4)]
    assert merged.sample.relations == [Relation(head=1, tail=2, type="Live_In")]


def test_long_inputs_are_split_into_windows_or_refused():
    model = tiny_model(max_position_embeddings=32).eval()
    long = Sample(id="long", tokens=["Pusterla", "works", "."] * 12)  # 3 + 1 + 1 pieces per 3 words
    short = toy_samples()[2]
    cfg = DecodeConfig(max_len=4)
    preds, split = predict_long(model, [short, long], cfg)
    assert split == ["long"]
    assert [p.sample.id for p in preds] == ["s3", "long"]
    assert preds[1].sample.tokens == long.tokens
    assert all(e.end <= len(long.tokens) for e in preds[1].sample.entities)
    with pytest.raises(
        UserError, match=r"input.txt:7: 36 words make 62 sub-word tokens, more than the model's 32"
    ):
        predict_long(model, [long], cfg, long="refuse", where=lambda s: "input.txt:7")
