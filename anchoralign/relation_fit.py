"""Fit a relation head (``anchoralign.relation_head``) on a trained model's frozen encoder.

The encoder runs once over the training split (no gradient, no dropout) and its word states are
kept; the head then trains on every ordered pair of each sentence's gold entities, with one
binary target per relation type. Nothing else of the model changes, so a fit takes minutes on a
CPU where a training run takes hours. The dev split then chooses the two thresholds of the vote:
the decoders decode dev once, the head scores every pair of their reported entities, and the
pair of thresholds with the best dev score (the dataset's headline relation F1) is stored with
the head. ``choose_relation_thresholds`` alone chooses them again for a model that has a head
(after a change of decoding flags, say). Sentences longer than the encoder takes are left out of the fit and keep the decoders'
relations when the thresholds are chosen; the report counts them.

With ``layers`` the head gets its own copy of the encoder's top layers, fine-tuned with it at
``layer_lr``, as the span head does (``span_fit``): the encoder then runs once up to the input of
those layers, which is what is kept, and the copy runs on every batch. The shared encoder is not
touched, so the decoders and the span head read what they were trained on.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from anchoralign.config import DecodeConfig
from anchoralign.decode import predict_long, relation_scores, voted
from anchoralign.fit_progress import NO_PROGRESS, FitProgress
from anchoralign.linearize import Triple, structure
from anchoralign.metrics import score
from anchoralign.model import AnchorAlignModel, EncoderState
from anchoralign.relation_head import (
    choose_thresholds,
    entity_pairs,
    pair_inputs,
    pair_loss,
    pair_targets,
    typed_spans,
)
from anchoralign.schema import DatasetMeta, Sample
from anchoralign.state_store import Keep, in_memory, state_keeper


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 20
    lr: float = 5e-4
    weight_decay: float = 0.01
    batch_size: int = 16  # sentences per optimiser step
    seed: int = 0
    heads: int = 1  # trained side by side, their probabilities averaged
    # The encoder's top layers the heads get their own fine-tuned copy of (0: they read the frozen
    # encoder's output), and the copy's learning rate (the heads' is lr).
    layers: int = 0
    layer_lr: float = 5e-5


@dataclass
class FitReport:
    keep: float
    add: float
    dev_before: float  # the dev headline relation F1 of the decoders alone
    dev_after: float  # with the head's vote at the chosen thresholds
    metric: str
    n_train: int  # training sentences with at least one pair of entities (0: thresholds only)
    n_too_long: int  # training and dev sentences the encoder cannot take whole
    losses: list[float] = field(default_factory=list)  # mean loss per sentence and head, per epoch


def each_relation_state(
    model: AnchorAlignModel, samples: Sequence[Sample], batch_size: int = 32
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """What the relation head reads of each sample the encoder takes whole
    (``AnchorAlignModel.relation_inputs``), batch by batch as encoded: its index, its word states
    [words, H] and its start state [H] (no gradient)."""
    for chunk, state in encoded_batches(model, samples, batch_size):
        with torch.no_grad():
            words, starts = model.relation_inputs(state)
        for j, i in enumerate(chunk):
            yield i, words[j, : len(samples[i].tokens)], starts[j]


def relation_states(
    model: AnchorAlignModel, samples: Sequence[Sample], batch_size: int = 32, keep: Keep = in_memory
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Each sample's ``each_relation_state`` (float32, kept by ``keep``); None for a sample longer
    than the encoder takes."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(samples)
    for i, words, starts in each_relation_state(model, samples, batch_size):
        out[i] = (keep(words), keep(starts))
    return out


def layer_inputs(
    model: AnchorAlignModel,
    samples: Sequence[Sample],
    layer: int,
    batch_size: int = 32,
    keep: Keep = in_memory,
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Each sample's input to encoder layer ``layer`` [sub-words, H] (float32, no gradient, kept by
    ``keep``; one of the model's ``head_input_layers``) and the first sub-word of each of its words
    [words]; None for a sample longer than the encoder takes."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(samples)
    for chunk, state in encoded_batches(model, samples, batch_size):
        for j, i in enumerate(chunk):
            length = int(state.mask[j].sum())
            out[i] = (
                keep(state.layer_inputs[layer][j, :length]),
                state.word_starts[j, : len(samples[i].tokens)],
            )
    return out


def padded_layer_inputs(
    model: AnchorAlignModel, hidden: Sequence[torch.Tensor], word_starts: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of ``layer_inputs`` items padded, on the model's device and in its dtype: the states
    [N,S,H], their attention mask [N,S] and the word starts [N,W]."""
    states = pad_sequence(list(hidden), batch_first=True)
    mask = pad_sequence([torch.ones(len(h), dtype=torch.long) for h in hidden], batch_first=True)
    # Padding words point at sub-word 0, the start token: word_maxima treats them as no word.
    starts = pad_sequence(list(word_starts), batch_first=True)
    dtype = model.backbone.embed_tokens.weight.dtype
    return states.to(model.device, dtype), mask.to(model.device), starts.to(model.device)


