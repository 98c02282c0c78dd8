"""The run's log: ``train.log``, ``metrics.jsonl`` and the console, written on rank 0 only; and the
window of loss terms and throughput that each ``train`` row of ``metrics.jsonl`` averages."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

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

    def progress(self, enabled: bool = True) -> Progress:
        """The stage's progress bar (steps, elapsed, remaining) on the log's console, rank 0 only."""
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not (self.active and enabled),
            transient=False,
        )

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


class Window:
    """Loss terms and throughput since the last metrics row (tensors summed on the device)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.samples = 0
        self.t0 = time.perf_counter()

    def add(self, terms: Mapping[str, torch.Tensor], samples: int) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1
        self.samples += samples

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpoints) does not count against throughput."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - start

    def means(self) -> dict[str, float]:
        # Gradient norms are measured on some steps only: each is averaged over its own count.
        return {k: float(v) / self.counts[k] for k, v in self.sums.items()}

    def samples_per_s(self) -> float:
        return self.samples / max(1e-9, time.perf_counter() - self.t0)
