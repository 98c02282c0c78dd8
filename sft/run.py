"""Stage 2, curriculum fine-tuning on the real training set.

Starts from a pretrained model (``init_from: <pretrain output_dir>/final``) or, with
``init_from: null``, from the bare backbone (the "without pretraining" ablation). Three phases
(``phases.epochs: [curriculum, full-CE, full-align]``):

1. ``curriculum`` - warm-up on the training samples with at most ``curriculum_max_relations``
   relations (cross-entropy only);
2. ``full-ce`` - the whole training set, cross-entropy only (joined by the samples of
   ``data.extra_train``, e.g. an augmented corpus, in this phase and the next);
3. ``full-align`` - the whole training set with the alignment and suppression terms, switched
   on as in pretraining (after the configured epochs, or once the dev outputs are valid).

Then, with the ``fit`` section, heads fitted on the frozen encoder of ``best/`` (a span head for the
entities, a relation head over them), written as ``output_dir/fitted`` (``anchoralign.fitted_heads``).

Launch: ``python sft/run.py --config sft/configs/conll04.yaml [--key=value ...]``, or under
``deepspeed`` / ``torchrun``; the same command resumes an interrupted run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anchoralign import distributed
from anchoralign.config import SFTConfig
from anchoralign.datasets import load_split
from anchoralign.errors import UserError
from anchoralign.runlog import RunLog
from anchoralign.schedule import Phase
from anchoralign.schema import DatasetMeta, is_records_source
from anchoralign.stages import LoadSets, stage_main, take
from anchoralign.training_set import TrainingSet, concat, in_memory, open_cached


def curriculum_subset(samples: TrainingSet, max_relations: int) -> TrainingSet:
    """The warm-up samples: those with at most ``max_relations`` relations, in their order."""
    return samples.select(np.flatnonzero(samples.relation_counts() <= max_relations))


def plan(cfg: SFTConfig, meta: DatasetMeta, log: RunLog) -> tuple[list[Phase], LoadSets]:
    warmup, full_ce, full_align = cfg.phases.epochs
    data = cfg.data
    samples = take(
        load_split(cfg.dataset, data.train_split, cfg.data_dir, fold=cfg.fold), data.limit_train, "train", log
    )
    if warmup:
        n_simple = sum(len(s.relations) <= data.curriculum_max_relations for s in samples)
        log.info(
            f"curriculum warm-up set: {n_simple} of {len(samples)} training samples have at most "
            f"K={data.curriculum_max_relations} relation(s)"
        )
        if not n_simple:
            raise UserError(
                f"data.curriculum_max_relations={data.curriculum_max_relations}: no training sample qualifies; "
                "raise it or set the first phases.epochs entry to 0"
            )

    extra = [Path(p) for p in data.extra_train]
    for path in extra:
        if not is_records_source(path):
            raise UserError(f"data.extra_train: {path} is neither a jsonl file nor a saved datasets folder")

    def load(tokenizer: Any) -> dict[str, TrainingSet]:
        train = in_memory(samples, tokenizer, f"{meta.name} {data.train_split}")
        simple = curriculum_subset(train, data.curriculum_max_relations)
        if extra:
            # Validated against the dataset's labels and tokenised once, like a pretraining corpus.
            added = [open_cached(path, tokenizer, meta, log.info) for path in extra]
            names = " + ".join([train.name, *(s.name for s in added)])
            train = concat([train, *added], names)
            log.info(f"full-data phases train on {names}: {len(train)} samples")
        return {"simple": simple, "train": train}

    phases = [
        Phase("curriculum", "simple", warmup, align=False),
        Phase("full-ce", "train", full_ce, align=False),
        Phase("full-align", "train", full_align, align=True),
    ]
    return phases, load


def fit_heads_on_run(cfg: SFTConfig, meta: DatasetMeta, log: RunLog) -> None:
    """The ``fit`` section, on the trained run: by rank 0 alone, the other ranks are done."""
    from anchoralign.fitted_heads import FITTED_DIR, fit_heads, planned_fits
    from anchoralign.model import CONFIG_FILE

    fits = planned_fits(cfg.fit, cfg.seed)
    if not fits or not distributed.is_main():
        return
    out = Path(cfg.output_dir)
    source = out / cfg.fit.source
    if not (source / CONFIG_FILE).is_file():
        raise UserError(f"fit.source={cfg.fit.source}: the run exported no {source} to fit heads on")
    splits = (cfg.data.train_split, cfg.eval.split)
    train, dev = (
        take(load_split(cfg.dataset, split, cfg.data_dir, fold=cfg.fold), limit, split, log)
        for split, limit in zip(splits, (cfg.data.limit_train, cfg.data.limit_eval), strict=True)
    )
    try:
        fit_heads(
            source, out / FITTED_DIR, train, dev, meta, fits, cfg.decode, splits, log.info,
            states_dir=cfg.fit.states_dir,
        )  # fmt: skip
    except ValueError as err:  # a training split with nothing to fit on
        raise UserError(f"fit: {meta.name} {splits[0]}: {err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(SFTConfig, plan, argv, prog="sft/run.py", after=fit_heads_on_run)


if __name__ == "__main__":
    sys.exit(main())
