"""`anchoralign predict`: entities and relations of new sentences with a trained checkpoint.

Input is a ``.txt`` file (one text a line, raw: decoded through the Python API, ``anchoralign.api``,
which tokenises it with ``anchoralign.tokenize`` in the checkpoint's language, exactly as the
training data is) or records, a ``.jsonl`` file or a saved ``datasets`` folder (their ``tokens``
used as given). Output is a
record file; the predictions are also shown per sentence. A sentence longer than the encoder takes
is split into word windows (``--long split``, default) or refused with its line (``--long
refuse``); it is never truncated.

The records carry token offsets only, also for ``.txt`` input: the record format is strict (the
scorer and the dataset loaders refuse unknown fields), and a record's ``tokens`` are exactly
``tokenize_with_offsets(line)``'s, which gives their character spans. For character offsets use
``Extractor.extract`` (``Extraction.to_dict()``).

The decoding options and the checkpoint loading here are shared with ``anchoralign evaluate``.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from anchoralign import config_tree
from anchoralign.commands.arguments import add_command
from anchoralign.errors import RecordError, UserError
from anchoralign.schema import (
    Sample,
    is_datasets_folder,
    iter_jsonl,
    read_records,
    sample_of_line,
    write_jsonl,
)

SUMMARY = "extract entities and relations from sentences with a trained checkpoint"
DESCRIPTION = (
    "Run the three decoders of a checkpoint on a .txt file (one sentence a line) or a .jsonl "
    "file of records, write the predictions as records and show them."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "predict",
        run,
        SUMMARY,
        DESCRIPTION,
        {"checkpoint": {}},
    )
    p.add_argument(
        "--input",
        required=True,
        metavar="FILE",
        help=".txt (one sentence a line), or records: .jsonl or a saved `datasets` folder",
    )
    p.add_argument("--output", required=True, metavar="FILE", help="predicted records (jsonl)")
    p.add_argument("--quiet", action="store_true", help="do not show the predictions, only the summary")
    add_decoding_arguments(p)


def add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by predict and evaluate: one flag per ``DecodeConfig`` field (the config
    generator), plus how long inputs are handled and the device."""
    from anchoralign.config import DecodeConfig

    g = p.add_argument_group(
        "decoding (anchoralign.config.DecodeConfig; also spelled --decode.KEY, as in training)"
    )
    config_tree.add_flags(g, DecodeConfig, alias_prefix="decode.")
    g.add_argument(
        "--long",
        choices=("split", "refuse"),
        default="split",
        help="inputs longer than the encoder takes: split into word windows (default) or stop with an error",
    )
    g.add_argument(
        "--device", default="auto", help="torch device: auto (cuda when available), cpu, cuda, cuda:1"
    )


def decode_config(args: argparse.Namespace):
    """The decoding config of the flags given (the rest at their defaults), validated."""
    from anchoralign.config import DecodeConfig

    return config_tree.load(DecodeConfig, None, config_tree.given_overrides(args))


def load_checkpoint(directory: str, device: str):
    """The model of a checkpoint directory on ``device`` ("auto": cuda when available)."""
    from transformers.utils import logging as hf_logging

    from anchoralign.api import resolve_device
    from anchoralign.model import AnchorAlignModel

    hf_logging.set_verbosity_error()
    return AnchorAlignModel.from_pretrained(directory, map_location=resolve_device(device, "--device"))


@contextmanager
def progress_bar(total: int, what: str):
    """A transient progress bar on stderr; yields ``advance(n)`` (``n`` may be a Fraction of a sentence)."""
    with Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task(what, total=total)
        done = Fraction(0)

        def advance(n: int | Fraction) -> None:
            # Summed exactly: windows of a split sentence (thirds, say) make whole sentences again.
            nonlocal done
            done += n
            progress.update(task, completed=float(done))

        yield advance


def plural(n: int, noun: str, plural_form: str | None = None) -> str:
    """``1 sentence``, ``2 sentences``."""
    return f"{n} {noun if n == 1 else plural_form or noun + 's'}"


