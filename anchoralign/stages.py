"""Running a stage end to end, shared by ``pretrain/run.py`` and ``sft/run.py``: parse the
config, plan the phases, load the data and the model, train with :class:`anchoralign.engine.Trainer`,
and turn a user's mistake into one clear line and exit status 2.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from torch import nn

from anchoralign import distributed
from anchoralign.config import (
    TrainConfig,
)
from anchoralign.engine import Trainer
from anchoralign.errors import UserError
from anchoralign.evaluation import Evaluator
from anchoralign.runlog import RunLog
from anchoralign.schedule import Phase, weights_for
from anchoralign.schema import Sample


def take(samples: Sequence[Sample], limit: int | None, what: str, log: RunLog) -> list[Sample]:
    """The first ``limit`` samples (smoke runs), saying so in the log."""
    if limit is None or limit >= len(samples):
        return list(samples)
    log.info(f"using the first {limit} of {len(samples)} {what} samples (limit)")
    return list(samples[:limit])


def load_model(cfg: TrainConfig, meta: Any) -> nn.Module:
    """The model to train: ``init_from``'s checkpoint, or a fresh one on ``backbone``."""
    from anchoralign.linearize import LabelSet
    from anchoralign.model import AnchorAlignModel

    if cfg.init_from is None:
        return AnchorAlignModel.from_backbone(
            cfg.backbone,
            meta,
            paradigm=cfg.paradigm,
            decoder_attention=cfg.decoder_attention,
            label_init=cfg.label_init,
        )
    path = Path(cfg.init_from)
    if not (path / "config.json").is_file():
        hint = f" (did you mean {path / 'final'}?)" if (path / "final" / "config.json").is_file() else ""
        raise UserError(f"init_from: {path} is not a model directory: no config.json{hint}")
    model = AnchorAlignModel.from_pretrained(path)
    want = LabelSet.from_meta(meta)
    if (model.labels.entity_types, model.labels.relation_types) != (want.entity_types, want.relation_types):
        raise UserError(f"init_from: {path} was trained with other labels than dataset '{meta.name}'")
    if int(model.paradigm) != cfg.paradigm:
        raise UserError(
            f"init_from: {path} uses paradigm {int(model.paradigm)} but the config has paradigm={cfg.paradigm}"
        )
    return model


def run_stage(
    cfg: TrainConfig,
    meta: Any,
    phases: Sequence[Phase],
    train_sets: Mapping[str, Sequence[Sample]],
    log: RunLog,
) -> Path:
    """Load the eval data and the model, then train the stage; returns the ``final`` directory.

    Everything a user can get wrong in the data is checked before the process group and the model
    are set up, so such errors come at once.
    """
    from anchoralign.datasets import load_split
    from anchoralign.decode import DecodeConfig
    from anchoralign.losses import loss_terms

    for split in (cfg.eval_split, *cfg.loss_splits):
        if split not in meta.splits:
            raise UserError(
                f"config: split '{split}' is not one of dataset {meta.name}'s splits {list(meta.splits)}"
            )
    splits = {
        s: load_split(cfg.dataset, s, cfg.data_dir, fold=cfg.fold) for s in {cfg.eval_split, *cfg.loss_splits}
    }
    splits = {s: take(v, cfg.limit_eval, s, log) for s, v in splits.items()}

    distributed.setup()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
    model = load_model(cfg, meta)
    collate = model.collator(max_length=cfg.max_length)
    decode_cfg = DecodeConfig(
        beam_size=cfg.beam_size,
        max_len=cfg.decode_max_len,
        batch_size=cfg.eval_batch_size,
        aggregate=cfg.aggregate,
        anchor=cfg.anchor,
        constrained=cfg.constrained,
    )
    evaluator = Evaluator(
        gold=splits[cfg.eval_split],
        loss_sets={s: splits[s] for s in cfg.loss_splits},
        collate=collate,
        loss_fn=loss_terms,
        # The loss curves show every configured term, also before the terms are switched on.
        weights=weights_for(cfg, align=True),
        decode_cfg=decode_cfg,
        symmetric=frozenset(meta.symmetric_relations),
        boundary_only=bool(meta.boundary_only),
        batch_size=cfg.eval_batch_size,
    )
    reload = type(model).from_pretrained
    trainer = Trainer(cfg, model, phases, train_sets, collate, loss_terms, evaluator, log, reload)
    return trainer.fit()


def stage_main(
    config_cls: type[TrainConfig],
    plan: Callable[[Any, Any, RunLog], tuple[list[Phase], dict[str, list[Sample]]]],
    argv: Sequence[str] | None,
    prog: str,
) -> int:
    """The whole entry point of a stage: parse the config, plan its phases, train, report errors."""

    def run() -> None:
        from anchoralign.config import parse_args
        from anchoralign.datasets import get_meta

        cfg = parse_args(config_cls, argv, prog=prog)
        meta = get_meta(cfg.dataset, cfg.data_dir)
        log = RunLog(Path(cfg.output_dir))
        phases, sets = plan(cfg, meta, log)
        run_stage(cfg, meta, phases, sets, log)

    return main_guard(run)


def main_guard(fn: Callable[[], object]) -> int:
    """Run an entry point; a UserError becomes one red line and exit status 2, not a traceback."""
    try:
        fn()
        return 0
    except UserError as err:
        prefix = f"[rank {distributed.rank()}] " if distributed.world_size() > 1 else ""
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]error:[/] {escape(prefix + str(err))}", highlight=False
        )
        return err.exit_code
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/]")
        return 130
