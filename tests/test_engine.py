"""The training engine: pure pieces against hand-computed values, then the loop itself on a tiny
stand-in model (same call contract as AnchorAlignModel), in this process on gloo."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anchoralign import distributed
from anchoralign.config import PretrainConfig, load_config
from anchoralign.engine import Trainer
from anchoralign.errors import UserError
from anchoralign.evaluation import EvalResult, mean_loss_terms
from anchoralign.losses import LOSS_KEYS, LossWeights, weighted_total
from anchoralign.schedule import (
    Phase,
    epoch_order,
    epoch_plan,
    gate_phase,
    lr_at,
    rank_micro_batches,
    steps_per_epoch,
    warmup_steps_for,
    weights_for,
)
from anchoralign.schema import Sample

REPO = Path(__file__).resolve().parent.parent

# --- pure pieces ------------------------------------------------------------------------------


def test_lr_linear_schedule_by_hand() -> None:
    # 10 updates, 2 of warm-up, peak 1: 0.5, 1 (warm-up), then 1 - (k - 2) / 8.
    got = [lr_at(k, 10, 2, 1.0, "linear") for k in range(11)]
    want = [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]
    assert got == pytest.approx(want)


def test_lr_cosine_constant_and_floor_by_hand() -> None:
    assert lr_at(4, 10, 2, 2.0, "cosine") == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(6, 10, 2, 2.0, "cosine") == pytest.approx(1.0)
    assert lr_at(10, 10, 2, 2.0, "cosine") == pytest.approx(0.0)
    assert lr_at(6, 10, 2, 1.0, "linear", min_ratio=0.1) == pytest.approx(0.55)
    assert lr_at(10, 10, 2, 1.0, "linear", min_ratio=0.1) == pytest.approx(0.1)
    assert [lr_at(k, 10, 2, 3.0, "constant") for k in (0, 1, 5, 9)] == pytest.approx([1.5, 3.0, 3.0, 3.0])
    assert lr_at(0, 10, 0, 1.0, "linear") == pytest.approx(1.0)  # no warm-up: the first update at the peak
    with pytest.raises(ValueError):
        lr_at(5, 10, 2, 1.0, "step")
    assert warmup_steps_for(100, 0.06) == 6
    assert warmup_steps_for(10, 0.0) == 0


def test_epoch_plan_and_gate() -> None:
    phases = [Phase("a", "masked", 2, False), Phase("b", "plain", 0, False), Phase("c", "plain", 1, True)]
    assert epoch_plan(phases) == [0, 0, 2]
    assert gate_phase(phases) is None  # the CE phase before alignment has no epochs
    phases[1] = Phase("b", "plain", 3, False)
    assert epoch_plan(phases) == [0, 0, 1, 1, 1, 2]
    assert gate_phase(phases) == 1
    assert gate_phase([Phase("a", "x", 1, False), Phase("b", "y", 1, True)]) is None  # other data
    assert gate_phase([Phase("a", "x", 1, True), Phase("b", "x", 1, True)]) is None


def test_epoch_order_is_a_seeded_permutation() -> None:
    a = epoch_order(seed=3, epoch=1, n=50)
    assert sorted(a) == list(range(50))
    assert a == epoch_order(seed=3, epoch=1, n=50)
    assert a != epoch_order(seed=3, epoch=2, n=50)
    assert a != epoch_order(seed=4, epoch=1, n=50)


def test_rank_micro_batches_by_hand() -> None:
    order = list(range(10))
    # G = 2 x 2 x 2 = 8: step 0 takes 0..7, micro-batch j of rank r is slice j * 2 + r.
    assert rank_micro_batches(order, 0, micro=2, accum=2, world=2, rank=0) == [[0, 1], [4, 5]]
    assert rank_micro_batches(order, 0, micro=2, accum=2, world=2, rank=1) == [[2, 3], [6, 7]]
    # Step 1 runs out after 8, 9 and is topped up from the start of the epoch.
    assert rank_micro_batches(order, 1, micro=2, accum=2, world=2, rank=0) == [[8, 9], [2, 3]]
    assert steps_per_epoch(10, 8) == 2
    seen = {
        i for s in range(2) for r in range(2) for mb in rank_micro_batches(order, s, 2, 2, 2, r) for i in mb
    }
    assert seen == set(order)


def _cfg(tmp_path: Path, *overrides: str) -> PretrainConfig:
    base = [
        "--dataset=conll04",
        f"--output_dir={tmp_path / 'run'}",
        "--epochs=[1,1,1]",
        "--lr=0.05",
        "--micro_batch_size=4",
        "--zero_stage=2",
        "--warmup_ratio=0.2",
        "--log_every=2",
        "--alpha=0.5",
        "--beta=0.25",
        "--gamma=2",
        "--progress=false",
    ]
    return load_config(PretrainConfig, None, [*base, *overrides])


def test_weights_for_phases_and_ablations(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    assert weights_for(cfg, align=False) == LossWeights(
        0.5, 0.25, 2.0, ner_re=False, fwd_rev=False, suppress=False
    )
    assert weights_for(cfg, align=True) == LossWeights(0.5, 0.25, 2.0)
    no_fr = _cfg(tmp_path, "--use_fwd_rev=false")
    assert weights_for(no_fr, align=True) == LossWeights(0.5, 0.25, 2.0, fwd_rev=False)
    none = _cfg(tmp_path, "--use_alignment=false")
    assert weights_for(none, align=True) == LossWeights(
        0.5, 0.25, 2.0, ner_re=False, fwd_rev=False, suppress=False
    )


# --- a stand-in model with AnchorAlignModel's call contract -----------------------------------

DIM, CLASSES, N_SAMPLES = 6, 3, 24
FEATURES = torch.randn(64, DIM, generator=torch.Generator().manual_seed(0))


class StandIn(nn.Module):
    """model(batch) -> {ner,fwd,rev}_logits [B,1,V]; save_pretrained(dir, train_config)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.hidden = nn.Linear(DIM, 8)
        self.out = nn.Linear(8, CLASSES)
        self.norm = nn.LayerNorm(8)
        self.drop = nn.Dropout(dropout)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = self.drop(torch.tanh(self.norm(self.hidden(batch["x"]))))
        logits = self.out(h)[:, None, :]
        return {"ner_logits": logits, "fwd_logits": 0.5 * logits, "rev_logits": 2.0 * logits}

    def save_pretrained(self, directory: Path, train_config: object = None) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), Path(directory) / "weights.pt")


