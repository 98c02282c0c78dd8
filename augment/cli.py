"""``augment`` command line: ``run``, ``rejects``, ``stats``, ``show``.

Arguments and the terminal display only; the work is in ``augment.runner``. Everything an LLM
wrote is shown as literal text (``rich.text.Text``), never parsed as console markup, so an
answer containing ``[bold]`` or ``[/]`` neither crashes nor restyles the screen.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from anchoralign import config_tree
from anchoralign.cli import run_cli
from anchoralign.errors import UserError
from anchoralign.schema import Sample, iter_jsonl
from augment import runner
from augment.config import AugmentConfig, load_config
from augment.journal import read_journal
from augment.plan import make_plan
from augment.processing import ALL_REASONS
from augment.progress import format_rate, rate
from augment.runner import DryRun, Progress, RunSummary

# Seconds between progress lines when the output is not a terminal (CI logs).
PLAIN_PROGRESS_EVERY_S = 10.0
TYPE_STYLES = ["bold cyan", "bold magenta", "bold green", "bold yellow", "bold blue", "bold red"]


# --------------------------------------------------------------------------------------------
# Parser


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", help="dataset whose corpus to read (corpus/<dataset>/)")
    p.add_argument("--out", help="corpus folder (instead of --dataset)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="augment", description="Build an LLM-augmented NER+RE corpus.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="rewrite a training set through an LLM into a corpus", allow_abbrev=False)
    r.add_argument("--config", help="YAML or JSON file of options (flags override it)")
    r.add_argument("--dry-run", action="store_true", help="show the first prompts and the plan; send nothing")
    # Every field of AugmentConfig, with its description as help (anchoralign.config_tree).
    config_tree.add_flags(r, AugmentConfig)
    r.set_defaults(func=cmd_run)

    j = sub.add_parser("rejects", help="table of rejected rewrites")
    _add_target(j)
    j.add_argument("--reason", help="only this reason code")
    j.add_argument("--kind", choices=["mention", "context"])
    j.add_argument("--limit", type=int, default=20, help="rows to show (default 20; 0 for all)")
    j.add_argument("--json", action="store_true", help="print the records as JSON lines")
    j.set_defaults(func=cmd_rejects)

    s = sub.add_parser("stats", help="summary of a corpus run")
    _add_target(s)
    s.add_argument("--json", action="store_true", help="print stats.json")
    s.set_defaults(func=cmd_stats)

    w = sub.add_parser("show", help="one source beside its accepted and rejected variants")
    _add_target(w)
    w.add_argument("source_id", metavar="SOURCE_ID")
    w.set_defaults(func=cmd_show)
    return parser


# --------------------------------------------------------------------------------------------
# run


def config_from_args(args: argparse.Namespace) -> AugmentConfig:
    return load_config(args.config, config_tree.given_overrides(args))


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _goal_text(p: Progress) -> str:
    """Samples and sources, the one the run is heading for (progress.goal) first."""
    samples = f"samples {min(p.samples, p.cap)}/{p.cap}"
    sources = f"sources {p.sources_done}/{p.source_limit}"
    return f"{samples}, {sources}" if p.goal.unit == "samples" else f"{sources}, {samples}"


def render_progress(p: Progress) -> Group:
    g = p.goal
    bar = ProgressBar(total=g.total, completed=g.done, width=40)
    head = Text.assemble((_goal_text(p), "bold"))
    head.append(f"  elapsed {_fmt_s(p.elapsed_s)}  ETA {_fmt_s(p.eta_s)}")
    counters = Text(
        f"requests {p.requests_sent} done, {p.in_flight} in flight, {p.requests_cached} from journal, "
        f"{p.failed} failed | variants {p.variants_accepted} accepted, {p.variants_rejected} rejected | "
        f"tokens {p.tokens:,} | {format_rate(p.requests_per_s)}"
    )
    return Group(head, bar, counters)


def _plain_line(p: Progress) -> str:
    return (
        f"[augment] {_goal_text(p)}, elapsed {_fmt_s(p.elapsed_s)}, ETA {_fmt_s(p.eta_s)}; "
        f"requests {p.requests_sent} (+{p.requests_cached} journal, {p.in_flight} in flight, {p.failed} failed), "
        f"variants {p.variants_accepted} ok / {p.variants_rejected} rejected, {format_rate(p.requests_per_s)}"
    )


def summary_table(summary: RunSummary) -> Table:
    st = summary.stats
    t = Table(title=f"augment run: {st['dataset']} ({st['status']})", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    origins = ", ".join(f"{k} {v}" for k, v in st["samples"]["by_origin"].items()) or "-"
    t.add_row("samples", Text(f"{st['samples']['selected']} of cap {st['cap']} ({origins})"))
    rq = st["requests"]
    t.add_row(
        "requests",
        Text(
            f"{rq['answered']} answered, {rq['cached']} from journal, {rq['failed']} failed, "
            f"{rq['refused_by_server']} refused"
        ),
    )
    tok = st["tokens"]
    cost = "" if st["cost_usd"] is None else f", ${st['cost_usd']:.4f}"
    t.add_row("tokens", Text(f"{tok['prompt']:,} in + {tok['completion']:,} out{cost}"))
    for kind, v in st["variants"].items():
        t.add_row(f"{kind} variants", Text(f"{v['accepted']} accepted, {v['rejected']} rejected"))
    reasons = ", ".join(
        f"{k} {v}" for k, v in sorted(st["rejected_by_reason"].items(), key=lambda kv: -kv[1])
    )
    t.add_row("rejected by reason", Text(reasons or "-"))
    if st.get("verification"):
        v = st["verification"]
        asked = v["requests_answered"] + v["requests_cached"]
        t.add_row(
            "verification",
            Text(
                f"{v['variants_checked']} variants asked {asked} questions "
                f"({v['requests_cached']} from journal), {v['variants_rejected']} rejected, "
                f"{v['unclear_answers']} answers neither yes nor no"
            ),
        )
    t.add_row("sources", Text(", ".join(f"{k} {v}" for k, v in st["sources"].items())))
    # The same rate as the live display: requests answered over the run's time.
    answered, elapsed = rq["answered"], st["elapsed_s"]
    t.add_row(
        "time",
        Text(
            f"{elapsed:.1f} s"
            + (f", {answered} requests answered, {format_rate(rate(answered, elapsed))}" if answered else "")
        ),
    )
    t.add_row("output", Text(str(summary.out_dir)))
    return t


def _show_dry_run(d: DryRun, console: Console) -> None:
    cfg = d.plan.cfg
    if d.first is not None:
        for spec in d.first:
            body = Text()
            for m in spec.messages:
                body.append(f"[{m['role']}]\n", style="bold")
                body.append(m["content"] + "\n\n")
            console.print(Panel(body, title=Text(f"{spec.kind} prompt for {spec.source_id}")))
    skipped = len(d.plan.skipped)
    lines = [
        f"sentences: {len(d.plan.sources)} in {d.plan.meta.name}/{cfg.split} ({len(d.plan.order)} eligible, {skipped} skipped)",
        f"requests: at most {d.max_requests} (2 per source); about {d.best_case_requests} for the cap of {cfg.cap} "
        "if every variant is accepted",
        f"already journalled: {d.cached} of the requests of the first {d.checked} sources",
        f"endpoint: {cfg.base_url or 'embedded llama.cpp'}, model {cfg.model}",
        "dry run: nothing was sent",
    ]
    for line in lines:
        console.print(Text(line))


def cmd_run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Console()
    err = Console(stderr=True)
    if args.dry_run:
        _show_dry_run(runner.dry_run(cfg), out)
        return 0

    def say(line: str) -> None:
        # On stdout, with the summary: what the run is; stderr carries progress and errors only.
        out.print(Text(line, style="dim"), soft_wrap=True)

    if err.is_terminal:
        # The start-up lines go out before the live display takes the bottom of the screen.
        summary = None
        live = Live(Text("starting..."), console=err, refresh_per_second=4, transient=False)

        def show(p: Progress) -> None:
            if not live.is_started:
                live.start()
            live.update(render_progress(p))

        try:
            summary = runner.run(cfg, on_progress=show, notify=say)
        finally:
            if live.is_started:
                live.stop()
    else:
        last = [time.monotonic()]

        def plain(p: Progress) -> None:
            if time.monotonic() - last[0] >= PLAIN_PROGRESS_EVERY_S:
                last[0] = time.monotonic()
                err.print(Text(_plain_line(p)), soft_wrap=True)  # one line each in a log

        summary = runner.run(cfg, on_progress=plain, progress_every_s=1.0, notify=say)
    out.print(summary_table(summary))
    for w in summary.warnings:
        err.print(Text("warning: ", style="yellow").append(w, style=""))
    if summary.interrupted:
        resume = shlex.join(["augment", *sys.argv[1:]]) if sys.argv[1:2] == ["run"] else "the same command"
        err.print(
            Text(
                f"interrupted: wrote the corpus of the completed sources to {summary.out_dir}; "
                f"resume with `{resume}` (journalled answers are not sent again)",
                style="yellow",
            )
        )
        return 130
    return 0


# --------------------------------------------------------------------------------------------
# reading a finished run


def _target_dir(args: argparse.Namespace) -> Path:
    if args.out:
        path = Path(args.out)
    elif args.dataset:
        path = AugmentConfig(dataset=args.dataset).out_dir
    else:
        raise UserError("say which corpus: --dataset NAME (reads corpus/NAME/) or --out DIR")
    if not path.is_dir():
        raise UserError(f"{path}: no corpus folder here (run `augment run` first, or pass --out)")
    return path


def _read_records(path: Path) -> Iterable[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"{path}: not found (is this a finished `augment run` folder?)")
    for _, obj in iter_jsonl(path):
        yield obj


def cmd_rejects(args: argparse.Namespace) -> int:
    folder = _target_dir(args)
    if args.reason and args.reason not in ALL_REASONS:
        raise UserError(f"unknown reason {args.reason!r}; known: {', '.join(ALL_REASONS)}")
    rows = [
        r
        for r in _read_records(folder / "rejected.jsonl")
        if (not args.reason or r.get("reason") == args.reason)
        and (not args.kind or r.get("kind") == args.kind)
    ]
    shown = rows if args.limit <= 0 else rows[: args.limit]
    console = Console()
    if args.json:
        for r in shown:
            sys.stdout.write(json.dumps(r, ensure_ascii=False) + "\n")
        return 0
    table = Table(title=f"rejected variants in {folder} ({len(shown)} of {len(rows)})", show_lines=True)
    # The source id, kind and reason are short words a reader scans and greps for: one narrow
    # column, each whole on its own line, so that the LLM's text gets the width.
    table.add_column("source, kind, reason", no_wrap=True)
    table.add_column("variant", overflow="fold")
    table.add_column("what differs", overflow="fold")
    for r in shown:
        table.add_row(
            Text.assemble(
                str(r.get("source_id", "")),
                "\n",
                (str(r.get("kind", "")), "dim"),
                "\n",
                (str(r.get("reason", "")), "yellow"),
            ),
            Text(str(r.get("text") or "")),
            Text(str(r.get("detail") or "")),
        )
    console.print(table)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    folder = _target_dir(args)
    path = folder / "stats.json"
    if not path.is_file():
        raise UserError(f"{path}: not found (is this a finished `augment run` folder?)")
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if args.json:
        sys.stdout.write(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
        return 0
    Console().print(summary_table(RunSummary(folder, stats.get("status", "?"), stats)))
    return 0


def highlight(sample: Sample, types: list[str]) -> Text:
    """The sentence with each entity coloured by type and followed by its dim type label."""
    starts = {e.start: (i, e) for i, e in enumerate(sample.entities)}
    text = Text()
    pos = 0
    while pos < len(sample.tokens):
        if pos in starts:
            i, e = starts[pos]
            style = TYPE_STYLES[types.index(e.type) % len(TYPE_STYLES)] if e.type in types else "bold"
            text.append(" ".join(sample.tokens[e.start : e.end]), style=style)
            text.append(f" [{e.type}]", style="dim")
            pos = e.end
        else:
            text.append(sample.tokens[pos])
            pos += 1
        if pos < len(sample.tokens):
            text.append(" ")
    return text


def cmd_show(args: argparse.Namespace) -> int:
    folder = _target_dir(args)
    cfg_path = folder / "config.json"
    cfg = load_config(cfg_path, {"out": str(folder)})
    plan = make_plan(cfg.resolved())
    index = next((i for i, s in enumerate(plan.sources) if s.id == args.source_id), None)
    if index is None:
        raise UserError(f"no sentence with id {args.source_id!r} in {plan.meta.name}/{cfg.split}")
    source = plan.sources[index]
    types = list(plan.meta.entity_types)
    console = Console()
    console.print(Panel(highlight(source, types), title=Text(f"source {source.id}")))
    if index in plan.skipped:
        console.print(Text(f"skipped: {plan.skipped[index]}", style="yellow"))
        return 0
    journal = read_journal(folder / "journal.jsonl").entries
    specs = plan.requests(index)
    outcomes = {spec.kind: journal[spec.key] for spec in specs if spec.key in journal}
    if len(outcomes) < 2:
        console.print(
            Text("no answers journalled for this source yet (not needed for the cap, or not tried)")
        )
        return 0
    result = plan.process(index, outcomes, journal)
    if result.awaiting_verification:
        console.print(Text("the verification answers (--verify) of this source are not journalled yet"))
        return 0
    in_corpus = {
        obj["id"] for obj in _read_records(folder / "unmasked.jsonl") if obj.get("source_id") == source.id
    }
    table = Table(
        title="accepted (records synthesised from the variants; * = in the corpus)", show_lines=True
    )
    table.add_column("id", overflow="fold")
    table.add_column("origin")
    table.add_column("sentence", overflow="fold")
    for rec in result.records:
        s = Sample.model_validate_json(rec.unmasked)
        mark = "*" if s.id in in_corpus else ""
        table.add_row(Text(s.id + mark), Text(s.origin or ""), highlight(s, types))
    console.print(table)
    rejected = Table(title="rejected", show_lines=True)
    rejected.add_column("kind, reason", no_wrap=True)
    rejected.add_column("variant", overflow="fold")
    rejected.add_column("what differs", overflow="fold")
    for r in result.rejections:
        rejected.add_row(
            Text.assemble((r["kind"], "dim"), "\n", (r["reason"], "yellow")),
            Text(r["text"] or ""),
            Text(r["detail"] or ""),
        )
    console.print(rejected)
    return 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_cli(build_parser(), argv))


if __name__ == "__main__":
    main()
