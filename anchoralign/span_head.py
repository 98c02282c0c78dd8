"""The span head: an optional NER component that classifies every span of up to ``width`` words
from the encoder's output, as span-based extractors do, beside the generative NER decoder.

Why it exists: on CoNLL04 the generative NER decoder trails a span-based model on the same encoder
by about 2 F1, and boundaries are where it loses (BENCHMARKS.md: most of the mentions it gets
wrong it writes with other boundaries or not at all). A span is represented by its first and last
word's encoder states and its width, and classified as one entity type or none; decoding keeps
the most probable spans that do not overlap. With ``decode.ner_source`` its mentions replace the
NER decoder's among the entities reported; relations stay anchored on the NER decoder's mentions
unless ``decode.anchor`` is ``reported``.

Class 0 is "not an entity"; class ``i + 1`` is entity type ``i`` of the label set. Spans are laid
out ``[W, L]``: start word ``i``, width ``w + 1``, covering words ``i .. i + w``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anchoralign.linearize import IGNORE, Span

NOT_ENTITY = 0


class SpanHead(nn.Module):
    """Span logits [N, W, L, types + 1] from word states [N, W, H].

    A two-layer classifier of [first word; last word; width] in which the first layer is split
    into its three parts (``start``, ``end``, ``width``), so that it is applied to W words, not to
    W x L spans: the same function, L times less work.
    """

    def __init__(self, hidden: int, n_types: int, width: int, dropout: float = 0.1):
        super().__init__()
        if width < 1:
            raise ValueError(f"span head width must be >= 1, got {width}")
        self.width = width
        self.start = nn.Linear(hidden, hidden)
        self.end = nn.Linear(hidden, hidden, bias=False)
        self.widths = nn.Embedding(width, hidden)
        self.out = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_types + 1))

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        n_words = words.shape[1]
        last = span_ends(n_words, self.width, words.device).clamp(max=n_words - 1)
        ends = self.end(words)[:, last]  # [N, W, L, H]
        x = self.start(words)[:, :, None] + ends + self.widths.weight
        return self.out(x)


def span_ends(n_words: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """[W, L]: the last word of the span that starts at word ``i`` with width ``w + 1``."""
    return torch.arange(n_words, device=device)[:, None] + torch.arange(width, device=device)


def span_mask(word_mask: torch.Tensor, width: int) -> torch.Tensor:
    """[N, W, L] whether each span lies within its sentence (``word_mask`` [N, W])."""
    n_words = word_mask.sum(1)
    ends = span_ends(word_mask.shape[1], width, word_mask.device)
    return word_mask[:, :, None] & (ends[None] < n_words[:, None, None])


def span_labels(
    mentions: Sequence[Sequence[Span]],
    n_words: Sequence[int],
    padded_words: int,
    width: int,
    types: Sequence[str],
) -> torch.Tensor:
    """[N, W, L] gold classes: the type's class for a mention, 0 for any other span of the
    sentence, ``IGNORE`` outside it. Mentions wider than ``width`` words have no place: see
    :func:`too_wide`."""
    index = {t: i + 1 for i, t in enumerate(types)}
    ends = span_ends(padded_words, width)
    n = torch.tensor(list(n_words), dtype=torch.long)
    inside = (torch.arange(padded_words)[None, :, None] < n[:, None, None]) & (ends[None] < n[:, None, None])
    labels = torch.where(inside, NOT_ENTITY, IGNORE)
    for b, spans in enumerate(mentions):
        for start, end, label in spans:
            if end - start <= width:
                labels[b, start, end - start - 1] = index[label]
    return labels


def too_wide(mentions: Sequence[Sequence[Span]], width: int) -> int:
    """How many of ``mentions`` a span head of ``width`` cannot find."""
    return sum(end - start > width for spans in mentions for start, end, _ in spans)


def span_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the spans whose label is not ``IGNORE`` (0 when there are none);
    logits [N, W, L, C] in any dtype, the softmax in float32."""
    n_spans = (labels != IGNORE).sum()
    total = F.cross_entropy(
        logits.float().flatten(0, 2), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return total / n_spans.clamp(min=1)


def decode_spans(
    logits: torch.Tensor, n_words: int, types: Sequence[str], threshold: float = 0.5
) -> list[Span]:
    """The mentions of one sentence (logits [W, L, C]): each span whose probability of being an
    entity, 1 - p(not an entity), is above ``threshold``, typed by its most probable type; most
    probable first, skipping any that overlaps one already kept; in sentence order."""
    width = logits.shape[1]
    probs = logits[:n_words].float().softmax(-1)
    entity_p = 1 - probs[..., NOT_ENTITY]
    best = probs[..., NOT_ENTITY + 1 :].argmax(-1)
    inside = span_ends(probs.shape[0], width, logits.device) < n_words
    found = ((entity_p > threshold) & inside).nonzero().tolist()
    found.sort(key=lambda iw: -entity_p[iw[0], iw[1]].item())
    taken: list[Span] = []
    for i, w in found:
        start, end = i, i + w + 1
        if all(end <= s or e <= start for s, e, _ in taken):
            taken.append((start, end, types[int(best[i, w])]))
    return sorted(taken)
