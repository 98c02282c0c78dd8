"""Heads fitted on a checkpoint and written as a new one (``anchoralign.fitted_heads``): the order of
the fits, the reports, the atomic write, and a second call that finds the work done."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from model_fixtures import TOY_META, one_cpu_thread, tiny_model, toy_samples  # noqa: F401

from anchoralign import fitted_heads
from anchoralign.config import DecodeConfig, HeadsFitConfig
from anchoralign.errors import UserError
from anchoralign.fitted_heads import RELATION_REPORT, SPAN_REPORT, already_fitted, fit_heads, planned_fits
from anchoralign.model import AnchorAlignModel

DECODE = DecodeConfig(max_len=8)
SPLITS = ("train", "dev")


def _fit(source: Path, out: Path, fits: dict, lines: list[str]) -> Path:
    return fit_heads(
        source, out, toy_samples(), toy_samples(), TOY_META, fits, DECODE, SPLITS, lines.append, "cpu"
    )


def test_planned_fits_follow_the_config_span_head_first() -> None:
    cfg = HeadsFitConfig(span_head=True, relation_head=True, span_width=3, span_layers=2, relation_heads=2)
    both = planned_fits(cfg, 7)
    assert list(both) == [SPAN_REPORT, RELATION_REPORT]
    assert (both[SPAN_REPORT].width, both[SPAN_REPORT].layers, both[SPAN_REPORT].seed) == (3, 2, 7)
    assert (both[RELATION_REPORT].heads, both[RELATION_REPORT].seed) == (2, 7)
    assert list(planned_fits(HeadsFitConfig(relation_head=True), 0)) == [RELATION_REPORT]
    assert planned_fits(HeadsFitConfig(), 0) == {}


def test_both_heads_are_fitted_reported_and_not_fitted_twice(tmp_path: Path, monkeypatch) -> None:
    source = tiny_model().save_pretrained(tmp_path / "best")
    (source / "train_config.yaml").write_text("# stage: sft\nseed: 3\n", encoding="utf-8")
    out = tmp_path / "fitted"
    fits = planned_fits(HeadsFitConfig(span_head=True, relation_head=True, span_width=3), 3)
    fits = {name: dataclasses.replace(fit, epochs=2) for name, fit in fits.items()}
    lines: list[str] = []
    assert _fit(source, out, fits, lines) == out
    model = AnchorAlignModel.from_pretrained(out)
    assert model.span_width == 3 and model.relation_head is not None
    span, relation = (
        json.loads((out / name).read_text(encoding="utf-8")) for name in (SPAN_REPORT, RELATION_REPORT)
    )
    for record in (span, relation):
        assert record["checkpoint"] == str(source) and record["dataset"] == "toy"
        assert (record["train_split"], record["dev_split"]) == SPLITS and len(record["losses"]) == 2
    assert span["fit"]["width"] == 3 and relation["fit"]["seed"] == 3
    assert model.relation_thresholds == (relation["keep"], relation["add"])
    # The relation head was fitted over the span head's entities, not the other way round.
    assert lines.index(next(x for x in lines if "span head" in x)) < lines.index(
        next(x for x in lines if "relation head" in x)
    )
    assert (out / "train_config.yaml").read_text(encoding="utf-8").endswith("seed: 3\n")
    assert not (tmp_path / "fitted.tmp").exists()
    assert already_fitted(out, source, fits, DECODE)

    # Found again: the checkpoint is not even read.
    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded again")

    with monkeypatch.context() as patch:
        patch.setattr(fitted_heads.AnchorAlignModel, "from_pretrained", refuse)
        assert _fit(source, out, fits, lines) == out
    assert lines[-1] == f"heads already fitted on {source}: {out}"

    # Other settings, or fewer heads, are a new fit that replaces the folder.
    span_only = {SPAN_REPORT: fits[SPAN_REPORT]}
    assert not already_fitted(out, source, span_only, DECODE)
    assert not already_fitted(out, tmp_path / "final", fits, DECODE)
    assert not already_fitted(out, source, fits, DECODE.model_copy(update={"beam": 2}))
    assert already_fitted(out, source, fits, DECODE.model_copy(update={"batch_size": 4}))
    _fit(source, out, span_only, lines)
    assert (
        not (out / RELATION_REPORT).exists() and AnchorAlignModel.from_pretrained(out).relation_head is None
    )


def test_a_fit_killed_before_its_rename_leaves_no_checkpoint(tmp_path: Path, monkeypatch) -> None:
    source = tiny_model().save_pretrained(tmp_path / "best")
    out = tmp_path / "fitted"
    (span,) = planned_fits(HeadsFitConfig(span_head=True, span_width=2), 0).values()
    fits = {SPAN_REPORT: dataclasses.replace(span, epochs=1)}

    def killed(self, target):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Path, "rename", killed)
        with pytest.raises(KeyboardInterrupt):
            _fit(source, out, fits, [])
    assert not out.exists() and not already_fitted(out, source, fits, DECODE)
    _fit(source, out, fits, [])  # the next start fits again, over the half-written one
    assert already_fitted(out, source, fits, DECODE) and not (tmp_path / "fitted.tmp").exists()


def test_a_run_folder_given_as_a_checkpoint_names_its_fitted_model_first(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for name in ("best", "fitted"):
        tiny_model().save_pretrained(run / name)
    with pytest.raises(
        UserError, match=f"this is a training run folder: give its {run / 'fitted'} or {run / 'best'}"
    ):
        AnchorAlignModel.from_pretrained(run)
