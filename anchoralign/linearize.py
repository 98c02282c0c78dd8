"""Samples to decoder target id sequences and back, in the four output paradigms.

The model is a pointer-style generator over a per-sentence *restricted vocabulary*: it can
only emit the structure symbols, the label tokens of a :class:`LabelSet` and the positions of
the input words. For a sentence of ``n`` words and E entity / R relation labels the ids are::

    0 <bos>   1 <eos>   2 <sep>   3..3+E-1 entity labels   3+E..3+E+R-1 relation labels
    3+E+R+i   word i of the sentence

A mention is written as its word ids (``start .. end-1``, consecutive) followed by its type id.
Three decoders share the encoder: NER, forward RE (blocks or triples led by the subject) and
reverse RE (led by the object).

Example (labels of CoNLL04; ``·`` separates blocks only for reading)::

    tokens    Ann Lee leads Acme in Oslo , says Reuters .
              0   1   2     3    4  5    6 7    8       9
    entities  Ann Lee/Peop  Acme/Org  Oslo/Loc  Reuters/Org
    relations Work_For(Ann Lee, Acme)  Live_In(Ann Lee, Oslo)  OrgBased_In(Acme, Oslo)

    paradigm 3 (GROUPED_ALL, the default)
      ner  Ann Lee <Peop> Acme <Org> Oslo <Loc> Reuters <Org> <eos>
      fwd  Ann Lee <Peop> Acme <Org> <Work_For> Oslo <Loc> <Live_In> <sep> ·
           Acme <Org> Oslo <Loc> <OrgBased_In> <sep> <eos>
      rev  Acme <Org> Ann Lee <Peop> <Work_For> <sep> ·
           Oslo <Loc> Ann Lee <Peop> <Live_In> Acme <Org> <OrgBased_In> <sep> <eos>
    paradigm 4 (GROUPED_NONREL): fwd and rev as in 3; ner lists only entities in no relation
      ner  Reuters <Org> <eos>
    paradigm 1 (FLAT_ALL): ner as in 3; one triple after another, no <sep>
      fwd  Ann Lee <Peop> Acme <Org> <Work_For> · Ann Lee <Peop> Oslo <Loc> <Live_In> ·
           Acme <Org> Oslo <Loc> <OrgBased_In> <eos>
      rev  Acme <Org> Ann Lee <Peop> <Work_For> · Oslo <Loc> Ann Lee <Peop> <Live_In> ·
           Oslo <Loc> Acme <Org> <OrgBased_In> <eos>
    paradigm 2 (FLAT_NONREL): fwd and rev as in 1, ner as in 4

Order is canonical so that a sample has exactly one target: entities by (start, end, label
order); forward triples by (subject, object, relation label order), reverse triples by
(object, subject, relation). Duplicate entities or triples in a sample are written once, so a
round trip preserves the *sets* of (span, type) entities and (head, tail, relation) triples.
Several relations between one pair and self-relations (head == tail) are ordinary triples.

Parsing is total: any list of ints yields the well-formed part of it and never raises.

1. Reading stops at the first ``<eos>``; ids after it are ignored. A ``<bos>`` in first
   position is skipped (generation output usually starts with it).
2. Lexing. A maximal run of word ids (in range for the sentence) followed by an entity label
   is a mention when the word ids are consecutive and increasing; otherwise the run and its
   label are discarded. A run of words not followed by an entity label is discarded, as is
   an entity label with no words before it, any other ``<bos>``, a negative id and any id
   past the last word. What remains is a stream of mentions, relation labels and ``<sep>``.
3. NER keeps every mention; relation labels and ``<sep>`` are discarded.
4. Flat RE (paradigms 1, 2): a relation label takes the two mentions just before it
   (subject then object forward; object then subject reverse). A relation label with fewer
   than two mentions pending is discarded together with the pending mention; a third pending
   mention pushes out the oldest one; ``<sep>`` is discarded; mentions left at the end are
   discarded.
5. Grouped RE (paradigms 3, 4): the first mention of a block is its anchor (the subject
   forward, the object reverse); each later mention followed by a relation label forms a
   triple with the anchor. A relation label with no partner mention pending is discarded; a
   partner followed by another mention instead of a label is discarded; ``<sep>`` closes the
   block (a ``<sep>`` with no open block is discarded, and so are an anchor that formed no
   triple and a partner still waiting for its label). Triples of a last block that lacks
   its ``<sep>`` are kept, but the decoder's report says ``unclosed``.

Each discarded id is counted in :class:`DecoderReport` ``dropped``, so a decoder output is
"valid" when it ended with ``<eos>``, nothing was dropped and no block was left open.

Keys (for alignment losses) say what each target position emits: ``("ent", start, end,
type, k)`` for the k-th token of a written mention (k = end - start for its type token),
``("rel", head, tail, relation)`` with head/tail as (start, end, type) for a relation label,
None for ``<sep>`` and ``<eos>``. See :func:`align_pairs` for how keys pair positions.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal, NamedTuple

from anchoralign.errors import UserError
from anchoralign.schema import Entity, Relation, Sample

BOS, EOS, SEP = 0, 1, 2
N_SPECIAL = 3
IGNORE = -100  # target positions that carry no label (padding); losses skip them
DECODERS = ("ner", "fwd", "rev")

Span = tuple[int, int, str]  # (start, end exclusive, entity type)
Triple = tuple[Span, Span, str]  # (head, tail, relation type)
Key = Hashable | None
# What a position of an RE target writes for one triple: (triple, "head" | "tail" | "rel", k), k
# the token's index in the mention (0 for a relation label). An anchor serves every triple of its
# block, so a position can carry several.
Role = tuple[Triple, str, int]
TokenKind = Literal["bos", "eos", "sep", "entity", "relation", "word", "invalid"]


class Paradigm(IntEnum):
    FLAT_ALL = 1
    FLAT_NONREL = 2
    GROUPED_ALL = 3
    GROUPED_NONREL = 4

    @property
    def grouped(self) -> bool:
        """RE decoders write one block per anchor entity, closed by ``<sep>``."""
        return self in (Paradigm.GROUPED_ALL, Paradigm.GROUPED_NONREL)

    @property
    def ner_lists_all(self) -> bool:
        """NER writes every entity (else only those in no relation)."""
        return self in (Paradigm.FLAT_ALL, Paradigm.GROUPED_ALL)


def as_paradigm(value: int | Paradigm) -> Paradigm:
    """Coerce a config value (1..4) to a Paradigm; anything else is a UserError."""
    try:
        return Paradigm(value)
    except ValueError:
        raise UserError(f"paradigm must be one of 1, 2, 3, 4; got {value!r}") from None


@dataclass(frozen=True)
class LabelSet:
    """The entity and relation labels of a dataset, in the order that fixes their ids."""

    entity_types: tuple[str, ...]
    relation_types: tuple[str, ...]
    _entity_ids: dict[str, int] = field(init=False, repr=False, compare=False)
    _relation_ids: dict[str, int] = field(init=False, repr=False, compare=False)
    _n_fixed: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        entities = _checked_labels("entity", self.entity_types)
        relations = _checked_labels("relation", self.relation_types)
        # Frozen dataclass: normalise lists to tuples and cache the id tables once.
        object.__setattr__(self, "entity_types", entities)
        object.__setattr__(self, "relation_types", relations)
        object.__setattr__(self, "_entity_ids", {t: N_SPECIAL + i for i, t in enumerate(entities)})
        first_relation = N_SPECIAL + len(entities)
        object.__setattr__(self, "_relation_ids", {r: first_relation + i for i, r in enumerate(relations)})
        object.__setattr__(self, "_n_fixed", first_relation + len(relations))

    @classmethod
    def from_meta(cls, meta: Any) -> LabelSet:
        """From a DatasetMeta (its ``entity_types``/``relation_types`` dicts, in their order)."""
        return cls(tuple(meta.entity_types), tuple(meta.relation_types))

    @property
    def n_fixed(self) -> int:
        """Ids before the first word: the structure symbols and all labels."""
        return self._n_fixed

    def vocab_size(self, n_words: int) -> int:
        return self.n_fixed + n_words

    def word_id(self, i: int) -> int:
        if i < 0:
            raise ValueError(f"word index must be >= 0, got {i}")
        return self.n_fixed + i

    def entity_id(self, entity_type: str) -> int:
        try:
            return self._entity_ids[entity_type]
        except KeyError:
            raise UserError(
                f"entity type {entity_type!r} is not in the label set {list(self.entity_types)}"
            ) from None

    def relation_id(self, relation_type: str) -> int:
        try:
            return self._relation_ids[relation_type]
        except KeyError:
            raise UserError(
                f"relation type {relation_type!r} is not in the label set {list(self.relation_types)}"
            ) from None

    def unknown_labels(self, sample: Sample) -> list[tuple[Literal["entity", "relation"], str]]:
        """("entity" | "relation", label) of every label of ``sample`` outside this set, in order:
        the one check that data, corpora and checkpoints agree on their labels."""
        found: list[tuple[Literal["entity", "relation"], str]] = [
            ("entity", e.type) for e in sample.entities if e.type not in self._entity_ids
        ]
        found += [("relation", r.type) for r in sample.relations if r.type not in self._relation_ids]
        return found

    def decode_id(self, token_id: int, n_words: int | None = None) -> tuple[TokenKind, Any]:
        """What an id means: ("word", i), ("entity", type), ("relation", type), ("eos", None), ...

        Ids that mean nothing (negative, or a word past ``n_words`` when given) are
        ("invalid", token_id).
        """
        n_fixed = self._n_fixed
        if token_id < 0 or (n_words is not None and token_id >= n_fixed + n_words):
            return "invalid", token_id
        if token_id >= n_fixed:
            return "word", token_id - n_fixed
        if token_id >= N_SPECIAL + len(self.entity_types):
            return "relation", self.relation_types[token_id - N_SPECIAL - len(self.entity_types)]
        if token_id >= N_SPECIAL:
            return "entity", self.entity_types[token_id - N_SPECIAL]
        return ("bos", "eos", "sep")[token_id], None


def _checked_labels(kind: str, labels: Iterable[str]) -> tuple[str, ...]:
    labels = tuple(labels)
    for label in labels:
        if not isinstance(label, str) or not label:
            raise UserError(f"{kind} labels must be non-empty strings; got {label!r}")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UserError(f"duplicate {kind} labels: {duplicates}")
    return labels


@dataclass
class Targets:
    """Target ids of the three decoders (each ending with ``<eos>``), one key per id, and for the
    RE decoders the roles of every id (see ``Role``)."""

    ner: list[int]
    fwd: list[int]
    rev: list[int]
    ner_keys: list[Key]
    fwd_keys: list[Key]
    rev_keys: list[Key]
    fwd_roles: list[tuple[Role, ...]] = field(default_factory=list)
    rev_roles: list[tuple[Role, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in DECODERS:
            if len(getattr(self, name)) != len(getattr(self, f"{name}_keys")):
                raise ValueError(f"{name}: {len(getattr(self, name))} ids but a different number of keys")


# --------------------------------------------------------------------------- writing


def entity_key(span: Span, k: int) -> tuple[str, int, int, str, int]:
    """Key of the k-th emitted token of a mention (k = span length for its type token)."""
    return ("ent", span[0], span[1], span[2], k)


def relation_key(triple: Triple) -> tuple[str, Span, Span, str]:
    head, tail, relation = triple
    return ("rel", head, tail, relation)


class _Writer:
    """Accumulates one decoder's ids, their keys and their roles."""

    def __init__(self, labels: LabelSet) -> None:
        self.labels = labels
        self.ids: list[int] = []
        self.keys: list[Key] = []
        self.roles: list[tuple[Role, ...]] = []

    def mention(self, span: Span, serves: Sequence[tuple[Triple, str]] = ()) -> None:
        """Write a mention; ``serves``: the (triple, "head" | "tail") it is written for."""
        start, end, entity_type = span
        for k, word in enumerate(range(start, end)):
            self._emit(self.labels.word_id(word), entity_key(span, k), serves, k)
        self._emit(self.labels.entity_id(entity_type), entity_key(span, end - start), serves, end - start)

    def relation(self, triple: Triple) -> None:
        self._emit(self.labels.relation_id(triple[2]), relation_key(triple), [(triple, "rel")], 0)

    def sep(self) -> None:
        self._emit(SEP, None)

    def finish(self) -> tuple[list[int], list[Key], list[tuple[Role, ...]]]:
        self._emit(EOS, None)
        return self.ids, self.keys, self.roles

    def _emit(self, token_id: int, key: Key, serves: Sequence[tuple[Triple, str]] = (), k: int = 0) -> None:
        self.ids.append(token_id)
        self.keys.append(key)
        self.roles.append(tuple((triple, role, k) for triple, role in serves))