def samples(n: int = N_SAMPLES, prefix: str = "s") -> list[Sample]:
    return [Sample(id=f"{prefix}{i}", tokens=[f"w{i}"]) for i in range(n)]


def collate(batch: Sequence[Sample]) -> dict[str, torch.Tensor]:
    idx = [int(s.id.lstrip("sm")) for s in batch]
    return {"x": FEATURES[idx], "y": torch.tensor([i % CLASSES for i in idx])}


class Loss:
    """Stand-in for loss_terms: real CE, made-up alignment terms; records the weights it got."""

    def __init__(self) -> None:
        self.seen: list[LossWeights] = []

    def __call__(self, outputs, batch, weights: LossWeights) -> dict[str, torch.Tensor]:
        if torch.is_grad_enabled():
            self.seen.append(weights)
        y = batch["y"]
        terms = {k: torch.zeros(()) for k in LOSS_KEYS}
        for name in ("ner", "fwd", "rev"):
            terms[f"ce_{name}"] = F.cross_entropy(outputs[f"{name}_logits"][:, 0].float(), y)
        if weights.ner_re:
            terms["kl_ner_re"] = (outputs["ner_logits"] - outputs["fwd_logits"]).pow(2).mean()
        if weights.fwd_rev:
            terms["kl_fwd_rev"] = (outputs["fwd_logits"] - outputs["rev_logits"]).abs().mean()
        if weights.suppress:
            terms["suppress"] = outputs["rev_logits"].softmax(-1)[..., 0].mean()
        terms["loss"] = weighted_total(terms, weights)
        return terms


class ScriptedEvaluator:
    """Returns scripted scores call by call; records the step of each call via the trainer."""

    def __init__(self, valid_rates: Sequence[float], f1: Sequence[float] | None = None):
        self.valid_rates, self.f1 = list(valid_rates), list(f1 or [])
        self.calls = 0
        self.validity: list[bool] = []

    def __call__(self, model: nn.Module, device: torch.device, validity: bool) -> EvalResult:
        self.validity.append(validity)
        i = self.calls
        self.calls += 1
        rate = self.valid_rates[min(i, len(self.valid_rates) - 1)]
        f1 = self.f1[min(i, len(self.f1) - 1)] if self.f1 else 0.0
        scores = {"rel_strict_f1": f1, "ner_f1": 50.0, "primary": "rel_strict_f1", "valid_rate": rate}
        return EvalResult(scores=scores, losses={"dev": {k: 1.0 for k in LOSS_KEYS}})


