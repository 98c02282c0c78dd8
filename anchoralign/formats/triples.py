"""Shared by the formats that give ``[subject, relation, object]`` strings (CasRel, Text2DT)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from anchoralign.formats.common import FormatOptions, LoadReport, Where
from anchoralign.formats.placement import Triple, place_triples
from anchoralign.schema import Sample


def parse_triple(value: Any, where: Where, field: str) -> Triple:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)):
        raise where.error(f"expected [subject, relation, object] strings, got {value!r}", field)
    subject, relation, obj = value
    return subject, relation, obj


def sample_from_triples(
    sample_id: str,
    tokens: list[str],
    triples: Sequence[tuple[str, Triple]],
    options: FormatOptions,
    split_mention: Callable[[str], list[str]],
    report: LoadReport,
    where: Where,
) -> Sample:
    """Place ``(field name, triple)`` pairs on ``tokens``; counts go to ``report``.

    A relation missing from the schema is an error (its arguments could not be typed), not a count.
    """
    for field, (_, relation, _) in triples:
        if relation not in options.argument_types:
            known = ", ".join(sorted(options.argument_types))
            raise where.error(f"relation {relation!r} is not in the dataset's schema (known: {known})", field)
    placement = place_triples(tokens, [t for _, t in triples], options.argument_types, split_mention)
    report.source_relations += len(triples)
    report.count(sample_id, "type_conflicts", placement.type_conflicts)
    report.count(sample_id, "normalised_matches", placement.normalised_matches)
    for subject, relation, obj in placement.unplaced:
        report.add_unplaced(sample_id, f"({subject!r}, {relation!r}, {obj!r})")
    return Sample(id=sample_id, tokens=tokens, entities=placement.entities, relations=placement.relations)