def linearize(sample: Sample, labels: LabelSet, paradigm: int | Paradigm = Paradigm.GROUPED_ALL) -> Targets:
    """The three decoder targets of a sample (see the module docstring for each paradigm)."""
    paradigm = as_paradigm(paradigm)
    entities, triples = gold_structure(sample, labels)
    if not paradigm.ner_lists_all:
        related = {span for head, tail, _ in triples for span in (head, tail)}
        entities = [span for span in entities if span not in related]
    write_relations = _write_grouped if paradigm.grouped else _write_flat
    ner, ner_keys, _ = _write_entities(entities, labels)
    fwd, fwd_keys, fwd_roles = write_relations(triples, labels, reverse=False)
    rev, rev_keys, rev_roles = write_relations(triples, labels, reverse=True)
    return Targets(ner, fwd, rev, ner_keys, fwd_keys, rev_keys, fwd_roles, rev_roles)


def gold_structure(sample: Sample, labels: LabelSet) -> tuple[list[Span], list[Triple]]:
    """The sample's distinct entities in canonical order and its distinct triples.

    Unknown labels are a UserError naming the sample, since they mean the data and its
    metadata disagree.
    """
    unknown = labels.unknown_labels(sample)
    if unknown:
        kind, label = unknown[0]
        known = labels.entity_types if kind == "entity" else labels.relation_types
        raise UserError(f"sample {sample.id!r}: {kind} type {label!r} is not in the label set {list(known)}")
    spans, triples = structure(sample)
    entity_order = _entity_order(labels)
    return sorted(set(spans), key=entity_order), sorted(set(triples), key=_triple_order(labels, False))


