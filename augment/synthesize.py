"""Synthesis of new labelled sentences from accepted variants, consistent by construction.

Pure functions: no network, no files.

``synthesize`` crosses (original mentions + accepted mention variants) with (original context +
accepted context variants), leaving out the original pair. Every combination goes through one
``fill``: a context is a list of segments (a list of tokens, or an entity index), each index is
replaced by that entity's mention tokens, and the span of entity ``i`` is where its tokens landed.
Types and relations are copied by index, so the output's ``entities`` list stays index-aligned with
the source's even when a context variant moves placeholders around (entities are then not in
position order; the relations still point at the right ones).

Tokens: the original context and the original mentions keep the dataset's own tokens (re-tokenising
their detokenised text could split them differently, e.g. ``cannot`` or ``''``); LLM-written text is
tokenised with ``anchoralign.tokenize.tokenize`` piece by piece, so an entity boundary is always a
token boundary (``<mask0>-based`` gives ``Paris``, ``-``, ``based``).

Each record is validated by the schema and by an independent ``check_consistency`` before it is
returned; a failure there is a bug, raised as ``InconsistentRecord``. Results are de-duplicated
within the source. The runner then drops records whose sentence is in the dev or test split
(``sentence_key``, ``exclude_sentences``) and writes the masked corpus with ``mask_sample``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Collection, Iterable, Sequence
from itertools import pairwise

from pydantic import ValidationError

from anchoralign.schema import Entity, Sample, mask_token
from anchoralign.tokenize import tokenize
from augment.parse import ContextVariant, MentionVariant, split_template
from augment.prompts import MASK_PATTERN, eligibility, position_order

Segment = list[str] | int  # tokens of context text, or the index of the entity placed there
ORIGINS = {(True, False): "mention", (False, True): "context", (True, True): "cross"}


class InconsistentRecord(RuntimeError):
    """A synthesised record failed its consistency check: a bug in synthesis, never bad LLM output."""


def context_segments(source: Sample) -> list[Segment]:
    """The source's own context: its tokens between entities, entity ``i`` as index ``i``."""
    segments: list[Segment] = []
    pos = 0
    for i in position_order(source):
        e = source.entities[i]
        if e.start > pos:
            segments.append(list(source.tokens[pos : e.start]))
        segments.append(i)
        pos = e.end
    if pos < len(source.tokens):
        segments.append(list(source.tokens[pos:]))
    return segments


def template_segments(template: str, language: str = "en") -> list[Segment]:
    """Segments of a context variant's template (``<mask{i}>`` placeholders), text tokenised."""
    segments: list[Segment] = []
    for part in split_template(template):
        if isinstance(part, int):
            segments.append(part)
        elif tokens := tokenize(part, language):
            segments.append(tokens)
    return segments


def fill(
    segments: Sequence[Segment], mentions: Sequence[Sequence[str]]
) -> tuple[list[str], list[tuple[int, int]]]:
    """Tokens of the filled context and the (start, end) span of every entity, by entity index.

    Every entity index must occur exactly once in ``segments`` and every mention be non-empty
    (ValueError otherwise: the parser guarantees both for accepted variants).
    """
    tokens: list[str] = []
    spans: list[tuple[int, int] | None] = [None] * len(mentions)
    for seg in segments:
        if isinstance(seg, int):
            if not 0 <= seg < len(mentions) or spans[seg] is not None:
                raise ValueError(f"entity index {seg} is out of range or placed twice")
            if not mentions[seg]:
                raise ValueError(f"entity {seg} has an empty mention")
            spans[seg] = (len(tokens), len(tokens) + len(mentions[seg]))
            tokens.extend(mentions[seg])
        else:
            tokens.extend(seg)
    missing = [i for i, s in enumerate(spans) if s is None]
    if missing:
        raise ValueError(f"entities {missing} have no place in the context")
    return tokens, [s for s in spans if s is not None]


