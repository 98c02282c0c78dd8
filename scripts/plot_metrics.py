"""Draw a training run's ``metrics.jsonl`` as PNG files.

    python scripts/plot_metrics.py runs/conll04/pretrain            # writes runs/conll04/pretrain/plots/
    python scripts/plot_metrics.py runs/a/metrics.jsonl --out figs  # any metrics file, any folder

Figures (each with dotted lines where a phase began):

- ``loss_terms.png``: every training loss term against the step, one panel each;
- ``alignment.png``: the alignment terms (NER-RE KL, forward-reverse KL, suppression) on the
  training batches and, from the evaluations, on each logged split (dev, test): the curves of the
  paper's appendix;
- ``scores.png``: the eval split's F1 scores and the valid-output rate;
- ``schedule.png``: learning rate and samples/s.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

LOSS_TERMS = ("ce_ner", "ce_fwd", "ce_rev", "kl_ner_re", "kl_fwd_rev", "suppress", "loss")
ALIGNMENT_TERMS = ("kl_ner_re", "kl_fwd_rev", "suppress")
RATES = ("complete_rate", "free_valid_rate")  # shares, drawn as percentages
SCORES = ("ner_f1", "rel_strict_f1", "rel_boundary_f1")


class PlotError(Exception):
    """A metrics file that cannot be drawn; printed as one line."""


def read_rows(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: metrics file not found")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PlotError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or "kind" not in row:
            raise PlotError(f"{path}:{lineno}: expected an object with a 'kind'")
        rows.append(row)
    return rows


def series(
    rows: Iterable[dict[str, Any]], kind: str, key: str, split: str | None = None
) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` in the rows of ``kind`` (and ``split``), skipping rows without it."""
    steps, values = [], []
    for r in rows:
        if r.get("kind") != kind or (split is not None and r.get("split") != split):
            continue
        value = r.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            steps.append(int(r["step"]))
            values.append(float(value))
    return steps, values


def splits_of(rows: Iterable[dict[str, Any]], kind: str) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        if r.get("kind") == kind and "split" in r:
            seen.setdefault(str(r["split"]))
    return list(seen)


def phase_starts(rows: Iterable[dict[str, Any]]) -> list[tuple[int, str]]:
    """(step, phase name) of every switch, for the dotted lines."""
    return [(int(r["step"]), str(r["to"])) for r in rows if r.get("kind") == "switch"]


def _mark_phases(ax: Any, switches: Sequence[tuple[int, str]]) -> None:
    for step, name in switches:
        ax.axvline(step, color="grey", linestyle=":", linewidth=1)
        ax.annotate(name, (step, 1), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                    va="top", ha="right", color="grey")  # fmt: skip


def plot(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Write the figures that have data; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    switches = phase_starts(rows)
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)

    terms = [t for t in LOSS_TERMS if series(rows, "train", t)[0]]
    if terms:
        fig, axes = plt.subplots(len(terms), 1, figsize=(8, 1.9 * len(terms)), sharex=True, squeeze=False)
        for ax, term in zip(axes[:, 0], terms, strict=True):
            ax.plot(*series(rows, "train", term), label="train")
            for split in splits_of(rows, "eval_loss"):
                ax.plot(*series(rows, "eval_loss", term, split), marker="o", markersize=3, label=split)
            ax.set_ylabel(term)
            _mark_phases(ax, switches)
        axes[0, 0].legend(fontsize=8)
        axes[-1, 0].set_xlabel("optimizer step")
        save(fig, "loss_terms.png")

    fig, axes = plt.subplots(
        1, len(ALIGNMENT_TERMS), figsize=(4.2 * len(ALIGNMENT_TERMS), 3.2), squeeze=False
    )
    drawn = False
    for ax, term in zip(axes[0], ALIGNMENT_TERMS, strict=True):
        # Before the switch a term is not computed and logged as 0: leave those points out.
        x, y = series(rows, "train", term)
        curves = [("train", ([a for a, b in zip(x, y, strict=True) if b != 0.0], [b for b in y if b != 0.0]))]
        curves += [(s, series(rows, "eval_loss", term, s)) for s in splits_of(rows, "eval_loss")]
        for label, (x, y) in curves:
            if x:
                ax.plot(x, y, marker="o" if label != "train" else None, markersize=3, label=label)
                drawn = True
        ax.set_title(term)
        ax.set_xlabel("optimizer step")
        _mark_phases(ax, switches)
        ax.legend(fontsize=8)
    if drawn:
        save(fig, "alignment.png")
    else:
        plt.close(fig)

    scored = [k for k in (*SCORES, *RATES) if series(rows, "eval", k)[0]]
    if scored:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for key in scored:
            x, y = series(rows, "eval", key)
            ax.plot(x, [v * 100 for v in y] if key in RATES else y, marker="o", markersize=3,
                    label=f"{key} (%)" if key in RATES else key)  # fmt: skip
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("score")
        _mark_phases(ax, switches)
        ax.legend(fontsize=8)
        save(fig, "scores.png")

    if series(rows, "train", "lr")[0]:
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 4), sharex=True)
        ax1.plot(*series(rows, "train", "lr"))
        ax1.set_ylabel("learning rate")
        ax2.plot(*series(rows, "train", "samples_per_s"))
        ax2.set_ylabel("samples/s")
        ax2.set_xlabel("optimizer step")
        for ax in (ax1, ax2):
            _mark_phases(ax, switches)
        save(fig, "schedule.png")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Draw metrics.jsonl of a training run as PNG files.")
    p.add_argument("metrics", help="a run folder (holding metrics.jsonl) or a metrics file")
    p.add_argument("--out", help="folder for the PNG files (default: <run folder>/plots)")
    args = p.parse_args(argv)
    source = Path(args.metrics)
    out = Path(args.out) if args.out else (source if source.is_dir() else source.parent) / "plots"
    try:
        rows = read_rows(source)
        written = plot(rows, out)
    except PlotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not written:
        print(f"error: {source}: no training or evaluation rows to draw", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
