"""Training losses: pure functions on restricted-vocabulary logits.

Every decoder scores, at each target position, the restricted vocabulary of its sentence
(structure symbols, label tokens, one pointer per input word; see docs/CONTRACTS.md). Logits are
``[B, T, V]`` with ``vocab_mask [B, V]`` saying which ids exist for each sentence; ids outside the
mask get zero probability here whatever the model put in their logits, and every softmax is
taken in float32 so that bf16/fp16 training gets the same numbers.

Terms (weighted and summed by :func:`loss_terms`):

- cross-entropy of each decoder (NER, forward RE, reverse RE) on its target;
- NER-RE alignment: KL(p_NER || p_RE) on the target positions where an RE decoder emits a token of
  an anchor entity that the NER decoder also emits, with the NER decoder as a fixed teacher;
- forward-reverse alignment: symmetric KL between the two RE decoders on the positions of the
  gold triples both emit;
- negative suppression: ``-log(1 - p(v))`` over the ids that occur in none of the sentence's gold
  targets, at every RE decoding step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100

# Large and finite: -inf would turn 0 * log 0 into NaN in the KL terms. The fill is applied after
# the cast to float32, so it is safe whatever the logits' dtype.
_MASKED = torch.finfo(torch.float32).min

# Floor for 1 - p in the suppression term: caps one id's penalty at -log(1e-6) ~ 13.8 instead of
# +inf when a negative id takes (numerically) all the mass. CE on the target pushes such an id
# down anyway; the floor only keeps the loss and its gradient finite.
SUPPRESS_EPS = 1e-6


def masked_log_probs(logits: torch.Tensor, vocab_mask: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax over the valid ids; ``vocab_mask`` broadcasts against ``logits``."""
    return torch.log_softmax(logits.float().masked_fill(~vocab_mask, _MASKED), dim=-1)


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=like.device)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_mask: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over the positions whose label is not -100 (0 when there are none).

    logits [B,T,V], labels [B,T], vocab_mask [B,V]. Every label must be a valid id of its sentence.
    """
    log_p = masked_log_probs(logits, vocab_mask[:, None, :])
    n_tokens = (labels != IGNORE).sum()
    total = F.nll_loss(log_p.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return total / n_tokens.clamp(min=1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim, counting only valid ids (masked ids have p = q = 0)."""
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(valid, terms, torch.zeros_like(terms)).sum(-1)


