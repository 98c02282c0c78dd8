"""The training loop on a tiny stand-in model (same call contract as AnchorAlignModel), in this
process on gloo: phases and switches, the ramp, the learning rates, and equality with a plain
PyTorch loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_fixtures import (
    Loss,
    ScriptedEvaluator,
    StandIn,
    cfg_of,
    collate,
    phases_of,
    rows_of,
    sets_of,
    weights_at,
)

from anchoralign.config import PretrainConfig
from anchoralign.errors import UserError
from anchoralign.losses import LOSS_KEYS, term_weights
from anchoralign.schedule import (
    Phase,
    epoch_order,
    epoch_plan,
    lr_at,
    rank_micro_batches,
    steps_per_epoch,
    warmup_steps_for,
)
from anchoralign.trainer import Trainer, parameter_groups

CE = {"ce_ner": 1.0, "ce_fwd": 1.0, "ce_rev": 1.0}
ALIGNED = {**CE, "kl_ner_re": 0.5, "kl_fwd_rev": 0.25, "suppress": 2.0}


def test_fit_runs_every_phase_logs_and_exports(tmp_path: Path, gloo: None) -> None:
    cfg = cfg_of(tmp_path)
    loss = Loss()
    trainer = Trainer(
        cfg, StandIn(), phases_of(), sets_of(), collate, loss, ScriptedEvaluator([0.1], [5.0, 9.0, 7.0])
    )
    final = trainer.fit()
    run = Path(cfg.output_dir)

    # 24 samples / global batch 4 = 6 steps an epoch, 3 epochs.
    assert trainer.state.global_step == 18 and trainer.state.done
    assert loss.seen[:12] == [CE] * 12
    assert loss.seen[12:] == [ALIGNED] * 6

    train = rows_of(run, "train")
    assert [r["step"] for r in train] == list(range(2, 19, 2))
    for r in train:
        assert set(LOSS_KEYS) <= set(r) and r["samples_per_s"] > 0
    assert train[0]["lr"] == pytest.approx(lr_at(1, 18, 4, 0.05))
    assert all(r["kl_ner_re"] == 0 for r in train if r["step"] <= 12)
    assert all(r["kl_ner_re"] > 0 for r in train if r["step"] > 12)
    switches = rows_of(run, "switch")
    assert [(s["from"], s["to"], s["step"]) for s in switches] == [
        ("etu", "poa-ce", 6),
        ("poa-ce", "poa-align", 12),
    ]
    assert "after the 1 configured epoch(s) of poa-ce" in switches[1]["reason"]
    assert [r["step"] for r in rows_of(run, "eval")] == [6, 12, 18]
    assert [r["split"] for r in rows_of(run, "eval_loss")] == ["dev"] * 3

    log = (run / "train.log").read_text()
    for text in (
        "phase 1 etu",
        "phase 2 poa-ce",
        "phase 3 poa-align",
        "phase poa-ce -> poa-align at step 12",
    ):
        assert text in log
    # Best by the primary score (9.0 at the second evaluation, step 12), final after the last step.
    assert json.loads((run / "best" / "scores.json").read_text())["step"] == 12
    assert final == run / "final" and (final / "weights.pt").is_file()
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-00000018-done"]


def test_the_teacher_is_a_pass_without_dropout_unless_asked_otherwise(tmp_path: Path, gloo: None) -> None:
    loss = Loss()
    Trainer(cfg_of(tmp_path), StandIn(dropout=0.5), phases_of(0, 1, 1), sets_of(), collate, loss).fit()
    assert all(t is None for t in loss.teachers[:6])  # cross-entropy steps need no teacher
    assert all(t is not None and not t.requires_grad for t in loss.teachers[6:])
    loss = Loss()
    cfg = cfg_of(tmp_path / "b", "--loss.teacher_dropout=true")
    Trainer(cfg, StandIn(dropout=0.5), phases_of(0, 1, 1), sets_of(), collate, loss).fit()
    assert all(t is None for t in loss.teachers)


def test_alignment_terms_ramp_in_after_the_switch(tmp_path: Path, gloo: None) -> None:
    loss = Loss()
    cfg = cfg_of(tmp_path, "--loss.ramp_steps=4", "--trainer.log_every=1")
    Trainer(cfg, StandIn(), phases_of(0, 1, 1), sets_of(), collate, loss).fit()
    got = [w.get("kl_ner_re", 0.0) for w in loss.seen]
    assert got == pytest.approx([0.0] * 6 + [0.5 * 0.25, 0.5 * 0.5, 0.5 * 0.75, 0.5, 0.5, 0.5])
    assert all(w["ce_ner"] == 1.0 for w in loss.seen)


def test_alignment_from_the_first_step_ramps_from_step_0(tmp_path: Path, gloo: None) -> None:
    loss = Loss()
    Trainer(
        cfg_of(tmp_path, "--loss.ramp_steps=2"), StandIn(), phases_of(0, 0, 1), sets_of(), collate, loss
    ).fit()
    assert [w["kl_fwd_rev"] for w in loss.seen] == pytest.approx([0.125, 0.25, 0.25, 0.25, 0.25, 0.25])


def test_gradient_norms_of_each_term_are_logged(tmp_path: Path, gloo: None) -> None:
    cfg = cfg_of(tmp_path, "--trainer.grad_norm_every=2", "--trainer.log_every=6")
    Trainer(cfg, StandIn(), phases_of(0, 1, 1), sets_of(), collate, Loss()).fit()
    first, second = rows_of(Path(cfg.output_dir), "train")
    assert {k for k in first if k.startswith("gradnorm_")} == {
        "gradnorm_ce_ner",
        "gradnorm_ce_fwd",
        "gradnorm_ce_rev",
    }
    assert {k for k in second if k.startswith("gradnorm_")} == {f"gradnorm_{k}" for k in ALIGNED}
    assert all(second[f"gradnorm_{k}"] > 0 for k in ALIGNED)


def test_valid_rate_switch_ends_the_gate_phase_early(tmp_path: Path, gloo: None) -> None:
    cfg = cfg_of(
        tmp_path, "--phases.switch=valid_rate", "--phases.valid_rate_threshold=0.9", "--eval.every=3"
    )
    loss = Loss()
    # Evaluations at steps 3, 6, 9, 12 (then 15, ...): the fourth passes the threshold.
    evaluator = ScriptedEvaluator([0.1, 0.2, 0.5, 0.95])
    trainer = Trainer(cfg, StandIn(), phases_of(1, 3, 1), sets_of(), collate, loss, evaluator)
    trainer.fit()
    run = Path(cfg.output_dir)
    switches = rows_of(run, "switch")
    assert [(s["to"], s["step"]) for s in switches] == [("poa-ce", 6), ("poa-align", 12)]
    assert "free-running outputs 95.0% reached the threshold 90.0%" in switches[1]["reason"]
    # Steps 13.. are aligned although epochs 2 and 3 were planned as poa-ce: the total is unchanged.
    assert len(loss.seen) == 30
    assert "kl_ner_re" not in loss.seen[11] and all("kl_ner_re" in w for w in loss.seen[12:])
    assert trainer.state.switched_at == 12
    # The free-running rate is asked for until the gate phase ends, not after.
    assert evaluator.validity[:4] == [True] * 4 and not any(evaluator.validity[4:])


def test_best_metric_joined_by_plus_selects_on_the_mean(tmp_path: Path, gloo: None) -> None:
    cfg = cfg_of(tmp_path, "--eval.best_metric=ner_f1+rel_strict_f1")
    # Relations alone would pick step 12 (9.0); the mean of both is 42.5, 29.5, 48.0: step 18.
    evaluator = ScriptedEvaluator([0.1], [5.0, 9.0, 6.0], ner=[80.0, 50.0, 90.0])
    Trainer(cfg, StandIn(), phases_of(), sets_of(), collate, Loss(), evaluator).fit()
    run = Path(cfg.output_dir)
    assert json.loads((run / "best" / "scores.json").read_text())["step"] == 18
    assert "new best mean(ner_f1, rel_strict_f1) 48.00 at step 18" in (run / "train.log").read_text()


def test_plateau_switch_ends_the_gate_phase_when_dev_stops_improving(tmp_path: Path, gloo: None) -> None:
    cfg = cfg_of(tmp_path, "--phases.switch=plateau", "--phases.patience=2", "--eval.every=3")
    # Dev scores at steps 3, 6, 9, 12, 15: best at 9, no better at 12 and 15 -> switch at 15.
    evaluator = ScriptedEvaluator([0.0], [1.0, 2.0, 3.0, 3.0, 2.5, 4.0])
    trainer = Trainer(cfg, StandIn(), phases_of(1, 3, 1), sets_of(), collate, Loss(), evaluator)
    trainer.fit()
    switches = rows_of(Path(cfg.output_dir), "switch")
    assert [(s["to"], s["step"]) for s in switches] == [("poa-ce", 6), ("poa-align", 15)]
    assert "no improvement in 2 evaluations (patience 2)" in switches[1]["reason"]
    assert not any(evaluator.validity)


def test_a_gate_that_never_fires_switches_after_the_epochs(tmp_path: Path, gloo: None) -> None:
    cfg = cfg_of(tmp_path, "--phases.switch=valid_rate", "--phases.valid_rate_threshold=0.9")
    Trainer(cfg, StandIn(), phases_of(0, 2, 1), sets_of(), collate, Loss(), ScriptedEvaluator([0.3])).fit()
    (switch,) = rows_of(Path(cfg.output_dir), "switch")
    assert switch["step"] == 12
    assert "the valid_rate condition did not fire in the 2 configured epochs of poa-ce" in switch["reason"]


def test_new_parameters_get_their_learning_rate_multiplier() -> None:
    class WithBackbone(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torch.nn.Module()
            self.backbone.old = torch.nn.Linear(2, 2)
            self.backbone.cross = torch.nn.Linear(2, 2)

        def new_parameter_names(self) -> list[str]:
            return ["backbone.cross.weight", "backbone.cross.bias"]

    cfg = PretrainConfig.model_validate(
        {
            "dataset": "d",
            "output_dir": "o",
            "phases": {"epochs": [1, 1, 1]},
            "optim": {"lr": 1e-4, "new_lr_mult": 10},
        }
    )
    groups = parameter_groups(WithBackbone(), cfg)
    got = sorted((g["weight_decay"], g["lr_mult"], len(g["params"])) for g in groups)
    assert got == [(0.0, 1.0, 1), (0.0, 10.0, 1), (0.01, 1.0, 1), (0.01, 10.0, 1)]


def _plain_torch_run(cfg: PretrainConfig, phases: list[Phase], sets: dict) -> dict:
    """The same training written as a plain PyTorch loop: the reference for the trainer."""
    model = StandIn()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    o = cfg.optim
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    )
    plan = epoch_plan(phases)
    g = o.micro_batch_size * o.grad_accum
    total = sum(steps_per_epoch(len(sets[phases[p].data]), g) for p in plan)
    warm = warmup_steps_for(total, o.warmup_ratio)
    loss_fn = Loss()
    update = 0
    for epoch, p in enumerate(plan):
        data = sets[phases[p].data]
        order = epoch_order(cfg.seed, epoch, len(data))
        for step in range(steps_per_epoch(len(data), g)):
            for group in opt.param_groups:
                group["lr"] = lr_at(update, total, warm, o.phase_lr(p), o.schedule)
            for mb in rank_micro_batches(order, step, o.micro_batch_size, o.grad_accum, 1, 0):
                batch = collate([data[i] for i in mb])
                terms = loss_fn(model(batch), batch, term_weights(cfg.loss, phases[p].align))
                (terms["loss"] / o.grad_accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip)
            opt.step()
            opt.zero_grad()
            update += 1
    return model.state_dict()


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_trainer_matches_a_plain_pytorch_loop(tmp_path: Path, gloo: None, zero_stage: int) -> None:
    """Accumulation, clipping, the per-phase learning rates with their schedule and the
    weight-decay groups do exactly what the plain loop does."""
    # A DeepSpeed JSON of one's own keeps ZeRO on a single rank (see effective_zero_stage).
    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage": "auto"}}')
    cfg = cfg_of(
        tmp_path,
        f"--trainer.zero_stage={zero_stage}",
        f"--trainer.deepspeed_config={ds_json}",
        "--optim.micro_batch_size=2",
        "--optim.grad_accum=2",
        "--optim.clip=0.3",
        "--optim.lr=[0.05,0.02,0.01]",
        "--loss.teacher_dropout=true",  # the stand-in loop has no separate teacher pass
    )
    phases = phases_of(1, 1, 1)
    trainer = Trainer(cfg, StandIn(), phases, sets_of(), collate, Loss(), evaluator=None)
    assert trainer.engine.zero_optimization_stage() == zero_stage
    got = weights_at(trainer.fit())
    want = _plain_torch_run(cfg, phases, sets_of())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(StandIn().state_dict()["out.weight"], want["out.weight"])


def test_max_steps_stops_the_stage(tmp_path: Path, gloo: None) -> None:
    cfg = cfg_of(tmp_path, "--trainer.max_steps=5")
    trainer = Trainer(cfg, StandIn(), phases_of(), sets_of(), collate, Loss())
    trainer.fit()
    assert trainer.state.global_step == 5 and trainer.total_steps == 5
    assert "stopping at max_steps=5" in (Path(cfg.output_dir) / "train.log").read_text()


def test_stop_after_epoch_stops_early_on_the_whole_stages_schedule(tmp_path: Path, gloo: None) -> None:
    """Where max_steps shortens the schedule, stop_after_epoch keeps it: the steps taken have the
    learning rates of the full run's same steps, and the run ends as a finished one."""
    full = Trainer(cfg_of(tmp_path / "full"), StandIn(), phases_of(), sets_of(), collate, Loss())
    full.fit()
    cfg = cfg_of(tmp_path / "stop", "--trainer.stop_after_epoch=2")
    trainer = Trainer(
        cfg, StandIn(), phases_of(), sets_of(), collate, Loss(), ScriptedEvaluator([0.1], [5.0])
    )
    final = trainer.fit()
    run = Path(cfg.output_dir)
    # 6 steps an epoch: two epochs of a schedule planned for 18 steps.
    assert trainer.state.global_step == 12 and trainer.total_steps == 18 and trainer.run_steps == 12
    assert trainer.state.done and final.is_dir()
    stopped, whole = rows_of(run, "train"), rows_of(Path(full.cfg.output_dir), "train")
    assert [r["lr"] for r in stopped] == [r["lr"] for r in whole[: len(stopped)]]
    assert stopped[-1]["lr"] == pytest.approx(lr_at(11, 18, 4, 0.05))
    # Each epoch evaluated once: the stop adds no evaluation of its own.
    assert [r["step"] for r in rows_of(run, "eval")] == [6, 12]
    log = (run / "train.log").read_text()
    assert "stopped after epoch 2 (step 12)" in log
    assert (
        "stopping at stop_after_epoch=2 (epoch 2 of 3, step 12 of the 18 the schedule is planned for)" in log
    )
    # Started again, it trains nothing more.
    again = Trainer(cfg, StandIn(), phases_of(), sets_of(), collate, Loss())
    again.fit()
    assert again.state.global_step == 12


