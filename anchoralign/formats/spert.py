"""SpERT JSON (SciERC, CoNLL04, ADE): a JSON array of records that already are in our format.

Items are ``{"tokens", "entities": [{"type", "start", "end"}], "relations": [{"type", "head", "tail"}],
"orig_id"}`` with exclusive ends, so loading is validation plus an id.
"""

from __future__ import annotations

from pathlib import Path

from anchoralign.formats.common import (
    FormatOptions,
    LoadReport,
    iter_objects,
    read_items,
    sample_ids,
    validate_sample,
)
from anchoralign.schema import Sample


def load(path: Path, options: FormatOptions) -> tuple[list[Sample], LoadReport]:
    items = list(iter_objects(read_items(path)))
    ids = sample_ids(options.id_prefix, [obj.get("orig_id") for _, obj in items])
    samples = []
    for sample_id, (where, obj) in zip(ids, items, strict=True):
        record = {k: v for k, v in obj.items() if k != "orig_id"}
        samples.append(validate_sample({**record, "id": sample_id}, where))
    report = LoadReport(files=[str(path)], source_relations=sum(len(s.relations) for s in samples))
    return samples, report