def structure(sample: Sample) -> tuple[list[Span], list[Triple]]:
    """The sample's entities as spans and its relations as triples of them, as written (in the
    sample's order, repeats kept)."""
    spans = [(e.start, e.end, e.type) for e in sample.entities]
    return spans, [(spans[r.head], spans[r.tail], r.type) for r in sample.relations]


def _entity_order(labels: LabelSet) -> Callable[[Span], tuple[int, int, int]]:
    return lambda span: (span[0], span[1], labels.entity_id(span[2]))


def _triple_order(labels: LabelSet, reverse: bool) -> Callable[[Triple], tuple]:
    """Forward: by subject, object, relation; reverse: by object, subject, relation."""
    entity_order = _entity_order(labels)

    def order(triple: Triple) -> tuple:
        head, tail, relation = triple
        first, second = (tail, head) if reverse else (head, tail)
        return entity_order(first), entity_order(second), labels.relation_id(relation)

    return order


_Written = tuple[list[int], list[Key], list[tuple[Role, ...]]]


def _write_entities(spans: Iterable[Span], labels: LabelSet) -> _Written:
    writer = _Writer(labels)
    for span in spans:
        writer.mention(span)
    return writer.finish()


def _write_flat(triples: Iterable[Triple], labels: LabelSet, reverse: bool) -> _Written:
    writer = _Writer(labels)
    first_role, second_role = ("tail", "head") if reverse else ("head", "tail")
    for triple in sorted(triples, key=_triple_order(labels, reverse)):
        head, tail, _ = triple
        first, second = (tail, head) if reverse else (head, tail)
        writer.mention(first, [(triple, first_role)])
        writer.mention(second, [(triple, second_role)])
        writer.relation(triple)
    return writer.finish()


