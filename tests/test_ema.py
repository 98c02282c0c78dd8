"""The moving average of the weights: its arithmetic by hand, and in the training loop: what is
evaluated and exported, what keeps training, and a resume that restores the average."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from trainer_fixtures import Loss, ScriptedEvaluator, StandIn, cfg_of, collate, phases_of, sets_of, weights_at

from anchoralign.ema import EMA_FILE, WeightAverage, ema_rate
from anchoralign.errors import UserError
from anchoralign.trainer import Trainer


def test_the_rate_counts_the_first_updates_fully_then_holds_the_decay():
    assert ema_rate(0.99, 1) == pytest.approx(2 / 11)
    assert ema_rate(0.99, 8) == pytest.approx(9 / 18)
    assert ema_rate(0.99, 989) == pytest.approx(0.99)  # (1 + t) / (10 + t) reaches 0.99 here
    assert ema_rate(0.99, 5000) == 0.99


def linear(value: float) -> nn.Linear:
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(value)
    return layer


def test_updates_applied_weights_and_a_saved_average(tmp_path: Path):
    layer = linear(0.0)
    avg = WeightAverage(layer, decay=0.5)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    avg.update(layer)  # keeps min(0.5, 2/11) = 2/11 of 0
    assert avg.shadow["weight"].item() == pytest.approx(9 / 11)
    with torch.no_grad():
        layer.weight.fill_(2.0)
    avg.update(layer)  # keeps min(0.5, 3/12) = 1/4
    expected = 9 / 11 / 4 + 2.0 * 3 / 4
    assert avg.shadow["weight"].item() == pytest.approx(expected)

    with avg.applied(layer):
        assert layer.weight.item() == pytest.approx(expected)
    assert layer.weight.item() == 2.0  # the raw weights are back

    avg.save(tmp_path / EMA_FILE)
    other = WeightAverage(linear(7.0), decay=0.5)
    other.load(tmp_path / EMA_FILE)
    assert other.updates == 2 and other.shadow["weight"].item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="another model"):
        WeightAverage(nn.Linear(1, 1), decay=0.5).load(tmp_path / EMA_FILE)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(layer, decay=1.0)


class RecordingEvaluator(ScriptedEvaluator):
    """A scripted evaluator that also keeps the weights it was shown."""

    def __init__(self, f1):
        super().__init__([1.0], f1)
        self.weights: list[dict[str, torch.Tensor]] = []

    def __call__(self, model, device, validity):
        self.weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return super().__call__(model, device, validity)


def test_the_loop_evaluates_and_exports_the_average_and_trains_the_raw_weights(tmp_path: Path, gloo: None):
    evaluator = RecordingEvaluator([5.0, 9.0, 7.0])
    trainer = Trainer(
        cfg_of(tmp_path, "--optim.ema_decay=0.8"),
        StandIn(),
        phases_of(),
        sets_of(),
        collate,
        Loss(),
        evaluator,
    )
    final = weights_at(trainer.fit())
    raw = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    averaged = trainer.ema.shadow
    assert trainer.ema.updates == 18
    for k, v in final.items():
        assert torch.allclose(v, averaged[k]) and not torch.allclose(v, raw[k]), k
        assert torch.equal(evaluator.weights[-1][k], v)  # the last evaluation saw the exported weights
    run = tmp_path / "run"
    best = weights_at(run / "best")  # the second evaluation's (9.0)
    assert all(torch.equal(best[k], evaluator.weights[1][k]) for k in best)
    assert not all(torch.equal(best[k], final[k]) for k in best)
    assert "moving average of the weights, decay 0.8" in (run / "train.log").read_text()

    # Without the average, training reaches the same raw weights: the average only watches.
    plain = Trainer(cfg_of(tmp_path / "b"), StandIn(), phases_of(), sets_of(), collate, Loss())
    plain.fit()
    for k, v in plain.engine.module.state_dict().items():
        assert torch.allclose(v, raw[k]), k


def test_a_resumed_run_restores_the_average(tmp_path: Path, gloo: None, monkeypatch: pytest.MonkeyPatch):
    # keep_final: the finished run's checkpoint keeps its average, for the last check below.
    args = ("--optim.ema_decay=0.8", "--checkpoint.save_every=4", "--checkpoint.keep_final=true")

    def trainer(out: Path) -> Trainer:
        return Trainer(cfg_of(out, *args), StandIn(), phases_of(), sets_of(), collate, Loss())

    reference = weights_at(trainer(tmp_path / "a").fit())
    crashing = trainer(tmp_path / "b")
    real_step = Trainer.train_step

    def step_then_crash(self: Trainer, micro_batches):
        if self.state.global_step == 10:  # the last checkpoint is at step 8
            raise KeyboardInterrupt
        return real_step(self, micro_batches)

    monkeypatch.setattr(Trainer, "train_step", step_then_crash)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = trainer(tmp_path / "b")
    got = weights_at(resumed.fit())
    assert resumed.ema.updates == 18
    for k in reference:
        assert torch.allclose(got[k], reference[k]), k

    # A checkpoint without its average cannot be resumed with one.
    (tmp_path / "b" / "run" / "checkpoints" / "step-00000018-done" / EMA_FILE).unlink()
    with pytest.raises(UserError, match=EMA_FILE):
        trainer(tmp_path / "b").fit()


def test_zero_3_is_refused(tmp_path: Path, gloo: None):
    # A DeepSpeed JSON keeps ZeRO-3 even on one rank.
    (tmp_path / "ds.json").write_text("{}")
    cfg = cfg_of(
        tmp_path,
        "--optim.ema_decay=0.9",
        "--trainer.zero_stage=3",
        f"--trainer.deepspeed_config={tmp_path / 'ds.json'}",
    )
    with pytest.raises(UserError, match="zero_stage 0, 1 or 2"):
        Trainer(cfg, StandIn(), phases_of(), sets_of(), collate, Loss())
