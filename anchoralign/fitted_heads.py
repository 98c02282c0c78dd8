"""Fitted heads as a checkpoint: what `fit-span-head`, `fit-relation-head` and a stage's ``fit``
section (``sft/run.py``, :class:`anchoralign.config.HeadsFitConfig`) share.

A fit reads a trained checkpoint, adds a head fitted on its frozen encoder (``span_fit``,
``relation_fit``) and writes the result as a new checkpoint directory with one JSON report per
head beside the weights: the source checkpoint, the splits, the fit's settings and its figures.
The directory is written under a temporary name and renamed, so a fit killed midway leaves no
half checkpoint that looks like a result.

After a stage, the span head is fitted first and the relation head over its entities, the order
the measured recipe uses (BENCHMARKS.md, "Nine seeds of the recipe"). A stage started again finds
the heads already fitted, with the same settings on the same checkpoint, and does not pay twice;
one stopped midway resumes each fit after its last finished epoch (``anchoralign.fit_progress``,
in ``fitted.partial/`` beside the output). A fit that finished before the stop is not run again:
the model with its head is kept there too (``finished/``), because fitting a head also measures
it on dev, a decode of the whole dev set that a resume would otherwise pay again.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from anchoralign.config import DecodeConfig, HeadsFitConfig
from anchoralign.fit_progress import FitProgress, checkpoint_fingerprint, progress_dir, remove_progress
from anchoralign.model import CONFIG_FILE, EXPORTED_DIRS, TRAIN_CONFIG_FILE, AnchorAlignModel
from anchoralign.relation_fit import FitConfig, fit_relation_head
from anchoralign.schema import DatasetMeta, Sample
from anchoralign.span_fit import SpanFitConfig, fit_span_head

SPAN_REPORT = "span_head.json"
RELATION_REPORT = "relation_head.json"
FITTED_DIR = EXPORTED_DIRS[0]  # under a stage's output_dir, beside best/ and final/
FINISHED_DIR = "finished"  # in the progress folder: the model after the fits that finished
SOURCE_FILE = "source.json"  # in FINISHED_DIR: the fingerprint of the checkpoint it was fitted on


def report_record(
    source: str | Path,
    dataset: str,
    train_split: str | None,
    dev_split: str,
    fit: Any,
    decode_cfg: DecodeConfig,
    report: Any,
) -> dict[str, Any]:
    """The JSON report of one fit: where it started, on what, with which settings (a dataclass, or
    None for a choice of thresholds alone) and decoding flags (the dev decode the fit measured and
    chose its thresholds on), then the fit's own report (a dataclass)."""
    return {
        "checkpoint": str(source),
        "dataset": dataset,
        "train_split": train_split,
        "dev_split": dev_split,
        "fit": None if fit is None else dataclasses.asdict(fit),
        "decode": decoding(decode_cfg),
        **dataclasses.asdict(report),
    }


def decoding(decode_cfg: DecodeConfig) -> dict[str, Any]:
    """The decoding flags that change what a dev decode gives (all but the batch size)."""
    return decode_cfg.model_dump(exclude={"batch_size"})


def write_fitted(
    model: AnchorAlignModel, out: Path, source: Path, reports: Mapping[str, dict[str, Any]]
) -> Path:
    """Write ``model`` to ``out`` (replacing it) with the source checkpoint's training config and the
    ``reports`` (file name -> record), atomically."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if (source / TRAIN_CONFIG_FILE).is_file():
        shutil.copyfile(source / TRAIN_CONFIG_FILE, tmp / TRAIN_CONFIG_FILE)
    for name, record in reports.items():
        (tmp / name).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def worse_span_head(report: Any, dev_split: str, fitted: str | Path) -> str | None:
    """The warning for a fitted span head (``span_fit.SpanFitReport``) whose dev entities are worse
    than the checkpoint's own; None when they are not."""
    if report.dev_after >= report.dev_before:
        return None
    return (
        f"the span head's {dev_split} entities are worse than the checkpoint's own "
        f"({report.dev_after:.2f} < {report.dev_before:.2f}): evaluate {fitted} with "
        "--ner-source decoder to report the NER decoder's"
    )


def planned_fits(cfg: HeadsFitConfig, seed: int) -> dict[str, Any]:
    """The fits ``cfg`` asks for, in the order they run: report file -> the fit's settings."""
    fits: dict[str, Any] = {}
    if cfg.span_head:
        fits[SPAN_REPORT] = SpanFitConfig(width=cfg.span_width, seed=seed, layers=cfg.span_layers)
    if cfg.relation_head:
        fits[RELATION_REPORT] = FitConfig(seed=seed, heads=cfg.relation_heads, layers=cfg.relation_layers)
    return fits


