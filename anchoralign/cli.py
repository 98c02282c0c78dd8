"""`anchoralign` command line: data-stats, score, evaluate, predict, fit-span-head, fit-relation-head.

Each sub-command lives in ``anchoralign/commands/<name>.py`` with ``register(subparsers)`` that
adds its parser and sets ``func``; this file only wires them and turns user errors into one line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape

from anchoralign.errors import UserError

COMMANDS = ["data_stats", "score", "evaluate", "predict", "fit_span_head", "fit_relation_head"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anchoralign", description="Joint NER and relation extraction (AnchorAlign)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"anchoralign.commands.{name}").register(sub)
    return parser


def hyphenated(argv: Sequence[str]) -> list[str]:
    """``--data_dir=x`` -> ``--data-dir=x``. Flags are spelled with hyphens in every tool; the
    spelling with underscores is accepted too, as the stages' config flags accept it."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        out.append(name.replace("_", "-") + eq + value if name.startswith("--") else arg)
    return out


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, run ``args.func(args)``, and print a UserError as one red line (shared by both CLIs)."""
    args = parser.parse_args(hyphenated(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        return err.exit_code
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/]")
        return 130
    except BrokenPipeError:
        if not stdout_reader_gone():
            raise  # a broken connection of the command's own (a server's socket): not ours to hide
        # The reader of stdout went away (`... | head`): what it wanted was written. Point stdout
        # at /dev/null so that the interpreter's last flush does not raise again, and exit as a
        # tool killed by SIGPIPE would, with no traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no real stdout (captured)
        return False


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_cli(build_parser(), argv))


if __name__ == "__main__":
    main()