def test_stop_after_epoch_beyond_the_stage_is_refused(tmp_path: Path, gloo: None) -> None:
    cfg = cfg_of(tmp_path, "--trainer.stop_after_epoch=4")
    with pytest.raises(UserError, match="stop_after_epoch=4: the stage has only 3 epochs"):
        Trainer(cfg, StandIn(), phases_of(), sets_of(), collate, Loss())


def test_empty_training_set_is_refused(tmp_path: Path, gloo: None) -> None:
    with pytest.raises(UserError, match="phase etu: its training set 'masked' is empty"):
        Trainer(cfg_of(tmp_path), StandIn(), phases_of(), {"plain": sets_of()["plain"]}, collate, Loss())


def test_also_best_exports_one_model_per_further_selection_rule(tmp_path: Path, gloo: None) -> None:
    rule = "ner_f1+rel_strict_f1"
    cfg = cfg_of(tmp_path, f"--eval.also_best=[{rule},ner_f1]")
    # Relations pick step 12 (9.0), their mean with NER step 18 (48.0), NER alone step 18 (90.0).
    evaluator = ScriptedEvaluator([0.1], [5.0, 9.0, 6.0], ner=[80.0, 50.0, 90.0])
    trainer = Trainer(cfg, StandIn(), phases_of(), sets_of(), collate, Loss(), evaluator)
    trainer.fit()
    run = Path(cfg.output_dir)
    step = {
        d: json.loads((run / d / "scores.json").read_text())["step"]
        for d in ("best", f"best_{rule}", "best_ner_f1")
    }
    assert step == {"best": 12, f"best_{rule}": 18, "best_ner_f1": 18}
    assert trainer.state.also_best == {rule: 48.0, "ner_f1": 90.0}
    log = (run / "train.log").read_text()
    assert f"new best mean(ner_f1, rel_strict_f1) 48.00 at step 18: exported to {run / f'best_{rule}'}" in log