def already_fitted(out: Path, source: Path, fits: Mapping[str, Any], decode_cfg: DecodeConfig) -> bool:
    """Whether ``out`` holds exactly these fits, made on ``source`` with these decoding flags."""
    if not (out / CONFIG_FILE).is_file():
        return False
    for name, fit in fits.items():
        path = out / name
        if not path.is_file():
            return False
        record = json.loads(path.read_text(encoding="utf-8"))
        made = (record.get("checkpoint"), record.get("fit"), record.get("decode"))
        if made != (str(source), dataclasses.asdict(fit), decoding(decode_cfg)):
            return False
    return {p.name for p in out.glob("*_head.json")} == set(fits)


def keep_finished(
    model: AnchorAlignModel, finished: Path, source: Path, reports: Mapping[str, dict[str, Any]]
) -> None:
    """Keep ``model`` with the heads fitted so far (and their ``reports``) in ``finished``, with the
    fingerprint of ``source``, so that a stop in a later fit does not cost these again; the
    per-epoch progress of the fits kept there is no longer needed."""
    write_fitted(model, finished, source, reports)
    (finished / SOURCE_FILE).write_text(json.dumps(checkpoint_fingerprint(source)) + "\n", encoding="utf-8")
    for name in reports:
        (finished.parent / (Path(name).stem + ".pt")).unlink(missing_ok=True)


def finished_fits(
    finished: Path,
    source: Path,
    fits: Mapping[str, Any],
    decode_cfg: DecodeConfig,
    dataset: str,
    splits: tuple[str, str],
) -> dict[str, dict[str, Any]]:
    """The reports of the fits kept in ``finished`` (``keep_finished``) when they are the first of
    ``fits``, made with the same settings, decoding flags, data and splits on ``source`` as it is
    now (not written again since); {} when there are none, or none of these."""
    if not (finished / SOURCE_FILE).is_file():
        return {}
    if json.loads((finished / SOURCE_FILE).read_text(encoding="utf-8")) != checkpoint_fingerprint(source):
        return {}
    done = [name for name in fits if (finished / name).is_file()]
    first = dict(list(fits.items())[: len(done)])
    if list(first) != done or not already_fitted(finished, source, first, decode_cfg):
        return {}
    reports = {name: json.loads((finished / name).read_text(encoding="utf-8")) for name in done}
    if any(
        (r.get("dataset"), r.get("train_split"), r.get("dev_split")) != (dataset, *splits)
        for r in reports.values()
    ):
        return {}
    return reports


def fit_heads(
    source: Path,
    out: Path,
    train: Sequence[Sample],
    dev: Sequence[Sample],
    meta: DatasetMeta,
    fits: Mapping[str, Any],
    decode_cfg: DecodeConfig,
    splits: tuple[str, str],
    log: Callable[[str], None],
    device: str = "auto",
    states_dir: str | Path | None = None,
) -> Path:
    """Fit the heads of ``fits`` (``planned_fits``) on the checkpoint ``source``, span head first,
    and write the result to ``out`` (``splits``: the names of ``train`` and ``dev``, for the
    reports; ``states_dir``: where the fits keep their training states, None for memory); nothing
    is done when ``out`` already holds them."""
    from anchoralign.api import resolve_device

    if already_fitted(out, source, fits, decode_cfg):
        log(f"heads already fitted on {source}: {out}")
        return out
    finished = progress_dir(out) / FINISHED_DIR
    reports = finished_fits(finished, source, fits, decode_cfg, meta.name, splits)
    if reports:
        log(f"{', '.join(reports)} already fitted before the stop, kept in {finished}: not fitted again")
    model = AnchorAlignModel.from_pretrained(
        finished if reports else source, map_location=resolve_device(device, "device")
    )
    for name, fit in fits.items():
        if name in reports:
            continue
        what, then = (
            ("span head", "measured") if name == SPAN_REPORT else ("relation head", "thresholds chosen")
        )
        log(f"fitting a {what} on the frozen encoder of {source} on {splits[0]}, {then} on {splits[1]}")

        def fit_log(message: str, what: str = what) -> None:  # the fit's lines apart from training's
            log(f"{what}: {message}")

        progress = FitProgress.of_fit(out, name, source, fit, meta.name, splits[0])
        if name == SPAN_REPORT:
            report = fit_span_head(model, train, dev, meta, fit, decode_cfg, fit_log, states_dir, progress)
            warning = worse_span_head(report, splits[1], out)
            if warning:
                log(warning)
        else:
            report = fit_relation_head(
                model, train, dev, meta, fit, decode_cfg, fit_log, states_dir, progress
            )
        reports[name] = report_record(source, meta.name, *splits, fit, decode_cfg, report)
        if len(reports) < len(fits):
            keep_finished(model, finished, source, reports)
    written = write_fitted(model, out, source, reports)
    remove_progress(out)
    log(f"wrote {written}: {source} with its fitted heads")
    return written
