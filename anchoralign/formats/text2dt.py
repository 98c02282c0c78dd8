"""Text2DT (Chinese medical decision trees) read as character-level relation triples.

Each item is ``{"text", "tree": [{"role": "C"|"D", "triples": [[s, r, o], ...], "logical_rel"}, ...]}``
(a JSON array, or one item a line). The tree structure is dropped: the triples of all nodes are
flattened in node order, and a triple repeated in several nodes is kept once (counted as merged),
because on the sentence it is one fact. Tokens are the non-space characters of the text; spans and
entity types are found as described in ``anchoralign.formats.placement``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from anchoralign.formats.common import FormatOptions, LoadReport, iter_objects, read_items, require
from anchoralign.formats.placement import Triple
from anchoralign.formats.triples import parse_triple, sample_from_triples
from anchoralign.schema import Sample
from anchoralign.tokenize import tokenize

_characters = partial(tokenize, language="zh")


def load(path: Path, options: FormatOptions) -> tuple[list[Sample], LoadReport]:
    report = LoadReport(files=[str(path)])
    samples = []
    for k, (where, obj) in enumerate(iter_objects(read_items(path))):
        tokens = _characters(require(obj, "text", str, where))
        if not tokens:
            raise where.error("the text is empty", "text")
        sample_id = f"{options.id_prefix}-{k}"
        unique: dict[Triple, str] = {}  # triple -> field of its first occurrence
        for n, node in enumerate(require(obj, "tree", list, where)):
            if not isinstance(node, dict):
                raise where.error(f"expected a node object, got {type(node).__name__}", f"tree[{n}]")
            if not isinstance(node.get("triples", []), list):
                raise where.error("expected a list", f"tree[{n}].triples")
            for j, value in enumerate(node.get("triples", [])):
                field = f"tree[{n}].triples[{j}]"
                triple = parse_triple(value, where, field)
                if triple in unique:
                    report.count(sample_id, "merged_duplicates")
                    report.source_relations += 1
                else:
                    unique[triple] = field
        triples = [(field, triple) for triple, field in unique.items()]
        samples.append(sample_from_triples(sample_id, tokens, triples, options, _characters, report, where))
    return samples, report
