"""Stage 1, pretraining on the augmented corpus of ``augment run``.

Three phases (``phases.epochs: [ETU, POA-CE, POA-align]``):

1. ``etu`` - Entity Type Understanding on ``masked.jsonl``: mentions are ``<mask_i>`` tokens, so
   the entity types must be read from the context alone (cross-entropy only);
2. ``poa-ce`` - Progressive Objective Activation on ``unmasked.jsonl`` with the three
   cross-entropies;
3. ``poa-align`` - the same data with the alignment and suppression terms switched on, after the
   configured epochs (or earlier, see ``phases.switch``).

Launch: ``python pretrain/run.py --config pretrain/configs/conll04.yaml [--key=value ...]`` (one
process), or under ``deepspeed`` / ``torchrun`` for several. Run it again with the same command
to resume an interrupted run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anchoralign.config import PretrainConfig
from anchoralign.errors import UserError
from anchoralign.runlog import RunLog
from anchoralign.schedule import Phase
from anchoralign.schema import DatasetMeta, is_records_source
from anchoralign.stages import LoadSets, stage_main, take
from anchoralign.training_set import TrainingSet, open_cached

MASKED = "masked.jsonl"
UNMASKED = "unmasked.jsonl"


def corpus_file(cfg: PretrainConfig, name: str) -> Path:
    """``<corpus>/masked.jsonl``, or a ``datasets`` folder ``<corpus>/masked`` in its place; a missing
    one names the command that builds it."""
    path = cfg.corpus_path / name
    for candidate in (path, path.with_suffix("")):
        if is_records_source(candidate):
            return candidate
    raise UserError(
        f"{path}: corpus file not found; build the corpus with "
        f"`augment run --dataset {cfg.dataset} --out {cfg.corpus_path}` "
        f"(or point --data.corpus-dir at a folder holding {MASKED} and {UNMASKED}, or saved `datasets` "
        f"folders {path.stem}/ and {Path(UNMASKED).stem}/)"
    )


def plan(cfg: PretrainConfig, meta: DatasetMeta, log: RunLog) -> tuple[list[Phase], LoadSets]:
    etu, poa_ce, poa_align = cfg.phases.epochs
    corpora = {}  # training set -> its records source; a missing one is an error now
    if etu:
        corpora["masked"] = corpus_file(cfg, MASKED)
    if poa_ce or poa_align:
        corpora["unmasked"] = corpus_file(cfg, UNMASKED)

    def load(tokenizer: Any) -> dict[str, TrainingSet]:
        # Validated (labels included) and tokenised once: from the cache after the first run.
        return {
            name: take(
                open_cached(path, tokenizer, meta, log.info), cfg.data.limit_train, f"{name}-corpus", log
            )
            for name, path in corpora.items()
        }

    phases = [
        Phase("etu", "masked", etu, align=False),
        Phase("poa-ce", "unmasked", poa_ce, align=False),
        Phase("poa-align", "unmasked", poa_align, align=True),
    ]
    return phases, load


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(PretrainConfig, plan, argv, prog="pretrain/run.py")


if __name__ == "__main__":
    sys.exit(main())
