"""The relation head: a classifier of every ordered pair of found entities, fitted on a trained
model's frozen encoder, whose vote joins the RE decoders' in the relations reported.

Why it exists: on CoNLL04 40-50% of the gold relations the decoders miss join two entities the
model found with the right spans and types (``quality_protocol.py --errors``); a span-based
extractor classifies exactly those pairs. The head does the same over the encoder of a finished
model, so it costs one short fit (``anchoralign fit-relation-head``), not a new training run.

A pair (head, tail) is represented by, for each of its two entities, the max over its words'
encoder states, a learned embedding of its type and one of its width; the max over the words
between the two entities (zeros when they touch); and the encoder's state at the sentence start.
A two-layer network gives one independent logit per relation type (several relations may join
one pair). ``RelationHeads`` holds one or more such heads and averages their probabilities.

The vote (``vote``): a relation the decoders wrote is kept when the head gives it a probability
above ``keep``; one they did not write is added above ``add``. Both thresholds are chosen on dev
when the head is fitted (``choose_thresholds``), so the head can both repair recall and veto.
Relations whose arguments are not among the scored entities are left as the decoders wrote them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anchoralign.linearize import Span, Triple

# Widths above this share the last width embedding (CoNLL04 mentions: 99.9% have at most 8 words).
MAX_WIDTH = 12
# Threshold grids of choose_thresholds, each starting from the choice that changes nothing: keep
# 0 (keep every relation the decoders wrote) .. 0.95; add 1 (add none) .. 0.05.
KEEP_GRID = tuple(round(0.05 * i, 2) for i in range(20))
ADD_GRID = tuple(round(1 - 0.05 * i, 2) for i in range(20))


class RelationHead(nn.Module):
    """Logits [P, relations] of candidate pairs from the word states of a batch of sentences."""

    def __init__(
        self,
        hidden: int,
        n_types: int,
        n_relations: int,
        inner: int = 384,
        dropout: float = 0.2,
        type_dim: int = 32,
        width_dim: int = 16,
    ):
        super().__init__()
        self.types = nn.Embedding(n_types, type_dim)
        self.widths = nn.Embedding(MAX_WIDTH, width_dim)
        entity = hidden + type_dim + width_dim
        self.mlp = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(2 * entity + 2 * hidden, inner),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(inner, n_relations),
        )

    def forward(
        self, words: torch.Tensor, starts: torch.Tensor, entities: torch.Tensor, pairs: torch.Tensor
    ) -> torch.Tensor:
        """``words`` [B, W, H] (padded), ``starts`` [B, H]; ``entities`` [E, 4] (sentence, start,
        end, type id) and ``pairs`` [P, 2] (head and tail rows of ``entities``, one sentence each),
        as ``pair_inputs`` lays them out."""
        sentence, bounds = entities[:, 0], entities[:, 1:3]
        position = torch.arange(words.shape[1], device=words.device)
        inside = (position >= bounds[:, :1]) & (position < bounds[:, 1:])  # [E, W]
        width = (bounds[:, 1] - bounds[:, 0]).clamp(max=MAX_WIDTH - 1)
        reps = torch.cat(
            [_masked_max(words[sentence], inside), self.types(entities[:, 3]), self.widths(width)], dim=-1
        )
        first, second = bounds[pairs[:, 0]], bounds[pairs[:, 1]]
        gap_start = torch.minimum(first[:, 1], second[:, 1])
        gap_end = torch.maximum(first[:, 0], second[:, 0])
        between = (position >= gap_start[:, None]) & (position < gap_end[:, None])  # [P, W]
        pair_sentence = sentence[pairs[:, 0]]
        x = torch.cat(
            [
                reps[pairs[:, 0]],
                reps[pairs[:, 1]],
                _masked_max(words[pair_sentence], between),
                starts[pair_sentence],
            ],
            dim=-1,
        )
        return self.mlp(x)


class RelationHeads(nn.Module):
    """``k`` relation heads, trained side by side from different initial weights; their mean
    probability is the vote's (an ensemble: a single fit's result moves with its seed)."""

    def __init__(self, hidden: int, n_types: int, n_relations: int, k: int = 1):
        super().__init__()
        if k < 1:
            raise ValueError(f"a relation head ensemble needs at least one head, got {k}")
        self.heads = nn.ModuleList(RelationHead(hidden, n_types, n_relations) for _ in range(k))

    def forward(
        self, words: torch.Tensor, starts: torch.Tensor, entities: torch.Tensor, pairs: torch.Tensor
    ) -> torch.Tensor:
        """[P, relations]: the heads' mean probability (``RelationHead.forward`` for the inputs)."""
        return torch.sigmoid(self.logits(words, starts, entities, pairs).float()).mean(0)

    def logits(
        self, words: torch.Tensor, starts: torch.Tensor, entities: torch.Tensor, pairs: torch.Tensor
    ) -> torch.Tensor:
        """[heads, P, relations]: each head's logits (what training scores)."""
        return torch.stack([h(words, starts, entities, pairs) for h in self.heads])


