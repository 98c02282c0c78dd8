"""A head fit stopped midway resumes after its last finished epoch (``anchoralign.fit_progress``)
and ends exactly where an uninterrupted fit ends; progress of another fit is never used."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from model_fixtures import TOY_META, cli, one_cpu_thread, tiny_model, toy_samples, write_user_dataset  # noqa: F401

from anchoralign import fit_progress
from anchoralign.config import DecodeConfig, HeadsFitConfig
from anchoralign.fit_progress import FitProgress, progress_dir
from anchoralign.fitted_heads import FINISHED_DIR, RELATION_REPORT, SPAN_REPORT, fit_heads, planned_fits
from anchoralign.model import AnchorAlignModel
from anchoralign.relation_fit import FitConfig, train_relation_head
from anchoralign.span_fit import SpanFitConfig, train_span_head

DECODE = DecodeConfig(max_len=8)


class Stopped(Exception):
    """Stands for the process being killed."""


def stop_after(epoch: int, lines: list[str]):
    """A fit's log that records its lines and stops the fit once epoch ``epoch`` is reported."""

    def log(message: str) -> None:
        lines.append(message)
        if message.startswith(f"epoch {epoch}/"):
            raise Stopped

    return log


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


TRAINERS = {
    # what is fitted, its trainer, its settings (with the head's own top layer, so that the copy's
    # weights and their optimiser state are resumed too), the module that holds what it trained
    "span head": (
        train_span_head,
        SpanFitConfig(width=3, epochs=4, layers=1),
        lambda m: (m.span_head, m.span_layers),
    ),
    "relation head": (
        train_relation_head,
        FitConfig(epochs=4, layers=1, heads=2),
        lambda m: (m.relation_head, m.relation_layers),
    ),
}


@pytest.mark.parametrize("what", list(TRAINERS))
def test_a_fit_stopped_midway_resumes_after_its_last_epoch_and_ends_as_an_uninterrupted_one(
    what: str, tmp_path: Path
) -> None:
    trainer, cfg, trained = TRAINERS[what]
    source = tiny_model().save_pretrained(tmp_path / "best")
    samples = toy_samples() * 3

    whole = AnchorAlignModel.from_pretrained(source)
    whole_losses = trainer(whole, samples, cfg, lambda _: None)[0]

    progress = FitProgress.of_fit(tmp_path / "fitted", f"{what}.json", source, cfg, "toy", "train")
    lines: list[str] = []
    with pytest.raises(Stopped):
        trainer(AnchorAlignModel.from_pretrained(source), samples, cfg, stop_after(2, lines), None, progress)
    assert progress.path is not None and progress.path.parent == progress_dir(tmp_path / "fitted")

    lines.clear()
    resumed = AnchorAlignModel.from_pretrained(source)
    losses = trainer(resumed, samples, cfg, lines.append, None, progress)[0]
    assert f"resuming after epoch 2 from {progress.path}" in lines
    # Only the epochs not done are trained again ...
    assert [x.split(":")[0] for x in lines if x.startswith("epoch")] == ["epoch 3/4", "epoch 4/4"]
    # ... and the fit ends where the uninterrupted one did, weights, optimiser steps and dropout alike.
    assert losses == whole_losses
    for mine, theirs in zip(trained(resumed), trained(whole), strict=True):
        assert_same_weights(weights(mine), weights(theirs))


