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
    """Span logits [N, W, L, types + 1] from word states [N, W, H] (each word's first sub-word)
    and, for a ``pooled`` head, word maxima [N, W, H] (each word's maximum over its sub-words:
    :func:`word_maxima`).

    A two-layer classifier of [first word; last word; width; (pooled) the maximum over the span]
    in which the first layer is split into its parts (``start``, ``end``, ``width``, ``pool``), so
    that it is applied to W words, not to W x L spans: the same function, L times less work.
    Pooling: on CoNLL04, fitted over the frozen encoder of ``--model joint``, +0.46 dev and +0.33
    test NER F1 over 3 seeds (BENCHMARKS.md, "A span head over the trained encoder"): the first
    and last word's first sub-words miss the rest of a long name.
    """

    def __init__(self, hidden: int, n_types: int, width: int, dropout: float = 0.1, pooled: bool = False):
        super().__init__()
        if width < 1:
            raise ValueError(f"span head width must be >= 1, got {width}")
        self.width = width
        self.start = nn.Linear(hidden, hidden)
        self.end = nn.Linear(hidden, hidden, bias=False)
        self.pool = nn.Linear(hidden, hidden, bias=False) if pooled else None
        self.widths = nn.Embedding(width, hidden)
        self.out = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_types + 1))

    @property
    def pooled(self) -> bool:
        return self.pool is not None

    def forward(self, words: torch.Tensor, maxima: torch.Tensor | None = None) -> torch.Tensor:
        n_words = words.shape[1]
        last = span_ends(n_words, self.width, words.device).clamp(max=n_words - 1)
        ends = self.end(words)[:, last]  # [N, W, L, H]
        x = self.start(words)[:, :, None] + ends + self.widths.weight
        if self.pool is not None:
            if maxima is None:
                raise ValueError("a pooled span head needs the word maxima")
            x = x + self.pool(span_maxima(maxima, self.width))
        return self.out(x)


def span_maxima(maxima: torch.Tensor, width: int) -> torch.Tensor:
    """[N, W, L, H]: the elementwise maximum of ``maxima`` [N, W, H] over the words of each span
    (start ``i``, width ``w + 1``; spans past the last word repeat its value: they are masked)."""
    n_words = maxima.shape[1]
    last = span_ends(n_words, width, maxima.device).clamp(max=n_words - 1)
    running = [maxima]
    for w in range(1, width):
        running.append(torch.maximum(running[-1], maxima[:, last[:, w]]))
    return torch.stack(running, 2)


def word_maxima(
    hidden: torch.Tensor, words: torch.Tensor, word_starts: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """[N, W, H]: each word's elementwise maximum over the states of its sub-words, from the encoder
    output ``hidden`` [N, S, H], the first sub-word of each word ``word_starts`` [N, W] (0 past
    the last word: position 0 is the start token) and ``attention_mask`` [N, S]; a word's sub-words
    run up to the next word's first, the last word's up to the end token. A word without sub-words
    (0 past the last, or a word the tokenizer gave none) takes its state in ``words`` [N, W, H],
    the state at its start (``AnchorAlignModel.word_states``)."""
    n, s, h = hidden.shape
    real = word_starts > 0
    starts = torch.where(real, word_starts, s)  # past every position: never counted below
    positions = torch.arange(s, device=hidden.device)
    word_of = (starts[:, None, :] <= positions[None, :, None]).sum(-1) - 1  # [N, S]
    end_token = attention_mask.sum(1, keepdim=True) - 1
    inside = (word_of >= 0) & (positions[None] < end_token)
    slot = torch.where(inside, word_of, word_starts.shape[1])  # outside: a spare row, dropped
    out = hidden.new_full((n, word_starts.shape[1] + 1, h), float("-inf"))
    out = out.scatter_reduce(1, slot[..., None].expand(-1, -1, h), hidden, "amax")[:, :-1]
    return torch.where(torch.isinf(out), words, out)


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
