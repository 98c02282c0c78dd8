"""Memory of a head fit's training states: in memory against in files (``fit.states_dir``).

A span or relation head fitted on a frozen encoder keeps what it reads of every training sentence
for all its epochs (``anchoralign.state_store``). This measures, for one span-head fit on the
first ``--limit`` sentences of a split, each way in a fresh process:

- **states**: the float32 values kept, in MiB, and per sub-word;
- **anonymous memory**: the process's ``RssAnon`` above what it held once the model and data were
  loaded, once the encoding is done (the states built, the epochs not begun) and at its peak
  (sampled every 20 ms; the epochs' own working memory adds to both variants alike). This is the
  memory that cannot be given back without swap: states kept in memory land here, states in files
  do not;
- **peak RSS** (``VmHWM``): it counts the files' pages too while the kernel keeps them resident,
  which it does while memory is free, and gives back under pressure;
- **time** of the encoding and the fit's epochs.

Random weights (memory and time do not depend on what the weights learned). Prints a markdown
table with the command, the machine and the date.

    python scripts/bench_fit_memory.py --data-dir ../shared/data --dataset nyt --split dev --limit 2000
    python scripts/bench_fit_memory.py --data-dir ../shared/data --store-gib 4   # the store alone

With ``--store-gib N`` no model runs: N GiB of random states of BART-large's width are made in
batches and kept by each store alone, as a fit keeps them, at a size where the states outgrow a
fit's own working memory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

VARIANTS = ("memory", "disk")


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (``RssAnon``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"no {field} in /proc/self/status: this benchmark needs Linux")


class PeakSampler(threading.Thread):
    """The largest ``RssAnon`` seen while it runs."""

    def __init__(self, every_s: float = 0.02):
        super().__init__(daemon=True)
        self.every_s, self.peak, self.running = every_s, status_kib("RssAnon"), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, status_kib("RssAnon"))
            time.sleep(self.every_s)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, status_kib("RssAnon"))


def store_only(args: argparse.Namespace) -> dict:
    """``args.store_gib`` GiB of states kept by the store of ``args.variant`` alone, no model, made
    as a fit makes them: batches of 32 sentences of 46 sub-words at BART-large's width (4 KiB a
    sub-word), each sentence's row kept, the batch then freed. Its figures."""
    import torch

    from anchoralign.state_store import state_keeper

    batch_shape = (32, 46, 1024)
    n_batches = round(args.store_gib * 2**30 / (4 * batch_shape[0] * batch_shape[1] * batch_shape[2]))
    base = status_kib("RssAnon")
    sampler = PeakSampler()
    sampler.start()
    with tempfile.TemporaryDirectory(dir=args.states_parent) as folder:
        keep = state_keeper(folder if args.variant == "disk" else None)
        start = time.perf_counter()
        kept = []
        for _ in range(n_batches):
            batch = torch.randn(batch_shape)
            kept += [keep(batch[j]) for j in range(batch_shape[0])]
            del batch
        seconds = time.perf_counter() - start
        held = status_kib("RssAnon")
        del kept
    peak = sampler.stop()
    return {
        "variant": args.variant,
        "states_mib": 4 * n_batches * batch_shape[0] * batch_shape[1] * batch_shape[2] / 2**20,
        "held_mib": (held - base) / 1024,
        "anon_mib": (peak - base) / 1024,
        "hwm_mib": status_kib("VmHWM") / 1024,
        "keep_s": seconds,
    }