def test_progress_of_another_fit_or_of_a_checkpoint_written_again_is_not_used(tmp_path: Path) -> None:
    source = tiny_model().save_pretrained(tmp_path / "best")
    cfg = SpanFitConfig(width=3, epochs=2, layers=0)
    samples = toy_samples()
    out = tmp_path / "fitted"
    progress = FitProgress.of_fit(out, SPAN_REPORT, source, cfg, "toy", "train")
    train_span_head(AnchorAlignModel.from_pretrained(source), samples, cfg, lambda _: None, None, progress)
    assert progress.path is not None and progress.path.is_file()

    def epochs_trained(progress: FitProgress, cfg: SpanFitConfig) -> list[str]:
        lines: list[str] = []
        train_span_head(AnchorAlignModel.from_pretrained(source), samples, cfg, lines.append, None, progress)
        assert not any(x.startswith("resuming") for x in lines)
        return [x for x in lines if x.startswith("epoch")]

    # Other settings (a learning rate) or another training split: the saved epochs are not theirs.
    other = dataclasses.replace(cfg, lr=cfg.lr / 2)
    assert (
        len(epochs_trained(FitProgress.of_fit(out, SPAN_REPORT, source, other, "toy", "train"), other)) == 2
    )
    assert len(epochs_trained(FitProgress.of_fit(out, SPAN_REPORT, source, cfg, "toy", "dev"), cfg)) == 2
    # The same checkpoint folder written again (a stage trained further in place).
    weights_file = source / "model.safetensors"
    stat = weights_file.stat()
    os.utime(weights_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = FitProgress.of_fit(out, SPAN_REPORT, source, cfg, "toy", "train")
    assert len(epochs_trained(again, cfg)) == 2


def test_heads_fitted_after_a_stage_resume_where_they_stopped_and_leave_no_progress(tmp_path: Path) -> None:
    source = tiny_model().save_pretrained(tmp_path / "best")
    fits = planned_fits(HeadsFitConfig(span_head=True, relation_head=True, span_width=3, span_layers=1), 3)
    fits = {name: dataclasses.replace(fit, epochs=3) for name, fit in fits.items()}
    samples = toy_samples() * 2

    def fit(out: Path, log) -> Path:
        return fit_heads(
            source, out, samples, toy_samples(), TOY_META, fits, DECODE, ("train", "dev"), log, "cpu"
        )

    whole = AnchorAlignModel.from_pretrained(fit(tmp_path / "whole", lambda _: None))

    out = tmp_path / "fitted"
    lines: list[str] = []

    def stopped_in_the_relation_head(message: str) -> None:
        lines.append(message)
        if message.startswith("relation head: epoch 2/"):
            raise Stopped

    with pytest.raises(Stopped):
        fit(out, stopped_in_the_relation_head)
    assert not out.exists()
    # The finished span head is kept as a model (its epochs' progress is no longer needed).
    assert sorted(p.name for p in progress_dir(out).iterdir()) == [FINISHED_DIR, "relation_head.pt"]

    lines.clear()
    assert fit(out, lines.append) == out
    # The span head was done: it is neither trained nor measured on dev again (no decode of the
    # whole dev set before and after it); the relation head goes on at epoch 3.
    assert (
        f"span_head.json already fitted before the stop, kept in {progress_dir(out) / FINISHED_DIR}: not fitted again"
        in lines
    )
    assert not any(x.startswith("span head:") for x in lines)
    assert [x.split(":")[1].strip() for x in lines if ": epoch" in x] == ["epoch 3/3"]
    assert sum("resuming after epoch" in x for x in lines) == 1
    assert not progress_dir(out).exists()
    resumed = AnchorAlignModel.from_pretrained(out)
    assert_same_weights(weights(resumed), weights(whole))
    assert resumed.relation_thresholds == whole.relation_thresholds
    assert {p.name for p in out.glob("*_head.json")} == {SPAN_REPORT, RELATION_REPORT}
    # The span head's report is the one its fit wrote before the stop.
    assert json.loads((out / SPAN_REPORT).read_text()) == json.loads(
        (tmp_path / "whole" / SPAN_REPORT).read_text()
    )


def test_a_finished_fit_of_another_checkpoint_or_other_settings_is_fitted_again(tmp_path: Path) -> None:
    source = tiny_model().save_pretrained(tmp_path / "best")
    fits = planned_fits(HeadsFitConfig(span_head=True, relation_head=True, span_width=3), 3)
    fits = {name: dataclasses.replace(fit, epochs=2) for name, fit in fits.items()}
    out = tmp_path / "fitted"

    def fit(fits: dict, log, splits=("train", "dev")) -> Path:
        return fit_heads(
            source, out, toy_samples(), toy_samples(), TOY_META, fits, DECODE, splits, log, "cpu"
        )

    def stopped_in_the_relation_head(message: str) -> None:
        if message.startswith("relation head: epoch"):
            raise Stopped

    def span_head_fitted(fits: dict, splits=("train", "dev")) -> bool:
        """Whether the span head is fitted, in a run stopped in the relation head's first epoch."""
        (progress_dir(out) / "relation_head.pt").unlink(missing_ok=True)
        with pytest.raises(Stopped):
            lines: list[str] = []
            fit(fits, lambda m: (lines.append(m), stopped_in_the_relation_head(m)), splits)
        return any(x.startswith("span head: epoch") for x in lines)

    assert span_head_fitted(fits)
    assert (progress_dir(out) / FINISHED_DIR).is_dir()
    assert not span_head_fitted(fits)  # the same fit: kept
    other = {**fits, SPAN_REPORT: dataclasses.replace(fits[SPAN_REPORT], lr=fits[SPAN_REPORT].lr / 2)}
    assert span_head_fitted(other)  # other settings
    assert span_head_fitted(other, ("train", "test"))  # measured on another split
    weights_file = source / "model.safetensors"  # the checkpoint written again in place
    stat = weights_file.stat()
    os.utime(weights_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert span_head_fitted(other, ("train", "test"))


def twice(samples: list) -> list:
    return [s.model_copy(update={"id": f"{s.id}-{k}"}) for k in range(2) for s in samples]


@pytest.mark.parametrize("command", ["fit-span-head", "fit-relation-head"])
def test_a_fit_command_interrupted_resumes_when_run_again(
    command: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    checkpoint = tiny_model().save_pretrained(tmp_path / "ck")
    data = write_user_dataset(
        tmp_path / "toy", TOY_META, {"train": twice(toy_samples()), "dev": toy_samples()}
    )
    args = [command, "--checkpoint", checkpoint, "--dataset", data, "--epochs", "3", "--json"]
    args += ["--max-len", "8"]
    code, printed, err = cli([*args, "--output", tmp_path / "whole"], capsys)
    assert code == 0, err
    whole = json.loads(printed)

    out = tmp_path / "fitted"
    save = FitProgress.save

    def interrupted_after_the_first_epoch(self, epochs, *rest):
        save(self, epochs, *rest)
        if epochs == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(fit_progress.FitProgress, "save", interrupted_after_the_first_epoch)
        code, _, err = cli([*args, "--output", out], capsys)
    assert code == 130 and "interrupted" in err
    assert not out.exists() and progress_dir(out).is_dir()

    code, printed, err = cli([*args, "--output", out], capsys)
    assert code == 0, err
    assert "resuming after epoch 1" in err and "epoch 1/3" not in err and "epoch 3/3" in err
    report = json.loads(printed)
    assert report["losses"] == whole["losses"] and report["dev_after"] == whole["dev_after"]
    assert not progress_dir(out).exists()
