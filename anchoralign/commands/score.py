"""`anchoralign score`: score a prediction file against a gold file (both in the record format:
jsonl files or saved ``datasets`` folders)."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from anchoralign.commands.arguments import add_command
from anchoralign.errors import UserError
from anchoralign.metrics import FAMILIES, FIGURES, OFFSETS, TEXT_FAMILIES, Metrics, average_folds, score
from anchoralign.schema import read_records

_ROW_NAMES = {"ner": "NER", "rel_strict": "Relation strict", "rel_boundary": "Relation boundary"}
# Short enough for the table to fit 80 columns; below a rule, after the rows by text.
_ROW_NAMES |= {
    f"{f}{OFFSETS}": f"{n} by offsets"
    for f, n in (("ner", "NER"), ("rel_strict", "Strict"), ("rel_boundary", "Boundary"))
}


SUMMARY = "score predictions against gold records (NER, relation strict and boundary P/R/F1)"
DESCRIPTION = (
    "Micro-averaged precision, recall and F1 (percentages) of NER, strict relations (mentions, "
    "entity types, relation type) and boundary relations (mentions, relation type). Entities are "
    "compared by mention text and type, one set per sentence, and again by token offsets and type "
    "(the rows 'by offsets', as span-based extractors are scored); records are matched by id."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "score",
        run,
        SUMMARY,
        DESCRIPTION,
        {
            "dataset": {
                "required": False,
                "help": "take the symmetric relation types and the headline figure from this dataset's metadata",
            },
            "data-dir": {"help": "data directory for --dataset (default: $ANCHORALIGN_DATA)"},
            "json": {},
        },
    )
    p.add_argument(
        "--gold",
        required=True,
        action="append",
        metavar="FILE",
        help="gold records (jsonl or a saved `datasets` folder); repeat per fold",
    )
    p.add_argument(
        "--pred",
        required=True,
        action="append",
        metavar="FILE",
        help="predicted records (jsonl), same ids; with several --gold/--pred pairs (e.g. ADE's 10 folds) "
        "each pair is scored and the figures are averaged",
    )


def run(args: argparse.Namespace) -> int:
    symmetric: frozenset[str] = frozenset()
    boundary_only = False
    if args.dataset:
        # Imported here so that scoring plain files never pays for (or depends on) the loaders.
        from anchoralign.datasets import get_meta

        meta = get_meta(args.dataset, args.data_dir)
        symmetric, boundary_only = meta.symmetric_relations, meta.boundary_only
    elif args.data_dir:
        raise UserError("--data-dir is only used together with --dataset")

    if len(args.gold) != len(args.pred):
        raise UserError(
            f"give one --pred per --gold (got {len(args.gold)} --gold and {len(args.pred)} --pred)"
        )
    per_pair = [
        score(read_records(g), read_records(p), symmetric=symmetric, boundary_only=boundary_only)
        for g, p in zip(args.gold, args.pred, strict=True)
    ]
    if len(per_pair) == 1:
        metrics, title = per_pair[0], f"{args.pred[0]} against {args.gold[0]}"
    else:
        metrics, title = average_folds(per_pair), f"mean over {len(per_pair)} folds"
    if args.json:
        print(json.dumps(rounded(metrics)))
    else:
        print_table(metrics, title=title)
    return 0


def rounded(metrics: Metrics) -> Metrics:
    """The figures rounded to 2 decimals for printing; counts and names unchanged."""
    return {k: round(v, 2) if k in FIGURES or k.endswith("_std") else v for k, v in metrics.items()}


def print_table(metrics: Metrics, title: str, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=title, title_justify="left")
    table.add_column("", no_wrap=True)
    for name in ("P", "R", "F1"):
        table.add_column(name, justify="right")
    for name in ("correct", "predicted", "gold"):
        table.add_column(name, justify="right", style="dim")
    primary_family = str(metrics["primary"]).removesuffix("_f1")
    for family in FAMILIES:
        figures = [f"{metrics[f'{family}_{m}']:.2f}" for m in ("p", "r", "f1")]
        counts = [str(metrics[f"{family}_{c}"]) for c in ("tp", "n_pred", "n_gold")]
        style = "bold" if family == primary_family else None
        table.add_row(
            _ROW_NAMES[family], *figures, *counts, style=style, end_section=family == TEXT_FAMILIES[-1]
        )
    console.print(table)
    # Say which row it is in words: styling is not shown when the output is piped.
    row = _ROW_NAMES[primary_family]
    shown = " (bold)" if console.is_terminal else ""
    console.print(
        f"{metrics['n_samples']} gold sentences; headline figure: {metrics['primary']}, the '{row}' row{shown}"
    )
    if metrics["n_missing_pred"]:
        console.print(
            f"[yellow]{metrics['n_missing_pred']} gold sentences have no prediction and were scored as empty[/]"
        )