@pytest.fixture()
def gloo(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-process group on loopback; the variables are removed again after the test."""
    env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "DS_ACCELERATOR": "cpu",
    }
    env["MASTER_PORT"] = str(distributed.free_port())
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def _phases(etu: int = 1, ce: int = 1, align: int = 1) -> list[Phase]:
    return [
        Phase("etu", "masked", etu, False),
        Phase("poa-ce", "plain", ce, False),
        Phase("poa-align", "plain", align, True),
    ]


def _sets() -> dict[str, list[Sample]]:
    return {"masked": samples(N_SAMPLES, "m"), "plain": samples(N_SAMPLES)}


def _rows(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "weights.pt")


def test_fit_runs_every_phase_logs_and_exports(tmp_path: Path, gloo: None) -> None:
    cfg = _cfg(tmp_path)
    loss = Loss()
    trainer = Trainer(
        cfg, StandIn(), _phases(), _sets(), collate, loss, ScriptedEvaluator([0.1], [5.0, 9.0, 7.0])
    )
    final = trainer.fit()
    run = Path(cfg.output_dir)

    # 24 samples / global batch 4 = 6 steps an epoch, 3 epochs.
    assert trainer.state.global_step == 18 and trainer.state.done
    ce_only = LossWeights(0.5, 0.25, 2.0, ner_re=False, fwd_rev=False, suppress=False)
    assert loss.seen[:12] == [ce_only] * 12
    assert loss.seen[12:] == [LossWeights(0.5, 0.25, 2.0)] * 6

    train = _rows(run, "train")
    assert [r["step"] for r in train] == list(range(2, 19, 2))
    for r in train:
        assert set(LOSS_KEYS) <= set(r) and r["samples_per_s"] > 0
    assert train[0]["lr"] == pytest.approx(lr_at(1, 18, 4, 0.05))
    assert all(r["kl_ner_re"] == 0 for r in train if r["step"] <= 12)
    assert all(r["kl_ner_re"] > 0 for r in train if r["step"] > 12)
    switches = _rows(run, "switch")
    assert [(s["from"], s["to"], s["step"]) for s in switches] == [
        ("etu", "poa-ce", 6),
        ("poa-ce", "poa-align", 12),
    ]
    assert "after the 1 configured epoch(s) of poa-ce" in switches[1]["reason"]
    assert [r["step"] for r in _rows(run, "eval")] == [6, 12, 18]
    assert [r["split"] for r in _rows(run, "eval_loss")] == ["dev"] * 3

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


def test_valid_rate_switch_ends_the_gate_phase_early(tmp_path: Path, gloo: None) -> None:
    cfg = _cfg(tmp_path, "--switch_on=valid_rate", "--valid_rate_threshold=0.9", "--eval_every=3")
    loss = Loss()
    # Evaluations at steps 3, 6, 9, 12 (then 15, ...): the fourth passes the threshold.
    evaluator = ScriptedEvaluator([0.1, 0.2, 0.5, 0.95])
    trainer = Trainer(cfg, StandIn(), _phases(1, 3, 1), _sets(), collate, loss, evaluator)
    trainer.fit()
    run = Path(cfg.output_dir)
    switches = _rows(run, "switch")
    assert [(s["to"], s["step"]) for s in switches] == [("poa-ce", 6), ("poa-align", 12)]
    assert "valid-output rate 95.0% reached the threshold 90.0%" in switches[1]["reason"]
    # Steps 13.. are aligned although epochs 2 and 3 were planned as poa-ce: the total is unchanged.
    assert len(loss.seen) == 30
    assert not loss.seen[11].ner_re and all(w.ner_re for w in loss.seen[12:])
    assert trainer.state.switched_at == 12
    # The valid-output rate is asked for until the gate phase ends, not after.
    assert evaluator.validity[:4] == [True] * 4 and not any(evaluator.validity[4:])
    assert "reached the threshold" in (run / "train.log").read_text()


def test_valid_rate_never_reached_switches_after_the_epochs(tmp_path: Path, gloo: None) -> None:
    cfg = _cfg(tmp_path, "--switch_on=valid_rate", "--valid_rate_threshold=0.9")
    trainer = Trainer(cfg, StandIn(), _phases(0, 2, 1), _sets(), collate, Loss(), ScriptedEvaluator([0.3]))
    trainer.fit()
    (switch,) = _rows(Path(cfg.output_dir), "switch")
    assert switch["step"] == 12
    assert "stayed below 90.0% for all 2 configured epochs of poa-ce" in switch["reason"]
    assert "last 30.0%" in switch["reason"]


def _plain_torch_run(cfg: PretrainConfig, phases: list[Phase], sets: dict[str, list[Sample]]) -> dict:
    """The same training written as a plain PyTorch loop: the reference for the engine."""
    model = StandIn()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    plan = epoch_plan(phases)
    g = cfg.micro_batch_size * cfg.grad_accum
    total = sum(steps_per_epoch(len(sets[phases[p].data]), g) for p in plan)
    warm = warmup_steps_for(total, cfg.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_at(k, total, warm, 1.0, cfg.schedule))
    loss_fn = Loss()
    for epoch, p in enumerate(plan):
        data = sets[phases[p].data]
        order = epoch_order(cfg.seed, epoch, len(data))
        for step in range(steps_per_epoch(len(data), g)):
            for mb in rank_micro_batches(order, step, cfg.micro_batch_size, cfg.grad_accum, 1, 0):
                batch = collate([data[i] for i in mb])
                terms = loss_fn(model(batch), batch, weights_for(cfg, phases[p].align))
                (terms["loss"] / cfg.grad_accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            sched.step()
            opt.zero_grad()
    return model.state_dict()


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_engine_matches_a_plain_pytorch_loop(tmp_path: Path, gloo: None, zero_stage: int) -> None:
    """Accumulation, clipping, the schedule and weight-decay groups do exactly what the loop does."""
    # A DeepSpeed JSON of one's own keeps ZeRO on a single rank (see effective_zero_stage).
    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage": "auto"}}')
    overrides = [f"--zero_stage={zero_stage}", f"--deepspeed_config={ds_json}", "--micro_batch_size=2"]
    cfg = _cfg(tmp_path, *overrides, "--grad_accum=2", "--clip=0.3")
    phases = _phases(1, 1, 1)
    trainer = Trainer(cfg, StandIn(), phases, _sets(), collate, Loss(), evaluator=None)
    assert trainer.engine.zero_optimization_stage() == zero_stage
    got = _weights(trainer.fit())
    want = _plain_torch_run(cfg, phases, _sets())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(StandIn().state_dict()["out.weight"], want["out.weight"])


class Killed(Exception):
    pass


def test_resume_after_a_crash_reaches_the_same_weights(
    tmp_path: Path, gloo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Checkpoints at steps 4, 6 (epoch end), 8, 12 (epoch end), ...; evaluations at 5, 6, 10, 12,
    # 15, ...: the fifth (step 15) passes the threshold and ends poa-ce.
    args = ("--save_every=4", "--switch_on=valid_rate", "--eval_every=5")
    rates = [0.1, 0.1, 0.1, 0.1, 0.95]

    def trainer(cfg: PretrainConfig) -> Trainer:
        # Dropout: the resumed run must also restore the RNG to match.
        return Trainer(
            cfg, StandIn(dropout=0.3), _phases(1, 2, 1), _sets(), collate, Loss(), ScriptedEvaluator(rates)
        )

    reference = _weights(trainer(_cfg(tmp_path / "a", *args)).fit())

    cfg = _cfg(tmp_path / "b", *args)
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
    got = _weights(resumed.fit())
    assert "resuming from" in (Path(cfg.output_dir) / "train.log").read_text()
    assert resumed.state.switched_at == 15
    for k in reference:
        assert torch.equal(got[k], reference[k]), k

    # metrics.jsonl lost what was logged after the checkpoint, so no step appears twice: the
    # same rows as the uninterrupted run's (throughput aside).
    def comparable(run: Path) -> list[dict]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in lines]

    assert comparable(Path(cfg.output_dir)) == comparable(tmp_path / "a" / "run")


def test_resume_refuses_a_different_config(tmp_path: Path, gloo: None) -> None:
    Trainer(_cfg(tmp_path), StandIn(), _phases(1, 0, 0), _sets(), collate, Loss()).fit()
    other = Trainer(
        _cfg(tmp_path, "--lr=0.01", "--epochs=[1,0,0]"), StandIn(), _phases(1, 0, 0), _sets(), collate, Loss()
    )
    with pytest.raises(UserError, match=r"holds a run with another config \(epochs: .*lr: 0.05 -> 0.01\)"):
        other.fit()


def test_resume_refuses_another_world_size(tmp_path: Path, gloo: None) -> None:
    cfg = _cfg(tmp_path, "--epochs=[1,0,0]")
    Trainer(cfg, StandIn(), _phases(1, 0, 0), _sets(), collate, Loss()).fit()
    ckpt = Path(cfg.output_dir) / "checkpoints"
    state_file = ckpt / (ckpt / "latest").read_text().strip() / "train_state.json"
    state = json.loads(state_file.read_text())
    assert state["world_size"] == 1
    state_file.write_text(json.dumps({**state, "world_size": 2}))
    again = Trainer(cfg, StandIn(), _phases(1, 0, 0), _sets(), collate, Loss())
    with pytest.raises(UserError, match=r"written by 2 rank\(s\); resume it with 2, not 1"):
        again.fit()


def test_finished_run_is_not_trained_again(tmp_path: Path, gloo: None) -> None:
    cfg = _cfg(tmp_path, "--epochs=[1,0,0]")
    Trainer(cfg, StandIn(), _phases(1, 0, 0), _sets(), collate, Loss()).fit()
    loss = Loss()
    again = Trainer(cfg, StandIn(), _phases(1, 0, 0), _sets(), collate, loss)
    again.fit()
    assert loss.seen == [] and again.state.done


def test_max_steps_stops_the_stage(tmp_path: Path, gloo: None) -> None:
    cfg = _cfg(tmp_path, "--max_steps=5")
    trainer = Trainer(cfg, StandIn(), _phases(), _sets(), collate, Loss())
    trainer.fit()
    assert trainer.state.global_step == 5 and trainer.total_steps == 5
    assert "stopping at max_steps=5" in (Path(cfg.output_dir) / "train.log").read_text()


def test_empty_training_set_is_refused(tmp_path: Path, gloo: None) -> None:
    with pytest.raises(UserError, match="phase etu: its training set 'masked' is empty"):
        Trainer(_cfg(tmp_path), StandIn(), _phases(), {"plain": samples()}, collate, Loss())


def test_mean_loss_terms_weights_batches_by_size() -> None:
    def loss_fn(outputs, batch, weights):
        # The batch's mean of x[:, 0] as every term, so the expected value is the overall mean.
        v = batch["x"][:, 0].mean()
        return {k: v for k in LOSS_KEYS}

    data = samples(10)
    got = mean_loss_terms(StandIn(), data, collate, loss_fn, LossWeights(1, 1, 1), batch_size=4, device="cpu")
    assert got["loss"] == pytest.approx(float(FEATURES[:10, 0].mean()), abs=1e-6)
    assert set(got) == set(LOSS_KEYS)


# --- scripts/plot_metrics.py on the metrics a run writes --------------------------------------


def _plot_module():
    spec = importlib.util.spec_from_file_location("plot_metrics", REPO / "scripts" / "plot_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_series_by_hand() -> None:
    plot = _plot_module()
    rows = [
        {"kind": "train", "step": 1, "loss": 3.0},
        {"kind": "eval_loss", "step": 2, "split": "dev", "loss": 2.5},
        {"kind": "train", "step": 2, "loss": 2.0, "phase": "x"},
        {"kind": "eval_loss", "step": 2, "split": "test", "loss": 2.7},
        {"kind": "switch", "step": 2, "from": "a", "to": "b", "reason": "r"},
        {"kind": "train", "step": 3},
    ]
    assert plot.series(rows, "train", "loss") == ([1, 2], [3.0, 2.0])
    assert plot.series(rows, "eval_loss", "loss", "test") == ([2], [2.7])
    assert plot.splits_of(rows, "eval_loss") == ["dev", "test"]
    assert plot.phase_starts(rows) == [(2, "b")]


def test_plot_metrics_draws_a_run(tmp_path: Path, gloo: None) -> None:
    cfg = _cfg(tmp_path, "--log_every=1")
    Trainer(
        cfg, StandIn(), _phases(), _sets(), collate, Loss(), ScriptedEvaluator([0.5], [1.0, 2.0, 3.0])
    ).fit()
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plot_metrics.py"), cfg.output_dir],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    names = {"loss_terms.png", "alignment.png", "scores.png", "schedule.png"}
    assert {Path(line).name for line in done.stdout.split()} == names
    for name in names:
        assert (Path(cfg.output_dir) / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plot_metrics.py"), str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "metrics file not found" in missing.stderr


def test_bench_model_flops_by_hand() -> None:
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "scripts" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    counts = {"encoder": 10, "decoder_ner": 20, "decoder_fwd": 20, "decoder_rev": 20}
    # Encoder 2*10*3 + 4*1*3*3*4 = 204; decoders 3 * (2*20*2 + 4*1*2*2*4 + 4*1*2*3*4) = 720; x3.
    assert bench.model_flops_per_sample(counts, d_model=4, layers=1, src=3, tgt=2) == 3 * (204 + 720)
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bench.peak_tflops("Some GPU") is None
