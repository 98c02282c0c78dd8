"""`anchoralign predict`: entities and relations of new sentences with a trained checkpoint.

Input is a ``.txt`` file (one sentence a line, tokenised with ``anchoralign.tokenize`` in the
checkpoint's language, exactly as augmented sentences are) or a ``.jsonl`` file of records (their
``tokens`` used as given). Output is a record file; the predictions are also shown per sentence.
A sentence longer than the encoder takes is split into word windows (``--long split``, default)
or refused with its line (``--long refuse``); it is never truncated.

The decoding options and the checkpoint loading here are shared with ``anchoralign evaluate``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from anchoralign.errors import RecordError, UserError
from anchoralign.schema import Sample, iter_jsonl, parse_record, write_jsonl


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="extract entities and relations from sentences with a trained checkpoint",
        description=(
            "Run the three decoders of a checkpoint on a .txt file (one sentence a line) or a .jsonl "
            "file of records, write the predictions as records and show them."
        ),
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="DIR", help="checkpoint directory (save_pretrained)"
    )
    p.add_argument(
        "--input", required=True, metavar="FILE", help=".txt (one sentence a line) or .jsonl records"
    )
    p.add_argument("--output", required=True, metavar="FILE", help="predicted records (jsonl)")
    p.add_argument("--quiet", action="store_true", help="do not show the predictions, only the summary")
    add_decoding_arguments(p)
    p.set_defaults(func=run)


def add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by predict and evaluate."""
    g = p.add_argument_group("decoding")
    g.add_argument("--beam", type=_positive, default=1, metavar="K", help="beam size per decoder (1: greedy)")
    g.add_argument("--batch-size", type=_positive, default=40, metavar="N", help="sentences per batch")
    g.add_argument(
        "--max-len", type=_positive, metavar="N", help="tokens per decoder (default: 3 * words + 16)"
    )
    g.add_argument("--no-aggregate", action="store_true", help="relations of the forward decoder only")
    g.add_argument(
        "--no-anchor", action="store_true", help="keep relations whose mentions NER did not produce"
    )
    g.add_argument(
        "--no-constraints", action="store_true", help="decode without the output grammar (ablation)"
    )
    g.add_argument(
        "--long",
        choices=("split", "refuse"),
        default="split",
        help="inputs longer than the encoder takes: split into word windows (default) or stop with an error",
    )
    g.add_argument(
        "--device", default="auto", help="torch device: auto (cuda when available), cpu, cuda, cuda:1"
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def decode_config(args: argparse.Namespace):
    from anchoralign.decode import DecodeConfig

    return DecodeConfig(
        beam_size=args.beam,
        max_len=args.max_len,
        batch_size=args.batch_size,
        aggregate=not args.no_aggregate,
        anchor=not args.no_anchor,
        constrained=not args.no_constraints,
    )


def load_checkpoint(directory: str, device: str):
    """The model of a checkpoint directory on ``device`` ("auto": cuda when available)."""
    import torch
    from transformers.utils import logging as hf_logging

    from anchoralign.model import AnchorAlignModel

    hf_logging.set_verbosity_error()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        target = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device: not a torch device: {device!r}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: CUDA was asked for but is not available")
    return AnchorAlignModel.from_pretrained(directory, map_location=target)


@contextmanager
def progress_bar(total: int, what: str):
    """A transient progress bar on stderr; yields ``advance(n)``."""
    with Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task(what, total=total)
        yield lambda n: progress.advance(task, n)


def read_inputs(path: Path, language: str) -> tuple[list[Sample], dict[str, str]]:
    """Samples of a .txt or .jsonl file, and where each came from (``file:line`` by id)."""
    from anchoralign.tokenize import tokenize

    if not path.is_file():
        raise UserError(f"{path}: file not found")
    samples, where = [], {}
    if path.suffix == ".txt":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                tokens = tokenize(line.strip(), language)
                if tokens:
                    samples.append(Sample(id=f"{path.stem}-{lineno}", tokens=tokens))
                    where[samples[-1].id] = f"{path}:{lineno}"
    elif path.suffix == ".jsonl":
        for lineno, obj in iter_jsonl(path):
            if isinstance(obj, dict) and "id" not in obj:
                obj = {"id": f"{path.stem}-{lineno}", **obj}
            sample = parse_record(obj, path, lineno)
            if sample.id in where:
                raise RecordError(
                    str(path), lineno, f"id {sample.id!r} already used at {where[sample.id]}", "id"
                )
            samples.append(Sample(id=sample.id, tokens=sample.tokens))
            where[sample.id] = f"{path}:{lineno}"
    else:
        raise UserError(f"{path}: expected a .txt file (one sentence a line) or a .jsonl file of records")
    if not samples:
        raise UserError(f"{path}: no sentences in the file")
    return samples, where


def run_prediction(
    model, samples: Sequence[Sample], args: argparse.Namespace, where: Callable[[Sample], str]
):
    from anchoralign.decode import predict_long

    with progress_bar(len(samples), "decoding") as advance:
        return predict_long(
            model, samples, decode_config(args), long=args.long, where=where, progress=advance
        )


def run(args: argparse.Namespace) -> int:
    model = load_checkpoint(args.checkpoint, args.device)
    source = Path(args.input)
    samples, where = read_inputs(source, model.meta.language)
    preds, split_ids = run_prediction(model, samples, args, lambda s: where[s.id])
    n = write_jsonl(args.output, [p.sample for p in preds])
    console = Console()
    if not args.quiet:
        for p in preds:
            show(p.sample, console, valid=p.valid)
    n_ent = sum(len(p.sample.entities) for p in preds)
    n_rel = sum(len(p.sample.relations) for p in preds)
    console.print(
        f"{n} sentences, {n_ent} entities, {n_rel} relations written to {escape(str(args.output))}",
        highlight=False,
    )
    if split_ids:
        console.print(f"[yellow]{len(split_ids)} long sentences were split into word windows[/]")
    invalid = sum(not p.valid for p in preds)
    if invalid:
        console.print(f"[yellow]{invalid} outputs were cut at the length bound or not well formed[/]")
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
    for r in sample.relations:
        console.print(
            f"  relation   {escape(sample.mention(r.head))} [magenta]-{escape(r.type)}->[/] "
            f"{escape(sample.mention(r.tail))}",
            highlight=False,
        )
    if not sample.entities and not sample.relations:
        console.print("  [dim]nothing found[/]", highlight=False)
