"""`anchoralign fit-relation-head`: add a relation head to a trained checkpoint (``anchoralign.relation_fit``).

The checkpoint is read, its encoder frozen, the head fitted on the training split and its vote
thresholds chosen on the dev split with the decoding flags given (the ones to evaluate with); the
result is a new checkpoint directory, the old one untouched, with ``relation_head.json`` beside
it (the fit's settings, losses and dev figures). ``evaluate`` and ``predict`` use the head of a
checkpoint that has one (``--relation-head off`` to compare without it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from rich.console import Console

from anchoralign.commands.arguments import add_command
from anchoralign.commands.evaluate import check_labels
from anchoralign.commands.predict import add_decoding_arguments, decode_config, load_checkpoint
from anchoralign.errors import UserError

SUMMARY = "fit a relation head on a checkpoint's frozen encoder (minutes on a CPU) and save a new checkpoint"
DESCRIPTION = (
    "Train a classifier of entity pairs over the frozen encoder of a trained checkpoint on the training "
    "split, choose its two vote thresholds on the dev split, and write checkpoint and report to --output."
)
REPORT_FILE = "relation_head.json"
TRAIN_CONFIG_FILE = "train_config.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    from anchoralign.relation_fit import FitConfig

    defaults = FitConfig()
    p = add_command(
        subparsers,
        "fit-relation-head",
        run,
        SUMMARY,
        DESCRIPTION,
        {
            "checkpoint": {},
            "dataset": {},
            "data-dir": {},
            "fold": {},
            "json": {"help": "print the report as JSON"},
        },
    )
    p.add_argument("--output", required=True, metavar="DIR", help="new checkpoint directory (must not exist)")
    p.add_argument("--train-split", default="train", help="split the head is fitted on (default: train)")
    p.add_argument("--dev-split", default="dev", help="split that chooses the thresholds (default: dev)")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help=f"default {defaults.epochs}")
    p.add_argument("--lr", type=float, default=defaults.lr, help=f"default {defaults.lr}")
    p.add_argument("--seed", type=int, default=defaults.seed, help=f"default {defaults.seed}")
    p.add_argument(
        "--heads",
        type=int,
        default=defaults.heads,
        help=f"heads trained side by side, their probabilities averaged (default {defaults.heads})",
    )
    p.add_argument(
        "--thresholds-only",
        action="store_true",
        help="keep the checkpoint's relation head and only choose its thresholds again on the dev split "
        "(after a change of decoding flags)",
    )
    add_decoding_arguments(p)


def run(args: argparse.Namespace) -> int:
    from anchoralign.datasets import get_meta, load_split
    from anchoralign.relation_fit import FitConfig, choose_relation_thresholds, fit_relation_head

    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output {out} exists and is not empty; give a new directory")
    for flag, value in (("--epochs", args.epochs), ("--heads", args.heads)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    meta = get_meta(args.dataset, args.data_dir)
    splits = [args.dev_split] if args.thresholds_only else [args.train_split, args.dev_split]
    data = {split: load_split(args.dataset, split, args.data_dir, fold=args.fold) for split in splits}
    for split, samples in data.items():
        if not samples:
            raise UserError(f"dataset {meta.name} {split} is empty")
    dev = data[args.dev_split]
    model = load_checkpoint(args.checkpoint, args.device)
    check_labels(dev, model.labels, args.checkpoint, meta.name)
    console = Console(stderr=True, soft_wrap=True)
    cfg = FitConfig(epochs=args.epochs, lr=args.lr, seed=args.seed, heads=args.heads)

    def log(message: str) -> None:
        console.print(message, highlight=False)

    if args.thresholds_only:
        if model.relation_head is None:
            raise UserError(f"--thresholds-only: {args.checkpoint} has no relation head; fit one without it")
        report = choose_relation_thresholds(model, dev, meta, decode_config(args), log)
    else:
        try:
            report = fit_relation_head(
                model, data[args.train_split], dev, meta, cfg, decode_config(args), log
            )
        except ValueError as err:
            raise UserError(f"{meta.name} {args.train_split}: {err}") from None
    model.save_pretrained(out)
    source = Path(args.checkpoint) / TRAIN_CONFIG_FILE
    if source.is_file():
        shutil.copyfile(source, out / TRAIN_CONFIG_FILE)
    record = {
        "checkpoint": str(args.checkpoint),
        "dataset": meta.name,
        "train_split": None if args.thresholds_only else args.train_split,
        "dev_split": args.dev_split,
        "fit": None if args.thresholds_only else dataclasses.asdict(cfg),
        **dataclasses.asdict(report),
    }
    (out / REPORT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(record))
    else:
        console.print(
            f"wrote {out}: dev {report.metric} {report.dev_before:.2f} -> {report.dev_after:.2f} "
            f"(keep > {report.keep}, add > {report.add})",
            highlight=False,
        )
    return 0
