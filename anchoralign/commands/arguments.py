"""What the ``anchoralign`` commands share on their command lines: the parser of a command and the
options several of them take, each written once."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

# The options more than one command takes; a command may word a help text its own way.
SHARED: dict[str, dict[str, Any]] = {
    "checkpoint": {
        "required": True,
        "metavar": "DIR",
        "help": "model directory (a run's fitted/, best/ or final/)",
    },
    "dataset": {"required": True, "metavar": "NAME", "help": "a built-in dataset or the path of your data"},
    "data-dir": {"metavar": "DIR", "help": "data directory (default: $ANCHORALIGN_DATA, else ./data)"},
    "fold": {"type": int, "metavar": "K", "help": "cross-validation fold (ADE)"},
    "json": {"action": "store_true", "help": "print one JSON object instead of a table"},
}


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    run: Callable[[argparse.Namespace], int],
    summary: str,
    description: str,
    shared: dict[str, dict[str, Any]],
) -> argparse.ArgumentParser:
    """The parser of command ``name``, with the ``SHARED`` options named in ``shared`` (each with
    its changes to the shared definition, e.g. ``{"fold": {"help": ...}}``)."""
    p = subparsers.add_parser(name, help=summary, description=description)
    for option, changes in shared.items():
        p.add_argument(f"--{option}", **{**SHARED[option], **changes})
    p.set_defaults(func=run)
    return p
