"""Errors a user can cause. The CLIs print them as one line (no traceback) and exit non-zero."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class UserError(Exception):
    """A problem with the user's input, config, data or environment, explained in one message."""

    exit_code = 2


class RecordError(UserError):
    """A bad record in a data file: names the file, the line (1-based) and the field."""

    def __init__(self, path: str, line: int | None, message: str, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': {message}" if field else message
        super().__init__(f"{where}: {what}")


def first_error(err: ValidationError) -> tuple[str, str, Any]:
    """The first problem of a pydantic error as (dotted field path, message, the value given).

    The one place that turns pydantic's report into the words of a one-line UserError. A value
    that fits no member of a union (``float | [float, float, float]``) is reported once, with the
    message of the project's own check when one ran, and without pydantic's member tags in the path.
    """
    errors = err.errors()
    first = next((e for e in errors if e["type"] == "value_error"), errors[0])
    where = ".".join(str(p) for p in first["loc"] if not _union_tag(p))
    return where, first["msg"].removeprefix("Value error, "), first.get("input")


def _union_tag(part: object) -> bool:
    """pydantic names the member of a union it tried ('float', 'tuple[float, float, float]')."""
    return isinstance(part, str) and (part in {"float", "int", "str", "bool", "list", "tuple"} or "[" in part)
