"""`anchoralign fit-span-head`: give a trained checkpoint a span head for its entities (``anchoralign.span_fit``).

The checkpoint is read, its encoder frozen, a span head fitted on the training split and the
entities measured on the dev split before and after; the result is a new checkpoint directory,
the old one untouched, with ``span_head.json`` beside it (the fit's settings, losses and dev
figures). ``evaluate`` and ``predict`` report a span head's entities (``--ner-source decoder``
for the NER decoder's). A relation head in the checkpoint has its thresholds chosen again; fitting
the span head first and the relation head on its checkpoint is the order the README gives.
"""

from __future__ import annotations

import argparse

from rich.markup import escape

from anchoralign.commands.fitting import add_fit_command, console, load_for_fit, save_fitted
from anchoralign.commands.predict import add_decoding_arguments, decode_config
from anchoralign.errors import UserError

SUMMARY = "fit a span head for the entities on a checkpoint's frozen encoder (minutes on a CPU) and save a new checkpoint"
DESCRIPTION = (
    "Train a classifier of word spans over the frozen encoder of a trained checkpoint on the training "
    "split, measure the entities on the dev split, and write checkpoint and report to --output."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from anchoralign.span_fit import SpanFitConfig

    defaults = SpanFitConfig()
    p = add_fit_command(subparsers, "fit-span-head", run, SUMMARY, DESCRIPTION, defaults)
    p.add_argument(
        "--width",
        type=int,
        default=defaults.width,
        help=f"longest mention the head can find, in words (default {defaults.width})",
    )
    p.add_argument(
        "--pooled",
        action=argparse.BooleanOptionalAction,
        default=defaults.pooled,
        help="read the maximum over each span's sub-words beside its first and last word (default: on)",
    )
    add_decoding_arguments(p)


def run(args: argparse.Namespace) -> int:
    from anchoralign.fit_progress import FitProgress
    from anchoralign.fitted_heads import SPAN_REPORT, report_record, worse_span_head
    from anchoralign.span_fit import SpanFitConfig, fit_span_head

    if args.width < 1:
        raise UserError(f"--width must be at least 1, got {args.width}")
    meta, data, model = load_for_fit(args, [args.train_split, args.dev_split])
    cfg = SpanFitConfig(
        width=args.width,
        pooled=args.pooled,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        layers=args.layers,
        layer_lr=args.layer_lr,
    )
    out, log = console()

    decode = decode_config(args)
    progress = FitProgress.of_fit(args.output, SPAN_REPORT, args.checkpoint, cfg, meta.name, args.train_split)
    try:
        train, dev = data[args.train_split], data[args.dev_split]
        report = fit_span_head(model, train, dev, meta, cfg, decode, log, args.states_dir, progress)
    except ValueError as err:
        raise UserError(f"{meta.name} {args.train_split}: {err}") from None
    record = report_record(args.checkpoint, meta.name, args.train_split, args.dev_split, cfg, decode, report)
    written = save_fitted(model, args, SPAN_REPORT, record)
    if not args.json:
        out.print(
            f"wrote {written}: dev ner_f1 {report.dev_before:.2f} -> {report.dev_after:.2f}", highlight=False
        )
    warning = worse_span_head(report, args.dev_split, written)
    if warning:
        out.print(f"[yellow]{escape(warning)}[/yellow]")
    return 0
