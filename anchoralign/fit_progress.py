"""A head fit's progress, saved after every epoch, so that a fit that is stopped resumes at the
epoch where it stopped instead of starting over.

A fit of both heads on CoNLL04 takes about half an hour on one CPU thread, and NYT's training set
is 60 times larger; a fit that is killed (a session's end, the OOM killer, Ctrl-C) used to lose all
of it, since the fitted checkpoint is written only at the end (``fitted_heads.write_fitted``).
Now each fit keeps one file in a folder beside its output (``progress_dir``): the weights it
trains, the optimiser's state, the random-number state and the losses so far. The same command
started again finds it and goes on from the next epoch; the result is the one an uninterrupted fit
gives, to the last digit, because the data order is replayed from the seed (the shuffles of the
epochs done are drawn again) and the dropout masks continue from the saved random state.

A progress file is used only for the fit that wrote it: the same settings, the same training
split, on the same checkpoint (its files' names, sizes and modification times, so a checkpoint
trained again in place is not mistaken for the old one). Anything else starts over, and says so.
The folder is removed once the fitted checkpoint is written.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

PROGRESS_SUFFIX = ".partial"


def progress_dir(out: str | Path) -> Path:
    """The folder where the fits that write the checkpoint ``out`` keep their progress: beside it,
    so that a new ``--output`` never inherits another fit's progress."""
    out = Path(out)
    return out.with_name(out.name + PROGRESS_SUFFIX)


def remove_progress(out: str | Path) -> None:
    """Forget the progress of the fits of ``out`` (called once ``out`` is written)."""
    shutil.rmtree(progress_dir(out), ignore_errors=True)


def checkpoint_fingerprint(checkpoint: str | Path) -> list[list[Any]]:
    """The files of a checkpoint directory (its top level: weights, config, labels) as (name,
    size, modification time): what tells a checkpoint from the same folder written again, without
    reading its weights."""
    return sorted(
        [p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in Path(checkpoint).iterdir() if p.is_file()
    )


class FitProgress:
    """Where one fit keeps its progress (``path``; None: nowhere, the fit cannot resume) and what
    identifies the fit (``key``: compared whole on resume)."""

    def __init__(self, path: Path | None, key: dict[str, Any] | None = None):
        self.path = path
        self.key = key or {}

    @classmethod
    def of_fit(
        cls, out: str | Path, name: str, checkpoint: str | Path, fit: Any, dataset: str, train_split: str
    ) -> FitProgress:
        """The progress of the fit ``name`` (a report file's name: ``span_head.json``) with the
        settings ``fit`` (a dataclass) on ``checkpoint``, for the checkpoint ``out``."""
        key = {
            "checkpoint": checkpoint_fingerprint(checkpoint),
            "fit": dataclasses.asdict(fit),
            "dataset": dataset,
            "train_split": train_split,
        }
        return cls(progress_dir(out) / (Path(name).stem + ".pt"), key)

    def restore(
        self, modules: Sequence[nn.Module], optimizer: torch.optim.Optimizer, log: Callable[[str], None]
    ) -> tuple[int, list[float]]:
        """Load the saved state into ``modules`` and ``optimizer`` (the fit's, freshly built as at its
        start); the epochs done and their losses, (0, []) when there is nothing to resume."""
        if self.path is None or not self.path.is_file():
            return 0, []
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        if saved.get("key") != self.key:
            log(f"{self.path} is the progress of another fit (settings or checkpoint differ): starting over")
            return 0, []
        for module, state in zip(modules, saved["modules"], strict=True):
            module.load_state_dict(state)
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        epochs = int(saved["epochs"])
        log(f"resuming after epoch {epochs} from {self.path}")
        return epochs, [float(x) for x in saved["losses"]]

    def save(
        self,
        epochs: int,
        losses: Sequence[float],
        modules: Sequence[nn.Module],
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """Save the state after ``epochs`` epochs, replacing the previous one whole (written under
        a temporary name and renamed, so a fit killed mid-save resumes from the epoch before)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "key": self.key,
            "epochs": epochs,
            "losses": list(losses),
            "modules": [m.state_dict() for m in modules],
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)


NO_PROGRESS = FitProgress(None)
