"""JointER JSON (the WebNLG version with spans): a JSON array of items with token-level triples.

Items are ``{"tokens", "spo_list", "spo_details": [[s_start, s_end, s_type, relation, o_start, o_end,
o_type], ...]}`` with exclusive ends; ``spo_list`` repeats the same triples as strings and is not read.
A span is one entity; if two triples give it different types, the first triple's type is kept and the
span is counted as a type conflict (the rule of the other triple formats).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anchoralign.formats.common import (
    FormatOptions,
    LoadReport,
    Where,
    iter_objects,
    read_items,
    require,
    validate_sample,
)
from anchoralign.schema import Entity, Relation, Sample

Detail = tuple[int, int, str, str, int, int, str]


def _detail(value: Any, n_tokens: int, where: Where, field: str) -> Detail:
    shape_ok = isinstance(value, list) and len(value) == 7
    kinds = (int, int, str, str, int, int, str)
    if not shape_ok or not all(
        isinstance(v, k) and not isinstance(v, bool) for v, k in zip(value, kinds, strict=True)
    ):
        raise where.error(
            f"expected [s_start, s_end, s_type, relation, o_start, o_end, o_type], got {value!r}", field
        )
    for start, end in ((value[0], value[1]), (value[4], value[5])):
        if not 0 <= start < end <= n_tokens:
            raise where.error(f"span {start}..{end} is not inside the {n_tokens} tokens", field)
    s_start, s_end, s_type, relation, o_start, o_end, o_type = value
    return s_start, s_end, s_type, relation, o_start, o_end, o_type


def load(path: Path, options: FormatOptions) -> tuple[list[Sample], LoadReport]:
    report = LoadReport(files=[str(path)])
    samples = []
    for k, (where, obj) in enumerate(iter_objects(read_items(path))):
        tokens = require(obj, "tokens", list, where)
        details = [
            _detail(d, len(tokens), where, f"spo_details[{j}]")
            for j, d in enumerate(require(obj, "spo_details", list, where))
        ]
        type_of: dict[tuple[int, int], str] = {}
        conflicts = set()
        for s_start, s_end, s_type, _, o_start, o_end, o_type in details:
            for span, entity_type in (((s_start, s_end), s_type), ((o_start, o_end), o_type)):
                if type_of.setdefault(span, entity_type) != entity_type:
                    conflicts.add(span)
        ordered = sorted(type_of)
        index = {span: i for i, span in enumerate(ordered)}
        relations = [Relation(head=index[(d[0], d[1])], tail=index[(d[4], d[5])], type=d[3]) for d in details]
        entities = [Entity(start=s, end=e, type=type_of[(s, e)]) for s, e in ordered]
        record = {
            "id": f"{options.id_prefix}-{k}",
            "tokens": tokens,
            "entities": entities,
            "relations": relations,
        }
        samples.append(validate_sample(record, where))
        report.source_relations += len(details)
        report.count(record["id"], "type_conflicts", len(conflicts))
    return samples, report
