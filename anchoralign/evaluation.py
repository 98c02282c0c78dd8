"""Evaluation during training: dev scores with the metrics of ``anchoralign.metrics``, the share
of outputs that parse into valid structures (the gate of progressive activation), and the mean
loss terms on the configured splits (the alignment curves of the paper's appendix).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from anchoralign.losses import LOSS_KEYS, LossWeights
from anchoralign.schema import Sample

Batch = dict[str, Any]
LossFn = Callable[
    [Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], LossWeights], dict[str, torch.Tensor]
]
Collate = Callable[[list[Sample]], Batch]


@dataclass
class EvalResult:
    scores: dict[str, Any]  # metrics.score of the eval split, plus "valid_rate"
    losses: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> mean loss terms


class Evaluate(Protocol):
    def __call__(self, model: nn.Module, device: torch.device, validity: bool) -> EvalResult:
        """Scores of the eval split; with ``validity``, ``valid_rate`` must say how many of the
        model's own (unconstrained) outputs parse into valid structures."""
        ...


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


@torch.no_grad()
def mean_loss_terms(
    model: nn.Module,
    samples: Sequence[Sample],
    collate: Collate,
    loss_fn: LossFn,
    weights: LossWeights,
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
    """Scores the eval split with the real decoder and logs loss terms on the loss splits.

    Every rank runs the same evaluation (identical inputs and weights): under ZeRO-3 the forward
    passes gather parameters collectively, so all ranks must take part anyway.

    ``valid_rate`` is the share of predictions whose three outputs parse with nothing dropped.
    Constrained decoding makes every output parse, so when the switch needs to know whether the
    model itself writes valid structures, the rate comes from a second, unconstrained greedy pass.
    """

    def __init__(
        self,
        gold: Sequence[Sample],
        loss_sets: Mapping[str, Sequence[Sample]],
        collate: Collate,
        loss_fn: LossFn,
        weights: LossWeights,
        decode_cfg: Any,
        symmetric: frozenset[str],
        boundary_only: bool,
        batch_size: int,
    ):
        self.gold = list(gold)
        # Only id and tokens go to the decoder: nothing of the answer can leak into it.
        self.inputs = [Sample(id=s.id, tokens=s.tokens) for s in self.gold]
        self.loss_sets = {k: list(v) for k, v in loss_sets.items()}
        self.collate, self.loss_fn, self.weights = collate, loss_fn, weights
        self.decode_cfg = decode_cfg
        self.symmetric, self.boundary_only = symmetric, boundary_only
        self.batch_size = batch_size

    def __call__(self, model: nn.Module, device: torch.device, validity: bool = False) -> EvalResult:
        from anchoralign.decode import predict
        from anchoralign.metrics import score

        preds = predict(model, self.inputs, self.decode_cfg)
        scores: dict[str, Any] = dict(
            score(
                self.gold,
                [p.sample for p in preds],
                symmetric=self.symmetric,
                boundary_only=self.boundary_only,
            )
        )
        checked = preds
        if validity and self.decode_cfg.constrained:
            free = dataclasses.replace(self.decode_cfg, constrained=False, beam_size=1)
            checked = predict(model, self.inputs, free)
        scores["valid_rate"] = sum(p.valid for p in checked) / max(1, len(checked))
        scores["valid_rate_of"] = (
            "constrained" if checked is preds and self.decode_cfg.constrained else "unconstrained"
        )
        losses = {
            split: mean_loss_terms(
                model, samples, self.collate, self.loss_fn, self.weights, self.batch_size, device
            )
            for split, samples in self.loss_sets.items()
        }
        return EvalResult(scores=scores, losses=losses)
