"""The smallest dataset metadata the record tests share (imported, not a conftest)."""

from __future__ import annotations

from anchoralign.schema import DatasetMeta

# Two entity types and one relation: enough for a record to be valid or to break each check.
PEOP_ORG_META = DatasetMeta(
    name="toy",
    language="en",
    entity_types={"Peop": "person", "Org": "organization"},
    relation_types={"Work_For": "works for"},
    symmetric_relations=frozenset(),
    boundary_only=False,
    splits=("train",),
)