def one_fit(args: argparse.Namespace) -> dict:
    """The fit of ``args.variant`` in this process: its figures."""
    import torch

    from anchoralign.datasets import get_meta, load_split
    from anchoralign.model import AnchorAlignModel
    from anchoralign.span_fit import SpanFitConfig, train_span_head

    torch.manual_seed(0)
    meta = get_meta(args.dataset, args.data_dir)
    train = load_split(args.dataset, args.split, args.data_dir)[: args.limit]
    model = AnchorAlignModel.from_backbone(args.backbone, meta)
    collate = model.collator()
    subwords = sum(collate.pieces.input_length(s.tokens) for s in train)
    base = status_kib("RssAnon")
    sampler = PeakSampler()
    sampler.start()
    with tempfile.TemporaryDirectory(dir=args.states_parent) as folder:
        states_dir = folder if args.variant == "disk" else None
        kept = []

        def log(message: str) -> None:
            kept.append((time.perf_counter(), status_kib("RssAnon"), message))

        start = time.perf_counter()
        cfg = SpanFitConfig(epochs=args.epochs, layers=args.layers)
        losses, n_train, _, _ = train_span_head(model, train, cfg, log, states_dir)
        seconds = time.perf_counter() - start
        # The fit's first line (sentences kept, mentions too wide) comes once the encoding is done.
        encoded, held = kept[0][0] - start, kept[0][1]
    peak = sampler.stop()
    hidden = model.backbone.embed_tokens.weight.shape[1]
    # With its own layers the head keeps their input, a state a sub-word; without, a word's state
    # and its maximum over its sub-words (the pooled head, SpanFitConfig's default).
    words = sum(len(s.tokens) for s in train)
    states = subwords * hidden if args.layers else 2 * words * hidden
    return {
        "variant": args.variant,
        "sentences": n_train,
        "subwords": subwords,
        "hidden": hidden,
        "states_mib": 4 * states / 2**20,
        "held_mib": (held - base) / 1024,
        "anon_mib": (peak - base) / 1024,
        "hwm_mib": status_kib("VmHWM") / 1024,
        "encode_s": encoded,
        "fit_s": seconds,
        "loss": losses[-1],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--dataset", default="nyt")
    p.add_argument("--split", default="dev", help="the split fitted on (default dev)")
    p.add_argument("--limit", type=int, default=2000, help="its first N sentences (default 2000)")
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--layers", type=int, default=2, help="the span head's own top layers (default 2)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--states-parent", default=None, help="where the disk variant's folder is made")
    p.add_argument(
        "--store-gib",
        type=float,
        help="instead of a fit: keep this many GiB of random BART-large-sized states in each store alone",
    )
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one fit, in a child
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(store_only(args) if args.store_gib else one_fit(args)))
        return
    rows = []
    for variant in VARIANTS:
        child = [
            sys.executable,
            __file__,
            *(argv if argv is not None else sys.argv[1:]),
            "--variant",
            variant,
        ]
        done = subprocess.run(child, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{variant}: {done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    command = "python scripts/bench_fit_memory.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"`{command}`; {platform.processor() or platform.machine()}, {dt.date.today()}\n")
    if args.store_gib:
        print(
            "| states kept | states (MiB) | anonymous memory once kept (MiB) | its peak (MiB) "
            "| peak RSS (MiB) | keeping (s) |"
        )
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['variant']} | {r['states_mib']:.0f} | {r['held_mib']:.0f} | {r['anon_mib']:.0f} | "
                f"{r['hwm_mib']:.0f} | {r['keep_s']:.1f} |"
            )
        return
    first = rows[0]
    print(
        f"{first['sentences']} sentences, {first['subwords']} sub-words, hidden {first['hidden']}: "
        f"{first['states_mib']:.0f} MiB of states ({first['states_mib'] * 1024 / first['subwords']:.1f} KiB a sub-word)\n"
    )
    print(
        "| states kept | anonymous memory once encoded (MiB) | its peak (MiB) | peak RSS (MiB) "
        "| encoding (s) | encoding and fit (s) | last loss |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['held_mib']:.0f} | {r['anon_mib']:.0f} | {r['hwm_mib']:.0f} | "
            f"{r['encode_s']:.1f} | {r['fit_s']:.1f} | {r['loss']:.4f} |"
        )


if __name__ == "__main__":
    main()