def _paired(
    first: torch.Tensor, second: torch.Tensor, pairs: torch.Tensor, vocab_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities [P,V] of both decoders at the paired positions, and their valid ids [P,V]."""
    b, t1, t2 = pairs.long().unbind(-1)
    valid = vocab_mask[b]
    return masked_log_probs(first[b, t1], valid), masked_log_probs(second[b, t2], valid), valid


def ner_re_alignment(
    ner_logits: torch.Tensor, re_logits: torch.Tensor, pairs: torch.Tensor, vocab_mask: torch.Tensor
) -> torch.Tensor:
    """Mean KL(p_NER || p_RE) over the paired positions; 0 without pairs.

    pairs [P,3] = (batch index, position in the NER target, position in the RE target). The NER
    distribution is detached: it is the teacher. Entity recognition is the easier, better-learned
    task, and the term exists to carry that knowledge into the RE decoders; with gradient through
    both sides the KL could also be lowered by dragging the NER decoder towards the noisier RE
    decoders, which would cost NER accuracy for nothing.
    """
    if pairs.numel() == 0:
        return _zero(re_logits)
    log_p, log_q, valid = _paired(ner_logits.detach(), re_logits, pairs, vocab_mask)
    return _kl(log_p, log_q, valid).mean()


def fwd_rev_alignment(
    fwd_logits: torch.Tensor, rev_logits: torch.Tensor, pairs: torch.Tensor, vocab_mask: torch.Tensor
) -> torch.Tensor:
    """Mean symmetric KL 0.5 * (KL(p||q) + KL(q||p)) over paired positions; 0 without pairs.

    pairs [P,3] = (batch index, position in the forward target, position in the reverse target).
    Neither decoder is the better one, so both receive gradient.
    """
    if pairs.numel() == 0:
        return _zero(fwd_logits)
    log_p, log_q, valid = _paired(fwd_logits, rev_logits, pairs, vocab_mask)
    return (0.5 * (_kl(log_p, log_q, valid) + _kl(log_q, log_p, valid))).mean()


def negative_suppression(
    logits: torch.Tensor, labels: torch.Tensor, neg_mask: torch.Tensor, vocab_mask: torch.Tensor
) -> torch.Tensor:
    """Mean over decoding steps of the average ``-log(1 - p(v))`` over the negative ids ``v``.

    logits [B,T,V]; labels [B,T] (steps are the positions whose label is not -100); neg_mask [B,V]:
    ids of the sentence's restricted vocabulary that occur in none of its gold targets. A sentence
    without negative ids contributes 0 at its steps. ``1 - p`` is floored at SUPPRESS_EPS.
    """
    neg = neg_mask & vocab_mask
    p = masked_log_probs(logits, vocab_mask[:, None, :]).exp()
    penalty = -torch.log((1.0 - p).clamp(min=SUPPRESS_EPS))  # [B,T,V]
    penalty = torch.where(neg[:, None, :], penalty, torch.zeros_like(penalty))
    per_step = penalty.sum(-1) / neg.sum(-1, keepdim=True).clamp(min=1)  # [B,T]
    steps = labels != IGNORE
    return per_step[steps].sum() / steps.sum().clamp(min=1)


@dataclass(frozen=True)
class LossWeights:
    """Weights and switches of the loss terms.

    A switched-off term, or one with weight 0, is not computed and is reported as 0; the paper's
    ablations and the progressive activation of the alignment terms are therefore config values.
    """

    alpha: float  # NER-RE alignment
    beta: float  # forward-reverse alignment
    gamma: float  # negative suppression
    ner_re: bool = True
    fwd_rev: bool = True
    suppress: bool = True
    ce: bool = True  # the three cross-entropies (off only for diagnostics)

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


LOSS_KEYS = ("ce_ner", "ce_fwd", "ce_rev", "kl_ner_re", "kl_fwd_rev", "suppress", "loss")


def weighted_total(terms: Mapping[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    """The training objective from the unweighted terms: the three cross-entropies plus
    alpha, beta and gamma times the NER-RE, forward-reverse and suppression terms."""
    return (
        terms["ce_ner"]
        + terms["ce_fwd"]
        + terms["ce_rev"]
        + weights.alpha * terms["kl_ner_re"]
        + weights.beta * terms["kl_fwd_rev"]
        + weights.gamma * terms["suppress"]
    )


def loss_terms(
    outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], weights: LossWeights
) -> dict[str, torch.Tensor]:
    """Every term (unweighted) and the weighted total ``loss``, as float32 scalar tensors.

    outputs: ``ner_logits``, ``fwd_logits``, ``rev_logits`` [B,T,V]; batch: ``vocab_mask``,
    ``neg_mask``, ``{ner,fwd,rev}_labels`` and ``ner_fwd_pairs``, ``ner_rev_pairs``,
    ``fwd_rev_pairs`` as built by the collator. The NER-RE and suppression terms average the
    forward and reverse decoders.
    """
    ner, fwd, rev = outputs["ner_logits"], outputs["fwd_logits"], outputs["rev_logits"]
    vocab_mask = batch["vocab_mask"]
    terms = {key: _zero(ner) for key in LOSS_KEYS}
    if weights.ce:
        for name, logits in (("ner", ner), ("fwd", fwd), ("rev", rev)):
            terms[f"ce_{name}"] = cross_entropy(logits, batch[f"{name}_labels"], vocab_mask)
    if weights.ner_re and weights.alpha > 0:
        terms["kl_ner_re"] = 0.5 * (
            ner_re_alignment(ner, fwd, batch["ner_fwd_pairs"], vocab_mask)
            + ner_re_alignment(ner, rev, batch["ner_rev_pairs"], vocab_mask)
        )
    if weights.fwd_rev and weights.beta > 0:
        terms["kl_fwd_rev"] = fwd_rev_alignment(fwd, rev, batch["fwd_rev_pairs"], vocab_mask)
    if weights.suppress and weights.gamma > 0:
        neg_mask = batch["neg_mask"]
        terms["suppress"] = 0.5 * (
            negative_suppression(fwd, batch["fwd_labels"], neg_mask, vocab_mask)
            + negative_suppression(rev, batch["rev_labels"], neg_mask, vocab_mask)
        )
    terms["loss"] = weighted_total(terms, weights)
    return terms
