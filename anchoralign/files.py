"""Reading and writing files safely."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from anchoralign.errors import UserError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so that a reader (or a
    run killed midway) sees the old file or the new one, never half of one."""
    atomic_write_lines(path, [text], end="")


def atomic_write_lines(path: str | Path, lines: Iterable[str], end: str = "\n") -> None:
    """:func:`atomic_write_text` of ``lines`` streamed one by one, each followed by ``end``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + end)
    tmp.replace(path)


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file holding one object; anything else is one UserError line naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data
