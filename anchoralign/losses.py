"""Training losses: pure functions on restricted-vocabulary logits.

Every decoder scores, at each target position, the restricted vocabulary of its sentence
(structure symbols, label tokens, one pointer per input word; see docs/CONTRACTS.md). Logits are
``[B, T, V]`` with ``vocab_mask [B, V]`` saying which ids exist for each sentence; ids outside the
mask get zero probability here whatever the model put in their logits, and every softmax is
taken in float32 so that bf16/fp16 training gets the same numbers.

Terms (weighted by :func:`term_weights`, the one place that says which are on, and summed by
:func:`loss_terms`):

- cross-entropy of each decoder (NER, forward RE, reverse RE) on its target, optionally label-smoothed;
- NER-RE alignment: KL(p_NER || p_RE) on the target positions where an RE decoder emits a token of
  an anchor entity that the NER decoder also emits, with the NER decoder as a fixed teacher;
- forward-reverse alignment: symmetric KL between the two RE decoders on the positions of the
  gold triples both emit;
- both alignment terms optionally on distributions softened by a temperature (``align_temperature``);
- negative suppression: ``-log(1 - p(v))`` over the ids that occur in none of the sentence's gold
  targets, at every RE decoding step;
- with a span head (``anchoralign.span_head``), the cross-entropy of its span classes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from anchoralign.config import LossConfig
from anchoralign.linearize import IGNORE
from anchoralign.span_head import span_loss

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


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, vocab_mask: torch.Tensor, smoothing: float = 0.0
) -> torch.Tensor:
    """Mean token cross-entropy over the positions whose label is not -100 (0 when there are none).

    logits [B,T,V], labels [B,T], vocab_mask [B,V]. Every label must be a valid id of its sentence.
    With ``smoothing`` = e the target of each position is (1 - e) on the label plus e spread
    evenly over the sentence's valid ids (label smoothing; ids outside the mask get none, so the
    smoothed mass stays on outputs the decoder could write).
    """
    log_p = masked_log_probs(logits, vocab_mask[:, None, :])
    labelled = labels != IGNORE
    total = F.nll_loss(log_p.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    if smoothing > 0:
        valid = vocab_mask[:, None, :].expand_as(log_p)
        # -mean over the valid ids of log p, per position; masked ids contribute 0, not -inf * 0.
        uniform = -(log_p.masked_fill(~valid, 0.0).sum(-1) / valid.sum(-1).clamp(min=1))
        total = (1 - smoothing) * total + smoothing * uniform[labelled].sum()
    return total / labelled.sum().clamp(min=1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim, counting only valid ids (masked ids have p = q = 0)."""
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(valid, terms, torch.zeros_like(terms)).sum(-1)