def _write_grouped(triples: Iterable[Triple], labels: LabelSet, reverse: bool) -> _Written:
    writer = _Writer(labels)
    anchor_of: Callable[[Triple], Span] = (lambda t: t[1]) if reverse else (lambda t: t[0])
    partner_of: Callable[[Triple], Span] = (lambda t: t[0]) if reverse else (lambda t: t[1])
    anchor_role, partner_role = ("tail", "head") if reverse else ("head", "tail")
    ordered = sorted(triples, key=_triple_order(labels, reverse))
    for anchor, group in itertools.groupby(ordered, key=anchor_of):
        block = list(group)
        writer.mention(anchor, [(triple, anchor_role) for triple in block])
        for triple in block:
            writer.mention(partner_of(triple), [(triple, partner_role)])
            writer.relation(triple)
        writer.sep()
    return writer.finish()


# --------------------------------------------------------------------------- the grammar

# Token categories of the restricted vocabulary.
CAT_BOS, CAT_EOS, CAT_SEP, CAT_ENT, CAT_REL, CAT_WORD = range(6)
# How a grammar state treats word ids: none allowed, any word, or only the word after the last one.
NO_WORD, ANY_WORD, NEXT_WORD = 0, 1, 2
DONE, START = 0, 1  # every grammar: state 0 = finished (only <eos> may follow), state 1 = start


@dataclass(frozen=True)
class GrammarState:
    """One state of a decoder's output grammar.

    ``words``: which word ids may follow (NO_WORD, ANY_WORD, NEXT_WORD) and ``after_word`` the state
    they lead to; ``moves``: category -> next state for the other ids; ``starts_anchor``: a word
    written here begins the anchor (grouped) or the first mention (flat) of a relation;
    ``starts_partner``: a word written here begins the mention that the anchor relates to.
    """

    words: int
    after_word: int
    moves: Mapping[int, int]
    starts_anchor: bool = False
    starts_partner: bool = False


# The three grammars, one per kind of output (the writers above produce exactly these; the
# decoder's constraint tables are built from them, see anchoralign.decode.Grammar).
ENTITY_GRAMMAR = (
    GrammarState(NO_WORD, DONE, {CAT_EOS: DONE}),
    GrammarState(ANY_WORD, 2, {CAT_EOS: DONE}),  # 1: between mentions
    GrammarState(NEXT_WORD, 2, {CAT_ENT: 1}),  # 2: inside a mention
)
# Both relation grammars open with the same five states: a first mention (the anchor, or the
# first mention of a flat triple) and the mention it relates to. They differ in what follows the
# relation label: grouped blocks take another partner or close with <sep>, flat triples restart.
_RELATION_OPENING = (
    GrammarState(NO_WORD, DONE, {CAT_EOS: DONE}),
    GrammarState(ANY_WORD, 2, {CAT_EOS: DONE}, starts_anchor=True),  # 1: a block / triple may start (or end)
    GrammarState(NEXT_WORD, 2, {CAT_ENT: 3}),  # 2: inside the first mention
    GrammarState(ANY_WORD, 4, {}, starts_partner=True),  # 3: the partner mention must follow
    GrammarState(NEXT_WORD, 4, {CAT_ENT: 5}),  # 4: inside the partner mention
)
GROUPED_GRAMMAR = (
    *_RELATION_OPENING,
    GrammarState(NO_WORD, DONE, {CAT_REL: 6}),  # 5: its relation label
    GrammarState(ANY_WORD, 4, {CAT_SEP: 1}, starts_partner=True),  # 6: another partner, or close the block
)
FLAT_GRAMMAR = (
    *_RELATION_OPENING,
    GrammarState(NO_WORD, DONE, {CAT_REL: 1}),  # 5: the relation label, then the next triple
)


