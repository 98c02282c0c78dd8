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

from anchoralign.config import PretrainConfig
from anchoralign.errors import RecordError, UserError
from anchoralign.linearize import LabelSet
from anchoralign.runlog import RunLog
from anchoralign.schedule import Phase
from anchoralign.schema import DatasetMeta, Sample, read_jsonl
from anchoralign.stages import stage_main, take

MASKED = "masked.jsonl"
UNMASKED = "unmasked.jsonl"


def read_corpus(cfg: PretrainConfig, name: str, meta: DatasetMeta) -> list[Sample]:
    """One corpus file; a missing one names the command that builds it."""
    path = cfg.corpus_path / name
    if not path.is_file():
        raise UserError(
            f"{path}: corpus file not found; build the corpus with "
            f"`augment run --dataset {cfg.dataset} --out {cfg.corpus_path}` "
            f"(or point --data.corpus-dir at a folder holding {MASKED} and {UNMASKED})"
        )
    samples = read_jsonl(path)
    check_labels(samples, meta, path)
    return samples


def check_labels(samples: Sequence[Sample], meta: DatasetMeta, path: Path) -> None:
    """Every label must be one of the dataset's: the model has label tokens for those only."""
    labels = LabelSet.from_meta(meta)
    for line, s in enumerate(samples, start=1):
        for kind, label in labels.unknown_labels(s)[:1]:
            field = "entities" if kind == "entity" else "relations"
            raise RecordError(str(path), line, f"{kind} type {label!r} is not a {meta.name} label", field)


def plan(cfg: PretrainConfig, meta: DatasetMeta, log: RunLog) -> tuple[list[Phase], dict[str, list[Sample]]]:
    etu, poa_ce, poa_align = cfg.phases.epochs
    sets: dict[str, list[Sample]] = {}
    if etu:
        sets["masked"] = take(read_corpus(cfg, MASKED, meta), cfg.data.limit_train, "masked-corpus", log)
    if poa_ce or poa_align:
        sets["unmasked"] = take(
            read_corpus(cfg, UNMASKED, meta), cfg.data.limit_train, "unmasked-corpus", log
        )
    phases = [
        Phase("etu", "masked", etu, align=False),
        Phase("poa-ce", "unmasked", poa_ce, align=False),
        Phase("poa-align", "unmasked", poa_align, align=True),
    ]
    return phases, sets


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(PretrainConfig, plan, argv, prog="pretrain/run.py")


if __name__ == "__main__":
    sys.exit(main())
