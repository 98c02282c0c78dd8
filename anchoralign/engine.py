"""The training loop shared by both stages: ``train_step``, ``evaluate`` and ``fit`` around a
DeepSpeed engine, with checkpoints, resume, metrics and the phase plan of progressive activation.

A stage is a list of :class:`Phase` (name, training set, epochs, alignment on or off). Epochs run
in order; the phase in effect only moves forward. The cross-entropy-only phase that precedes an
alignment phase on the same data is the *gate*: with ``switch_on: valid_rate`` it ends as soon as
the share of dev outputs that parse into valid structures reaches the threshold, and its remaining
epochs run with alignment on; otherwise it ends after its configured epochs. Either way the total
number of steps, and so the learning-rate schedule, is fixed in advance.

Data order is a seeded permutation per epoch, so a resumed run replays it exactly; a checkpoint
holds the DeepSpeed state (model, optimizer, schedule), the :class:`TrainState` (phase, epoch, step,
switch, best score) and each rank's RNG state. Logging, metrics and exports happen on rank 0.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from anchoralign import distributed
from anchoralign.config import (
    CONFIG_FILE,
    TrainConfig,
    config_differences,
    deepspeed_config,
    load_config,
    save_config,
)
from anchoralign.errors import UserError
from anchoralign.evaluation import Collate, EvalResult, Evaluate, LossFn, to_device
from anchoralign.losses import LOSS_KEYS, LossWeights
from anchoralign.runlog import RunLog
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

CHECKPOINTS = "checkpoints"
STATE_FILE = "train_state.json"


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Where a stage is; saved with every checkpoint."""

    stage: str
    phase: int = 0  # phase in effect (only grows)
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps completed in the current epoch
    global_step: int = 0
    samples_seen: int = 0
    switched_at: int | None = None  # global step at which the gate phase ended
    switch_reason: str | None = None
    last_valid_rate: float | None = None
    best_score: float | None = None
    best_step: int | None = None
    last_eval_step: int | None = None
    metrics_rows: int = 0  # rows of metrics.jsonl written up to this state
    world_size: int = 1
    done: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainState:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Runs one stage: ``fit()`` trains every phase, evaluates, checkpoints and exports.

    ``model(batch)`` returns the logits dict of docs/CONTRACTS.md and ``model.save_pretrained(dir)``
    writes the checkpoint directory format; ``collate`` turns samples into a batch; ``loss_fn`` is
    :func:`anchoralign.losses.loss_terms` (or anything with its signature).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        phases: Sequence[Phase],
        train_sets: Mapping[str, Sequence[Sample]],
        collate: Collate,
        loss_fn: LossFn,
        evaluator: Evaluate | None = None,
        log: RunLog | None = None,
        reload: Callable[[Path], nn.Module] | None = None,
    ):
        for p in phases:
            if p.epochs and not train_sets.get(p.data):
                raise UserError(f"phase {p.name}: its training set '{p.data}' is empty")
        self.cfg, self.model, self.phases = cfg, model, list(phases)
        self.train_sets, self.collate, self.loss_fn, self.evaluator = train_sets, collate, loss_fn, evaluator
        self.reload = reload  # directory -> model, for evaluating under ZeRO-3
        self.plan = epoch_plan(self.phases)
        self.gate = gate_phase(self.phases) if cfg.switch_on == "valid_rate" else None
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / CHECKPOINTS
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = log or RunLog(self.out)
        distributed.setup()
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.state = TrainState(stage=cfg.stage, world_size=self.world)
        self.global_batch = cfg.micro_batch_size * cfg.grad_accum * self.world
        # Sentence lengths for length bucketing, by training set.
        self.lengths = {id(v): [len(s.tokens) for s in v] for v in train_sets.values()}
        self.epoch_steps = [
            steps_per_epoch(len(train_sets[self.phases[p].data]), self.global_batch) for p in self.plan
        ]
        planned = sum(self.epoch_steps)
        self.total_steps = min(planned, cfg.max_steps) if cfg.max_steps else planned
        self.warmup = warmup_steps_for(self.total_steps, cfg.warmup_ratio)
        self.engine = self._deepspeed_engine()

    # -- set-up ---------------------------------------------------------------------------------

    def _deepspeed_engine(self):
        import deepspeed

        cfg = self.cfg
        optimizer = torch.optim.AdamW(parameter_groups(self.model, cfg), lr=cfg.lr)

        def factor(step: int) -> float:
            return lr_at(step, self.total_steps, self.warmup, 1.0, cfg.schedule, cfg.min_lr_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        ds_config = deepspeed_config(cfg, self.world)
        engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        if self.world == 1 and engine.zero_optimization_stage() == 0:
            # Alone, the all-reduce of the gradients only copies every gradient into a flat
            # buffer and back (a tenth of a MiniLM step on CPU).
            engine.enable_backward_allreduce = False
        return engine

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def phase_weights(self) -> LossWeights:
        return weights_for(self.cfg, self.phases[self.state.phase].align)

    # -- one step -------------------------------------------------------------------------------

    def train_step(self, micro_batches: Sequence[Sequence[Sample]]) -> dict[str, torch.Tensor]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss terms."""
        self.engine.train()
        weights = self.phase_weights()
        sums = {k: torch.zeros((), device=self.device) for k in LOSS_KEYS}
        for samples in micro_batches:
            batch = to_device(self.collate(list(samples)), self.device)
            with autocast(self.cfg.precision, self.device):
                outputs = self.engine(batch)
            # The losses take float32 softmaxes of the (bf16) logits themselves.
            terms = self.loss_fn(outputs, batch, weights)
            # DeepSpeed scales the loss by 1/grad_accum and steps the optimizer (and the schedule)
            # only at the last micro-batch of the step.
            self.engine.backward(terms["loss"])
            self.engine.step()
            for k in LOSS_KEYS:
                sums[k] += terms[k].detach().float()
        return {k: v / len(micro_batches) for k, v in sums.items()}

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> EvalResult | None:
        """Score the eval split, log it, keep the best model and maybe end the gate phase."""
        st = self.state
        if self.evaluator is None or st.last_eval_step == st.global_step:
            return None
        self.engine.eval()
        try:
            # The valid-output rate matters only until the gate phase has ended.
            validity = self.gate is not None and st.phase <= self.gate
            with self._eval_model() as model:
                result = self.evaluator(model, self.device, validity)
        finally:
            self.engine.train()
        st.last_eval_step = st.global_step
        scores = result.scores
        primary = self.cfg.best_metric or str(scores.get("primary", "rel_strict_f1"))
        if primary not in scores:
            numeric = sorted(k for k, v in scores.items() if isinstance(v, float))
            raise UserError(f"best_metric '{primary}' is not a score; choose one of {', '.join(numeric)}")
        base = {"step": st.global_step, "epoch": st.epoch, "phase": self.phases[st.phase].name}
        self.log.metrics({"kind": "eval", **base, "split": self.cfg.eval_split, **scores})
        for split, terms in result.losses.items():
            self.log.metrics({"kind": "eval_loss", **base, "split": split, **terms})
        st.last_valid_rate = float(scores["valid_rate"])
        self.log.info(
            f"eval step {st.global_step}: {self.cfg.eval_split} {primary} {scores[primary]:.2f}, "
            f"ner_f1 {scores.get('ner_f1', float('nan')):.2f}, "
            f"valid outputs {100 * st.last_valid_rate:.1f}% ({scores.get('valid_rate_of', 'as decoded')})"
        )
        value = float(scores[primary])
        if st.best_score is None or value > st.best_score:
            st.best_score, st.best_step = value, st.global_step
            self.export(self.out / "best", extra={"step": st.global_step, "scores": scores})
            self.log.info(
                f"new best {primary} {value:.2f} at step {st.global_step}: exported to {self.out / 'best'}"
            )
        self._maybe_switch_on_valid_rate()
        return result

    def _maybe_switch_on_valid_rate(self) -> None:
        st = self.state
        if self.gate is None or st.phase != self.gate or st.last_valid_rate is None:
            return
        # Rank 0 decides, so that all ranks change phase at the same step even if their
        # evaluations were to differ in the last bit on some accelerator.
        passed = distributed.broadcast_object(st.last_valid_rate >= self.cfg.valid_rate_threshold)
        if passed:
            self._switch(
                self.gate + 1,
                f"dev valid-output rate {100 * st.last_valid_rate:.1f}% reached the threshold "
                f"{100 * self.cfg.valid_rate_threshold:.1f}%",
            )

    def _switch(self, to: int, reason: str) -> None:
        st = self.state
        old = self.phases[st.phase].name
        st.phase = to
        if st.switched_at is None and self.phases[to].align:
            st.switched_at, st.switch_reason = st.global_step, reason
        new = self.phases[to]
        self.log.info(
            f"phase {old} -> {new.name} at step {st.global_step} (epoch {st.epoch}): {reason}; "
            f"loss terms on: {', '.join(_active_terms(self.phase_weights()))}"
        )
        self.log.metrics(
            {
                "kind": "switch",
                "step": st.global_step,
                "epoch": st.epoch,
                "from": old,
                "to": new.name,
                "reason": reason,
            }
        )

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Save everything needed to continue, then drop older checkpoints (all ranks call this)."""
        st = self.state
        st.metrics_rows = self.log.rows
        # The final save gets its own tag: rewriting the directory `latest` points at is not safe.
        tag = f"step-{st.global_step:08d}" + ("-done" if st.done else "")
        path = self.ckpt_dir / tag
        # Each rank's RNG: dropout masks depend on its own batches, so the states differ by rank.
        path.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), path / f"rng-rank{self.rank}.pt")
        if distributed.is_main():
            save_config(self.cfg, path / CONFIG_FILE)
            (path / STATE_FILE).write_text(json.dumps(asdict(st), indent=2) + "\n", encoding="utf-8")
        # DeepSpeed writes the `latest` pointer last, so a run killed mid-save resumes from the
        # previous checkpoint.
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state={"train_state": asdict(st)})
        distributed.barrier()
        if distributed.is_main():
            for old in self.ckpt_dir.glob("step-*"):
                if old.name != tag and old.is_dir():
                    shutil.rmtree(old)
        distributed.barrier()

    def resume(self) -> bool:
        """Continue from ``checkpoints/latest`` when there is one (and ``resume`` is on)."""
        latest = self.ckpt_dir / "latest"
        if not (self.cfg.resume and latest.is_file()):
            return False
        tag = latest.read_text(encoding="utf-8").strip()
        path = self.ckpt_dir / tag
        self._check_same_config(path / CONFIG_FILE)
        saved_world = json.loads((path / STATE_FILE).read_text(encoding="utf-8")).get("world_size", 1)
        if saved_world != self.world:
            # ZeRO shards and per-rank RNG states belong to one world size.
            raise UserError(
                f"{path} was written by {saved_world} rank(s); resume it with {saved_world}, not {self.world}"
            )
        load_path, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if load_path is None or not client or "train_state" not in client:
            raise UserError(
                f"{path}: checkpoint is incomplete; delete {self.ckpt_dir} or pass --resume=false"
            )
        self.state = TrainState.from_dict(client["train_state"])
        rng_file = path / f"rng-rank{self.rank}.pt"
        if not rng_file.is_file():
            raise UserError(f"{rng_file}: missing; delete {self.ckpt_dir} or pass --resume=false")
        _set_rng_state(torch.load(rng_file, weights_only=True))
        st = self.state
        self.log.info(
            f"resuming from {path}: phase {self.phases[st.phase].name}, epoch {st.epoch}, "
            f"step {st.global_step} of {self.total_steps}"
        )
        return True

    def _check_same_config(self, saved: Path) -> None:
        if not saved.is_file():
            raise UserError(f"{saved}: missing; cannot tell whether this checkpoint belongs to this config")
        old = load_config(type(self.cfg), saved)
        diff = config_differences(old, self.cfg)
        if diff:
            raise UserError(
                f"{self.out} holds a run with another config ({'; '.join(diff)}); use another "
                "--output_dir, or --resume=false to start over"
            )

    @contextmanager
    def _eval_model(self) -> Iterator[nn.Module]:
        """The model to evaluate: the trained module itself, or under ZeRO-3 a plain copy.

        ZeRO-3 keeps a shard of each parameter per rank and gathers it only while its own module
        runs, releasing it afterwards even inside ``GatheredParameters``; decoding reads weights
        outside module calls (the shared embedding table) and so cannot run on the sharded
        module. Every rank loads the exported weights into an ordinary model instead.
        """
        if self.engine.zero_optimization_stage() != 3:
            yield self.engine.module
            return
        if self.reload is None:
            raise UserError("zero_stage=3: evaluation needs a model loader (Trainer(reload=...))")
        path = self.out / ".eval-model"
        self.export(path)
        model = self.reload(path).to(self.device)
        try:
            yield model
        finally:
            del model
            distributed.barrier()
            if distributed.is_main():
                shutil.rmtree(path, ignore_errors=True)

    def _whole_parameters(self) -> AbstractContextManager[Any]:
        """Under ZeRO-3, every parameter gathered whole on every rank (all ranks must enter)."""
        if self.engine.zero_optimization_stage() != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)

    def export(self, path: Path, extra: Mapping[str, Any] | None = None) -> None:
        """Write the model in the checkpoint directory format (loadable without DeepSpeed), atomically."""
        with self._whole_parameters():
            if distributed.is_main():
                tmp = path.with_name(path.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                with _own_storage(self.engine.module):
                    self.engine.module.save_pretrained(tmp, train_config=self.cfg)
                if extra is not None:
                    (tmp / "scores.json").write_text(json.dumps(extra, indent=2) + "\n", encoding="utf-8")
                shutil.rmtree(path, ignore_errors=True)
                tmp.rename(path)
        distributed.barrier()

    # -- the loop -------------------------------------------------------------------------------

    def fit(self) -> Path:
        """Train the stage to the end (or ``max_steps``); returns the exported ``final`` directory."""
        resumed = self.resume()
        st = self.state
        final = self.out / "final"
        if st.done:
            # Killed between the last checkpoint and the export: export now.
            if not distributed.broadcast_object(final.is_dir()):
                self.export(final)
            self.log.info(f"{self.cfg.stage}: this run already finished; the model is in {final}")
            return final
        self.log.keep_metrics(st.metrics_rows if resumed else 0)
        if not resumed:
            # Dropout differs by rank, as their batches do; a resumed run restores these states.
            random.seed(self.cfg.seed + self.rank)
            torch.manual_seed(self.cfg.seed + self.rank)
            st.phase = self.plan[0]  # phases without epochs are skipped
            self._describe_plan()
        self.log.info(f"{self.cfg.stage}: phase {self.phases[st.phase].name} (step {st.global_step})")
        with self._progress() as progress:
            bar = progress.add_task(
                self.phases[st.phase].name, total=self.total_steps, completed=st.global_step
            )
            window = _Window(self.device)
            while st.epoch < len(self.plan) and not self._at_max_steps():
                self._enter_epoch()
                self._train_epoch(
                    window, lambda: progress.update(bar, advance=1, description=self.phases[st.phase].name)
                )
        if window.steps:
            self._log_train(window)
        if self._at_max_steps() and st.epoch < len(self.plan):
            self.log.info(
                f"stopping at max_steps={self.cfg.max_steps} (epoch {st.epoch} of {len(self.plan)})"
            )
        self.evaluate()
        st.done = True
        self.save_checkpoint()
        self.export(final)
        best = (
            f"; best {self.cfg.eval_split} score {st.best_score:.2f} at step {st.best_step}"
            if st.best_step
            else ""
        )
        self.log.info(f"{self.cfg.stage} finished at step {st.global_step}: model in {final}{best}")
        return final

    def _train_epoch(self, window: _Window, tick: Callable[[], None]) -> None:
        """The rest of the current epoch (all of it unless resumed mid-epoch)."""
        st, cfg = self.state, self.cfg
        data = self.train_sets[self.phases[self.plan[st.epoch]].data]
        order = epoch_order(
            cfg.seed,
            st.epoch,
            len(data),
            self.lengths[id(data)],
            cfg.bucket_batches * self.global_batch,
            self.global_batch,
        )
        n_steps = self.epoch_steps[st.epoch]
        while st.step_in_epoch < n_steps and not self._at_max_steps():
            idx = rank_micro_batches(
                order, st.step_in_epoch, cfg.micro_batch_size, cfg.grad_accum, self.world, self.rank
            )
            window.add(self.train_step([[data[i] for i in mb] for mb in idx]), self.global_batch)
            st.step_in_epoch += 1
            st.global_step += 1
            st.samples_seen += self.global_batch
            tick()
            if st.global_step % cfg.log_every == 0:
                self._log_train(window)
            with window.paused():
                if st.step_in_epoch == n_steps:
                    st.epoch, st.step_in_epoch = st.epoch + 1, 0
                    self.evaluate()
                    self.save_checkpoint()
                    return
                if cfg.eval_every and st.global_step % cfg.eval_every == 0:
                    self.evaluate()
                if cfg.save_every and st.global_step % cfg.save_every == 0:
                    self.save_checkpoint()

    def _at_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.state.global_step >= self.cfg.max_steps

    def _enter_epoch(self) -> None:
        st = self.state
        planned = self.plan[st.epoch]
        if planned <= st.phase:
            return
        prev = self.phases[st.phase]
        if st.phase == self.gate:
            rate = "n/a" if st.last_valid_rate is None else f"{100 * st.last_valid_rate:.1f}%"
            reason = (
                f"the dev valid-output rate (last {rate}) stayed below "
                f"{100 * self.cfg.valid_rate_threshold:.1f}% for all {prev.epochs} configured epochs of {prev.name}"
            )
        else:
            reason = f"after the {prev.epochs} configured epoch(s) of {prev.name}"
        self._switch(planned, reason)

    def _describe_plan(self) -> None:
        cfg = self.cfg
        self.log.info(
            f"{cfg.stage}: {self.world} rank(s), global batch {self.global_batch} "
            f"(micro {cfg.micro_batch_size} x accumulation {cfg.grad_accum} x {self.world}), {self._zero_text()}, "
            f"{cfg.precision}, {self.total_steps} steps, warm-up {self.warmup}, {cfg.schedule} decay, lr {cfg.lr:g}"
        )
        for i, p in enumerate(self.phases):
            n = len(self.train_sets[p.data]) if p.data in self.train_sets else 0
            terms = ", ".join(_active_terms(weights_for(cfg, p.align)))
            steps = steps_per_epoch(n, self.global_batch) if n else 0
            gate = (
                f"; ends early once dev valid outputs reach {100 * cfg.valid_rate_threshold:.0f}%"
                if i == self.gate
                else ""
            )
            self.log.info(
                f"  phase {i + 1} {p.name}: {p.epochs} epoch(s) on {p.data} ({n} samples, {steps} steps/epoch), "
                f"loss terms: {terms}{gate}"
            )
            self.log.metrics(
                {
                    "kind": "phase",
                    "index": i,
                    "name": p.name,
                    "data": p.data,
                    "samples": n,
                    "epochs": p.epochs,
                }
            )

    def _zero_text(self) -> str:
        stage = self.engine.zero_optimization_stage()
        if stage == self.cfg.zero_stage:
            return f"ZeRO {stage}"
        return f"ZeRO {stage} (zero_stage={self.cfg.zero_stage} has nothing to partition on one rank)"

    def _log_train(self, window: _Window) -> None:
        st = self.state
        terms = distributed.mean_over_ranks(window.means(), self.device)
        row = {
            "kind": "train",
            "step": st.global_step,
            "epoch": st.epoch,
            "phase": self.phases[st.phase].name,
            "lr": lr_at(
                st.global_step - 1,
                self.total_steps,
                self.warmup,
                self.cfg.lr,
                self.cfg.schedule,
                self.cfg.min_lr_ratio,
            ),
            "samples_per_s": window.samples_per_s(),
            **terms,
        }
        self.log.metrics(row)
        window.reset()

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.log.console,
            disable=not (self.log.active and self.cfg.progress),
            transient=False,
        )