def encoded_batches(
    model: AnchorAlignModel, samples: Sequence[Sample], batch_size: int = 32
) -> Iterator[tuple[list[int], EncoderState]]:
    """The encoding (eval mode, no gradient) of every sample the encoder takes whole, in batches of
    similar length: each batch's indices into ``samples`` and its state."""
    collate = model.collator()
    fits = [collate.pieces.input_length(s.tokens) <= collate.max_length for s in samples]
    order = sorted((i for i in range(len(samples)) if fits[i]), key=lambda i: len(samples[i].tokens))
    model.eval()
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        inputs = [Sample(id=samples[i].id, tokens=samples[i].tokens) for i in chunk]
        batch = {k: t.to(model.device) for k, t in collate.inputs(inputs).items()}
        with torch.no_grad():
            state = model.encode(batch)
        yield chunk, state


def decoder_predictions(
    model: AnchorAlignModel, gold: Sequence[Sample], decode_cfg: DecodeConfig | None = None
) -> list[Sample]:
    """The model's predictions of ``gold``'s inputs without its relation head's vote."""
    base = (decode_cfg or DecodeConfig()).model_copy(update={"relation_head": "off"})
    inputs = [Sample(id=s.id, tokens=s.tokens) for s in gold]
    return [p.sample for p in predict_long(model, inputs, base)[0]]


def scored_predictions(
    model: AnchorAlignModel,
    gold: Sequence[Sample],
    decode_cfg: DecodeConfig | None = None,
    predicted: Sequence[Sample] | None = None,
) -> tuple[list[Sample], list[dict[Triple, float]], int]:
    """The decoders' predictions of ``gold``'s inputs (``decoder_predictions``; ``predicted`` when
    the caller already has them), the head's score of every relation between two of each
    prediction's entities (none for a sentence too long to encode whole) and the number of those
    sentences."""
    predicted = list(predicted) if predicted is not None else decoder_predictions(model, gold, decode_cfg)
    scored: list[dict[Triple, float]] = [{} for _ in predicted]
    encoded = 0
    # Scored as encoded: a large dev set's states are never all held at once.
    for i, words, starts in each_relation_state(model, predicted):
        with torch.no_grad():
            scored[i] = relation_scores(model, words.float(), starts.float(), predicted[i])
        encoded += 1
    return predicted, scored, len(predicted) - encoded


def headline(gold: Sequence[Sample], predicted: Sequence[Sample], meta: DatasetMeta) -> tuple[str, float]:
    """The dataset's headline figure of ``predicted`` against ``gold`` (``metrics.score``'s primary)."""
    result = score(gold, predicted, meta.symmetric_relations, meta.boundary_only)
    return str(result["primary"]), float(result[str(result["primary"])])


def fit_relation_head(
    model: AnchorAlignModel,
    train: Sequence[Sample],
    dev: Sequence[Sample],
    meta: DatasetMeta,
    cfg: FitConfig = FitConfig(),
    decode_cfg: DecodeConfig | None = None,
    log: Callable[[str], None] = lambda _: None,
    states_dir: str | Path | None = None,
    progress: FitProgress = NO_PROGRESS,
) -> FitReport:
    """Add a relation head to ``model``, train it on ``train`` and choose its thresholds on ``dev``
    (``states_dir``: keep the training states in files there, ``anchoralign.state_store``;
    ``progress``: where the training saves each epoch and resumes from, ``anchoralign.fit_progress``)."""
    losses, n_train, n_too_long = train_relation_head(model, train, cfg, log, states_dir, progress)
    report = choose_relation_thresholds(model, dev, meta, decode_cfg, log)
    return dataclasses.replace(
        report, n_train=n_train, n_too_long=report.n_too_long + n_too_long, losses=losses
    )


