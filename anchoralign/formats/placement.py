"""Anchoring string triples ``(subject, relation, object)`` to typed token spans.

Triple datasets (NYT, Text2DT) name their entities by text only, without offsets or types. The rules,
all deterministic:

- A mention is searched as a contiguous run of tokens; if it is absent verbatim, it is searched again
  with accents and compatibility forms ignored on both sides (NFKD, combining marks dropped), which
  finds ``Cancún`` in a sentence spelling ``Cancun``.
- When a mention occurs several times, the first occurrence that is not strictly inside an occurrence
  of a longer mention of the same sentence is used (so ``New York`` is not placed inside an earlier
  ``New York City``); if every occurrence is inside one, the first occurrence is used. One string is
  therefore one entity per sentence, and the same span reached by two strings is one entity.
- An entity's type comes from the relation schema (subject and object type of each relation). When
  relations disagree about a span, the type from the first triple in the sentence's list wins and the
  span is counted as a type conflict.
- A triple with an argument that cannot be found is left out and counted as unplaced; its other
  argument, when found, is still an entity (it is an annotated mention of the sentence).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from anchoralign.schema import Entity, Relation

Triple = tuple[str, str, str]
Span = tuple[int, int]


@dataclass(frozen=True)
class Placement:
    entities: list[Entity]  # ordered by (start, end)
    relations: list[Relation]  # the placed triples, in source order
    unplaced: list[Triple]
    type_conflicts: int
    normalised_matches: int  # mentions found only after normalisation


def normalise(token: str) -> str:
    """``token`` without accents and with compatibility characters (full-width digits...) folded."""
    decomposed = unicodedata.normalize("NFKD", token)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def find_occurrences(tokens: Sequence[str], mention: Sequence[str]) -> list[int]:
    """Start offsets of every occurrence of ``mention`` as a contiguous run of ``tokens``."""
    n = len(mention)
    if n == 0:
        return []
    first = mention[0]
    return [
        i
        for i in range(len(tokens) - n + 1)
        if tokens[i] == first and list(tokens[i : i + n]) == list(mention)
    ]


def choose_span(starts: Sequence[int], length: int, longer: Sequence[Span]) -> Span:
    """The first occurrence not strictly inside one of the ``longer`` spans, else the first one."""
    for start in starts:
        end = start + length
        if not any(s <= start and end <= e and (s, e) != (start, end) for s, e in longer):
            return start, end
    return starts[0], starts[0] + length


def place_triples(
    tokens: Sequence[str],
    triples: Sequence[Triple],
    argument_types: Mapping[str, tuple[str, str]],
    split_mention: Callable[[str], list[str]],
) -> Placement:
    """Entities and relations of one sentence from its triples (see the module docstring for the rules).

    Every relation of ``triples`` must be a key of ``argument_types`` (callers check this, to report the
    file and item of an unknown relation).
    """
    normalised_tokens: list[str] | None = None
    occurrences: dict[str, tuple[list[int], int]] = {}  # mention -> (starts, length in tokens)
    normalised = 0
    for mention in dict.fromkeys(m for s, _, o in triples for m in (s, o)):
        parts = split_mention(mention)
        starts = find_occurrences(tokens, parts)
        if not starts and parts:
            if normalised_tokens is None:
                normalised_tokens = [normalise(t) for t in tokens]
            starts = find_occurrences(normalised_tokens, [normalise(p) for p in parts])
            normalised += bool(starts)
        occurrences[mention] = (starts, len(parts))

    all_spans = [(s, s + n) for starts, n in occurrences.values() for s in starts]
    span_of: dict[str, Span] = {}
    for mention, (starts, n) in occurrences.items():
        if starts:
            span_of[mention] = choose_span(starts, n, [sp for sp in all_spans if sp[1] - sp[0] > n])

    type_of: dict[Span, str] = {}
    conflicts: set[Span] = set()
    for subject, relation, obj in triples:
        for mention, entity_type in zip((subject, obj), argument_types[relation], strict=True):
            span = span_of.get(mention)
            if span is None:
                continue
            if type_of.setdefault(span, entity_type) != entity_type:
                conflicts.add(span)

    ordered = sorted(type_of)
    index = {span: i for i, span in enumerate(ordered)}
    relations, unplaced = [], []
    for triple in triples:
        subject, relation, obj = triple
        if subject in span_of and obj in span_of:
            relations.append(Relation(head=index[span_of[subject]], tail=index[span_of[obj]], type=relation))
        else:
            unplaced.append(triple)
    return Placement(
        entities=[Entity(start=s, end=e, type=type_of[(s, e)]) for s, e in ordered],
        relations=relations,
        unplaced=unplaced,
        type_conflicts=len(conflicts),
        normalised_matches=normalised,
    )
