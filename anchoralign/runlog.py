"""The run's log: ``train.log``, ``metrics.jsonl`` and the console, written on rank 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from anchoralign import distributed

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"


class RunLog:
    """Console lines, ``train.log`` and ``metrics.jsonl``; silent on ranks other than 0.

    Nothing is written into the run folder before :meth:`open` (the trainer calls it when training
    starts; the first metrics row does too): the lines logged before are kept and written then, so
    a run that fails while loading its data leaves no run folder behind.
    """

    def __init__(self, output_dir: Path, console: Console | None = None):
        self.active = distributed.is_main()
        # Log lines stay whole (no wrapping at 80 columns when the output is not a terminal).
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.output_dir = output_dir
        self.log_path = output_dir / LOG_FILE
        self.metrics_path = output_dir / METRICS_FILE
        self.rows = 0  # metrics rows in the file (rank 0)
        self._waiting: list[str] | None = []  # train.log lines until the folder is opened

    def open(self) -> None:
        """Create the run folder and write the lines logged so far to ``train.log`` (once)."""
        if not self.active or self._waiting is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as f:
            f.writelines(self._waiting)
        self._waiting = None

    def info(self, msg: str) -> None:
        if not self.active:
            return
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {escape(msg)}", highlight=False)
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n"
        if self._waiting is not None:
            self._waiting.append(line)
            return
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(line)

    def metrics(self, row: dict[str, Any]) -> None:
        if not self.active:
            return
        self.open()
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.rows += 1

    def keep_metrics(self, rows: int) -> None:
        """Cut ``metrics.jsonl`` to its first ``rows`` rows: what a resumed checkpoint had logged
        (a fresh start keeps none), so that no step appears twice."""
        if not self.active:
            return
        self.open()
        kept = []
        if rows and self.metrics_path.is_file():
            kept = self.metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)[:rows]
        self.metrics_path.write_text("".join(kept), encoding="utf-8")
        self.rows = len(kept)
