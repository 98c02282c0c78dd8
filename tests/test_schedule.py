"""Pure pieces of a stage against hand-computed values: the learning-rate schedule, the phase
plan, the per-epoch order (with length bucketing) and its split over ranks."""

from __future__ import annotations

import math

import pytest

from anchoralign.config import PhasesConfig
from anchoralign.schedule import (
    Phase,
    epoch_order,
    epoch_plan,
    gate_phase,
    gate_reason,
    lr_at,
    rank_micro_batches,
    steps_per_epoch,
    warmup_steps_for,
)


def test_lr_linear_schedule_by_hand() -> None:
    # 10 updates, 2 of warm-up, peak 1: 0.5, 1 (warm-up), then 1 - (k - 2) / 8.
    got = [lr_at(k, 10, 2, 1.0, "linear") for k in range(11)]
    want = [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]
    assert got == pytest.approx(want)


def test_lr_cosine_constant_and_floor_by_hand() -> None:
    assert lr_at(4, 10, 2, 2.0, "cosine") == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(6, 10, 2, 2.0, "cosine") == pytest.approx(1.0)
    assert lr_at(10, 10, 2, 2.0, "cosine") == pytest.approx(0.0)
    assert lr_at(6, 10, 2, 1.0, "linear", min_ratio=0.1) == pytest.approx(0.55)
    assert lr_at(10, 10, 2, 1.0, "linear", min_ratio=0.1) == pytest.approx(0.1)
    assert [lr_at(k, 10, 2, 3.0, "constant") for k in (0, 1, 5, 9)] == pytest.approx([1.5, 3.0, 3.0, 3.0])
    assert lr_at(0, 10, 0, 1.0, "linear") == pytest.approx(1.0)  # no warm-up: the first update at the peak
    with pytest.raises(ValueError):
        lr_at(5, 10, 2, 1.0, "step")
    assert warmup_steps_for(100, 0.06) == 6
    assert warmup_steps_for(10, 0.0) == 0


def test_epoch_plan_and_gate() -> None:
    phases = [Phase("a", "masked", 2, False), Phase("b", "plain", 0, False), Phase("c", "plain", 1, True)]
    assert epoch_plan(phases) == [0, 0, 2]
    assert gate_phase(phases) is None  # the CE phase before alignment has no epochs
    phases[1] = Phase("b", "plain", 3, False)
    assert epoch_plan(phases) == [0, 0, 1, 1, 1, 2]
    assert gate_phase(phases) == 1
    assert gate_phase([Phase("a", "x", 1, False), Phase("b", "y", 1, True)]) is None  # other data
    assert gate_phase([Phase("a", "x", 1, True), Phase("b", "x", 1, True)]) is None


def test_gate_reason_by_switch() -> None:
    epochs = PhasesConfig(epochs=[1, 2, 3])
    assert gate_reason(epochs, 1.0, 99) is None  # fixed epochs: never early
    valid = PhasesConfig(epochs=[1, 2, 3], switch="valid_rate", valid_rate_threshold=0.9)
    assert gate_reason(valid, 0.89, 99) is None and gate_reason(valid, None, 0) is None
    assert gate_reason(valid, 0.9, 0) == "dev valid free-running outputs 90.0% reached the threshold 90.0%"
    plateau = PhasesConfig(epochs=[1, 2, 3], switch="plateau", patience=2)
    assert gate_reason(plateau, 1.0, 1) is None
    assert (
        gate_reason(plateau, None, 2) == "dev score plateaued: no improvement in 2 evaluations (patience 2)"
    )


def test_epoch_order_is_a_seeded_permutation() -> None:
    a = epoch_order(seed=3, epoch=1, n=50)
    assert sorted(a) == list(range(50))
    assert a == epoch_order(seed=3, epoch=1, n=50)
    assert a != epoch_order(seed=3, epoch=2, n=50)
    assert a != epoch_order(seed=4, epoch=1, n=50)


def test_bucketed_order_makes_batches_of_similar_length() -> None:
    lengths = [(7 * i) % 23 + 1 for i in range(42)]  # 42 samples, batches of 4, windows of 12
    order = epoch_order(seed=1, epoch=0, n=42, lengths=lengths, bucket=12, batch=4)
    assert sorted(order) == list(range(42))
    assert order == epoch_order(seed=1, epoch=0, n=42, lengths=lengths, bucket=12, batch=4)
    plain = epoch_order(seed=1, epoch=0, n=42)
    batches = [order[i : i + 4] for i in range(0, 42, 4)]
    # Every batch is a length-sorted slice of one window of the plain permutation ...
    windows = [set(plain[i : i + 12]) for i in range(0, 42, 12)]
    for b in batches:
        assert any(set(b) <= w for w in windows)
        assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)
    # ... the only short batch (42 = 10 x 4 + 2) is the last one, so global batches stay aligned ...
    assert [len(b) for b in batches] == [4] * 10 + [2]

    # ... and batches hold less spread of length than the plain order's.
    def spread(bs: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in bs)

    assert spread(batches) < spread([plain[i : i + 4] for i in range(0, 42, 4)])


def test_rank_micro_batches_by_hand() -> None:
    order = list(range(10))
    # G = 2 x 2 x 2 = 8: step 0 takes 0..7, micro-batch j of rank r is slice j * 2 + r.
    assert rank_micro_batches(order, 0, micro=2, accum=2, world=2, rank=0) == [[0, 1], [4, 5]]
    assert rank_micro_batches(order, 0, micro=2, accum=2, world=2, rank=1) == [[2, 3], [6, 7]]
    # Step 1 runs out after 8, 9 and is topped up from the start of the epoch.
    assert rank_micro_batches(order, 1, micro=2, accum=2, world=2, rank=0) == [[8, 9], [2, 3]]
    assert steps_per_epoch(10, 8) == 2
    seen = {
        i for s in range(2) for r in range(2) for mb in rank_micro_batches(order, s, 2, 2, 2, r) for i in mb
    }
    assert seen == set(order)