def grammar_of(decoder: str, paradigm: int | Paradigm) -> tuple[GrammarState, ...]:
    """The grammar of ``decoder``'s output ("ner", "fwd" or "rev") in ``paradigm``."""
    if decoder == "ner":
        return ENTITY_GRAMMAR
    return GROUPED_GRAMMAR if as_paradigm(paradigm).grouped else FLAT_GRAMMAR


def token_category(token_id: int, labels: LabelSet) -> int:
    kind = labels.decode_id(token_id)[0]
    return {"bos": CAT_BOS, "eos": CAT_EOS, "sep": CAT_SEP, "entity": CAT_ENT, "relation": CAT_REL}.get(
        kind, CAT_WORD
    )


def accepted(ids: Sequence[int], grammar: Sequence[GrammarState], labels: LabelSet) -> bool:
    """Whether ``ids`` (ending with ``<eos>``) is a complete output of ``grammar``; the writers'
    targets always are (tested), so the grammar and the writers cannot drift apart."""
    state, last = START, None
    for token_id in ids:
        spec = grammar[state]
        cat = token_category(token_id, labels)
        if cat == CAT_WORD:
            word = token_id - labels.n_fixed
            if spec.words == NO_WORD or (spec.words == NEXT_WORD and word != last + 1):
                return False
            state, last = spec.after_word, word
        elif state == DONE and cat == CAT_EOS:
            return True
        elif cat in spec.moves:
            state = spec.moves[cat]
            if cat == CAT_EOS:
                return True
        else:
            return False
    return False


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class DecoderReport:
    """How cleanly one decoder output parsed."""

    ended: bool  # an <eos> was found
    dropped: int  # ids before <eos> that ended up in no output (see the recovery rules)
    unclosed: bool = False  # grouped paradigms: the last block had no <sep>

    @property
    def ok(self) -> bool:
        return self.ended and self.dropped == 0 and not self.unclosed


@dataclass(frozen=True)
class ParseReport:
    ner: DecoderReport
    fwd: DecoderReport
    rev: DecoderReport

    @property
    def valid(self) -> bool:
        """Every decoder ended with <eos>, nothing was dropped, no block was left open."""
        return self.ner.ok and self.fwd.ok and self.rev.ok


class _Unit(NamedTuple):
    """A lexed piece of a decoder output: a mention, a relation label or <sep>."""

    kind: Literal["mention", "relation", "sep"]
    value: Any  # Span for a mention, the relation type for a label, None for <sep>
    n_ids: int  # how many ids it spans (what is dropped if the grammar discards it)


@dataclass
class _Lexed:
    units: list[_Unit]
    dropped: int
    ended: bool


def _lex(ids: Iterable[int], n_words: int, labels: LabelSet) -> _Lexed:
    """Rules 1 and 2 of the module docstring."""
    body, ended = _until_eos(ids)
    tokens = [labels.decode_id(token_id, n_words) for token_id in body]
    units: list[_Unit] = []
    dropped = 0
    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "word":
            end = i
            while end < len(tokens) and tokens[end][0] == "word":
                end += 1
            words = [word for _, word in tokens[i:end]]
            if end < len(tokens) and tokens[end][0] == "entity":
                if _consecutive(words):
                    units.append(_Unit("mention", (words[0], words[-1] + 1, tokens[end][1]), len(words) + 1))
                else:
                    dropped += len(words) + 1
                i = end + 1
            else:
                dropped += len(words)
                i = end
        elif kind in ("relation", "sep"):
            units.append(_Unit(kind, value, 1))
            i += 1
        else:  # <bos>, an invalid id, or an entity label with no words before it
            dropped += 1
            i += 1
    return _Lexed(units, dropped, ended)


def _until_eos(ids: Iterable[int]) -> tuple[list[int], bool]:
    body: list[int] = []
    for position, raw in enumerate(ids):
        token_id = int(raw)  # accept numpy / torch integer scalars
        if token_id == EOS:
            return body, True
        if position == 0 and token_id == BOS:
            continue
        body.append(token_id)
    return body, False


def _consecutive(words: list[int]) -> bool:
    return all(b == a + 1 for a, b in itertools.pairwise(words))


