"""`anchoralign data-stats`: sizes and structure of a dataset's splits, and what loading left out.

Per split: sentences, entities, relations, relations per sentence, the share of sentences with
overlapping relations (an entity in two or more distinct relations) and with nested entities (two
entity spans that overlap), plus the load report's counts (unplaced triples, type conflicts...).
Cross-validated datasets without ``--fold`` show the whole corpus and the size of every fold.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from anchoralign.commands.arguments import add_command
from anchoralign.datasets import DataNotFoundError, LoadReport, get_meta, load_split, load_split_with_report
from anchoralign.schema import Sample

ROW_LABELS = {
    "sentences": "sentences",
    "entities": "entities",
    "relations": "relations",
    "relations_per_sentence": "relations per sentence",
    "overlapping_share": "with overlapping relations",
    "nested_share": "with nested entities",
}
# Load-report counts, shown as rows only for datasets where one of them is not zero.
REPORT_ROWS = {
    "source_relations": "source relations",
    "unplaced_relations": "unplaced relations",
    "merged_duplicates": "merged duplicates",
    "duplicate_relations": "duplicate relations",
    "type_conflicts": "type conflicts",
    "normalised_matches": "mentions matched ignoring accents",
}


SUMMARY = "sizes and structure of a dataset's splits"
DESCRIPTION = (
    "Per split: sentences, entities, relations, relations per sentence, the share of sentences "
    "with overlapping relations (an entity in two or more relations) and with nested entities "
    "(overlapping spans), and the relations that loading could not place on the tokens. "
    "'relations' counts the relations in the loaded samples; 'source relations' counts them as "
    "the source files list them (relations + unplaced + merged duplicates)."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(
        subparsers,
        "data-stats",
        run,
        SUMMARY,
        DESCRIPTION,
        {
            "dataset": {},
            "data-dir": {},
            "fold": {"help": "cross-validation fold (ADE); without it: every fold's size"},
            "json": {"help": "print one JSON object instead of tables"},
        },
    )


def run(args: argparse.Namespace) -> int:
    stats = dataset_stats(args.dataset, args.data_dir, args.fold)
    if args.json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
    else:
        print_stats(stats)
    return 0


# ---------------------------------------------------------------------------------------------- figures


def has_overlapping_relations(sample: Sample) -> bool:
    """True when some entity takes part in two or more distinct relations (as head or tail)."""
    seen: dict[int, int] = {}
    for head, tail, _ in {(r.head, r.tail, r.type) for r in sample.relations}:
        for entity in {head, tail}:
            seen[entity] = seen.get(entity, 0) + 1
            if seen[entity] >= 2:
                return True
    return False


def has_nested_entities(sample: Sample) -> bool:
    """True when two entities' spans share a token (one inside the other, or crossing)."""
    spans = sorted((e.start, e.end) for e in sample.entities)
    return any(next_start < end for (_, end), (next_start, _) in pairwise(spans))


def duplicate_relations(sample: Sample) -> int:
    """Relations listed more than once (same head, tail and type), counting each extra copy."""
    return len(sample.relations) - len({(r.head, r.tail, r.type) for r in sample.relations})


def split_stats(samples: Sequence[Sample], report: LoadReport | None = None) -> dict[str, Any]:
    n = len(samples)
    relations = sum(len(s.relations) for s in samples)

    def share(count: int) -> float:
        return round(count / n, 4) if n else 0.0

    stats: dict[str, Any] = {
        "sentences": n,
        "entities": sum(len(s.entities) for s in samples),
        "relations": relations,
        "relations_per_sentence": share(relations),
        "overlapping_share": share(sum(has_overlapping_relations(s) for s in samples)),
        "nested_share": share(sum(has_nested_entities(s) for s in samples)),
        "duplicate_relations": sum(duplicate_relations(s) for s in samples),
    }
    if report is not None:
        stats.update(
            source_relations=report.source_relations,
            unplaced_relations=report.unplaced_relations,
            merged_duplicates=report.merged_duplicates,
            type_conflicts=report.type_conflicts,
            normalised_matches=report.normalised_matches,
            unplaced_examples=[f"{i}: {t}" for i, t in report.unplaced_examples],
        )
    return stats


