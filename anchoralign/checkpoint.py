"""Checkpoints of a training stage, kept apart from the loop: save, resume, random-number state,
the config comparison on resume, and the export of a model directory.

Run folder::

    checkpoints/<tag>/        the DeepSpeed state (model, optimizer), train_state.json (phase, epoch,
                              step, switch, best score), train_config.yaml, rng-rank<R>.pt, and
                              ema.pt (the moving average of the weights, with optim.ema_decay)
    checkpoints/latest        the tag to resume from (written last and replaced whole, so a run
                              killed mid-save resumes from the previous checkpoint)
    best/, final/             model directories (``AnchorAlignModel.save_pretrained``; loadable
                              without DeepSpeed), best/ with scores.json
    best_<rule>/              the same as best/ for each selection rule of ``eval.also_best``

Only the newest checkpoint is kept. A checkpoint holds each rank's RNG state: dropout masks depend
on the rank's own batches, so the states differ by rank. Once a finished run has exported final/,
its last checkpoint is cut down to train_state.json and train_config.yaml (``prune``): a finished
run is never trained further, so the weights and optimizer state there (several times the model's
size) would only fill the disk; the record that remains says the run is done.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anchoralign import distributed
from anchoralign.config import CONFIG_FILE, TrainConfig, config_differences, load_config, save_config
from anchoralign.ema import EMA_FILE, WeightAverage
from anchoralign.errors import UserError
from anchoralign.files import atomic_write_text

CHECKPOINTS = "checkpoints"
LATEST = "latest"  # in CHECKPOINTS: the tag of the checkpoint to resume from
STATE_FILE = "train_state.json"
SCORES_FILE = "scores.json"
_RECORD = frozenset({STATE_FILE, CONFIG_FILE})  # what a pruned checkpoint keeps


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
    align_since: int | None = None  # global step at which the alignment terms came on (the ramp's origin)
    last_valid_rate: float | None = None
    stale_evals: int = 0  # evaluations since the dev score last improved
    best_score: float | None = None
    best_step: int | None = None
    also_best: dict[str, float] = field(default_factory=dict)  # eval.also_best rule -> its best score
    last_eval_step: int | None = None
    metrics_rows: int = 0  # rows of metrics.jsonl written up to this state
    world_size: int = 1
    done: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainState:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class Checkpointer:
    """Saves and restores a stage's checkpoints around a DeepSpeed engine (every rank calls it)."""

    def __init__(
        self,
        cfg: TrainConfig,
        engine: Any,
        out: Path,
        reload: Callable[[Path], nn.Module] | None = None,
        ema: WeightAverage | None = None,
    ):
        self.cfg, self.engine, self.out, self.ema = cfg, engine, out, ema
        self.dir = out / CHECKPOINTS
        self.reload = reload  # directory -> model, for evaluating under ZeRO-3
        self.rank = distributed.rank()

    def save(self, state: TrainState) -> None:
        """Save everything needed to continue, then drop older checkpoints."""
        tag = f"step-{state.global_step:08d}" + ("-done" if state.done else "")
        # The final save gets its own tag: rewriting the directory `latest` points at is not safe.
        path = self.dir / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), path / f"rng-rank{self.rank}.pt")
        if distributed.is_main():
            save_config(self.cfg, path / CONFIG_FILE)
            atomic_write_text(path / STATE_FILE, json.dumps(asdict(state), indent=2) + "\n")
            if self.ema is not None:  # equal on every rank, as the whole weights it follows are
                self.ema.save(path / EMA_FILE)
        self.engine.save_checkpoint(
            str(self.dir), tag=tag, client_state={"train_state": asdict(state)}, save_latest=False
        )
        distributed.barrier()
        if distributed.is_main():
            # DeepSpeed would rewrite `latest` in place, so a run killed during that write would
            # find it empty; replaced whole, it names this checkpoint or the previous one.
            atomic_write_text(self.dir / LATEST, tag)
            for old in self.dir.glob("step-*"):
                if old.name != tag and old.is_dir():
                    shutil.rmtree(old)
        distributed.barrier()

    def resume(self, world_size: int) -> TrainState | None:
        """The state of ``checkpoints/latest`` with the engine and RNG restored, or None when there is
        nothing to resume (or ``checkpoint.resume`` is off)."""
        if not (self.cfg.checkpoint.resume and (self.dir / LATEST).is_file()):
            return None
        path = self.latest()
        tag = path.name
        self._check_same_config(path / CONFIG_FILE)
        saved = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if saved.get("done") and self.pruned(path):
            return TrainState.from_dict(saved)  # finished: nothing to load, nothing to train
        saved_world = saved.get("world_size", 1)
        if saved_world != world_size:
            # ZeRO shards and per-rank RNG states belong to one world size.
            raise UserError(
                f"{path} was written by {saved_world} rank(s); resume it with {saved_world}, not {world_size}"
            )
        load_path, client = self.engine.load_checkpoint(str(self.dir), tag=tag)
        if load_path is None or not client or "train_state" not in client:
            raise UserError(
                f"{path}: checkpoint is incomplete; delete {self.dir} or pass --checkpoint.resume=false"
            )
        rng_file = path / f"rng-rank{self.rank}.pt"
        if not rng_file.is_file():
            raise UserError(f"{rng_file}: missing; delete {self.dir} or pass --checkpoint.resume=false")
        set_rng_state(torch.load(rng_file, weights_only=True))
        if self.ema is not None:
            if not (path / EMA_FILE).is_file():
                raise UserError(
                    f"{path / EMA_FILE}: missing; delete {self.dir} or pass --checkpoint.resume=false"
                )
            self.ema.load(path / EMA_FILE)
        return TrainState.from_dict(client["train_state"])

    def latest(self) -> Path:
        """The checkpoint ``checkpoints/latest`` names."""
        return self.dir / (self.dir / LATEST).read_text(encoding="utf-8").strip()

    def prune(self) -> None:
        """Cut the latest checkpoint down to its record (state and config), once a finished run's
        final/ is written."""
        distributed.barrier()
        if distributed.is_main():
            path = self.latest()
            for item in path.iterdir():
                if item.is_dir():
                    shutil.rmtree(item)
                elif item.name not in _RECORD:
                    item.unlink()
        distributed.barrier()

    @staticmethod
    def pruned(path: Path) -> bool:
        """Whether the checkpoint at ``path`` holds only its record (``prune``)."""
        return all(item.name in _RECORD for item in path.iterdir())

    def _check_same_config(self, saved: Path) -> None:
        if not saved.is_file():
            raise UserError(f"{saved}: missing; cannot tell whether this checkpoint belongs to this config")
        old = load_config(type(self.cfg), saved)
        diff = config_differences(old, self.cfg)
        if diff:
            raise UserError(
                f"{self.out} holds a run with another config ({'; '.join(diff)}); use another "
                "--output-dir, or --checkpoint.resume=false to start over"
            )

    def export(self, path: Path, extra: Mapping[str, Any] | None = None) -> None:
        """Write the model in the checkpoint directory format (loadable without DeepSpeed), atomically."""
        with self._whole_parameters():
            if distributed.is_main():
                tmp = path.with_name(path.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                with _own_storage(self.engine.module):
                    self.engine.module.save_pretrained(tmp, train_config=self.cfg)
                if extra is not None:
                    (tmp / SCORES_FILE).write_text(json.dumps(extra, indent=2) + "\n", encoding="utf-8")
                shutil.rmtree(path, ignore_errors=True)
                tmp.rename(path)
        distributed.barrier()

    @contextmanager
    def eval_model(self) -> Iterator[nn.Module]:
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
        model = self.reload(path).to(self.engine.device)
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


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
