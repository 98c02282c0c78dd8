"""`anchoralign fit-relation-head`: add a relation head to a trained checkpoint (``anchoralign.relation_fit``).

The checkpoint is read, its encoder frozen, the head fitted on the training split and its vote
thresholds chosen on the dev split with the decoding flags given (the ones to evaluate with); the
result is a new checkpoint directory, the old one untouched, with ``relation_head.json`` beside
it (the fit's settings, losses and dev figures). ``evaluate`` and ``predict`` use the head of a
checkpoint that has one (``--relation-head off`` to compare without it).
"""

from __future__ import annotations

import argparse

from anchoralign.commands.fitting import add_fit_command, console, load_for_fit, save_fitted
from anchoralign.commands.predict import add_decoding_arguments, decode_config
from anchoralign.errors import UserError

SUMMARY = "fit a relation head on a checkpoint's frozen encoder (minutes on a CPU) and save a new checkpoint"
DESCRIPTION = (
    "Train a classifier of entity pairs over the frozen encoder of a trained checkpoint on the training "
    "split, choose its two vote thresholds on the dev split, and write checkpoint and report to --output."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from anchoralign.relation_fit import FitConfig

    defaults = FitConfig()
    p = add_fit_command(subparsers, "fit-relation-head", run, SUMMARY, DESCRIPTION, defaults)
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
    from anchoralign.fit_progress import FitProgress
    from anchoralign.fitted_heads import RELATION_REPORT, report_record
    from anchoralign.relation_fit import FitConfig, choose_relation_thresholds, fit_relation_head

    if args.heads < 1:
        raise UserError(f"--heads must be at least 1, got {args.heads}")
    splits = [args.dev_split] if args.thresholds_only else [args.train_split, args.dev_split]
    meta, data, model = load_for_fit(args, splits)
    dev = data[args.dev_split]
    cfg = FitConfig(
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        heads=args.heads,
        layers=args.layers,
        layer_lr=args.layer_lr,
    )
    decode = decode_config(args)
    out, log = console()

    if args.thresholds_only:
        if model.relation_head is None:
            raise UserError(f"--thresholds-only: {args.checkpoint} has no relation head; fit one without it")
        report = choose_relation_thresholds(model, dev, meta, decode, log)
    else:
        progress = FitProgress.of_fit(
            args.output, RELATION_REPORT, args.checkpoint, cfg, meta.name, args.train_split
        )
        try:
            report = fit_relation_head(
                model, data[args.train_split], dev, meta, cfg, decode, log, args.states_dir, progress
            )
        except ValueError as err:
            raise UserError(f"{meta.name} {args.train_split}: {err}") from None
    record = report_record(
        args.checkpoint,
        meta.name,
        None if args.thresholds_only else args.train_split,
        args.dev_split,
        None if args.thresholds_only else cfg,
        decode,
        report,
    )
    written = save_fitted(model, args, RELATION_REPORT, record)
    if not args.json:
        out.print(
            f"wrote {written}: dev {report.metric} {report.dev_before:.2f} -> {report.dev_after:.2f} "
            f"(keep > {report.keep}, add > {report.add})",
            highlight=False,
        )
    return 0
