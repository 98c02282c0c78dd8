"""What the fit commands (``fit-span-head``, ``fit-relation-head``) share: a new output directory,
the splits and checkpoint to fit on, and the new checkpoint written beside a JSON report."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from anchoralign.commands.arguments import add_command
from anchoralign.commands.evaluate import check_labels
from anchoralign.commands.predict import load_checkpoint
from anchoralign.errors import UserError


def add_fit_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    run: Callable[[argparse.Namespace], int],
    summary: str,
    description: str,
    defaults: Any,
) -> argparse.ArgumentParser:
    """A fit command's parser with the options every fit takes (``defaults``: its fit config,
    for the epochs, learning rate, seed and the head's own layers); the caller adds its own, then
    the decoding flags."""
    p = add_command(
        subparsers,
        name,
        run,
        summary,
        description,
        {
            "checkpoint": {},
            "dataset": {},
            "data-dir": {},
            "fold": {},
            "json": {"help": "print the report as JSON"},
        },
    )
    epochs, lr, seed = defaults.epochs, defaults.lr, defaults.seed
    p.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="new checkpoint directory (must not exist); until it is written, the fit saves its progress "
        "after every epoch in DIR.partial, and the same command run again resumes from there",
    )
    p.add_argument("--train-split", default="train", help="split the head is fitted on (default: train)")
    p.add_argument(
        "--dev-split",
        default="dev",
        help="split that measures the head and chooses its thresholds (default: dev)",
    )
    p.add_argument("--epochs", type=int, default=epochs, help=f"default {epochs}")
    p.add_argument("--lr", type=float, default=lr, help=f"default {lr}")
    p.add_argument("--seed", type=int, default=seed, help=f"default {seed}")
    p.add_argument(
        "--layers",
        type=int,
        default=defaults.layers,
        help="the encoder's top layers the head gets its own copy of, fine-tuned with it "
        f"(default {defaults.layers}; 0: it reads the frozen encoder's output)",
    )
    p.add_argument(
        "--layer-lr",
        type=float,
        default=defaults.layer_lr,
        help=f"learning rate of the head's own layers (default {defaults.layer_lr})",
    )
    p.add_argument(
        "--states-dir",
        metavar="DIR",
        help="keep the training sentences' encoder states in files under DIR, read through memory maps, "
        "instead of in memory: the same fit, for training sets whose states do not fit in memory",
    )
    return p


def load_for_fit(args: argparse.Namespace, splits: list[str]) -> tuple[Any, dict[str, list[Any]], Any]:
    """The dataset's metadata, the ``splits`` asked for (none empty) and the checkpoint, its labels
    checked against the last split; refuses an ``--output`` that holds anything."""
    from anchoralign.datasets import get_meta, load_split

    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output {out} exists and is not empty; give a new directory")
    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")
    if args.layers < 0:
        raise UserError(f"--layers must be at least 0, got {args.layers}")
    meta = get_meta(args.dataset, args.data_dir)
    data = {split: load_split(args.dataset, split, args.data_dir, fold=args.fold) for split in splits}
    for split, samples in data.items():
        if not samples:
            raise UserError(f"dataset {meta.name} {split} is empty")
    model = load_checkpoint(args.checkpoint, args.device)
    check_labels(data[splits[-1]], model.labels, args.checkpoint, meta.name)
    return meta, data, model


def save_fitted(model: Any, args: argparse.Namespace, report_file: str, record: dict[str, Any]) -> Path:
    """Write the fitted checkpoint to ``--output`` with the source's training config and the
    report ``record`` (``fitted_heads.report_record``), and forget the fit's progress."""
    from anchoralign.fit_progress import remove_progress
    from anchoralign.fitted_heads import write_fitted

    out = write_fitted(model, Path(args.output), Path(args.checkpoint), {report_file: record})
    remove_progress(out)
    if args.json:
        print(json.dumps(record))
    return out


def console() -> tuple[Console, Callable[[str], None]]:
    """The console a fit reports on (stderr) and the log function that prints a line to it."""
    out = Console(stderr=True, soft_wrap=True)
    return out, lambda message: out.print(message, highlight=False)
