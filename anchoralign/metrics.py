"""Scores for joint NER and relation extraction: pure functions over gold and predicted samples.

A generative model writes mentions as text, not as token offsets, so entities and relations are
compared by mention text (the mention's tokens joined by one space) and type, sentence by
sentence. Each sentence contributes a *set* of keys per family:

- NER: ``(mention, entity type)``;
- relation strict: ``(head mention, head type, tail mention, tail type, relation type)``;
- relation boundary: ``(head mention, tail mention, relation type)``.

Sets, not multisets: a mention that occurs twice in a sentence with the same type (or a
relation between two such mentions) is one key in the gold and one in the prediction, because
the model's output cannot say which occurrence it meant. For the same reason, a prediction that
repeats an entity or a relation is neither rewarded nor penalised for the repeat. The same
mention with two different types is two keys.

The same three families are also keyed by token offsets (``ner_offsets``, ``rel_strict_offsets``,
``rel_boundary_offsets``): a mention is its ``(start, end)`` instead of its text, so each
occurrence of a repeated mention is a key of its own. That is how span-based extractors (SpERT
and its kin) score CoNLL04 and the like, so it is the figure to set beside theirs. It asks more
of a generative model: a repeated gold mention is a key per occurrence, and the model has to copy
the right one. On CoNLL04 test the gold has 1,079 entities and 422 relations by offsets, 1,059
and 407 by text.

For a *symmetric* relation type the two arguments are put in a canonical (sorted) order before
comparison, so ``(a, r, b)`` matches ``(b, r, a)`` and a gold pair annotated in both directions
counts once. Asymmetric relation types keep their direction.

Figures are micro-averaged: true positives, predicted and gold keys are summed over all sentences
before precision, recall and F1 are taken, and reported as percentages; a zero denominator
gives 0.0. Gold and predicted samples are matched by ``id``; a gold sentence without a
prediction is scored as an empty prediction and counted in ``n_missing_pred``.

``boundary_only`` (NYT) changes no figure: it only sets ``primary`` to ``"rel_boundary_f1"``, the
headline number for datasets whose entity types are not annotated but derived by the loader
(strict figures are still reported, but they measure those derived types). Otherwise
``primary`` is ``"rel_strict_f1"``.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from anchoralign.errors import UserError
from anchoralign.schema import Sample

# Families keyed by mention text, then the same keyed by token offsets (see the docstring).
TEXT_FAMILIES = ("ner", "rel_strict", "rel_boundary")
OFFSETS = "_offsets"
FAMILIES = (*TEXT_FAMILIES, *(f"{family}{OFFSETS}" for family in TEXT_FAMILIES))
FIGURES = tuple(f"{family}_{figure}" for family in FAMILIES for figure in ("p", "r", "f1"))
COUNTS = tuple(f"{family}_{count}" for family in FAMILIES for count in ("tp", "n_pred", "n_gold"))

# A score result: the FIGURES (percentages), the COUNTS, "n_samples", "n_missing_pred", "primary".
Metrics = dict[str, float | int | str]


Mention = str | tuple[int, int]


def _mention(sample: Sample, i: int, offsets: bool) -> Mention:
    """Entity ``i`` as a key: its text, or its ``(start, end)`` token offsets."""
    e = sample.entities[i]
    return (e.start, e.end) if offsets else sample.mention(i)


def entity_keys(sample: Sample, offsets: bool = False) -> set[tuple[Mention, str]]:
    """NER keys of one sentence: ``(mention, entity type)``."""
    return {(_mention(sample, i, offsets), e.type) for i, e in enumerate(sample.entities)}


def strict_relation_keys(
    sample: Sample, symmetric: Collection[str] = (), offsets: bool = False
) -> set[tuple[Mention, str, Mention, str, str]]:
    """Strict relation keys: ``(head, head type, tail, tail type, relation)``, symmetric ones sorted."""
    keys = set()
    for r in sample.relations:
        head = (_mention(sample, r.head, offsets), sample.entities[r.head].type)
        tail = (_mention(sample, r.tail, offsets), sample.entities[r.tail].type)
        if r.type in symmetric:
            head, tail = sorted((head, tail))
        keys.add((*head, *tail, r.type))
    return keys


def boundary_relation_keys(
    sample: Sample, symmetric: Collection[str] = (), offsets: bool = False
) -> set[tuple[Mention, Mention, str]]:
    """Boundary relation keys: ``(head, tail, relation)``, the two mentions sorted for symmetric ones."""
    keys = set()
    for r in sample.relations:
        head, tail = _mention(sample, r.head, offsets), _mention(sample, r.tail, offsets)
        if r.type in symmetric:
            head, tail = sorted((head, tail))
        keys.add((head, tail, r.type))
    return keys


@dataclass
class Counts:
    """Micro-average accumulator of one family."""

    tp: int = 0
    n_pred: int = 0
    n_gold: int = 0

    def add(self, gold: set, pred: set) -> None:
        self.tp += len(gold & pred)
        self.n_pred += len(pred)
        self.n_gold += len(gold)

    def prf(self) -> tuple[float, float, float]:
        return prf(self.tp, self.n_pred, self.n_gold)


def prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    """Precision, recall and F1 as percentages; 0.0 wherever a denominator is zero."""
    p = 100.0 * tp / n_pred if n_pred else 0.0
    r = 100.0 * tp / n_gold if n_gold else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f1


def _by_id(samples: Iterable[Sample], role: str) -> dict[str, Sample]:
    out: dict[str, Sample] = {}
    for s in samples:
        if s.id in out:
            raise UserError(f"{role} sample id {s.id!r} occurs more than once; ids must be unique to match")
        out[s.id] = s
    return out


def score(
    gold: Sequence[Sample],
    pred: Sequence[Sample],
    symmetric: Collection[str] = (),
    boundary_only: bool = False,
) -> Metrics:
    """Micro P/R/F1 of NER, strict and boundary relations (see the module docstring for the rules).

    Raises UserError when an id repeats, when a prediction has an id that is not in the gold, or
    when a prediction's tokens differ from its gold sentence's (a sign of scoring the wrong file).
    """
    gold_by_id = _by_id(gold, "gold")
    pred_by_id = _by_id(pred, "predicted")
    for pid, p in pred_by_id.items():
        if pid not in gold_by_id:
            raise UserError(f"predicted sample id {pid!r} is not in the gold samples")
        if p.tokens != gold_by_id[pid].tokens:
            raise UserError(f"sample id {pid!r}: the predicted tokens differ from the gold tokens")
    symmetric = frozenset(symmetric)

    keys_of = {}
    for suffix, offsets in (("", False), (OFFSETS, True)):
        keys_of[f"ner{suffix}"] = partial(entity_keys, offsets=offsets)
        keys_of[f"rel_strict{suffix}"] = partial(strict_relation_keys, symmetric=symmetric, offsets=offsets)
        keys_of[f"rel_boundary{suffix}"] = partial(
            boundary_relation_keys, symmetric=symmetric, offsets=offsets
        )
    counts = {family: Counts() for family in FAMILIES}
    missing = 0
    for gid, g in gold_by_id.items():
        p = pred_by_id.get(gid)
        missing += p is None
        for family, keys in keys_of.items():
            counts[family].add(keys(g), keys(p) if p is not None else set())

    result: Metrics = {}
    for family, c in counts.items():
        p, r, f1 = c.prf()
        result.update({f"{family}_p": p, f"{family}_r": r, f"{family}_f1": f1})
        result.update({f"{family}_tp": c.tp, f"{family}_n_pred": c.n_pred, f"{family}_n_gold": c.n_gold})
    result["n_samples"] = len(gold_by_id)
    result["n_missing_pred"] = missing
    result["primary"] = "rel_boundary_f1" if boundary_only else "rel_strict_f1"
    return result


def average_folds(folds: Sequence[Mapping[str, float | int | str]]) -> Metrics:
    """Combine the results of cross-validation folds (ADE's 10) into one.

    Each figure is the mean over folds (the usual way fold results are reported, rather than a
    micro-average over all folds), with its population standard deviation (numpy's default) as
    ``<figure>_std``; counts, ``n_samples`` and ``n_missing_pred`` are summed; ``folds`` is the
    number of folds. Every fold must name the same ``primary`` figure.
    """
    if not folds:
        raise ValueError("average_folds needs at least one fold result")
    primaries = {f["primary"] for f in folds}
    if len(primaries) != 1:
        raise ValueError(f"the folds disagree on the primary figure: {sorted(primaries)}")
    out: Metrics = {}
    for key in FIGURES:
        values = [float(f[key]) for f in folds]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.pstdev(values)
    for key in (*COUNTS, "n_samples", "n_missing_pred"):
        out[key] = sum(int(f[key]) for f in folds)
    out["folds"] = len(folds)
    out["primary"] = primaries.pop()
    return out
