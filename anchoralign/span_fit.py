"""Fit a span head (``anchoralign.span_head``) on a trained model's frozen encoder.

Why: on CoNLL04 the generative NER decoder of the recipe with the best relations trails a
span-based extractor on the same encoder by 2 F1, while the encoder it trained already holds what
a span classifier needs: a span head fitted over it, the encoder frozen, reports better entities
than the decoder that trained it (BENCHMARKS.md, "A span head over the trained encoder").

The encoder runs once over the training split (no gradient, no dropout) and its word states are
kept; the head then trains on every span of up to ``width`` words of each sentence, the gold
mentions against all the others (``span_head.span_loss``). Nothing else of the model changes.
The dev split then measures the entities before (the checkpoint's own: its span head's if it had
one, else the NER decoder's) and after. A relation head already in the checkpoint votes between
the entities reported, which have just changed, so its thresholds are chosen again on dev.

The head has its own copy of the encoder's top ``layers`` layers (two by default; 0: none, the
head reads the encoder's output), fine-tuned with it at ``layer_lr``: the encoder then runs once
up to the input of those layers, which is what is kept, and the copy runs on every batch. The
shared encoder is not touched, so the decoders and a relation head read what they were trained on.
Why: a frozen encoder trained for generation caps what a head over its output can find; letting
its top layers adapt to spans is what span-based extractors do with the whole encoder, at a
fraction of the cost (BENCHMARKS.md, "The span head's own top layers").
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from anchoralign.config import DecodeConfig
from anchoralign.fit_progress import NO_PROGRESS, FitProgress
from anchoralign.linearize import structure
from anchoralign.metrics import score
from anchoralign.model import AnchorAlignModel
from anchoralign.relation_fit import (
    choose_relation_thresholds,
    decoder_predictions,
    encoded_batches,
    layer_inputs,
    padded_layer_inputs,
)
from anchoralign.schema import DatasetMeta, Sample
from anchoralign.span_head import span_labels, span_loss, too_wide
from anchoralign.state_store import Keep, in_memory, state_keeper


@dataclass(frozen=True)
class SpanFitConfig:
    width: int = 8  # longest mention in words; 3 of CoNLL04 train's 3,377 mentions are wider
    pooled: bool = True  # the maximum over each span's sub-words too (span_head.SpanHead)
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 16  # sentences per optimiser step
    seed: int = 0
    # The encoder's top layers the head gets its own fine-tuned copy of, and their learning rate
    # (the head's is lr). Two on CoNLL04 with MiniLM: +0.49 test / +0.36 dev NER F1 and +0.22 /
    # +0.19 relation F1 over 6 seeds against none (BENCHMARKS.md, "The span head's own top layers").
    layers: int = 2
    layer_lr: float = 5e-5


@dataclass
class SpanFitReport:
    dev_before: float  # dev NER F1 of the checkpoint's own entities
    dev_after: float  # with the fitted span head's
    n_train: int  # training sentences fitted on
    n_too_long: int  # training sentences the encoder cannot take whole (left out)
    n_too_wide: int  # gold training mentions wider than the head's width (it cannot find them)
    relation_thresholds: tuple[float, float] | None = None  # chosen again for a relation head
    losses: list[float] = field(default_factory=list)  # mean loss per batch, per epoch


def dev_ner_f1(
    model: AnchorAlignModel, dev: Sequence[Sample], meta: DatasetMeta, decode_cfg: DecodeConfig
) -> tuple[float, list[Sample]]:
    """NER F1 of ``model``'s reported entities on ``dev`` and the predictions it scored (the
    relation head not asked: it does not change the entities)."""
    predicted = decoder_predictions(model, dev, decode_cfg)
    return float(score(dev, predicted, meta.symmetric_relations, meta.boundary_only)["ner_f1"]), predicted


def fit_span_head(
    model: AnchorAlignModel,
    train: Sequence[Sample],
    dev: Sequence[Sample],
    meta: DatasetMeta,
    cfg: SpanFitConfig = SpanFitConfig(),
    decode_cfg: DecodeConfig | None = None,
    log: Callable[[str], None] = lambda _: None,
    states_dir: str | Path | None = None,
    progress: FitProgress = NO_PROGRESS,
) -> SpanFitReport:
    """Give ``model`` a new span head trained on ``train`` (replacing any it had), measure the
    entities on ``dev`` before and after, and choose a relation head's thresholds again
    (``states_dir``: keep the training states in files there, ``anchoralign.state_store``;
    ``progress``: where the training saves each epoch and resumes from, ``anchoralign.fit_progress``)."""
    decode_cfg = decode_cfg or DecodeConfig()
    before, _ = dev_ner_f1(model, dev, meta, decode_cfg)
    losses, n_train, n_too_long, n_too_wide = train_span_head(model, train, cfg, log, states_dir, progress)
    head_cfg = decode_cfg.model_copy(update={"ner_source": "span_head"})
    after, predicted = dev_ner_f1(model, dev, meta, head_cfg)
    log(f"dev ner_f1: {before:.2f} before, {after:.2f} from the span head")
    thresholds = None
    if model.relation_head is not None:
        log("the relation head votes between the new entities: choosing its thresholds again")
        # The decode that measured the head is the one the vote needs, unless the flags ask for
        # the NER decoder's entities (then the vote's entities are not the head's).
        reuse = decode_cfg.ner_source != "decoder"
        choose_relation_thresholds(model, dev, meta, decode_cfg, log, predicted if reuse else None)
        thresholds = model.relation_thresholds
    return SpanFitReport(before, after, n_train, n_too_long, n_too_wide, thresholds, losses)


def train_span_head(
    model: AnchorAlignModel,
    train: Sequence[Sample],
    cfg: SpanFitConfig,
    log: Callable[[str], None],
    states_dir: str | Path | None = None,
    progress: FitProgress = NO_PROGRESS,
) -> tuple[list[float], int, int, int]:
    """Add a new span head of ``cfg.width`` (with its own ``cfg.layers`` top layers) to ``model``
    and train it on ``train`` over the frozen rest, its states kept in memory or in files under
    ``states_dir``, each epoch saved to ``progress`` and the epochs it holds not trained again; the
    mean loss of each epoch, the sentences trained on, those too long to encode and the gold
    mentions too wide for the head."""
    if cfg.width < 1:
        raise ValueError(f"span head width must be at least 1, got {cfg.width}")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model.requires_grad_(False)
    model.add_span_head(cfg.width, cfg.pooled, cfg.layers)
    head = model.span_head
    types = model.labels.entity_types

    keep = state_keeper(states_dir)
    if cfg.layers:
        # (input of the head's own layers [S, H], first sub-word of each word [W], mentions)
        inputs = layer_inputs(model, train, model.input_layer(model.span_layers), keep=keep)
        items = [(x[0], x[1], structure(s)[0]) for s, x in zip(train, inputs, strict=True) if x is not None]
    else:
        # (word states [W, H], word maxima [W, H] or None, mentions)
        inputs = frozen_span_inputs(model, train, keep=keep)
        items = [
            (x[0], x[1] if cfg.pooled else None, structure(s)[0])
            for s, x in zip(train, inputs, strict=True)
            if x is not None
        ]
    if not items:
        raise ValueError("no training sentence fits the encoder: nothing to fit a span head on")
    n_too_long = len(train) - len(items)
    n_too_wide = too_wide([spans for *_, spans in items], cfg.width)
    log(
        f"{len(items)} training sentences ({n_too_long} too long for the encoder); "
        f"{n_too_wide} gold mentions wider than {cfg.width} words"
    )

    groups = [{"params": list(head.parameters()), "lr": cfg.lr}]
    trained: list[torch.nn.Module] = [head]
    if model.span_layers is not None:
        groups.append({"params": list(model.span_layers.parameters()), "lr": cfg.layer_lr})
        trained.append(model.span_layers)
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    done, losses = progress.restore(trained, optimizer, log)
    for epoch in range(cfg.epochs):
        rng.shuffle(items)  # the epochs done before a resume are shuffled again: the order repeats
        if epoch < done:
            continue
        for module in trained:
            module.train()
        total, steps = 0.0, 0
        for begin in range(0, len(items), cfg.batch_size):
            batch = items[begin : begin + cfg.batch_size]
            if cfg.layers:
                features = layer_features(model, batch)
                n_words = [len(item[1]) for item in batch]
            else:
                words = pad_sequence([item[0] for item in batch], batch_first=True).to(model.device)
                maxima = (
                    pad_sequence([item[1] for item in batch], batch_first=True).to(model.device)
                    if cfg.pooled
                    else None
                )
                features = (words, maxima)
                n_words = [len(item[0]) for item in batch]
            labels = span_labels(
                [item[2] for item in batch], n_words, features[0].shape[1], cfg.width, types
            ).to(features[0].device)
            loss = span_loss(head(*features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        losses.append(total / steps)
        progress.save(epoch + 1, losses, trained, optimizer)
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {losses[-1]:.4f}")
    for module in trained:
        module.eval()
    return losses, len(items), n_too_long, n_too_wide


def frozen_span_inputs(
    model: AnchorAlignModel, samples: Sequence[Sample], batch_size: int = 32, keep: Keep = in_memory
) -> list[tuple[torch.Tensor, ...] | None]:
    """Each sample's inputs of a span head over the frozen encoder's output
    (``AnchorAlignModel.span_inputs``): its word states [words, H] and, for a pooled head, its word
    maxima [words, H] (float32, no gradient, kept by ``keep``); None for a sample longer than the
    encoder takes."""
    out: list[tuple[torch.Tensor, ...] | None] = [None] * len(samples)
    for chunk, state in encoded_batches(model, samples, batch_size):
        with torch.no_grad():
            features = model.span_inputs(state)
        for j, i in enumerate(chunk):
            out[i] = tuple(keep(f[j, : len(samples[i].tokens)]) for f in features)
    return out


def layer_features(
    model: AnchorAlignModel, batch: Sequence[tuple[torch.Tensor, torch.Tensor, object]]
) -> tuple[torch.Tensor, ...]:
    """The span head's inputs (``AnchorAlignModel.span_features``) for a batch of
    ``relation_fit.layer_inputs`` items, padded, through the head's own layers."""
    padded = padded_layer_inputs(model, [item[0] for item in batch], [item[1] for item in batch])
    return model.span_features(*padded)
