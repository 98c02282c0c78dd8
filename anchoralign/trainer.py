"""The training loop shared by both stages: ``train_step``, ``evaluate`` and ``fit`` around a
DeepSpeed engine. Checkpoints live in ``anchoralign.checkpoint``, pure schedule pieces in
``anchoralign.schedule``, the loss terms in ``anchoralign.losses``.

A stage is a list of :class:`Phase` (name, training set, epochs, alignment on or off). Epochs run in
order; the phase in effect only moves forward. The cross-entropy phase that precedes an alignment
phase on the same data is the *gate*: it ends after its configured epochs, or earlier with
``phases.switch`` = ``valid_rate`` (the share of dev outputs the model writes as valid structures
reached the threshold) or ``plateau`` (the dev score has not improved for ``patience``
evaluations); its remaining epochs then run with alignment on, so the number of steps is fixed in
advance. The alignment terms grow in over ``loss.ramp_steps`` steps.

With ``optim.ema_decay`` the evaluations, ``best/`` and ``final/`` use the moving average of the
weights (``anchoralign.ema``); training continues from the raw weights.

The learning rate of a step is the phase's (``optim.lr``, one value or one per phase) times the
warm-up/decay factor of the stage times the parameter's multiplier (``optim.new_lr_mult`` for the
parameters the backbone did not provide); it is set on the optimizer before every update, so it
follows from the step and the phase alone and a resumed run needs no scheduler state.

Data order is a seeded permutation per epoch (length-bucketed with ``data.bucket_batches``), so a
resumed run replays it exactly. Training sets are indexed, never loaded whole (``TrainingSet``
turns only a batch's rows into samples). Logging, metrics and exports happen on rank 0; the run
folder is created when ``fit`` starts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn

from anchoralign import distributed
from anchoralign.batching import Item
from anchoralign.checkpoint import Checkpointer, TrainState
from anchoralign.config import TrainConfig
from anchoralign.deepspeed_config import deepspeed_config, describe_zero, effective_zero_stage
from anchoralign.ema import WeightAverage
from anchoralign.errors import UserError
from anchoralign.evaluation import Collate, EvalResult, Evaluate, LossFn, selection_score, to_device
from anchoralign.losses import LOSS_KEYS, describe_terms, ramp_factor, term_weights
from anchoralign.optim import autocast, parameter_groups
from anchoralign.runlog import RunLog, Window
from anchoralign.schedule import (
    Phase,
    epoch_order,
    epoch_plan,
    gate_phase,
    gate_reason,
    lr_at,
    rank_micro_batches,
    steps_per_epoch,
    warmup_steps_for,
)
from anchoralign.training_set import sample_lengths

__all__ = ["Phase", "TrainState", "Trainer"]


class Trainer:
    """Runs one stage: ``fit()`` trains every phase, evaluates, checkpoints and exports.

    ``model(batch)`` returns the logits dict of the model and ``model.save_pretrained(dir)`` writes
    the checkpoint directory format; ``collate`` turns samples into a batch; ``loss_fn`` is
    :func:`anchoralign.losses.loss_terms` (or anything with its signature).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        phases: Sequence[Phase],
        train_sets: Mapping[str, Sequence[Item]],
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
        self.plan = epoch_plan(self.phases)
        self.gate = gate_phase(self.phases) if cfg.phases.switch != "epochs" else None
        self.out = Path(cfg.output_dir)
        self.log = log or RunLog(self.out)
        distributed.setup()
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.state = TrainState(stage=cfg.stage, world_size=self.world)
        self.spans = cfg.model.span_head_width > 0  # the span head's term is on
        self.relations = cfg.model.relation_heads > 0  # the relation heads' term is on
        optim = cfg.optim
        self.global_batch = optim.micro_batch_size * optim.grad_accum * self.world
        # Sentence lengths for length bucketing, by training set.
        self.lengths = {name: sample_lengths(data) for name, data in train_sets.items()}
        self.epoch_steps = [
            steps_per_epoch(len(train_sets[self.phases[p].data]), self.global_batch) for p in self.plan
        ]
        planned = sum(self.epoch_steps)
        self.total_steps = min(planned, cfg.trainer.max_steps) if cfg.trainer.max_steps else planned
        stop = cfg.trainer.stop_after_epoch
        if stop is not None and stop > len(self.plan):
            raise UserError(
                f"trainer.stop_after_epoch={stop}: the stage has only {len(self.plan)} epochs (phases.epochs)"
            )
        # The steps this run takes; the schedule (total_steps) may be planned for more.
        self.run_steps = min(self.total_steps, sum(self.epoch_steps[:stop]) if stop else planned)
        self.warmup = warmup_steps_for(self.total_steps, optim.warmup_ratio)
        if cfg.optim.ema_decay and effective_zero_stage(cfg, self.world) == 3:
            raise UserError(
                "optim.ema_decay needs whole parameters on every rank: use trainer.zero_stage 0, 1 or 2"
            )
        self.engine = self._deepspeed_engine()
        self.ema = self._weight_average()
        self.checkpoints = Checkpointer(cfg, self.engine, self.out, reload, self.ema)

    def _deepspeed_engine(self):
        import deepspeed

        optimizer = torch.optim.AdamW(parameter_groups(self.model, self.cfg), lr=self.cfg.optim.phase_lr(0))
        engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, config=deepspeed_config(self.cfg, self.world)
        )
        if self.world == 1 and engine.zero_optimization_stage() == 0:
            # Alone, the all-reduce of the gradients only copies every gradient into a flat
            # buffer and back (a tenth of a MiniLM step on CPU).
            engine.enable_backward_allreduce = False
        return engine

    def _weight_average(self) -> WeightAverage | None:
        decay = self.cfg.optim.ema_decay
        return WeightAverage(self.engine.module, decay) if decay else None

    def averaged(self) -> AbstractContextManager[object]:
        """The module with the averaged weights in place (``optim.ema_decay``), or as it is."""
        return self.ema.applied(self.engine.module) if self.ema is not None else nullcontext()

    @property
    def device(self) -> torch.device:
        return self.engine.device

    # -- the objective of the current step ------------------------------------------------------

    def phase_weights(self) -> dict[str, float]:
        """Weights of the active loss terms now (alignment ramped in from ``align_since``)."""
        st = self.state
        align = self.phases[st.phase].align
        since = st.global_step - (st.align_since if st.align_since is not None else st.global_step)
        ramp = ramp_factor(since, self.cfg.loss.ramp_steps)
        return term_weights(self.cfg.loss, align, ramp, self.spans, self.relations)

    def lr(self, step: int | None = None) -> float:
        """Learning rate (before the per-parameter multiplier) of optimizer update ``step``."""
        step = self.state.global_step if step is None else step
        o = self.cfg.optim
        peak = o.phase_lr(self.state.phase)
        return lr_at(step, self.total_steps, self.warmup, peak, o.schedule, o.min_lr_ratio)

    # -- one step -------------------------------------------------------------------------------

    def train_step(self, micro_batches: Sequence[Sequence[Item]]) -> dict[str, torch.Tensor]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss terms (and,
        every ``trainer.grad_norm_every`` steps, each active term's gradient norm)."""
        self.engine.train()
        weights = self.phase_weights()
        lr = self.lr()
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        every = self.cfg.trainer.grad_norm_every
        measure = every > 0 and self.state.global_step % every == 0
        sums = {k: torch.zeros((), device=self.device) for k in LOSS_KEYS}
        for samples in micro_batches:
            batch = to_device(self.collate(list(samples)), self.device)
            teacher = self._teacher(batch) if "kl_ner_re" in weights else None
            with autocast(self.cfg.trainer.precision, self.device):
                outputs = self.engine(batch)
            # The losses take float32 softmaxes of the (bf16) logits themselves.
            terms = self.loss_fn(outputs, batch, weights, teacher, self.cfg.loss.teacher_gate)
            if measure:
                for key, norm in self._grad_norms(batch, weights, teacher).items():
                    sums[key] = sums.get(key, 0) + norm
            # DeepSpeed scales the loss by 1/grad_accum and steps the optimizer only at the last
            # micro-batch of the step.
            self.engine.backward(terms["loss"])
            self.engine.step()
            for k in LOSS_KEYS:
                sums[k] += terms[k].detach().float()
        if self.ema is not None:
            self.ema.update(self.engine.module)
        return {k: v / len(micro_batches) for k, v in sums.items()}

    def _teacher(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The NER decoder's logits from a pass without dropout and without gradient, as the
        teacher of the NER-RE term; None to use the training pass (``loss.teacher_dropout``)."""
        if self.cfg.loss.teacher_dropout:
            return None
        module = self.engine.module
        module.eval()
        try:
            with torch.no_grad(), autocast(self.cfg.trainer.precision, self.device):
                return module(batch, decoders=("ner",), spans=False)["ner_logits"]
        finally:
            module.train()

    def _grad_norms(
        self, batch: Mapping[str, torch.Tensor], weights: Mapping[str, float], teacher: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Norm of the gradient of each weighted active term over all trainable parameters.

        A pass of its own through the bare module: DeepSpeed refuses gradients taken outside
        ``engine.backward`` on the engine's outputs. Under ZeRO-3 the parameters are shards and
        the norms would mean nothing, so none are measured.
        """
        if self.engine.zero_optimization_stage() == 3:
            return {}
        module = self.engine.module
        params = [p for p in module.parameters() if p.requires_grad]
        with autocast(self.cfg.trainer.precision, self.device):
            outputs = module(batch)
        terms = self.loss_fn(outputs, batch, weights, teacher, self.cfg.loss.teacher_gate)
        norms = {}
        for key, weight in weights.items():
            grads = torch.autograd.grad(weight * terms[key], params, retain_graph=True, allow_unused=True)
            squares = [g.float().pow(2).sum() for g in grads if g is not None]
            norms[f"gradnorm_{key}"] = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
        return norms

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> EvalResult | None:
        """Score the eval split, log it, keep the best model and maybe end the gate phase."""
        st = self.state
        if self.evaluator is None or st.last_eval_step == st.global_step:
            return None
        with self.averaged():
            return self._evaluate()

    def _evaluate(self) -> EvalResult:
        st, cfg = self.state, self.cfg
        self.engine.eval()
        try:
            # The free-running validity matters only until the gate phase has ended.
            validity = cfg.phases.switch == "valid_rate" and self.gate is not None and st.phase <= self.gate
            with self.checkpoints.eval_model() as model:
                result = self.evaluator(model, self.device, validity)
        finally:
            self.engine.train()
        st.last_eval_step = st.global_step
        scores = result.scores
        primary, value = selection_score(scores, cfg.eval.best_metric)
        base = {"step": st.global_step, "epoch": st.epoch, "phase": self.phases[st.phase].name}
        self.log.metrics({"kind": "eval", **base, "split": cfg.eval.split, **scores})
        for split, terms in result.losses.items():
            self.log.metrics({"kind": "eval_loss", **base, "split": split, **terms})
        free = scores.get("free_valid_rate")
        st.last_valid_rate = None if free is None else float(free)
        self.log.info(
            f"eval step {st.global_step}: {cfg.eval.split} {primary} {value:.2f}, "
            f"ner_f1 {scores.get('ner_f1', float('nan')):.2f}, "
            f"complete outputs {100 * scores['complete_rate']:.1f}%"
            + ("" if free is None else f", valid free-running outputs {100 * free:.1f}%")
        )
        if st.best_score is None or value > st.best_score:
            st.best_score, st.best_step, st.stale_evals = value, st.global_step, 0
            self._export_best("best", primary, value, scores)
        else:
            st.stale_evals += 1
        for rule in cfg.eval.also_best:
            name, score = selection_score(scores, rule)
            if rule not in st.also_best or score > st.also_best[rule]:
                st.also_best[rule] = score
                self._export_best(f"best_{rule}", name, score, scores)
        self._maybe_end_gate()
        return result

    def _export_best(self, folder: str, name: str, value: float, scores: Mapping[str, object]) -> None:
        step = self.state.global_step
        self.checkpoints.export(self.out / folder, extra={"step": step, "scores": scores})
        self.log.info(f"new best {name} {value:.2f} at step {step}: exported to {self.out / folder}")

    def _maybe_end_gate(self) -> None:
        st = self.state
        if self.gate is None or st.phase != self.gate:
            return
        reason = gate_reason(self.cfg.phases, st.last_valid_rate, st.stale_evals)
        # Rank 0 decides, so that all ranks change phase at the same step even if their
        # evaluations were to differ in the last bit on some accelerator.
        if distributed.broadcast_object(reason is not None):
            self._switch(self.gate + 1, str(reason))

    def _switch(self, to: int, reason: str) -> None:
        st = self.state
        old = self.phases[st.phase].name
        st.phase = to
        new = self.phases[to]
        if new.align:
            st.align_since = st.global_step
            if st.switched_at is None:
                st.switched_at, st.switch_reason = st.global_step, reason
        self.log.info(
            f"phase {old} -> {new.name} at step {st.global_step} (epoch {st.epoch}): {reason}; "
            f"loss terms on: {describe_terms(self.phase_weights())}"
            + (
                f", ramped in over {self.cfg.loss.ramp_steps} steps"
                if new.align and self.cfg.loss.ramp_steps
                else ""
            )
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

    # -- the loop -------------------------------------------------------------------------------

    def fit(self) -> Path:
        """Train the stage to the end (or ``trainer.max_steps``); returns the exported ``final`` directory."""
        resumed = self.checkpoints.resume(self.world)
        self.log.open()  # training starts: the run folder and train.log (with the lines so far)
        if resumed is not None:
            self.state = resumed
            self.log.info(
                f"resuming from {self.out / 'checkpoints'}: phase {self.phases[resumed.phase].name}, "
                f"epoch {resumed.epoch}, step {resumed.global_step} of {self.total_steps}"
            )
        st = self.state
        final = self.out / "final"
        if st.done:
            if not distributed.broadcast_object(final.is_dir()):
                if self.checkpoints.pruned(self.checkpoints.latest()):
                    raise UserError(
                        f"{self.out} holds a finished run whose final/ is gone and whose last checkpoint "
                        "kept no weights; train again with --checkpoint.resume=false"
                    )
                # Killed between the last checkpoint and the export: export now.
                with self.averaged():
                    self.checkpoints.export(final)
            self._prune()  # killed before the prune, or kept by an earlier keep_final
            self.log.info(f"{self.cfg.stage}: this run already finished; the model is in {final}")
            return final
        self.log.keep_metrics(st.metrics_rows if resumed else 0)
        if resumed is None:
            # Dropout differs by rank, as their batches do; a resumed run restores these states.
            random.seed(self.cfg.seed + self.rank)
            torch.manual_seed(self.cfg.seed + self.rank)
            st.phase = self.plan[0]  # phases without epochs are skipped
            if self.phases[st.phase].align:
                st.align_since = 0
            self._describe_plan()
        self.log.info(f"{self.cfg.stage}: phase {self.phases[st.phase].name} (step {st.global_step})")
        with self.log.progress(enabled=self.cfg.trainer.progress) as progress:
            bar = progress.add_task(
                self.phases[st.phase].name, total=self.run_steps, completed=st.global_step
            )
            window = Window(self.device)
            while st.epoch < len(self.plan) and not self._stopping():
                self._enter_epoch()
                self._train_epoch(
                    window, lambda: progress.update(bar, advance=1, description=self.phases[st.phase].name)
                )
        if window.steps:
            self._log_train(window)
        if st.epoch < len(self.plan):
            rule = (
                f"max_steps={self.cfg.trainer.max_steps}"
                if self._at_max_steps()
                else f"stop_after_epoch={self.cfg.trainer.stop_after_epoch}"
            )
            self.log.info(
                f"stopping at {rule} (epoch {st.epoch} of {len(self.plan)}, step {st.global_step} "
                f"of the {self.total_steps} the schedule is planned for)"
            )
        self.evaluate()
        st.done = True
        self.save_checkpoint()
        with self.averaged():
            self.checkpoints.export(final)
        self._prune()
        best = (
            f"; best {self.cfg.eval.split} score {st.best_score:.2f} at step {st.best_step}"
            if st.best_step
            else ""
        )
        self.log.info(f"{self.cfg.stage} finished at step {st.global_step}: model in {final}{best}")
        return final

    def _prune(self) -> None:
        if not self.cfg.checkpoint.keep_final:
            self.checkpoints.prune()

    def save_checkpoint(self) -> None:
        self.state.metrics_rows = self.log.rows
        self.checkpoints.save(self.state)

    def _train_epoch(self, window: Window, tick: Callable[[], None]) -> None:
        """The rest of the current epoch (all of it unless resumed mid-epoch)."""
        st, cfg = self.state, self.cfg
        name = self.phases[self.plan[st.epoch]].data
        data = self.train_sets[name]
        bucket = cfg.data.bucket_batches * self.global_batch
        order = epoch_order(cfg.seed, st.epoch, len(data), self.lengths[name], bucket, self.global_batch)
        n_steps = self.epoch_steps[st.epoch]
        while st.step_in_epoch < n_steps and not self._stopping():
            idx = rank_micro_batches(
                order,
                st.step_in_epoch,
                cfg.optim.micro_batch_size,
                cfg.optim.grad_accum,
                self.world,
                self.rank,
            )
            window.add(self.train_step([[data[i] for i in mb] for mb in idx]), self.global_batch)
            st.step_in_epoch += 1
            st.global_step += 1
            st.samples_seen += self.global_batch
            tick()
            if st.global_step % cfg.trainer.log_every == 0:
                self._log_train(window)
            with window.paused():
                if st.step_in_epoch == n_steps:
                    st.epoch, st.step_in_epoch = st.epoch + 1, 0
                    self.evaluate()
                    self.save_checkpoint()
                    return
                if cfg.eval.every and st.global_step % cfg.eval.every == 0:
                    self.evaluate()
                if cfg.checkpoint.save_every and st.global_step % cfg.checkpoint.save_every == 0:
                    self.save_checkpoint()

    def _at_max_steps(self) -> bool:
        return self.cfg.trainer.max_steps is not None and self.state.global_step >= self.cfg.trainer.max_steps

    def _stopping(self) -> bool:
        """max_steps reached, or stop_after_epoch's epochs done (checked between epochs: an epoch
        ends with its evaluation and checkpoint either way)."""
        stop = self.cfg.trainer.stop_after_epoch
        return self._at_max_steps() or (stop is not None and self.state.epoch >= stop)

    def _enter_epoch(self) -> None:
        st = self.state
        planned = self.plan[st.epoch]
        if planned <= st.phase:
            return
        prev = self.phases[st.phase]
        if st.phase == self.gate:
            reason = f"the {self.cfg.phases.switch} condition did not fire in the {prev.epochs} configured epochs of {prev.name}"
        else:
            reason = f"after the {prev.epochs} configured epoch(s) of {prev.name}"
        self._switch(planned, reason)

    def _describe_plan(self) -> None:
        cfg, o = self.cfg, self.cfg.optim
        lrs = ", ".join(f"{o.phase_lr(i):g}" for i in range(len(self.phases)))
        self.log.info(
            f"{cfg.stage}: {self.world} rank(s), global batch {self.global_batch} "
            f"(micro {o.micro_batch_size} x accumulation {o.grad_accum} x {self.world}), {describe_zero(self.cfg, self.world, self.engine.zero_optimization_stage())}, "
            f"{cfg.trainer.precision}, {self.total_steps} steps, warm-up {self.warmup}, {o.schedule} schedule, "
            f"lr {lrs} by phase"
            + (f" (x{o.new_lr_mult:g} for new parameters)" if o.new_lr_mult != 1 else "")
            + (
                f"; stopped after epoch {cfg.trainer.stop_after_epoch} (step {self.run_steps})"
                if cfg.trainer.stop_after_epoch
                else ""
            )
            + (
                f"; evaluated and exported: the moving average of the weights, decay {o.ema_decay:g}"
                if self.ema
                else ""
            )
        )
        for i, p in enumerate(self.phases):
            n = len(self.train_sets[p.data]) if p.data in self.train_sets else 0
            steps = steps_per_epoch(n, self.global_batch) if n else 0
            gate = ""
            if i == self.gate:
                ph = cfg.phases
                gate = (
                    f"; ends early once dev valid outputs reach {100 * ph.valid_rate_threshold:.0f}%"
                    if ph.switch == "valid_rate"
                    else f"; ends early once the dev score has not improved for {ph.patience} evaluations"
                )
            self.log.info(
                f"  phase {i + 1} {p.name}: {p.epochs} epoch(s) on {p.data} ({n} samples, {steps} steps/epoch), "
                f"loss terms: {describe_terms(term_weights(cfg.loss, p.align, spans=self.spans, relations=self.relations))}{gate}"
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

    def _log_train(self, window: Window) -> None:
        st = self.state
        terms = distributed.mean_over_ranks(window.means(), self.device)
        row = {
            "kind": "train",
            "step": st.global_step,
            "epoch": st.epoch,
            "phase": self.phases[st.phase].name,
            "lr": self.lr(st.global_step - 1),
            "samples_per_s": window.samples_per_s(),
            **terms,
        }
        self.log.metrics(row)
        window.reset()
