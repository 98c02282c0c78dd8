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
    """Console lines, ``train.log`` and ``metrics.jsonl``; silent on ranks other than 0."""

    def __init__(self, output_dir: Path, console: Console | None = None):
        self.active = distributed.is_main()
        # Log lines stay whole (no wrapping at 80 columns when the output is not a terminal).
        self.console = console or Console(stderr=True, soft_wrap=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = output_dir / LOG_FILE
        self.metrics_path = output_dir / METRICS_FILE
        self.rows = 0  # metrics rows in the file (rank 0)

    def info(self, msg: str) -> None:
        if not self.active:
            return
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {escape(msg)}", highlight=False)
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    def metrics(self, row: dict[str, Any]) -> None:
        if not self.active:
            return
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.rows += 1

    def keep_metrics(self, rows: int) -> None:
        """Cut ``metrics.jsonl`` to its first ``rows`` rows: what a resumed checkpoint had logged
        (a fresh start keeps none), so that no step appears twice."""
        if not self.active:
            return
        kept = []
        if rows and self.metrics_path.is_file():
            kept = self.metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)[:rows]
        self.metrics_path.write_text("".join(kept), encoding="utf-8")
        self.rows = len(kept)