def _unique(items: Iterable[Any]) -> list[Any]:
    """Distinct items in order of first occurrence."""
    return list(dict.fromkeys(items))


def _read_entities(ids: Iterable[int], n_words: int, labels: LabelSet) -> tuple[list[Span], DecoderReport]:
    lexed = _lex(ids, n_words, labels)
    spans = [u.value for u in lexed.units if u.kind == "mention"]
    dropped = lexed.dropped + sum(u.n_ids for u in lexed.units if u.kind != "mention")
    return _unique(spans), DecoderReport(lexed.ended, dropped)


def _read_flat(units: list[_Unit]) -> tuple[list[tuple[Span, Span, str]], int]:
    """Rule 4: (first written mention, second written mention, relation) and the dropped count."""
    found = []
    dropped = 0
    pending: list[_Unit] = []
    for unit in units:
        if unit.kind == "mention":
            pending.append(unit)
            if len(pending) > 2:
                dropped += pending.pop(0).n_ids
        elif unit.kind == "relation":
            if len(pending) == 2:
                found.append((pending[0].value, pending[1].value, unit.value))
            else:
                dropped += unit.n_ids + sum(p.n_ids for p in pending)
            pending.clear()
        else:
            dropped += unit.n_ids
    dropped += sum(p.n_ids for p in pending)
    return found, dropped


def _read_grouped(units: list[_Unit]) -> tuple[list[tuple[Span, Span, str]], int, bool]:
    """Rule 5: (anchor, partner, relation), the dropped count and whether a block is left open."""
    found = []
    dropped = 0
    anchor: _Unit | None = None
    anchor_used = False
    partner: _Unit | None = None
    for unit in units:
        if unit.kind == "mention":
            if anchor is None:
                anchor, anchor_used = unit, False
            else:
                if partner is not None:
                    dropped += partner.n_ids
                partner = unit
        elif unit.kind == "relation":
            if anchor is not None and partner is not None:
                found.append((anchor.value, partner.value, unit.value))
                anchor_used, partner = True, None
            else:
                dropped += unit.n_ids
        else:  # <sep>
            if anchor is None:
                dropped += unit.n_ids
            elif not anchor_used:
                dropped += anchor.n_ids
            if partner is not None:
                dropped += partner.n_ids
            anchor, partner = None, None
    if partner is not None:
        dropped += partner.n_ids
    if anchor is not None and not anchor_used:
        dropped += anchor.n_ids
    return found, dropped, anchor is not None


def _read_relations(
    ids: Iterable[int], n_words: int, labels: LabelSet, paradigm: Paradigm, reverse: bool
) -> tuple[list[Triple], DecoderReport]:
    lexed = _lex(ids, n_words, labels)
    unclosed = False
    if paradigm.grouped:
        written, dropped, unclosed = _read_grouped(lexed.units)
    else:
        written, dropped = _read_flat(lexed.units)
    # Both decoders write the side they are centred on first; triples are always (head, tail).
    triples = [(second, first, r) if reverse else (first, second, r) for first, second, r in written]
    return _unique(triples), DecoderReport(lexed.ended, lexed.dropped + dropped, unclosed)


def parse_entities(ids: Iterable[int], n_words: int, labels: LabelSet) -> list[Span]:
    """Entities of an NER decoder output, distinct, in order of appearance. Never raises."""
    return _read_entities(ids, n_words, labels)[0]


def parse_relations(
    ids: Iterable[int],
    n_words: int,
    labels: LabelSet,
    paradigm: int | Paradigm = Paradigm.GROUPED_ALL,
    reverse: bool = False,
) -> list[Triple]:
    """(head, tail, relation) triples of a forward (or, with ``reverse``, reverse) RE output.

    Distinct, in order of appearance. Never raises on any ids (the paradigm must be 1..4).
    """
    return _read_relations(ids, n_words, labels, as_paradigm(paradigm), reverse)[0]


ANCHOR_MODES = ("typed", "reported", "span", "off")
ENTITY_SOURCES = ("ner", "union")


def parse(*args: Any, **kwargs: Any) -> Sample:
    """The predicted Sample of the three decoder outputs: :func:`parse_with_report` without its report."""
    return parse_with_report(*args, **kwargs)[0]


