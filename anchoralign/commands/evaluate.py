"""`anchoralign evaluate`: score a checkpoint on a dataset split.

The split is loaded with ``anchoralign.datasets`` (a built-in dataset or the path of the user's
data), decoded with only its ids and tokens, and scored with ``anchoralign.metrics.score`` using
the dataset's symmetric relations and headline figure. ``--output`` writes the predictions and
``--gold-output`` the gold split, both as records, so that ``anchoralign score --gold GOLD --pred
PRED`` reproduces the printed figures. Decoding and scoring are ``anchoralign.evaluation.evaluate_split``,
the path the trainers' dev checks take too. The metrics JSON adds ``complete_rate`` (share of outputs that
ended and parsed cleanly), ``n_split`` (inputs decoded in word windows) and ``samples_per_second``.

A single record file has no splits (``datasets`` gives every split name the whole file), so with one
``--split`` is refused rather than printed as a label it did not change; the table names the file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from anchoralign.commands import predict as shared
from anchoralign.commands.arguments import add_command
from anchoralign.commands.predict import add_decoding_arguments, decode_config, load_checkpoint, plural
from anchoralign.commands.score import print_table, rounded
from anchoralign.errors import UserError
from anchoralign.schema import Sample, is_records_source, write_jsonl

SUMMARY = "decode a dataset split with a checkpoint and print NER / relation P, R, F1"
DESCRIPTION = (
    "Decode a split with the three decoders of a checkpoint (forward and reverse relations united, "
    "kept only when NER produced both mentions, unless switched off) and score it."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "evaluate",
        run,
        SUMMARY,
        DESCRIPTION,
        {
            "checkpoint": {},
            "dataset": {},
            "data-dir": {},
            "fold": {},
            "json": {"help": "print the metrics as one JSON object"},
        },
    )
    p.add_argument(
        "--split",
        help="split to evaluate (default: test); not with a single .jsonl file, which is read whole",
    )
    p.add_argument("--output", metavar="FILE", help="write the predictions (jsonl records)")
    p.add_argument(
        "--gold-output", metavar="FILE", help="write the gold split (jsonl records) for anchoralign score"
    )
    add_decoding_arguments(p)


def check_labels(gold: list[Sample], model_labels, checkpoint: str, dataset: str) -> None:
    """The model can only predict its own labels: gold labels it lacks mean the wrong checkpoint or data."""
    unknown = {label for s in gold for _, label in model_labels.unknown_labels(s)}
    if unknown:
        missing = ", ".join(sorted(unknown))
        raise UserError(
            f"dataset {dataset} uses labels the checkpoint {checkpoint} was not trained with: {missing}"
        )


def single_file(dataset: str) -> bool:
    """Whether ``--dataset`` names one record file or saved ``datasets`` folder (every split of which
    is the whole of it)."""
    from anchoralign.datasets import known_datasets

    return dataset not in known_datasets() and is_records_source(Path(dataset))


def run(args: argparse.Namespace) -> int:
    from anchoralign.datasets import get_meta, load_split
    from anchoralign.evaluation import evaluate_split

    single = single_file(args.dataset)
    if single and args.split is not None:
        raise UserError(f"--split: {args.dataset} is a single file, evaluated whole; leave --split out")
    split = args.split or "test"  # a single file gives every split the same records
    meta = get_meta(args.dataset, args.data_dir)
    gold = load_split(args.dataset, split, args.data_dir, fold=args.fold)
    what = args.dataset if single else f"{meta.name} {split}"
    if not gold:
        raise UserError(f"dataset {what} is empty")
    model = load_checkpoint(args.checkpoint, args.device)
    check_labels(gold, model.labels, args.checkpoint, meta.name)
    with shared.progress_bar(len(gold), "decoding") as advance:
        result = evaluate_split(
            model,
            gold,
            decode_config(args),
            meta,
            long=args.long,
            where=lambda s: f"{what} sample {s.id!r}",
            progress=advance,
        )
    metrics = result.scores
    predicted = [p.sample for p in result.predictions]
    if args.output:
        write_jsonl(args.output, predicted)
    if args.gold_output:
        write_jsonl(args.gold_output, gold)
    if args.json:
        print(json.dumps(rounded(metrics)))
        return 0
    console = Console()
    fold = "" if args.fold is None else f" fold {args.fold}"
    print_table(metrics, title=escape(f"{args.checkpoint} on {what}{fold}"), console=console)
    n_split = metrics["n_split"]
    console.print(
        f"complete outputs {100 * metrics['complete_rate']:.1f}%, {metrics['samples_per_second']:.2f} sentences/s"
        + (f", {plural(n_split, 'long sentence')} decoded in windows" if n_split else ""),
        highlight=False,
    )
    return 0
