"""Evaluation: the one path by which a model is scored on a split, during training (the dev
checks, the best checkpoint, the switch of progressive activation) and by ``anchoralign evaluate``.

:func:`evaluate_split` decodes the inputs (ids and tokens only) with a :class:`DecodeConfig` and
scores them with ``anchoralign.metrics.score``. Two rates say how well-formed the outputs are:

- ``complete_rate``: the share of sentences whose three outputs, decoded as configured, ended with
  ``<eos>`` within the length bound and parsed with nothing dropped (with the grammar constraint
  only the length bound can fail);
- ``free_valid_rate`` (on request): the share whose *unconstrained* greedy outputs parse with
  nothing dropped and whose NER output is not empty: whether the model itself writes the output
  grammar (an empty output parses cleanly, so it does not count).

The trainer's :class:`Evaluator` adds the mean teacher-forced loss terms on the configured splits
(the alignment curves).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from anchoralign.config import DecodeConfig, LossConfig
from anchoralign.errors import UserError
from anchoralign.losses import LOSS_KEYS, term_weights
from anchoralign.schema import DatasetMeta, Sample

Batch = dict[str, Any]
LossFn = Callable[..., dict[str, torch.Tensor]]
Collate = Callable[[list[Sample]], Batch]


@dataclass
class EvalResult:
    scores: dict[str, Any]  # metrics.score of the eval split, plus the rates
    losses: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> mean loss terms
    predictions: list[Any] = field(default_factory=list)


class Evaluate(Protocol):
    def __call__(self, model: nn.Module, device: torch.device, validity: bool) -> EvalResult:
        """Scores of the eval split; with ``validity``, also ``free_valid_rate``."""
        ...


def selection_score(scores: Mapping[str, Any], metric: str | None) -> tuple[str, float]:
    """The figure that picks ``best/`` (and counts a plateau): ``metric`` (``eval.best_metric``), a
    score's name or several joined by ``+``, whose mean is taken (``ner_f1+rel_strict_f1`` for an
    extractor judged on both), else the score's own ``primary``. Returns its label and value; a name
    that is not a numeric score is a UserError listing those there are."""
    names = (metric or str(scores.get("primary", "rel_strict_f1"))).split("+")
    unknown = [n for n in names if not isinstance(scores.get(n), int | float)]
    if unknown or not all(names):
        numeric = sorted(k for k, v in scores.items() if isinstance(v, float))
        raise UserError(
            f"eval.best_metric '{metric}': {', '.join(unknown) or 'an empty name'} is not a score; "
            f"choose from {', '.join(numeric)}, or several joined by '+'"
        )
    value = sum(float(scores[n]) for n in names) / len(names)
    return (names[0] if len(names) == 1 else f"mean({', '.join(names)})"), value


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def evaluate_split(
    model: nn.Module,
    gold: Sequence[Sample],
    decode_cfg: DecodeConfig,
    meta: DatasetMeta,
    validity: bool = False,
    long: str = "split",
    where: Callable[[Sample], str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Decode ``gold``'s inputs and score them: ``metrics.score`` plus ``complete_rate``,
    ``n_split`` (inputs longer than the encoder, decoded in word windows), ``samples_per_second``
    and, with ``validity``, ``free_valid_rate``."""
    from anchoralign.decode import predict, predict_long
    from anchoralign.metrics import score

    inputs = [Sample(id=s.id, tokens=s.tokens) for s in gold]  # nothing of the answer can leak
    start = time.perf_counter()
    preds, split_ids = predict_long(model, inputs, decode_cfg, long=long, where=where, progress=progress)
    seconds = time.perf_counter() - start
    scores: dict[str, Any] = dict(
        score(
            gold,
            [p.sample for p in preds],
            symmetric=meta.symmetric_relations,
            boundary_only=meta.boundary_only,
        )
    )
    scores["complete_rate"] = sum(p.valid for p in preds) / max(1, len(preds))
    scores["n_split"] = len(split_ids)
    scores["samples_per_second"] = len(preds) / max(seconds, 1e-9)
    if validity:
        free = decode_cfg.model_copy(update={"constrained": False, "beam": 1})
        checked = predict(model, inputs, free)
        scores["free_valid_rate"] = sum(
            p.valid and bool(p.outputs.get("ner", [1])[:-1]) for p in checked
        ) / max(1, len(checked))
    return EvalResult(scores=scores, predictions=preds)


@torch.no_grad()
def mean_loss_terms(
    model: nn.Module,
    samples: Sequence[Sample],
    collate: Collate,
    loss_fn: LossFn,
    weights: Mapping[str, float],
    batch_size: int,
    device: torch.device | str,
) -> dict[str, float]:
    """Teacher-forced loss terms averaged over ``samples`` (each batch weighted by its size)."""
    totals = dict.fromkeys(LOSS_KEYS, 0.0)
    for i in range(0, len(samples), batch_size):
        chunk = list(samples[i : i + batch_size])
        batch = to_device(collate(chunk), device)
        terms = loss_fn(model(batch), batch, weights)
        for k in totals:
            totals[k] += float(terms[k]) * len(chunk)
    return {k: v / max(1, len(samples)) for k, v in totals.items()}


class Evaluator:
    """The trainer's evaluation: :func:`evaluate_split` on the eval split, and the loss terms on
    the loss splits (every configured term, also before it is switched on).

    Every rank runs the same evaluation (identical inputs and weights): under ZeRO-3 the forward
    passes gather parameters collectively, so all ranks must take part anyway.
    """

    def __init__(
        self,
        gold: Sequence[Sample],
        loss_sets: Mapping[str, Sequence[Sample]],
        collate: Collate,
        loss_fn: LossFn,
        loss_cfg: LossConfig,
        decode_cfg: DecodeConfig,
        meta: DatasetMeta,
    ):
        self.gold = list(gold)
        self.loss_sets = {k: list(v) for k, v in loss_sets.items()}
        self.collate, self.loss_fn = collate, loss_fn
        self.loss_cfg, self.decode_cfg, self.meta = loss_cfg, decode_cfg, meta

    def __call__(self, model: nn.Module, device: torch.device, validity: bool = False) -> EvalResult:
        result = evaluate_split(model, self.gold, self.decode_cfg, self.meta, validity)
        spans = getattr(model, "span_head", None) is not None
        relations = getattr(model, "relation_head", None) is not None
        weights = term_weights(self.loss_cfg, align=True, spans=spans, relations=relations)
        result.losses = {
            split: mean_loss_terms(
                model, samples, self.collate, self.loss_fn, weights, self.decode_cfg.batch_size, device
            )
            for split, samples in self.loss_sets.items()
        }
        return result