def parse_with_report(
    ner: Iterable[int],
    fwd: Iterable[int],
    rev: Iterable[int],
    tokens: Sequence[str],
    labels: LabelSet,
    paradigm: int | Paradigm = Paradigm.GROUPED_ALL,
    aggregate: bool = True,
    anchor: bool | str = "typed",
    sample_id: str = "",
    self_relations: bool = False,
    entities: str = "ner",
    mentions: Sequence[Span] | None = None,
) -> tuple[Sample, ParseReport]:
    """Recombine the three decoders into one Sample, and say how cleanly each parsed.

    Relations are the forward ones, united with the reverse ones when ``aggregate`` (else
    the reverse output is not used at all). ``anchor`` is the anchor-guided constraint: with
    ``"typed"`` (or True) a relation survives only if both its (span, type) mentions are among
    the NER outputs; with ``"reported"`` among the entities reported (the NER outputs, and with
    ``entities="union"`` the mentions the union adds, so that every reported entity keeps the
    relations its RE decoder wrote for it); with ``"span"`` only their spans must be among the NER
    outputs, and the relation keeps the types
    its RE decoder wrote (so a span can then appear as an entity of two types); ``"off"`` (or
    False) keeps every relation. In paradigms 2 and 4 the NER decoder is trained to omit every
    entity that takes part in a relation, so there is nothing to anchor to and ``anchor`` has
    no effect. A relation from a mention to itself is dropped unless ``self_relations``.
    Entities are the NER outputs plus the mentions of the surviving relations (with the typed
    anchor in paradigms 1 and 3 that adds nothing); with ``entities="union"`` also every mention
    an RE decoder wrote (in a relation kept or not) whose span overlaps no NER output, the first
    in sentence order where two such overlap: the RE decoders find entities the NER decoder missed,
    while an overlap is a boundary or type decision the NER decoder already made. Entities are
    ordered by (start, end, label order) and relations by (head, tail, label order), both without
    duplicates. ``mentions`` (the span head's) take the place of the NER outputs among the
    entities reported (and so for the ``"reported"`` anchor); the ``"typed"`` and ``"span"``
    anchors still check the NER decoder's own outputs.

    ``tokens`` must be the sentence (at least one token); the id lists may be anything.
    """
    paradigm = as_paradigm(paradigm)
    mode = {True: "typed", False: "off"}.get(anchor, anchor) if isinstance(anchor, bool) else anchor
    if mode not in ANCHOR_MODES:
        raise ValueError(f"anchor must be one of {ANCHOR_MODES}, got {anchor!r}")
    if entities not in ENTITY_SOURCES:
        raise ValueError(f"entities must be one of {ENTITY_SOURCES}, got {entities!r}")
    n_words = len(tokens)
    spans, ner_report = _read_entities(ner, n_words, labels)
    reported = spans if mentions is None else list(mentions)
    fwd_triples, fwd_report = _read_relations(fwd, n_words, labels, paradigm, reverse=False)
    rev_triples, rev_report = _read_relations(rev, n_words, labels, paradigm, reverse=True)
    triples = _unique(fwd_triples + rev_triples) if aggregate else fwd_triples
    # The RE mentions of every relation read, before the anchor filters relations against the
    # NER decoder's own spans (which the union must not widen).
    shown = (
        _with_unclaimed(reported, (m for t in triples for m in t[:2]), labels)
        if entities == "union"
        else reported
    )
    if not self_relations:
        triples = [t for t in triples if t[0][:2] != t[1][:2]]
    if mode in ("typed", "reported") and paradigm.ner_lists_all:
        anchors = set(spans if mode == "typed" else shown)
        triples = [t for t in triples if t[0] in anchors and t[1] in anchors]
    elif mode == "span" and paradigm.ner_lists_all:
        places = {span[:2] for span in spans}
        triples = [t for t in triples if t[0][:2] in places and t[1][:2] in places]
    sample = _assemble(sample_id, tokens, shown, triples, labels)
    return sample, ParseReport(ner_report, fwd_report, rev_report)


def _with_unclaimed(spans: list[Span], mentions: Iterable[Span], labels: LabelSet) -> list[Span]:
    """``spans`` plus each of ``mentions`` (in entity order) whose words none of those taken overlaps."""
    taken = list(spans)
    for start, end, label in sorted(set(mentions), key=_entity_order(labels)):
        if all(end <= s or e <= start for s, e, _ in taken):
            taken.append((start, end, label))
    return taken


def _assemble(
    sample_id: str, tokens: Sequence[str], spans: Iterable[Span], triples: Iterable[Triple], labels: LabelSet
) -> Sample:
    triples = list(triples)
    related = (span for head, tail, _ in triples for span in (head, tail))
    entities = sorted(set(spans).union(related), key=_entity_order(labels))
    index = {span: i for i, span in enumerate(entities)}
    relations = sorted(
        {(index[h], index[t], r) for h, t, r in triples}, key=lambda x: (x[0], x[1], labels.relation_id(x[2]))
    )
    return Sample(
        id=sample_id,
        tokens=list(tokens),
        entities=[Entity(start=s, end=e, type=t) for s, e, t in entities],
        relations=[Relation(head=h, tail=t, type=r) for h, t, r in relations],
    )


# --------------------------------------------------------------------------- alignment


def is_entity_key(key: Key) -> bool:
    return isinstance(key, tuple) and key[0] == "ent"