def consistency_problems(
    sample: Sample, source: Sample, mentions: Sequence[Sequence[str]] | None = None
) -> list[str]:
    """Why ``sample`` is not a faithful synthesis from ``source`` (empty when it is).

    Checks, without trusting how the record was built: the same number of entities with the same
    types by index, identical relations, non-overlapping spans, tokens that are non-empty and free
    of whitespace and of leftover placeholders, ``source_id``/``origin`` set, and, when the intended
    ``mentions`` are given, that each span covers exactly the tokens of its mention.
    """
    problems = []
    if len(sample.entities) != len(source.entities):
        problems.append(f"{len(sample.entities)} entities instead of {len(source.entities)}")
    for i, (got, want) in enumerate(zip(sample.entities, source.entities, strict=False)):
        if got.type != want.type:
            problems.append(f"entity {i}: type {got.type!r} instead of {want.type!r}")
    if sample.relations != source.relations:
        problems.append("relations differ from the source's")
    spans = sorted((e.start, e.end) for e in sample.entities)
    if any(b[0] < a[1] for a, b in pairwise(spans)):
        problems.append("entity spans overlap")
    for t, tok in enumerate(sample.tokens):
        if not tok or any(ch.isspace() for ch in tok):
            problems.append(f"token {t} {tok!r} is empty or has whitespace")
    # Joined, because our tokenizer splits a leftover "<mask0>" into "<", "mask0", ">".
    if MASK_PATTERN.search(" ".join(sample.tokens)):
        problems.append("a placeholder is left in the sentence")
    if sample.source_id != source.id or sample.origin not in ORIGINS.values():
        problems.append(
            f"source_id {sample.source_id!r} / origin {sample.origin!r} not set for source {source.id!r}"
        )
    if mentions is not None:
        for i, e in enumerate(sample.entities):
            if i < len(mentions) and sample.tokens[e.start : e.end] != list(mentions[i]):
                problems.append(
                    f"entity {i}: span holds {sample.tokens[e.start : e.end]} instead of {list(mentions[i])}"
                )
    return problems


def check_consistency(
    sample: Sample, source: Sample, mentions: Sequence[Sequence[str]] | None = None
) -> None:
    """Raise InconsistentRecord when consistency_problems finds anything."""
    problems = consistency_problems(sample, source, mentions)
    if problems:
        raise InconsistentRecord(f"record {sample.id!r}: " + "; ".join(problems))


def _build(
    source: Sample, record_id: str, origin: str, segments: list[Segment], mentions: list[list[str]]
) -> Sample:
    tokens, spans = fill(segments, mentions)
    try:
        sample = Sample(
            id=record_id,
            tokens=tokens,
            entities=[
                Entity(start=s, end=e, type=src.type)
                for (s, e), src in zip(spans, source.entities, strict=True)
            ],
            relations=list(source.relations),
            source_id=source.id,
            origin=origin,
        )
    except ValidationError as err:
        raise InconsistentRecord(f"record {record_id!r} fails the schema: {err}") from err
    check_consistency(sample, source, mentions)
    return sample


def synthesize(
    source: Sample,
    mentions: Sequence[MentionVariant],
    contexts: Sequence[ContextVariant],
    language: str = "en",
) -> list[Sample]:
    """All (M+1)(C+1)-1 records built from ``source`` and its accepted variants, de-duplicated.

    Ids are ``f"{source.id}/m{i}c{j}"``: ``i`` is 0 for the original mentions, else the 1-based
    mention variant; ``j`` likewise for contexts. Order: by ``i``, then by ``j``.
    """
    reason = eligibility(source)
    if reason is not None:
        raise ValueError(f"sample {source.id!r} cannot be synthesised from ({reason})")
    n = len(source.entities)
    mention_sets = [[list(source.tokens[e.start : e.end]) for e in source.entities]]
    for v in mentions:
        if len(v.mentions) != n:
            raise ValueError(f"mention variant {v.text!r} has {len(v.mentions)} mentions for {n} entities")
        mention_sets.append([tokenize(m, language) for m in v.mentions])
    context_sets = [context_segments(source)] + [template_segments(c.template, language) for c in contexts]
    out = []
    for i, ms in enumerate(mention_sets):
        for j, cs in enumerate(context_sets):
            if i == 0 and j == 0:
                continue
            out.append(_build(source, f"{source.id}/m{i}c{j}", ORIGINS[(i > 0, j > 0)], cs, ms))
    return dedupe(out)[0]


