"""Pure pieces of a training stage: the learning-rate schedule, the phase plan of progressive
activation, and the per-epoch data order (length-bucketed on request) and its split over ranks.

Every function here is deterministic and has tests against hand-computed values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from anchoralign.config import PhasesConfig


def lr_at(
    step: int,
    total_steps: int,
    warmup_steps: int,
    peak_lr: float,
    schedule: str = "linear",
    min_ratio: float = 0.0,
) -> float:
    """Learning rate of optimizer update ``step`` (0-based).

    Linear warm-up reaching ``peak_lr`` at update ``warmup_steps - 1`` (so no update is wasted at
    lr 0), then ``constant``, ``linear`` or ``cosine`` decay from the peak towards
    ``peak_lr * min_ratio``, reached one update after the last (``total_steps``).
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        factor = 1.0 - progress
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return peak_lr * (min_ratio + (1.0 - min_ratio) * factor)


def warmup_steps_for(total_steps: int, ratio: float) -> int:
    return round(total_steps * ratio)


@dataclass(frozen=True)
class Phase:
    """One phase of a stage: ``epochs`` passes over ``train_sets[data]``."""

    name: str
    data: str
    epochs: int
    align: bool  # alignment and suppression terms on (cross-entropy is always on)


def epoch_plan(phases: Sequence[Phase]) -> list[int]:
    """The planned phase index of every epoch of the stage, e.g. epochs 2, 0, 1 -> [0, 0, 2]."""
    return [i for i, p in enumerate(phases) for _ in range(p.epochs)]


def gate_phase(phases: Sequence[Phase]) -> int | None:
    """Index of the cross-entropy phase that an alignment phase on the same data follows, if any."""
    for i in range(len(phases) - 1):
        a, b = phases[i], phases[i + 1]
        if not a.align and b.align and a.data == b.data and a.epochs > 0 and b.epochs > 0:
            return i
    return None


def gate_reason(cfg: PhasesConfig, valid_rate: float | None, stale_evals: int) -> str | None:
    """Why the gate phase ends now under ``cfg.switch``, or None while it goes on.

    ``valid_rate``: the last dev share of valid free-running outputs; ``stale_evals``: evaluations
    since the dev score last improved. With ``switch: epochs`` the gate never ends early.
    """
    if cfg.switch == "valid_rate" and valid_rate is not None and valid_rate >= cfg.valid_rate_threshold:
        return (
            f"dev valid free-running outputs {100 * valid_rate:.1f}% reached the threshold "
            f"{100 * cfg.valid_rate_threshold:.1f}%"
        )
    if cfg.switch == "plateau" and stale_evals >= cfg.patience:
        return f"dev score plateaued: no improvement in {stale_evals} evaluations (patience {cfg.patience})"
    return None


def steps_per_epoch(n_samples: int, global_batch: int) -> int:
    """Optimizer steps to see every sample once: the last step is topped up from the epoch's start."""
    return math.ceil(n_samples / global_batch)


def epoch_order(
    seed: int, epoch: int, n: int, lengths: Sequence[int] | None = None, bucket: int = 0, batch: int = 1
) -> list[int]:
    """The sample order of one epoch: a permutation fixed by (seed, epoch), the same on every rank.

    With ``bucket`` > 0 (a multiple of the global ``batch``) and ``lengths``, each window of
    ``bucket`` samples of the permutation is sorted by length and cut into batches, and the batches
    of the epoch are shuffled: every batch holds sentences of similar length, so little of it is
    padding, while the epoch still visits the samples in a random mix of lengths.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if not bucket or lengths is None:
        return order
    batches = []
    for start in range(0, n, bucket):
        window = sorted(order[start : start + bucket], key=lambda i: lengths[i])
        batches += [window[i : i + batch] for i in range(0, len(window), batch)]
    # Only the very last batch can be short; it stays last so that every global batch of
    # ``rank_micro_batches`` is one of these batches.
    short = [batches.pop()] if len(batches[-1]) < batch else []
    shuffled = [batches[b] for b in torch.randperm(len(batches), generator=g).tolist()]
    return [i for b in shuffled + short for i in b]


def rank_micro_batches(
    order: Sequence[int], step: int, micro: int, accum: int, world: int, rank: int
) -> list[list[int]]:
    """Sample indices of ``rank``'s micro-batches for optimizer step ``step`` of the epoch.

    Step ``k`` takes the global batch ``order[k*G:(k+1)*G]`` (G = micro x accum x world), wrapping
    around to the epoch's start when the order runs out; micro-batch ``j`` of rank ``r`` is its
    slice number ``j * world + r``, so every rank gets different samples.
    """
    g = micro * accum * world
    n = len(order)
    start = step * g
    flat = [order[(start + i) % n] for i in range(g)]
    return [flat[(j * world + rank) * micro : (j * world + rank + 1) * micro] for j in range(accum)]
