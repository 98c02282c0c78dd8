"""One loader per source file format; each returns samples plus a LoadReport of what it could not keep.

Loaders are chosen by the ``format`` named in a dataset's metadata, so no loader knows dataset names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from anchoralign.formats import casrel, dygie, jointer, records, spert, text2dt
from anchoralign.formats.common import FormatOptions, LoadReport
from anchoralign.schema import Sample

Loader = Callable[[Path, FormatOptions], tuple[list[Sample], LoadReport]]

LOADERS: dict[str, Loader] = {
    "spert": spert.load,
    "casrel": casrel.load,
    "jointer": jointer.load,
    "dygie": dygie.load,
    "text2dt": text2dt.load,
    "records": records.load,
}

__all__ = ["LOADERS", "FormatOptions", "LoadReport", "Loader"]
