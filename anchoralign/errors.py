"""Errors a user can cause. The CLIs print them as one line (no traceback) and exit non-zero."""

from __future__ import annotations


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
