"""CasRel triple format (NYT): a JSON array of ``{"text", "triple_list": [[s, r, o], ...]}``.

The text is tokenised by whitespace (the corpora come pre-tokenised with single spaces), mentions
likewise; spans and entity types are found as described in ``anchoralign.formats.placement``.
"""

from __future__ import annotations

from pathlib import Path

from anchoralign.formats.common import FormatOptions, LoadReport, iter_objects, read_items, require
from anchoralign.formats.triples import parse_triple, sample_from_triples
from anchoralign.schema import Sample


def load(path: Path, options: FormatOptions) -> tuple[list[Sample], LoadReport]:
    report = LoadReport(files=[str(path)])
    samples = []
    for k, (where, obj) in enumerate(iter_objects(read_items(path))):
        tokens = require(obj, "text", str, where).split()
        if not tokens:
            raise where.error("the text is empty", "text")
        triples = [
            (f"triple_list[{j}]", parse_triple(t, where, f"triple_list[{j}]"))
            for j, t in enumerate(require(obj, "triple_list", list, where))
        ]
        sample_id = f"{options.id_prefix}-{k}"
        samples.append(sample_from_triples(sample_id, tokens, triples, options, str.split, report, where))
    return samples, report