def _masked_max(words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, H]: the max of ``words`` [N, W, H] over the positions of ``mask`` [N, W]; zeros for none."""
    filled = words.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)
    return torch.where(mask.any(dim=1, keepdim=True), filled, torch.zeros_like(filled))


def pair_inputs(
    sentences: Sequence[tuple[Sequence[tuple[int, int, int]], Sequence[tuple[int, int]]]],
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``RelationHead`` inputs ``entities`` [E, 4] and ``pairs`` [P, 2] of a batch: each sentence's
    typed spans and its index pairs into them (``entity_pairs``), pairs in sentence order."""
    entities, pairs, offset = [], [], 0
    for b, (spans, sentence_pairs) in enumerate(sentences):
        entities += [(b, start, end, label) for start, end, label in spans]
        pairs += [(offset + i, offset + j) for i, j in sentence_pairs]
        offset += len(spans)
    return (
        torch.tensor(entities, dtype=torch.long, device=device).reshape(-1, 4),
        torch.tensor(pairs, dtype=torch.long, device=device).reshape(-1, 2),
    )


def typed_spans(spans: Sequence[Span], entity_types: Sequence[str]) -> list[tuple[int, int, int]]:
    """``spans`` with each type as its index in ``entity_types`` (the head's type embedding row)."""
    index = {label: i for i, label in enumerate(entity_types)}
    return [(start, end, index[label]) for start, end, label in spans]


def entity_pairs(spans: Sequence[Span]) -> list[tuple[int, int]]:
    """Ordered index pairs of ``spans`` whose mentions differ (an entity never relates to its own span)."""
    return [(i, j) for i, j in itertools.permutations(range(len(spans)), 2) if spans[i][:2] != spans[j][:2]]


def pair_targets(
    spans: Sequence[Span],
    pairs: Sequence[tuple[int, int]],
    triples: Iterable[Triple],
    relations: Sequence[str],
) -> torch.Tensor:
    """[P, relations] float: 1 where (head, tail, relation) is one of ``triples``."""
    gold = set(triples)
    rows = [[float((spans[i], spans[j], r) in gold) for r in relations] for i, j in pairs]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(pairs), len(relations))


def pair_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy summed over pairs and relation types (and heads, given their stacked
    logits): a sentence with more candidate pairs weighs more, as it holds more decisions."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")


def pair_probabilities(
    spans: Sequence[Span], pairs: Sequence[tuple[int, int]], probs: torch.Tensor, relations: Sequence[str]
) -> dict[Triple, float]:
    """Each (head, tail, relation) triple of ``pairs`` with its probability (``probs`` [P, relations])."""
    rows = probs.tolist()
    return {
        (spans[i], spans[j], r): p
        for (i, j), row in zip(pairs, rows, strict=True)
        for r, p in zip(relations, row, strict=True)
    }


def vote(predicted: Iterable[Triple], probs: Mapping[Triple, float], keep: float, add: float) -> list[Triple]:
    """The relations reported: each predicted triple the head scores above ``keep`` (or does not score),
    then each other scored triple above ``add``; predicted ones first, in their order."""
    predicted = list(dict.fromkeys(predicted))
    written = set(predicted)
    kept = [t for t in predicted if t not in probs or probs[t] > keep]
    added = [t for t, p in probs.items() if t not in written and p > add]
    return kept + added


def choose_thresholds(
    f1_of: Callable[[float, float], float],
    keep_grid: Sequence[float] = KEEP_GRID,
    add_grid: Sequence[float] = ADD_GRID,
) -> tuple[float, float, float]:
    """``(keep, add, f1)`` maximising ``f1_of(keep, add)`` over the grids; ties go to the first found,
    with the default grids the fewest changes to the decoders' relations (so the head changes
    nothing unless that scores better: (0, 1) is the decoders' own output)."""
    best = (keep_grid[0], add_grid[0], f1_of(keep_grid[0], add_grid[0]))
    for keep in keep_grid:
        for add in add_grid:
            f1 = f1_of(keep, add)
            if f1 > best[2]:
                best = (keep, add, f1)
    return best