def _sizes(samples: Sequence[Sample]) -> dict[str, int]:
    return {
        "sentences": len(samples),
        "entities": sum(len(s.entities) for s in samples),
        "relations": sum(len(s.relations) for s in samples),
    }


def dataset_stats(name: str, data_dir: str | None = None, fold: int | None = None) -> dict[str, Any]:
    """Every figure of the command as one JSON-ready dict.

    A split whose file is missing is listed under ``missing`` (with the reason) instead of failing the
    whole command, since some distributions lack a split (NYT's train set); if every split is missing
    the error is raised.
    """
    meta = get_meta(name, data_dir)
    whole_corpus_only = meta.folds > 0 and fold is None
    splits = (meta.full_split,) if whole_corpus_only else meta.splits
    out: dict[str, Any] = {"dataset": meta.name, "language": meta.language, "fold": fold, "splits": {}}
    missing: dict[str, DataNotFoundError] = {}
    notes: list[str] = []
    for split in splits:
        try:
            samples, report = load_split_with_report(name, split, data_dir, fold)
        except DataNotFoundError as err:
            missing[split] = err
            continue
        out["splits"][split] = split_stats(samples, report)
        notes.extend(n for n in report.notes if n not in notes)
    if not out["splits"]:
        raise next(iter(missing.values()))
    if whole_corpus_only:
        out["folds"] = {
            str(k): {s: _sizes(load_split(name, s, data_dir, fold=k)) for s in meta.splits}
            for k in range(meta.folds)
        }
        notes.append(
            f"{meta.name} is evaluated by {meta.folds}-fold cross-validation; pass --fold K for one fold"
        )
    out["missing"] = {split: {"path": str(err.path), "message": str(err)} for split, err in missing.items()}
    out["notes"] = notes
    return out


# ---------------------------------------------------------------------------------------------- display


def print_stats(stats: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    title = stats["dataset"] + ("" if stats["fold"] is None else f", fold {stats['fold']}")
    splits: dict[str, dict[str, Any]] = stats["splits"]
    # One column per split keeps the table narrow whatever the number of figures.
    table = Table(title=escape(title), title_justify="left")
    table.add_column("")
    for split in splits:
        table.add_column(escape(split), justify="right")
    rows: list[tuple[str, str]] = [
        ("sentences", "{}"),
        ("entities", "{}"),
        ("relations", "{}"),
        ("relations_per_sentence", "{:.2f}"),
        ("overlapping_share", "{:.1%}"),
        ("nested_share", "{:.1%}"),
    ]
    dropped = any(s.get("unplaced_relations") or s.get("merged_duplicates") for s in splits.values())
    if dropped:
        rows.append(("source_relations", "{}"))
    rows += [
        (k, "{}") for k in REPORT_ROWS if k != "source_relations" and any(s.get(k) for s in splits.values())
    ]
    for key, fmt in rows:
        label = ROW_LABELS.get(key) or REPORT_ROWS[key]
        table.add_row(label, *(fmt.format(s[key]) for s in splits.values()))
    console.print(table)
    if dropped:
        console.print("relations = source relations - unplaced - merged duplicates (what the samples hold)")
    for split, s in splits.items():
        for example in s.get("unplaced_examples", []):
            console.print(f"[yellow]{escape(split)}: unplaced {escape(example)}[/]")
    if "folds" in stats:
        folds = Table(title="folds (sentences / relations)", title_justify="left")
        names = list(next(iter(stats["folds"].values())))
        folds.add_column("fold")
        for name in names:
            folds.add_column(name, justify="right")
        for k, parts in stats["folds"].items():
            folds.add_row(k, *(f"{parts[n]['sentences']} / {parts[n]['relations']}" for n in names))
        console.print(folds)
    for split, info in stats["missing"].items():
        console.print(f"[yellow]{escape(split)}: not available[/] ({escape(info['path'])} not found)")
    if stats["missing"]:
        console.print(escape(next(iter(stats["missing"].values()))["message"]), style="dim")
    for note in stats["notes"]:
        console.print(f"note: {escape(note)}")