def train_relation_head(
    model: AnchorAlignModel,
    train: Sequence[Sample],
    cfg: FitConfig,
    log: Callable[[str], None],
    states_dir: str | Path | None = None,
    progress: FitProgress = NO_PROGRESS,
) -> tuple[list[float], int, int]:
    """Add ``cfg.heads`` new relation heads (with their own ``cfg.layers`` top layers) to ``model``
    and train them on ``train`` over the frozen rest, its states kept in memory or in files under
    ``states_dir``, each epoch saved to ``progress`` and the epochs it holds not trained again; the
    mean loss of each epoch, the sentences trained on and those too long to encode."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model.requires_grad_(False)
    model.add_relation_head(cfg.heads, cfg.layers)
    heads, own = model.relation_head, model.relation_layers
    labels = model.labels

    # (word states [W, H] and start state [H]; with own layers: their input [S, H] and word starts [W])
    keep = state_keeper(states_dir)
    states = (
        layer_inputs(model, train, model.input_layer(own), keep=keep)
        if own is not None
        else relation_states(model, train, keep=keep)
    )
    items = []
    for sample, state in zip(train, states, strict=True):
        spans, triples = structure(sample)
        pairs = entity_pairs(spans)
        if state is None or not pairs:
            continue
        typed = typed_spans(spans, labels.entity_types)
        items.append(
            (state[0], state[1], typed, pairs, pair_targets(spans, pairs, triples, labels.relation_types))
        )
    if not items:
        raise ValueError("no training sentence has two entities: nothing to fit a relation head on")
    n_too_long = sum(s is None for s in states)
    log(f"{len(items)} training sentences with entity pairs ({n_too_long} too long for the encoder)")

    # The heads' parameters are disjoint, so one optimiser over the summed loss trains each on its
    # own; their shared copy of the top layers, if any, learns from all of them.
    groups = [{"params": list(heads.parameters()), "lr": cfg.lr}]
    trained: list[torch.nn.Module] = [heads]
    if own is not None:
        groups.append({"params": list(own.parameters()), "lr": cfg.layer_lr})
        trained.append(own)
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    done, losses = progress.restore(trained, optimizer, log)
    for epoch in range(cfg.epochs):
        rng.shuffle(items)  # the epochs done before a resume are shuffled again: the order repeats
        if epoch < done:
            continue
        for module in trained:
            module.train()
        total = 0.0
        for begin in range(0, len(items), cfg.batch_size):
            batch = items[begin : begin + cfg.batch_size]
            if own is not None:
                padded = padded_layer_inputs(model, [item[0] for item in batch], [item[1] for item in batch])
                words, starts = model.relation_features(*padded)
            else:
                words = pad_sequence([item[0] for item in batch], batch_first=True).to(model.device)
                starts = torch.stack([item[1] for item in batch]).to(model.device)
            entities, pairs = pair_inputs([(item[2], item[3]) for item in batch], words.device)
            targets = torch.cat([item[4] for item in batch]).to(words.device)
            logits = heads.logits(words, starts, entities, pairs)
            loss = pair_loss(logits, targets.expand_as(logits)) / len(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch) / cfg.heads
        losses.append(total / len(items))
        progress.save(epoch + 1, losses, trained, optimizer)
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {losses[-1]:.4f}")
    for module in trained:
        module.eval()
    return losses, len(items), n_too_long


def choose_relation_thresholds(
    model: AnchorAlignModel,
    dev: Sequence[Sample],
    meta: DatasetMeta,
    decode_cfg: DecodeConfig | None = None,
    log: Callable[[str], None] = lambda _: None,
    predicted: Sequence[Sample] | None = None,
) -> FitReport:
    """Choose the vote's thresholds of ``model``'s relation head on ``dev`` (``choose_thresholds``
    over the dataset's headline relation F1) and set them; the report's training fields are empty.
    ``predicted``: the model's ``decoder_predictions`` of ``dev`` under ``decode_cfg``, when the
    caller has decoded them already (a dev decode is the costly part on a large dev set)."""
    if model.relation_head is None:
        raise ValueError("the model has no relation head to choose thresholds for")
    predicted, scored, n_too_long = scored_predictions(model, dev, decode_cfg, predicted)

    def f1_of(keep: float, add: float) -> float:
        return headline(
            dev, [voted(s, sc, keep, add) for s, sc in zip(predicted, scored, strict=True)], meta
        )[1]

    metric, before = headline(dev, predicted, meta)
    keep, add, after = choose_thresholds(f1_of)
    model.relation_thresholds = (keep, add)
    log(
        f"dev {metric}: {before:.2f} from the decoders, {after:.2f} with the head (keep > {keep}, add > {add})"
    )
    return FitReport(keep, add, before, after, metric, 0, n_too_long)