def variant_samples(
    source: Sample,
    mentions: Sequence[MentionVariant],
    contexts: Sequence[ContextVariant],
    language: str = "en",
) -> tuple[list[Sample], list[Sample]]:
    """Each accepted variant as a sentence of its own: mention variant ``i`` in the source's
    context (``m{i}c0``) and context variant ``j`` with the source's mentions (``m0c{j}``), the
    records ``synthesize`` makes from it, one for each variant, not de-duplicated."""
    original = [list(source.tokens[e.start : e.end]) for e in source.entities]
    own_context = context_segments(source)
    by_mention = [
        _build(
            source, f"{source.id}/m{i}c0", "mention", own_context, [tokenize(m, language) for m in v.mentions]
        )
        for i, v in enumerate(mentions, start=1)
    ]
    by_context = [
        _build(source, f"{source.id}/m0c{j}", "context", template_segments(c.template, language), original)
        for j, c in enumerate(contexts, start=1)
    ]
    return by_mention, by_context


def mask_sample(sample: Sample) -> Sample:
    """The masked-corpus form: entity ``i``'s mention replaced by the one token ``<mask{i}>``.

    Types, relations, id, source_id and origin are kept; only for non-overlapping entities.
    """
    tokens: list[str] = []
    entities: list[Entity | None] = [None] * len(sample.entities)
    pos = 0
    for i in position_order(sample):
        e = sample.entities[i]
        tokens.extend(sample.tokens[pos : e.start])
        entities[i] = Entity(start=len(tokens), end=len(tokens) + 1, type=e.type)
        tokens.append(mask_token(i))
        pos = e.end
    tokens.extend(sample.tokens[pos:])
    # Built anew rather than model_copy'd so that the schema validates the result.
    return Sample(**{**sample.model_dump(), "tokens": tokens, "entities": entities})


def sentence_key(tokens: Iterable[str]) -> str:
    """The sentence compared for dev/test exclusion: NFKC, case-folded, all whitespace removed.

    Ignoring token boundaries makes the comparison independent of how each side was tokenised
    (the datasets' own tokens versus ours); two sentences differing only in spacing count as equal,
    which errs on the side of excluding.
    """
    return "".join(unicodedata.normalize("NFKC", "".join(tokens)).casefold().split())


def exclude_sentences(samples: Iterable[Sample], forbidden_keys: Collection[str]) -> tuple[list[Sample], int]:
    """(samples whose sentence_key is not forbidden, number dropped)."""
    kept, dropped = [], 0
    for s in samples:
        if sentence_key(s.tokens) in forbidden_keys:
            dropped += 1
        else:
            kept.append(s)
    return kept, dropped


def _record_key(s: Sample) -> tuple:
    return (
        tuple(s.tokens),
        tuple((e.start, e.end, e.type) for e in s.entities),
        tuple((r.head, r.tail, r.type) for r in s.relations),
    )


def dedupe(samples: Iterable[Sample]) -> tuple[list[Sample], int]:
    """(first occurrence of every distinct (tokens, entities, relations), number dropped)."""
    seen: set[tuple] = set()
    kept, dropped = [], 0
    for s in samples:
        key = _record_key(s)
        if key in seen:
            dropped += 1
        else:
            seen.add(key)
            kept.append(s)
    return kept, dropped
