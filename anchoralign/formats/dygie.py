"""DyGIE / PURE document JSON (ACE05 as produced by the usual preprocessing scripts), one document a line.

``{"doc_key", "sentences": [[token, ...], ...], "ner": [[[start, end, type], ...] per sentence],
"relations": [[[s_start, s_end, o_start, o_end, type], ...] per sentence]}``. Offsets count tokens from
the start of the *document* and ends are inclusive; each sentence becomes one sample with sentence
offsets and exclusive ends. A relation whose argument span is not one of the sentence's entities
cannot be represented and is counted as unplaced. Other keys (``clusters``, ``events``...) are ignored.
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
    sample_ids,
    validate_sample,
)
from anchoralign.schema import Entity, Relation, Sample


def _per_sentence(doc: dict[str, Any], key: str, n_sentences: int, where: Where) -> list[Any]:
    """``doc[key]`` (one list per sentence); absent means no annotations."""
    value = doc.get(key)
    if value is None:
        return [[] for _ in range(n_sentences)]
    if not isinstance(value, list) or len(value) != n_sentences:
        got = f"{len(value)} lists" if isinstance(value, list) else type(value).__name__
        raise where.error(f"expected one list per sentence ({n_sentences}), got {got}", key)
    return value


def _ints_and_label(value: Any, n_ints: int, where: Where, field: str) -> tuple[list[int], str]:
    ok = (
        isinstance(value, list)
        and len(value) == n_ints + 1
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value[:n_ints])
        and isinstance(value[n_ints], str)
    )
    if not ok:
        raise where.error(f"expected {n_ints} token offsets and a label, got {value!r}", field)
    return value[:n_ints], value[n_ints]


def load(path: Path, options: FormatOptions) -> tuple[list[Sample], LoadReport]:
    report = LoadReport(files=[str(path)])
    docs = list(iter_objects(read_items(path)))
    doc_ids = sample_ids(options.id_prefix, [doc.get("doc_key") for _, doc in docs])
    samples: list[Sample] = []
    skipped = 0
    for doc_id, (where, doc) in zip(doc_ids, docs, strict=True):
        sentences = require(doc, "sentences", list, where)
        ner = _per_sentence(doc, "ner", len(sentences), where)
        rels = _per_sentence(doc, "relations", len(sentences), where)
        offset = 0
        for k, tokens in enumerate(sentences):
            if not isinstance(tokens, list):
                raise where.error(
                    f"expected a list of tokens, got {type(tokens).__name__}", f"sentences[{k}]"
                )
            n = len(tokens)
            entities: list[Entity] = []
            for j, value in enumerate(ner[k]):
                field = f"ner[{k}][{j}]"
                (start, end), label = _ints_and_label(value, 2, where, field)
                if not offset <= start <= end < offset + n:
                    raise where.error(
                        f"span {start}..{end} is outside sentence {k} (document tokens {offset}..{offset + n - 1})",
                        field,
                    )
                entities.append(Entity(start=start - offset, end=end - offset + 1, type=label))
            index: dict[tuple[int, int], int] = {}
            for i, e in enumerate(entities):
                index.setdefault((e.start + offset, e.end + offset - 1), i)
            relations: list[Relation] = []
            for j, value in enumerate(rels[k]):
                (s1, e1, s2, e2), label = _ints_and_label(value, 4, where, f"relations[{k}][{j}]")
                report.source_relations += 1
                if (s1, e1) in index and (s2, e2) in index:
                    relations.append(Relation(head=index[(s1, e1)], tail=index[(s2, e2)], type=label))
                else:
                    report.add_unplaced(
                        f"{doc_id}-{k}", f"{label} {s1}..{e1} -> {s2}..{e2} (no entity at that span)"
                    )
            offset += n
            if n == 0:
                skipped += 1
                continue
            record = {"id": f"{doc_id}-{k}", "tokens": tokens, "entities": entities, "relations": relations}
            samples.append(validate_sample(record, where))
    if skipped:
        report.notes.append(f"{path.name}: {skipped} empty sentences skipped (no tokens, no annotations)")
    return samples, report
