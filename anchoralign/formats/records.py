"""The project's own record format (jsonl, one sample a line, or a saved ``datasets`` folder of
records), for a user's data."""

from __future__ import annotations

from pathlib import Path

from anchoralign.formats.common import FormatOptions, LoadReport
from anchoralign.schema import Sample, read_records


def load(path: Path, options: FormatOptions) -> tuple[list[Sample], LoadReport]:
    # Ids are the user's own (or <file stem>-<line>), so that predictions match them by id.
    samples = read_records(path)
    return samples, LoadReport(files=[str(path)], source_relations=sum(len(s.relations) for s in samples))
