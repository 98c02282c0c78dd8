"""Checkpoints: a killed run resumes to the same weights and metrics; resumes that would mix two
runs are refused; a finished run is not trained again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from trainer_fixtures import Loss, ScriptedEvaluator, StandIn, cfg_of, collate, phases_of, sets_of, weights_at

from anchoralign.config import PretrainConfig
from anchoralign.errors import UserError
from anchoralign.trainer import Trainer


class Killed(Exception):
    pass


def test_resume_after_a_crash_reaches_the_same_weights(
    tmp_path: Path, gloo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Checkpoints at steps 4, 6 (epoch end), 8, 12 (epoch end), ...; evaluations at 5, 6, 10, 12,
    # 15, ...: the fifth (step 15) passes the threshold and ends poa-ce; the terms then ramp in.
    args = (
        "--checkpoint.save_every=4",
        "--phases.switch=valid_rate",
        "--eval.every=5",
        "--loss.ramp_steps=3",
    )
    rates = [0.1, 0.1, 0.1, 0.1, 0.95]

    def trainer(cfg: PretrainConfig) -> Trainer:
        # Dropout: the resumed run must also restore the RNG to match.
        return Trainer(
            cfg,
            StandIn(dropout=0.3),
            phases_of(1, 2, 1),
            sets_of(),
            collate,
            Loss(),
            ScriptedEvaluator(rates),
        )

    reference = weights_at(trainer(cfg_of(tmp_path / "a", *args)).fit())

    cfg = cfg_of(tmp_path / "b", *args)
    crashing = trainer(cfg)
    real_step = Trainer.train_step

    def step_then_crash(self: Trainer, micro_batches):
        if self.state.global_step == 14:  # last checkpoint at step 12; the switch is still ahead
            raise Killed()
        return real_step(self, micro_batches)

    monkeypatch.setattr(Trainer, "train_step", step_then_crash)
    with pytest.raises(Killed):
        crashing.fit()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = trainer(cfg)
    # The scripted evaluator restarts its count: resuming at step 12 it must answer the fifth call.
    resumed.evaluator.calls = 4
    got = weights_at(resumed.fit())
    assert "resuming from" in (Path(cfg.output_dir) / "train.log").read_text()
    assert resumed.state.switched_at == 15 and resumed.state.align_since == 15
    for k in reference:
        assert torch.equal(got[k], reference[k]), k

    # metrics.jsonl lost what was logged after the checkpoint, so no step appears twice: the
    # same rows as the uninterrupted run's (throughput aside).
    def comparable(run: Path) -> list[dict]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in lines]

    assert comparable(Path(cfg.output_dir)) == comparable(tmp_path / "a" / "run")


def test_resume_refuses_a_different_config(tmp_path: Path, gloo: None) -> None:
    Trainer(cfg_of(tmp_path), StandIn(), phases_of(1, 0, 0), sets_of(), collate, Loss()).fit()
    other = Trainer(
        cfg_of(tmp_path, "--optim.lr=0.01", "--phases.epochs=[1,0,0]"),
        StandIn(),
        phases_of(1, 0, 0),
        sets_of(),
        collate,
        Loss(),
    )
    with pytest.raises(
        UserError, match=r"holds a run with another config \(optim.lr: 0.05 -> 0.01; phases.epochs: "
    ):
        other.fit()


def test_resume_refuses_another_world_size(tmp_path: Path, gloo: None) -> None:
    # A whole checkpoint (a finished run's record alone resumes nothing, under any world size).
    cfg = cfg_of(tmp_path, "--phases.epochs=[1,0,0]", "--checkpoint.keep_final=true")
    Trainer(cfg, StandIn(), phases_of(1, 0, 0), sets_of(), collate, Loss()).fit()
    ckpt = Path(cfg.output_dir) / "checkpoints"
    state_file = ckpt / (ckpt / "latest").read_text().strip() / "train_state.json"
    state = json.loads(state_file.read_text())
    assert state["world_size"] == 1
    state_file.write_text(json.dumps({**state, "world_size": 2}))
    again = Trainer(cfg, StandIn(), phases_of(1, 0, 0), sets_of(), collate, Loss())
    with pytest.raises(UserError, match=r"written by 2 rank\(s\); resume it with 2, not 1"):
        again.fit()


def _last_checkpoint(cfg: PretrainConfig) -> set[str]:
    ckpt = Path(cfg.output_dir) / "checkpoints"
    return {p.name for p in (ckpt / (ckpt / "latest").read_text().strip()).iterdir()}


def test_finished_run_is_not_trained_again(tmp_path: Path, gloo: None) -> None:
    cfg = cfg_of(tmp_path, "--phases.epochs=[1,0,0]")
    Trainer(cfg, StandIn(), phases_of(1, 0, 0), sets_of(), collate, Loss()).fit()
    # final/ is written: the last checkpoint keeps only the record that the run is done.
    assert _last_checkpoint(cfg) == {"train_state.json", "train_config.yaml"}
    loss = Loss()
    again = Trainer(cfg, StandIn(), phases_of(1, 0, 0), sets_of(), collate, loss)
    again.fit()
    assert loss.seen == [] and again.state.done

    # Without final/ and without weights there is nothing to export: a clear error, not a new run.
    shutil.rmtree(Path(cfg.output_dir) / "final")
    lost = Trainer(cfg, StandIn(), phases_of(1, 0, 0), sets_of(), collate, Loss())
    with pytest.raises(UserError, match=r"final/ is gone and whose last checkpoint kept no weights"):
        lost.fit()


def test_keep_final_keeps_the_last_checkpoint_whole(tmp_path: Path, gloo: None) -> None:
    cfg = cfg_of(tmp_path, "--phases.epochs=[1,0,0]", "--checkpoint.keep_final=true")
    reference = weights_at(Trainer(cfg, StandIn(), phases_of(1, 0, 0), sets_of(), collate, Loss()).fit())
    kept = _last_checkpoint(cfg)
    assert {"train_state.json", "train_config.yaml", "rng-rank0.pt"} < kept and len(kept) > 3
    # Killed between the checkpoint and the export: the run exports final/ from the checkpoint.
    shutil.rmtree(Path(cfg.output_dir) / "final")
    loss = Loss()
    again = Trainer(cfg, StandIn(), phases_of(1, 0, 0), sets_of(), collate, loss)
    got = weights_at(again.fit())
    assert loss.seen == []
    for k in reference:
        assert torch.equal(got[k], reference[k]), k
    # keep_final does not change what is computed: the same run, resumed without it, is pruned.
    plain = cfg_of(tmp_path, "--phases.epochs=[1,0,0]")
    Trainer(plain, StandIn(), phases_of(1, 0, 0), sets_of(), collate, Loss()).fit()
    assert _last_checkpoint(plain) == {"train_state.json", "train_config.yaml"}


def test_a_resumed_run_keeps_the_best_score_of_each_further_rule(
    tmp_path: Path, gloo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Evaluations at the ends of epochs (steps 6, 12, 18); NER is best at step 6. Killed at step
    # 14, the run resumes from step 12: forgetting that 80.0 would export step 18's 70.0.
    cfg = cfg_of(tmp_path, "--eval.also_best=[ner_f1]")
    evaluator = ScriptedEvaluator([0.1], [5.0, 9.0, 6.0], ner=[80.0, 50.0, 70.0])
    real_step = Trainer.train_step

    def step_then_crash(self: Trainer, micro_batches):
        if self.state.global_step == 14:
            raise Killed()
        return real_step(self, micro_batches)

    monkeypatch.setattr(Trainer, "train_step", step_then_crash)
    with pytest.raises(Killed):
        Trainer(cfg, StandIn(), phases_of(), sets_of(), collate, Loss(), evaluator).fit()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    evaluator.calls = 2  # the resumed run's next evaluation is the third
    resumed = Trainer(cfg, StandIn(), phases_of(), sets_of(), collate, Loss(), evaluator)
    resumed.fit()
    run = Path(cfg.output_dir)
    assert "resuming from" in (run / "train.log").read_text()
    assert json.loads((run / "best_ner_f1" / "scores.json").read_text())["step"] == 6
    assert resumed.state.also_best == {"ner_f1": 80.0}
