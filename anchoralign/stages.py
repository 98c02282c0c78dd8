"""Running a stage end to end, shared by ``pretrain/run.py`` and ``sft/run.py``: parse the
command line into the stage config, load the evaluation data and the model, plan the phases and
their training sets (tokenised with the model's tokenizer, ``anchoralign.training_set``), train with
:class:`anchoralign.trainer.Trainer`, and turn a user's mistake into one clear line and exit
status 2.

The run folder (``output_dir``) is created only when training starts: a run that fails before
(a missing corpus, a bad record, a bad config) leaves nothing that looks like a result.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console
from rich.markup import escape
from torch import nn

from anchoralign import config_tree, distributed
from anchoralign.config import TrainConfig
from anchoralign.errors import UserError
from anchoralign.runlog import RunLog
from anchoralign.schedule import Phase
from anchoralign.schema import DatasetMeta, Sample
from anchoralign.training_set import TrainingSet

C = TypeVar("C", bound=TrainConfig)
S = TypeVar("S", bound=Sequence)
# The model's tokenizer -> the stage's training sets by name.
LoadSets = Callable[[Any], dict[str, TrainingSet]]
# (config, dataset, log) -> the stage's phases, and how to load their training sets. A plan checks
# what it can at once (missing files, settings that select nothing); what needs the tokenizer
# (tokenising, and validating a corpus while caching it) waits for the model.
Plan = Callable[[Any, DatasetMeta, RunLog], tuple[list[Phase], LoadSets]]


def parse_args(cls: type[C], argv: Sequence[str] | None, prog: str) -> C:
    """``--config FILE`` plus one flag per config key (``--loss.alpha=0.3``) -> a validated config.

    ``--local_rank`` (added by the ``deepspeed`` launcher; the rank is read from the environment)
    is accepted and ignored; ``-h``/``--help`` lists every key with its type, default and meaning.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s --config FILE [--key=VALUE | --section.key=VALUE ...]",
        description=inspect.cleandoc(cls.__doc__ or ""),
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON config (flags override its keys)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    config_tree.add_flags(parser, cls, short_names=True)
    args = config_tree.parse_known_or_fail(parser, sys.argv[1:] if argv is None else argv, cls)
    return config_tree.load(cls, args.config, config_tree.given_overrides(args))


def take(samples: S, limit: int | None, what: str, log: RunLog) -> S:
    """The first ``limit`` samples (smoke runs), saying so in the log."""
    if limit is None or limit >= len(samples):
        return samples
    log.info(f"using the first {limit} of {len(samples)} {what} samples (limit)")
    return samples[:limit]


def load_model(cfg: TrainConfig, meta: DatasetMeta) -> nn.Module:
    """The model to train: ``init_from``'s checkpoint, or a fresh one on ``model.backbone``."""
    from anchoralign.linearize import LabelSet
    from anchoralign.model import AnchorAlignModel

    m = cfg.model
    if cfg.init_from is None:
        model = AnchorAlignModel.from_backbone(
            m.backbone,
            meta,
            paradigm=m.paradigm,
            decoder_attention=m.decoder_attention,
            label_init=m.label_init,
            decoder_input=m.decoder_input,
            span_width=m.span_head_width,
        )
        if m.relation_heads:
            model.add_relation_head(m.relation_heads)
        return model
    path = Path(cfg.init_from)
    if not (path / "config.json").is_file():
        hint = f" (did you mean {path / 'final'}?)" if (path / "final" / "config.json").is_file() else ""
        raise UserError(f"init_from: {path} is not a model directory: no config.json{hint}")
    model = AnchorAlignModel.from_pretrained(path)
    want = LabelSet.from_meta(meta)
    if (model.labels.entity_types, model.labels.relation_types) != (want.entity_types, want.relation_types):
        raise UserError(f"init_from: {path} was trained with other labels than dataset '{meta.name}'")
    if int(model.paradigm) != m.paradigm:
        raise UserError(
            f"init_from: {path} uses paradigm {int(model.paradigm)} but the config has model.paradigm={m.paradigm}"
        )
    if model.span_width != m.span_head_width:
        if model.span_width:
            raise UserError(
                f"init_from: {path} has a span head of width {model.span_width} but the config has "
                f"model.span_head_width={m.span_head_width}"
            )
        model.add_span_head(m.span_head_width)  # a new head on a model trained without one
    heads = 0 if model.relation_head is None else len(model.relation_head.heads)
    if heads != m.relation_heads:
        if heads:
            raise UserError(
                f"init_from: {path} has {heads} relation heads but the config has "
                f"model.relation_heads={m.relation_heads}"
            )
        model.add_relation_head(m.relation_heads)
    return model