def read_texts(path: Path) -> tuple[list[str], list[str], list[str]]:
    """The non-blank lines of a .txt file, their ids (``<stem>-<line>``) and places (``file:line``)."""
    texts, ids, places = [], [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                texts.append(line.rstrip("\r\n"))
                ids.append(f"{path.stem}-{lineno}")
                places.append(f"{path}:{lineno}")
    return texts, ids, places


def read_inputs(path: Path) -> tuple[list[Sample], dict[str, str]]:
    """Samples (id and tokens) of records (a .jsonl file or a saved ``datasets`` folder), and where
    each came from (``file:line`` or ``folder: row [i]``) by id."""
    if path.is_dir():
        found = [(f"{path}: row [{i}]", s) for i, s in enumerate(read_records(path))]
    else:
        found = [(f"{path}:{line}", sample_of_line(obj, path, line)) for line, obj in iter_jsonl(path)]
    samples, where = [], {}
    for place, sample in found:
        if sample.id in where:
            raise RecordError(place, None, f"id {sample.id!r} already used at {where[sample.id]}", "id")
        samples.append(Sample(id=sample.id, tokens=sample.tokens))
        where[sample.id] = place
    return samples, where


def run_prediction(
    model, samples: Sequence[Sample], args: argparse.Namespace, where: Callable[[Sample], str]
):
    """Predictions of token-level samples (records, evaluation splits) and the ids of those split."""
    from anchoralign.decode import predict_long

    with progress_bar(len(samples), "decoding") as advance:
        return predict_long(
            model, samples, decode_config(args), long=args.long, where=where, progress=advance
        )


def predict_file(model, source: Path, args: argparse.Namespace) -> tuple[list[Sample], list[bool], int]:
    """Predicted records of an input file, whether each output was valid, and how many were split."""
    if not (source.is_file() or is_datasets_folder(source)):
        raise UserError(f"{source}: file not found")
    if source.suffix == ".txt":
        from anchoralign.api import Extractor

        texts, ids, places = read_texts(source)
        if not texts:
            raise UserError(f"{source}: no sentences in the file")
        with progress_bar(len(texts), "decoding") as advance:
            found, split = Extractor(model, decode_config(args)).predict(
                texts, ids=ids, long=args.long, places=places, progress=advance
            )
        return [x.record for x in found], [x.valid for x in found], len(split)
    if source.suffix == ".jsonl" or source.is_dir():
        samples, where = read_inputs(source)
        if not samples:
            raise UserError(f"{source}: no sentences in the file")
        preds, split_ids = run_prediction(model, samples, args, lambda s: where[s.id])
        return [p.sample for p in preds], [p.valid for p in preds], len(split_ids)
    raise UserError(
        f"{source}: expected a .txt file (one sentence a line), or records: a .jsonl file or a saved `datasets` folder"
    )


def run(args: argparse.Namespace) -> int:
    model = load_checkpoint(args.checkpoint, args.device)
    records, valid, n_split = predict_file(model, Path(args.input), args)
    n = write_jsonl(args.output, records)
    console = Console()
    if not args.quiet:
        for record, ok in zip(records, valid, strict=True):
            show(record, console, valid=ok)
    n_ent = sum(len(r.entities) for r in records)
    n_rel = sum(len(r.relations) for r in records)
    counts = f"{plural(n, 'sentence')}, {plural(n_ent, 'entity', 'entities')}, {plural(n_rel, 'relation')}"
    console.print(f"{counts} written to {escape(str(args.output))}", highlight=False)
    if n_split:
        was = "was" if n_split == 1 else "were"
        console.print(f"[yellow]{plural(n_split, 'long sentence')} {was} split into word windows[/]")
    invalid = valid.count(False)
    if invalid:
        was = "was" if invalid == 1 else "were"
        console.print(
            f"[yellow]{plural(invalid, 'output')} {was} cut at the length bound or not well formed[/]"
        )
    return 0


def show(sample: Sample, console: Console, valid: bool = True) -> None:
    """One sentence with its entities and relations (user text escaped, never read as markup)."""
    flag = "" if valid else " [yellow](incomplete output)[/]"
    console.print(f"[bold]{escape(sample.id)}[/]{flag}  {escape(sample.text)}", highlight=False)
    if sample.entities:
        ents = " · ".join(
            f"{escape(sample.mention(i))} [cyan]{escape(e.type)}[/]" for i, e in enumerate(sample.entities)
        )
        console.print(f"  entities   {ents}", highlight=False)
    texts = Counter(sample.mention(i) for i in range(len(sample.entities)))

    def end(i: int) -> str:  # a relation's end, with its type where its text names two entities
        text = sample.mention(i)
        return escape(text) + (f" [cyan]({escape(sample.entities[i].type)})[/]" if texts[text] > 1 else "")

    for r in sample.relations:
        console.print(
            f"  relation   {end(r.head)} [magenta]-{escape(r.type)}->[/] {end(r.tail)}", highlight=False
        )
    if not sample.entities and not sample.relations:
        console.print("  [dim]nothing found[/]", highlight=False)