def is_relation_key(key: Key) -> bool:
    return isinstance(key, tuple) and key[0] == "rel"


def align_pairs(
    keys_a: Sequence[Key], keys_b: Sequence[Key], want: Callable[[Key], bool] = lambda key: key is not None
) -> list[tuple[int, int]]:
    """Pairs (i, j) of positions of two decoders that emit the same thing (equal keys).

    Only keys for which ``want`` is true are paired; None never is. A key can occur more
    than once in one sequence (a subject written in several flat triples, an object shared
    by several grouped blocks); then its occurrences are matched in order, the n-th in
    ``a`` with the n-th in ``b``, and the surplus of the longer side is paired with the
    first occurrence of the other side. So every wanted position that has a counterpart is
    in at least one pair, there are max(count_a, count_b) pairs per key (never a product),
    and swapping the arguments swaps each pair. Sorted by (i, j).
    """
    positions_a = _positions(keys_a, want)
    positions_b = _positions(keys_b, want)
    pairs = []
    for key, in_a in positions_a.items():
        in_b = positions_b.get(key)
        if not in_b:
            continue
        for n in range(max(len(in_a), len(in_b))):
            pairs.append((in_a[n] if n < len(in_a) else in_a[0], in_b[n] if n < len(in_b) else in_b[0]))
    return sorted(pairs)


def _positions(keys: Sequence[Key], want: Callable[[Key], bool]) -> Mapping[Key, list[int]]:
    positions: defaultdict[Key, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        if key is not None and want(key):
            positions[key].append(i)
    return positions


def shared_triple_keys(keys_a: Sequence[Key], keys_b: Sequence[Key]) -> Callable[[Key], bool]:
    """A ``want`` for forward/reverse alignment: the relation keys of triples that both
    sequences write, and the entity keys of those triples' heads and tails."""
    shared = {k for k in keys_a if is_relation_key(k)} & {k for k in keys_b if is_relation_key(k)}
    anchors = {span for _, head, tail, _ in shared for span in (head, tail)}
    return lambda key: key in shared or (is_entity_key(key) and key[1:4] in anchors)


def is_continuation_key(key: Key) -> bool:
    """An entity key past a mention's first token: a later word of it or its type label."""
    return is_entity_key(key) and key[4] >= 1


def role_pairs(
    roles_a: Sequence[tuple[Role, ...]], roles_b: Sequence[tuple[Role, ...]]
) -> list[tuple[int, int]]:
    """Pairs (i, j) of positions of two RE targets that write the same role of the same triple:
    the k-th token (k >= 1) of its head or of its tail, or its relation label. Sorted."""
    positions: defaultdict[Role, list[int]] = defaultdict(list)
    for j, roles in enumerate(roles_b):
        for role in roles:
            positions[role].append(j)
    pairs = {
        (i, j)
        for i, roles in enumerate(roles_a)
        for role in roles
        if role[1] == "rel" or role[2] >= 1
        for j in positions.get(role, ())
    }
    return sorted(pairs)


ALIGN_POSITIONS = ("decision", "all")


def decoder_pairs(targets: Targets, positions: str = "decision") -> dict[str, list[tuple[int, int]]]:
    """The aligned positions the collator needs: ``ner_fwd`` and ``ner_rev`` pair the NER target
    with an RE target on entity keys (empty in paradigms 2 and 4, whose NER target shares no entity
    with the RE targets), ``fwd_rev`` pairs the forward and reverse targets on shared triples.

    ``positions="decision"`` keeps only positions where the two decoders make the same decision.
    At the first token of a mention they do not: the NER decoder chooses which entity comes next
    in sentence order, an RE decoder which block anchor or which partner comes next, and pulling
    one towards the other teaches the RE decoders to put mass on entities in no relation. Later
    tokens of a mention (continue it, or close it with its type) and relation labels are the same
    decision in both. Forward and reverse positions are paired by (triple, role) rather than by
    order of occurrence. ``"all"`` pairs every shared entity token (:func:`align_pairs`,
    :func:`shared_triple_keys`).
    """
    if positions == "all":
        return {
            "ner_fwd": align_pairs(targets.ner_keys, targets.fwd_keys, is_entity_key),
            "ner_rev": align_pairs(targets.ner_keys, targets.rev_keys, is_entity_key),
            "fwd_rev": align_pairs(
                targets.fwd_keys, targets.rev_keys, shared_triple_keys(targets.fwd_keys, targets.rev_keys)
            ),
        }
    if positions != "decision":
        raise ValueError(f"positions must be one of {ALIGN_POSITIONS}, got {positions!r}")
    return {
        "ner_fwd": align_pairs(targets.ner_keys, targets.fwd_keys, is_continuation_key),
        "ner_rev": align_pairs(targets.ner_keys, targets.rev_keys, is_continuation_key),
        "fwd_rev": role_pairs(targets.fwd_roles, targets.rev_roles),
    }