def describe_span_head(width: int, gold: Sequence[Sample], log: RunLog) -> None:
    """Say what the span head cannot find: the gold mentions wider than it looks."""
    from anchoralign.span_head import too_wide

    mentions = [[(e.start, e.end, e.type) for e in s.entities] for s in gold]
    missed = too_wide(mentions, width)
    n = sum(map(len, mentions))
    log.info(
        f"span head: spans of up to {width} words; {missed} of the {n} mentions of the evaluation split "
        "are wider and out of its reach"
    )


def stage_loss(cfg: TrainConfig) -> Callable[..., dict[str, torch.Tensor]]:
    """:func:`anchoralign.losses.loss_terms` with the config's label smoothing and alignment
    temperature: one loss for
    training and for the logged dev losses, so that the two stay comparable."""
    from anchoralign.losses import loss_terms

    return functools.partial(
        loss_terms, label_smoothing=cfg.loss.label_smoothing, align_temperature=cfg.loss.align_temperature
    )


def run_stage(cfg: TrainConfig, meta: DatasetMeta, plan: Plan, log: RunLog) -> Path:
    """Load the eval data, the model and the training sets, then train the stage; returns the
    ``final`` directory.

    The eval splits and the plan are checked before the process group and the model are set up,
    so their errors come at once; the training sets are tokenised with the model's tokenizer, so a
    bad record deep in a corpus is found after the model is loaded.
    """
    from anchoralign.datasets import load_split
    from anchoralign.evaluation import Evaluator
    from anchoralign.trainer import Trainer

    for split in (cfg.eval.split, *cfg.eval.loss_splits):
        if split not in meta.splits:
            raise UserError(
                f"config: split '{split}' is not one of dataset {meta.name}'s splits {list(meta.splits)}"
            )
    splits = {
        s: load_split(cfg.dataset, s, cfg.data_dir, fold=cfg.fold)
        for s in {cfg.eval.split, *cfg.eval.loss_splits}
    }
    splits = {s: take(v, cfg.data.limit_eval, s, log) for s, v in splits.items()}
    phases, load_sets = plan(cfg, meta, log)

    distributed.setup()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
    model = load_model(cfg, meta)
    if model.span_width:
        describe_span_head(model.span_width, splits[cfg.eval.split], log)
    train_sets = load_sets(model.tokenizer)
    collate = model.collator(max_length=cfg.model.max_length, align_positions=cfg.loss.align_positions)
    for data in train_sets.values():
        data.check_lengths(collate.max_length)
    loss_fn = stage_loss(cfg)
    evaluator = Evaluator(
        gold=splits[cfg.eval.split],
        loss_sets={s: splits[s] for s in cfg.eval.loss_splits},
        collate=collate,
        loss_fn=loss_fn,
        loss_cfg=cfg.loss,
        decode_cfg=cfg.decode,
        meta=meta,
    )
    trainer = Trainer(
        cfg, model, phases, train_sets, collate, loss_fn, evaluator, log, type(model).from_pretrained
    )
    return trainer.fit()


def stage_main(
    config_cls: type[TrainConfig],
    plan: Plan,
    argv: Sequence[str] | None,
    prog: str,
    after: Callable[[Any, DatasetMeta, RunLog], None] | None = None,
) -> int:
    """The whole entry point of a stage: parse the config, plan its phases, train, run ``after``
    (config, dataset, log) on the trained run, report errors."""

    def run() -> None:
        from anchoralign.datasets import get_meta

        cfg = parse_args(config_cls, argv, prog=prog)
        meta = get_meta(cfg.dataset, cfg.data_dir)
        log = RunLog(Path(cfg.output_dir))
        run_stage(cfg, meta, plan, log)
        if after is not None:
            after(cfg, meta, log)

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