class _Window:
    """Loss terms and throughput since the last metrics row (tensors summed on the device)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.samples = 0
        self.t0 = time.perf_counter()

    def add(self, terms: Mapping[str, torch.Tensor], samples: int) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.steps += 1
        self.samples += samples

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpoints) does not count against throughput."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - start

    def means(self) -> dict[str, float]:
        return {k: float(v) / self.steps for k, v in self.sums.items()}

    def samples_per_s(self) -> float:
        return self.samples / max(1e-9, time.perf_counter() - self.t0)


def autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """Mixed precision of the forward pass: bfloat16 autocast for ``bf16``, nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only (shrinking biases and norm scales only hurts),
    and ``lr * new_lr_mult`` for the parameters the backbone checkpoint did not provide (random
    cross-attention), which have everything to learn while the rest needs gentle steps."""
    new_names = set(getattr(getattr(model, "backbone", None), "new_parameter_names", list)())
    new_names = {f"backbone.{n}" for n in new_names}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim >= 2, name in new_names), []).append(p)
    return [
        {
            "params": params,
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "lr": cfg.lr * (cfg.new_lr_mult if new else 1.0),
        }
        for (decay, new), params in sorted(groups.items())
    ]


def _active_terms(w: LossWeights) -> list[str]:
    terms = ["ce"]
    for name, on, weight in (
        ("kl_ner_re", w.ner_re, w.alpha),
        ("kl_fwd_rev", w.fwd_rev, w.beta),
        ("suppress", w.suppress, w.gamma),
    ):
        if on and weight > 0:
            terms.append(f"{name} x{weight:g}")
    return terms


@contextmanager
def _own_storage(module: nn.Module) -> Iterator[None]:
    """Give every parameter its own storage for the duration (tied parameters stay tied).

    ZeRO keeps parameters as views into one flat buffer; savers that detect tied weights by
    shared storage (safetensors) would see every tensor as tied to every other.
    """
    views = [(p, p.data) for p in module.parameters()]
    try:
        for p, data in views:
            p.data = data.clone()
        yield
    finally:
        for p, data in views:
            p.data = data


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