def _paired(
    first: torch.Tensor,
    second: torch.Tensor,
    pairs: torch.Tensor,
    vocab_mask: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities [P,V] of both decoders at the paired positions, softened by
    ``temperature``, and their valid ids [P,V]."""
    b, t1, t2 = pairs.long().unbind(-1)
    valid = vocab_mask[b]
    soft = [logits.float() / temperature for logits in (first[b, t1], second[b, t2])]
    return masked_log_probs(soft[0], valid), masked_log_probs(soft[1], valid), valid


def teacher_right(
    ner_logits: torch.Tensor, pairs: torch.Tensor, vocab_mask: torch.Tensor, ner_labels: torch.Tensor
) -> torch.Tensor:
    """[P] bool: at each pair's NER position, whether the teacher's top valid id is the gold one
    (``ner_labels`` [B,T], the NER target): the pairs ``teacher_gate`` keeps."""
    b, t, _ = pairs.long().unbind(-1)
    teacher_top = ner_logits[b, t].float().masked_fill(~vocab_mask[b], _MASKED).argmax(-1)
    return teacher_top == ner_labels[b, t]


def ner_re_alignment(
    ner_logits: torch.Tensor,
    re_logits: torch.Tensor,
    pairs: torch.Tensor,
    vocab_mask: torch.Tensor,
    ner_labels: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean KL(p_NER || p_RE) over the paired positions; 0 without pairs.

    pairs [P,3] = (batch index, position in the NER target, position in the RE target). The NER
    distribution is detached: it is the teacher. Entity recognition is the easier, better-learned
    task, and the term exists to carry that knowledge into the RE decoders; with gradient through
    both sides the KL could also be lowered by dragging the NER decoder towards the noisier RE
    decoders, which would cost NER accuracy for nothing.

    With ``ner_labels`` [B,T] (the NER target), only the pairs whose teacher puts its highest
    probability on the gold id are kept: a teacher that is wrong there has nothing to teach.

    ``temperature`` T > 1 compares both distributions softened (logits / T) and scales the mean by
    T^2, as distillation does, so that the gradient keeps its size as T grows. Why: a decoder
    converged on its training set is one-hot there (CoNLL04, the NER teacher at stage 2's start:
    top probability 0.9998 on average at the aligned positions), and KL to a one-hot teacher is
    just the student's cross-entropy on the same gold token, which it already has.
    """
    if ner_labels is not None and pairs.numel():
        pairs = pairs[teacher_right(ner_logits, pairs, vocab_mask, ner_labels)]
    if pairs.numel() == 0:
        return _zero(re_logits)
    log_p, log_q, valid = _paired(ner_logits.detach(), re_logits, pairs, vocab_mask, temperature)
    return temperature**2 * _kl(log_p, log_q, valid).mean()


def fwd_rev_alignment(
    fwd_logits: torch.Tensor,
    rev_logits: torch.Tensor,
    pairs: torch.Tensor,
    vocab_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean symmetric KL 0.5 * (KL(p||q) + KL(q||p)) over paired positions; 0 without pairs.

    pairs [P,3] = (batch index, position in the forward target, position in the reverse target).
    Neither decoder is the better one, so both receive gradient. ``temperature`` as in
    :func:`ner_re_alignment`.
    """
    if pairs.numel() == 0:
        return _zero(fwd_logits)
    log_p, log_q, valid = _paired(fwd_logits, rev_logits, pairs, vocab_mask, temperature)
    return temperature**2 * (0.5 * (_kl(log_p, log_q, valid) + _kl(log_q, log_p, valid))).mean()


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


CE_TERMS = ("ce_ner", "ce_fwd", "ce_rev")
ALIGN_TERMS = ("kl_ner_re", "kl_fwd_rev", "suppress")
LOSS_KEYS = (*CE_TERMS, *ALIGN_TERMS, "span", "relation", "loss")


def term_weights(
    cfg: LossConfig, align: bool, ramp: float = 1.0, spans: bool = False, relations: bool = False
) -> dict[str, float]:
    """The weight of every active term of a phase; a term that is not a key is off (not computed).

    The one place that decides whether a term is on: cross-entropy always; an alignment term when
    the phase aligns (``align``), ``cfg.alignment`` and its own switch are on and its weight is
    positive, scaled by ``ramp`` (see :func:`ramp_factor`); the span head's term in every phase
    when the model has one (``spans``) and ``cfg.span`` is positive; the relation heads' likewise
    (``relations``, ``cfg.relation``).
    """
    weights = dict.fromkeys(CE_TERMS, 1.0)
    if spans and cfg.span > 0:
        weights["span"] = cfg.span
    if relations and cfg.relation > 0:
        weights["relation"] = cfg.relation
    if align and cfg.alignment:
        for key, on, weight in (
            ("kl_ner_re", cfg.ner_re, cfg.alpha),
            ("kl_fwd_rev", cfg.fwd_rev, cfg.beta),
            ("suppress", cfg.suppress, cfg.gamma),
        ):
            if on and weight > 0:
                weights[key] = weight * ramp
    return weights


def ramp_factor(steps_since_switch: int, ramp_steps: int) -> float:
    """Share of their weight the alignment terms have at the ``steps_since_switch``-th update after
    they were switched on (0-based): (n + 1) / ramp_steps, at most 1; always 1 without a ramp.

    Arriving at full strength in one step hits an optimizer whose moment estimates were fitted to
    the cross-entropy gradients alone; growing the terms in lets those estimates follow.
    """
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (max(0, steps_since_switch) + 1) / ramp_steps)


def weighted_total(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """The training objective: the sum of ``weights[k] * terms[k]`` over the active terms."""
    total = _zero(next(iter(terms.values())))
    for key, weight in weights.items():
        total = total + weight * terms[key]
    return total


def loss_terms(
    outputs: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    teacher_logits: torch.Tensor | None = None,
    teacher_gate: bool = False,
    label_smoothing: float = 0.0,
    align_temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Every term (unweighted; 0 for the inactive ones) and the weighted total ``loss``, as float32
    scalar tensors.

    outputs: ``ner_logits``, ``fwd_logits``, ``rev_logits`` [B,T,V] (and ``span_logits`` with a
    span head); batch: ``vocab_mask``, ``neg_mask``, ``{ner,fwd,rev}_labels``, ``ner_fwd_pairs``,
    ``ner_rev_pairs``, ``fwd_rev_pairs`` (and ``span_labels``) as built by the collator;
    ``weights`` from :func:`term_weights`.
    ``teacher_logits``: the NER decoder's logits to align the RE decoders to (default: the NER
    logits of ``outputs``; the trainer passes a pass without dropout); with ``teacher_gate`` only
    the positions where the teacher's top id is the gold NER id are aligned; ``label_smoothing``
    smooths the three cross-entropies (:func:`cross_entropy`); ``align_temperature`` softens both
    alignment terms (:func:`ner_re_alignment`). The NER-RE and
    suppression terms average the forward and reverse decoders.
    """
    ner, fwd, rev = outputs["ner_logits"], outputs["fwd_logits"], outputs["rev_logits"]
    vocab_mask = batch["vocab_mask"]
    terms = {key: _zero(ner) for key in LOSS_KEYS}
    for name, logits in (("ner", ner), ("fwd", fwd), ("rev", rev)):
        if f"ce_{name}" in weights:
            terms[f"ce_{name}"] = cross_entropy(logits, batch[f"{name}_labels"], vocab_mask, label_smoothing)
    if "kl_ner_re" in weights:
        teacher = ner if teacher_logits is None else teacher_logits
        gold = batch["ner_labels"] if teacher_gate else None
        terms["kl_ner_re"] = 0.5 * (
            ner_re_alignment(teacher, fwd, batch["ner_fwd_pairs"], vocab_mask, gold, align_temperature)
            + ner_re_alignment(teacher, rev, batch["ner_rev_pairs"], vocab_mask, gold, align_temperature)
        )
    if "kl_fwd_rev" in weights:
        terms["kl_fwd_rev"] = fwd_rev_alignment(
            fwd, rev, batch["fwd_rev_pairs"], vocab_mask, align_temperature
        )
    if "suppress" in weights:
        neg_mask = batch["neg_mask"]
        terms["suppress"] = 0.5 * (
            negative_suppression(fwd, batch["fwd_labels"], neg_mask, vocab_mask)
            + negative_suppression(rev, batch["rev_labels"], neg_mask, vocab_mask)
        )
    if "span" in weights:
        terms["span"] = span_loss(outputs["span_logits"], batch["span_labels"])
    if "relation" in weights:
        terms["relation"] = relation_loss(outputs["relation_logits"], batch["pair_targets"])
    terms["loss"] = weighted_total(terms, weights)
    return terms


def relation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The relation heads' term: binary cross-entropy averaged over heads, pairs and relation types
    (``logits`` [heads, P, relations], ``targets`` [P, relations]); a mean, not the fit's per-sentence
    sum, so that it starts near log 2 beside the cross-entropies under one gradient clip. 0 without pairs."""
    if targets.numel() == 0:
        return _zero(logits)
    return F.binary_cross_entropy_with_logits(logits.float(), targets.expand_as(logits).float())


def describe_terms(weights: Mapping[str, float]) -> str:
    """``ce, span x1, kl_ner_re x1, suppress x0.1``: the active terms of a phase and their weights."""
    terms = ["ce"] + [f"{k} x{w:g}" for k, w in weights.items() if k not in CE_TERMS]
    return ", ".join(terms)
